"""Benchmark the selection policies on a realistic global superbatch; prints ONE JSON line.

The default superbatch mimics DataConcept at the published scale: vocabulary 19,261; 4 ranks x
5,120 samples, keep 4 x 1,024 (filter ratio 0.8); 3% of samples without concepts, the others with
Poisson(5) instances, each instance repeating an earlier concept of its sample with probability
0.3, else drawn from a Zipf(1.1) popularity over the vocabulary mapped through a seeded random
permutation of ids (the top concept then appears in about 45% of samples).

Timings are medians of whole global selections (validation, policy, fill, statistics) in this
process, after a warm-up that also compiles the numba kernels. Run it with one thread, e.g.
``NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 cabs-bench-selection`` (or
``python tools/bench_selection.py``); the kernels are single-threaded either way.

Besides IID, CABS-FM, CABS-DM and its ``official_compat`` form, the default run times the newer
policies on the same superbatch, each against the 5 ms budget of a global selection at this
scale (``budget_ms``, ``within_budget``):

- ``mixed``: ``mixed`` at ``lambda = 1``;
- ``dm_alpha``: ``diversity`` with targets ``N_c ** 0.5``;
- ``balanced``: MetaCLIP balancing with ``threshold`` the median of the dataset-wide counts
  (``balanced_threshold``): half the concepts are never held back and the head is thinned,
  so the draw really balances; MetaCLIP's own 20,000 would be below every count here (the
  rarest concept has about 900 samples in 100M) and draw nearly like IID;
- ``dm_filtered``: CABS-DM on the half of the superbatch with the highest value of a synthetic
  column ``quality`` (``default_rng([seed, QUALITY_STREAM]).random(N)``, a stand-in for a CLIP
  score), a ``Filtered`` wrapper with ``Filter("quality", top=0.5)``;
- ``schedule_dm`` and ``schedule_fm``: a two-phase ``Schedule`` (CABS-DM until step
  ``SCHEDULE_SWITCH``, then CABS-FM), timed at steps in each phase (the DM phase is the one
  that matters for the budget; the FM phase shows the schedule's own overhead is small).

Dataset-wide counts ``N_c`` (what ``dm_alpha`` and ``balanced`` bind to): for the generated
superbatch, the *expected* number of samples containing each concept in a nominal dataset of
``NOMINAL_DATASET`` (100M) samples drawn by the same generator (:func:`expected_counts`: the
Zipf popularity through the same seeded permutation, independent of the superbatch drawn); for
a ``--superbatch`` file, the superbatch's document frequencies scaled to 100M samples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from cabs_streaming.selection import (
    DatasetFacts,
    Filter,
    Filtered,
    Schedule,
    SelectionPolicy,
    get_policy,
    select,
)

VOCABULARY = 19_261
WORLD = 4
PER_RANK = 5_120
KEEP = 1_024
EMPTY_SHARE = 0.03
MEAN_INSTANCES = 5.0
REPEAT_PROBABILITY = 0.3
ZIPF_EXPONENT = 1.1

#: Benchmark name -> (registered policy, options).
POLICIES: dict[str, tuple[str, dict]] = {
    "iid": ("iid", {}),
    "fm": ("frequency", {}),
    "dm": ("diversity", {}),
    "dm_compat": ("diversity", {"official_compat": True}),
}
#: The newer policies of the default run (module docstring), in output order.
NEW_POLICIES = ("mixed", "dm_alpha", "balanced", "dm_filtered", "schedule_dm", "schedule_fm")
#: The newer policies added to ``--sweep`` (cheap to build for any superbatch).
SWEEP_NEW_POLICIES = ("mixed", "balanced")
#: What one global selection of 4 x 5,120 may cost (milliseconds) to hide behind a step.
BUDGET_MS = 5.0
#: Samples of the nominal dataset whose expected concept counts stand in for ``N_c``.
NOMINAL_DATASET = 100_000_000
#: ``dm_alpha``'s exponent: targets in proportion to ``N_c ** DM_ALPHA``.
DM_ALPHA = 0.5
#: ``mixed``'s lambda.
MIXED_LAMBDA = 1.0
#: Seed stream of the synthetic ``quality`` column (``default_rng([seed, QUALITY_STREAM])``).
QUALITY_STREAM = 0x9A
#: The step at which the benchmark's schedule switches from CABS-DM to CABS-FM.
SCHEDULE_SWITCH = 1_000


def make_superbatch(
    seed: int = 0,
    vocabulary: int = VOCABULARY,
    world: int = WORLD,
    per_rank: int = PER_RANK,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate the realistic ragged superbatch described in the module docstring (vectorised)."""
    rng = np.random.default_rng(seed)
    size = world * per_rank
    popularity = 1.0 / np.arange(1, vocabulary + 1, dtype=np.float64) ** ZIPF_EXPONENT
    popularity /= popularity.sum()
    permutation = rng.permutation(vocabulary).astype(np.int32)

    lengths = rng.poisson(MEAN_INSTANCES, size=size)
    lengths[rng.random(size) < EMPTY_SHARE] = 0
    offsets = np.zeros(size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    nnz = int(offsets[-1])

    fresh = permutation[rng.choice(vocabulary, size=nnz, p=popularity)]
    position = np.arange(nnz) - np.repeat(offsets[:-1], lengths)  # index within the sample
    repeat = (rng.random(nnz) < REPEAT_PROBABILITY) & (position > 0)
    # A repeat copies a uniformly chosen earlier instance of the same sample; resolving the
    # chain in order keeps "earlier" meaning the final (already resolved) concept.
    source = np.repeat(offsets[:-1], lengths) + (rng.random(nnz) * np.maximum(position, 1)).astype(
        np.int64
    )
    ids = fresh.copy()
    for e in np.flatnonzero(repeat):
        ids[e] = ids[source[e]]
    return offsets, ids


def expected_counts(
    seed: int = 0, vocabulary: int = VOCABULARY, samples: int = NOMINAL_DATASET
) -> np.ndarray:
    """Expected samples containing each concept id in ``samples`` samples of the generator.

    A sample with concepts draws about ``1 + (MEAN_INSTANCES - 1) * (1 - REPEAT_PROBABILITY)``
    fresh instances (repeats add no new concept), so it contains concept ``c`` with probability
    ``1 - (1 - p_c) ** fresh`` for Zipf popularity ``p_c``; the ids go through the same
    permutation as :func:`make_superbatch` (the first draw of ``default_rng(seed)``). An
    approximation (the Poisson spread of lengths is ignored), deterministic and positive for
    every concept: the dataset-wide ``N_c`` a trainer would read from ``concept_counts.json``.
    """
    popularity = 1.0 / np.arange(1, vocabulary + 1, dtype=np.float64) ** ZIPF_EXPONENT
    popularity /= popularity.sum()
    permutation = np.random.default_rng(seed).permutation(vocabulary)
    fresh = 1.0 + (MEAN_INSTANCES - 1.0) * (1.0 - REPEAT_PROBABILITY)
    share = (1.0 - EMPTY_SHARE) * (1.0 - (1.0 - popularity) ** fresh)
    counts = np.zeros(vocabulary, dtype=np.float64)
    counts[permutation] = np.round(samples * share)
    return counts


def scaled_counts(
    offsets: np.ndarray, ids: np.ndarray, samples: int = NOMINAL_DATASET
) -> np.ndarray:
    """A ``--superbatch`` file's stand-in for ``N_c``: document frequency scaled to ``samples``."""
    size = offsets.shape[0] - 1
    vocabulary = int(ids.max()) + 1 if ids.size else 1
    owner = np.repeat(np.arange(size, dtype=np.int64), np.diff(offsets))
    pairs = np.unique(owner * vocabulary + ids.astype(np.int64))
    doc_freq = np.bincount(pairs % vocabulary, minlength=vocabulary).astype(np.float64)
    return np.round(doc_freq * samples / size)


def quality_column(seed: int, size: int) -> np.ndarray:
    """The synthetic numeric column ``dm_filtered`` filters on: uniform, seeded, float64 ``[N]``."""
    return np.random.default_rng([seed, QUALITY_STREAM]).random(size)


def balanced_threshold(counts: np.ndarray) -> float:
    """``balanced``'s threshold: the median of the positive dataset-wide counts."""
    positive = counts[counts > 0]
    return float(np.median(positive)) if positive.size else 1.0


def timed_policies(
    counts: np.ndarray, labels: tuple[str, ...] = NEW_POLICIES
) -> dict[str, tuple[SelectionPolicy, int]]:
    """Every policy a run times, built: :data:`POLICIES`, then the newer ``labels``.

    Label -> (policy, first step to time), as :func:`build_new_policies` gives the newer ones.
    """
    timed = {label: (get_policy(name, options), 0) for label, (name, options) in POLICIES.items()}
    return {**timed, **build_new_policies(counts, labels)}


def build_new_policies(
    counts: np.ndarray, labels: tuple[str, ...] = NEW_POLICIES
) -> dict[str, tuple[SelectionPolicy, int]]:
    """Benchmark label -> (built and bound policy, first step to time) for ``labels``.

    ``counts`` are the dataset-wide ``N_c`` (:func:`expected_counts`). Every label but
    ``schedule_fm`` is timed from step 0; ``schedule_fm`` from ``SCHEDULE_SWITCH``, inside the
    schedule's FM phase.
    """
    facts = DatasetFacts(
        concept_samples=counts, names=tuple(f"c{i}" for i in range(counts.shape[0])),
        source="the benchmark's expected counts",
    )
    schedule = Schedule.from_config(
        [{"until": f"{SCHEDULE_SWITCH}ba", "policy": "diversity"}, {"policy": "frequency"}],
        get_policy,
    ).resolve(None, None)
    builders = {
        "mixed": lambda: (get_policy("mixed", {"lambda": MIXED_LAMBDA}), 0),
        "dm_alpha": lambda: (get_policy("diversity", {"alpha": DM_ALPHA}), 0),
        "balanced": lambda: (
            get_policy("balanced", {"threshold": balanced_threshold(counts)}), 0
        ),
        "dm_filtered": lambda: (
            Filtered(get_policy("diversity"), (Filter("quality", top=0.5),)), 0
        ),
        "schedule_dm": lambda: (schedule, 0),
        "schedule_fm": lambda: (schedule, SCHEDULE_SWITCH),
    }
    built = {}
    for label in labels:
        policy, first = builders[label]()
        built[label] = (policy.bind(facts), first)
    return built


def load_superbatch(path: Path) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Read ``offsets``, ``ids``, ``world`` and ``keep`` (per rank) from an ``.npz`` file."""
    with np.load(path) as data:
        missing = {"offsets", "ids", "world", "keep"} - set(data.files)
        if missing:
            raise SystemExit(
                f"{path}: missing arrays {sorted(missing)} (need offsets, ids, world, keep)"
            )
        return data["offsets"], data["ids"], int(data["world"]), int(data["keep"])


#: ``--sweep``: global superbatch sizes (20,480 is the published 4,096 kept at f = 0.8; 163,840
#: a SigLIP-style 32k batch) and world sizes; every size divides by every world size.
SWEEP_SIZES = (20_480, 40_960, 81_920, 163_840, 327_680, 655_360)
SWEEP_WORLDS = (1, 4, 16, 64, 256, 1024)
#: ``--sweep --quick``: a functional run of seconds (the test's).
QUICK_SIZES = (20_480, 40_960)
QUICK_WORLDS = (1, 4, 1024)
#: Kept share of the superbatch in the sweep: the published filter ratio f = 0.8.
SWEEP_KEEP_SHARE = 0.2


def sweep_repeats(size: int) -> int:
    """Timed calls per point: 31 where a call is short, 7 at the largest sizes (2 cores).

    Seven at least, so that calls slowed by another process on the machine do not set the
    median; the whole sweep still takes about a minute and a half.
    """
    return max(7, min(31, 2_000_000 // size))


def all_gather_bytes(offsets: np.ndarray, world: int) -> dict[str, int]:
    """Bytes one rank sends and receives when ``algorithm.gather_concepts`` runs on ``world``.

    It exchanges sizes (2 x int64), then per-sample lengths (int32) and the ids (int32) padded to
    the largest rank's count, then the consensus digest (int64); ``all_gather`` delivers every
    rank's buffer to every rank, so a rank receives ``world`` times what it sends. With one
    process nothing is exchanged.
    """
    if world == 1:
        return {"sent": 0, "received": 0}
    n = (offsets.shape[0] - 1) // world
    per_rank_nnz = offsets[np.arange(1, world + 1) * n] - offsets[np.arange(world) * n]
    sent = 16 + 4 * n + 4 * int(per_rank_nnz.max()) + 8
    return {"sent": sent, "received": sent * world}


def _time_calls(call, warmup: int, repeats: int) -> tuple[float, float]:
    """Median wall and CPU (this thread) milliseconds of ``call(step)`` over ``repeats`` steps."""
    for step in range(warmup):
        call(step)
    wall, cpu = [], []
    for step in range(warmup, warmup + repeats):
        started, started_cpu = time.perf_counter(), time.thread_time()
        call(step)
        cpu.append((time.thread_time() - started_cpu) * 1e3)
        wall.append((time.perf_counter() - started) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def sweep(
    sizes: tuple[int, ...],
    worlds: tuple[int, ...],
    seed: int = 0,
    repeats: int | None = None,
    out=None,
) -> list[dict]:
    """Time every policy at every (superbatch size, world size); print one JSON line per point.

    The superbatch of a size is generated once (the module's Zipf generator over the 19,261
    concept vocabulary) and split rank-major over each world size; every rank keeps
    ``SWEEP_KEEP_SHARE`` of its samples. ``cpu_ms`` (thread CPU time, robust to other processes
    on the machine) is the figure to compare; ``wall_ms`` is beside it. ``mixed`` and
    ``balanced`` (:data:`SWEEP_NEW_POLICIES`, built as in the default run) are timed too.
    """
    import sys

    out = out or sys.stdout
    points = []
    timed = timed_policies(expected_counts(seed), SWEEP_NEW_POLICIES)
    for size in sizes:
        offsets, ids = make_superbatch(seed, world=1, per_rank=size)
        count = repeats or sweep_repeats(size)
        for world in worlds:
            if size % world:
                raise SystemExit(f"superbatch {size} does not split over world={world}")
            per_rank = size // world
            keep = max(1, round(per_rank * SWEEP_KEEP_SHARE))
            point: dict = {
                "superbatch": size,
                "world": world,
                "per_rank": per_rank,
                "keep_per_rank": keep,
                "kept": keep * world,
                "nnz": int(ids.shape[0]),
                "repeats": count,
                "all_gather_bytes_per_rank": all_gather_bytes(offsets, world),
            }
            for label, (built, _) in timed.items():

                def call(
                    step: int,
                    built: SelectionPolicy = built,
                    world: int = world,
                    keep: int = keep,
                    offsets: np.ndarray = offsets,
                    ids: np.ndarray = ids,
                ):
                    return select(built, offsets, ids, world, keep, seed=seed, step=step)

                wall, cpu = _time_calls(call, 1, count)
                point[f"{label}_ms"] = round(wall, 3)
                point[f"{label}_cpu_ms"] = round(cpu, 3)
            print(json.dumps(point), file=out, flush=True)
            points.append(point)
    return points


def plot_sweep(points: list[dict], path: Path) -> None:
    """Write the sweep's figure to ``path``.

    Left: selection CPU time against superbatch size for 4 ranks (solid) and the largest world
    (dashed), with a line of slope 1 ("linear growth") and the 25 ms mark; right: the all-gather
    bytes a rank receives per step (one process exchanges nothing and is left out).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({p["superbatch"] for p in points})
    worlds = sorted({p["world"] for p in points})
    small = 4 if 4 in worlds else worlds[0]
    large = worlds[-1]

    def at(size: int, world: int) -> dict:
        return next(p for p in points if p["superbatch"] == size and p["world"] == world)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    plotted = (
        ("dm", "CABS-DM"),
        ("dm_compat", "CABS-DM official_compat"),
        ("mixed", "mixed (lambda 1)"),
        ("balanced", "balanced"),
        ("fm", "CABS-FM"),
        ("iid", "IID"),
    )
    for label, name in plotted:
        if f"{label}_cpu_ms" not in points[0]:
            continue  # a sweep file written before the policy was timed
        (line,) = left.plot(
            sizes,
            [at(s, small)[f"{label}_cpu_ms"] for s in sizes],
            marker="o",
            label=f"{name}, {small} ranks",
        )
        if large != small:
            left.plot(
                sizes,
                [at(s, large)[f"{label}_cpu_ms"] for s in sizes],
                marker=".",
                ls="--",
                color=line.get_color(),
                label=f"{name}, {large} ranks",
            )
    first = at(sizes[0], small)["dm_cpu_ms"]
    left.plot(sizes, [first * s / sizes[0] for s in sizes], "k:", label="linear growth")
    left.axhline(25, color="grey", lw=0.8, ls="-.")
    left.set(
        xscale="log",
        yscale="log",
        xlabel="global superbatch (samples)",
        ylabel="CPU ms per global selection",
        title="selection time (one thread)",
    )
    right.set(
        xscale="log",
        yscale="log",
        xlabel="global superbatch (samples)",
        ylabel="MiB received per rank per step",
        title="all-gather of concept ids",
    )
    for world in worlds:
        if world == 1:
            continue
        received = [at(s, world)["all_gather_bytes_per_rank"]["received"] / 2**20 for s in sizes]
        right.plot(sizes, received, marker=".", label=f"{world} ranks")
    for axis in (left, right):
        axis.set_xticks(sizes, [f"{s // 1024}k" for s in sizes])
        axis.minorticks_off()
    left.legend(fontsize=6, ncol=2, loc="upper left")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``cabs-bench-selection``: run the benchmark, print its JSON line(s); exit status 0."""
    run(argv)
    return 0


def run(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print its JSON line; returns the same dict."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--superbatch", type=Path, help=".npz with offsets, ids, world, keep")
    parser.add_argument("--seed", type=int, default=0, help="data seed and selection seed")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per policy (>= 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per policy first")
    parser.add_argument("--dump-selection", type=Path, help="write kept local indices as JSON")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="time every policy for superbatches of 20k-640k samples over 1-1024 ranks instead: "
        "one JSON line per point",
    )
    parser.add_argument("--quick", action="store_true", help="--sweep: a few small points only")
    parser.add_argument("--plot", type=Path, help="--sweep: write a PNG of time against size")
    args = parser.parse_args(argv)
    if args.sweep:
        quick = args.quick
        points = sweep(
            QUICK_SIZES if quick else SWEEP_SIZES,
            QUICK_WORLDS if quick else SWEEP_WORLDS,
            seed=args.seed,
            repeats=1 if quick else None,
        )
        if args.plot:
            plot_sweep(points, args.plot)
        return {"points": points}
    if args.quick or args.plot:
        parser.error("--quick and --plot go with --sweep")
    if args.repeats < 20:
        parser.error("--repeats must be at least 20 for a meaningful median")

    if args.superbatch:
        offsets, ids, world, keep = load_superbatch(args.superbatch)
        counts = scaled_counts(offsets, ids)
        counts_source = f"document frequency of the superbatch x {NOMINAL_DATASET:,} / N"
    else:
        offsets, ids = make_superbatch(args.seed)
        world, keep = WORLD, KEEP
        counts = expected_counts(args.seed)
        counts_source = f"expected Zipf counts in {NOMINAL_DATASET:,} samples"
    size = offsets.shape[0] - 1
    columns = {"quality": quality_column(args.seed, size)}
    runs = timed_policies(counts)

    results: dict = {"kept": {}}
    dumped: dict[str, list[list[int]]] = {}
    lengths = np.diff(offsets)
    for label, (policy, first) in runs.items():
        needs = columns if policy.required_columns() else None

        def call(step: int, policy: SelectionPolicy = policy, first: int = first,
                 columns: dict | None = needs):
            return select(
                policy, offsets, ids, world, keep, seed=args.seed, step=first + step,
                columns=columns,
            )

        for step in range(args.warmup):
            call(step)
        timings = []
        for step in range(args.repeats):
            started = time.perf_counter()
            result = call(step)
            timings.append((time.perf_counter() - started) * 1e3)
        results[f"{label}_ms"] = round(statistics.median(timings), 3)
        results["kept"][label] = int(result.kept.size)
        results[f"{label}_distinct"] = result.stats.kept_distinct
        kept_global = (result.kept + np.arange(world)[:, None] * (len(lengths) // world)).ravel()
        results[f"{label}_mean_instances"] = round(float(lengths[kept_global].mean()), 3)
        results[f"{label}_filled"] = result.stats.filled
        results[f"{label}_filter_shortfall"] = result.stats.filter_shortfall
        dumped[label] = result.kept.tolist()

    line = {
        key: results[key]
        for key in (
            "dm_ms",
            "dm_compat_ms",
            "fm_ms",
            "iid_ms",
            "kept",
            "dm_distinct",
            "dm_compat_distinct",
            "fm_distinct",
            "iid_distinct",
            "fm_mean_instances",
            "iid_mean_instances",
        )
    }
    for label in NEW_POLICIES:
        for key in ("ms", "distinct", "mean_instances", "filled"):
            line[f"{label}_{key}"] = results[f"{label}_{key}"]
    line["dm_filtered_filter_shortfall"] = results["dm_filtered_filter_shortfall"]
    line["budget_ms"] = BUDGET_MS
    line["within_budget"] = {label: results[f"{label}_ms"] <= BUDGET_MS for label in NEW_POLICIES}
    line["settings"] = {
        "world": world,
        "per_rank": int(len(lengths) // world),
        "keep_per_rank": keep,
        "nnz": int(len(ids)),
        "superbatch_distinct": result.stats.superbatch_distinct,
        "repeats": args.repeats,
        "seed": args.seed,
        "source": str(args.superbatch) if args.superbatch else "generated",
        "dataset_counts": counts_source,
        "mixed_lambda": MIXED_LAMBDA,
        "dm_alpha": DM_ALPHA,
        "balanced_threshold": balanced_threshold(counts),
        "dm_filtered": "top 0.5 of a seeded uniform column 'quality'",
        "schedule": f"diversity until {SCHEDULE_SWITCH}ba, then frequency; schedule_dm timed at "
        f"steps from 0, schedule_fm from {SCHEDULE_SWITCH}",
    }
    print(json.dumps(line), flush=True)
    if args.dump_selection:
        args.dump_selection.write_text(json.dumps(dumped))
    return line

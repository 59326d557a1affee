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
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from cabs_streaming.selection import select

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
    on the machine) is the figure to compare; ``wall_ms`` is beside it.
    """
    import sys

    out = out or sys.stdout
    points = []
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
            for label, (policy, options) in POLICIES.items():

                def call(
                    step: int,
                    policy: str = policy,
                    options: dict = options,
                    world: int = world,
                    keep: int = keep,
                    offsets: np.ndarray = offsets,
                    ids: np.ndarray = ids,
                ):
                    return select(
                        policy, offsets, ids, world, keep, seed=seed, step=step, **options
                    )

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
    for label, name in (
        ("dm", "CABS-DM"),
        ("dm_compat", "CABS-DM official_compat"),
        ("fm", "CABS-FM"),
        ("iid", "IID"),
    ):
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
        axis.legend(fontsize=7)
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
    else:
        offsets, ids = make_superbatch(args.seed)
        world, keep = WORLD, KEEP

    results: dict = {"kept": {}}
    dumped: dict[str, list[list[int]]] = {}
    lengths = np.diff(offsets)
    for label, (policy, options) in POLICIES.items():

        def call(step: int, policy: str = policy, options: dict = options):
            return select(policy, offsets, ids, world, keep, seed=args.seed, step=step, **options)

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
    line["settings"] = {
        "world": world,
        "per_rank": int(len(lengths) // world),
        "keep_per_rank": keep,
        "nnz": int(len(ids)),
        "superbatch_distinct": result.stats.superbatch_distinct,
        "repeats": args.repeats,
        "seed": args.seed,
        "source": str(args.superbatch) if args.superbatch else "generated",
    }
    print(json.dumps(line), flush=True)
    if args.dump_selection:
        args.dump_selection.write_text(json.dumps(dumped))
    return line

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


def main(argv: list[str] | None = None) -> int:
    """``cabs-bench-selection``: run the benchmark, print its JSON line; exit status 0."""
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
    args = parser.parse_args(argv)
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

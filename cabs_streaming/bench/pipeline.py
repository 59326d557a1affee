"""Benchmark the training input pipeline end to end (no model step); prints ONE JSON line.

Why: deferred decoding (docs/design.md#deferred-decoding) is only worth its complexity if a CABS run
with ``f = 0.8`` delivers trained samples about as fast as plain IID training with ``f = 0``,
although it must read five samples per trained one. This tool measures delivered TRAINED samples
per second (after selection, decode, augmentation and tokenization: what the model would receive)
for three configurations, on one machine, with the same MDS data, trained batch size, DataLoader
workers and prefetch:

- ``iid``: policy ``iid`` with ``f = 0`` in its fastest configuration, decoding and tokenizing in
  the DataLoader workers as plain Streaming users do (the kept indices are the identity, so no
  rows are gathered).
- ``deferred``: CABS-DM (policy ``diversity``) with ``f = 0.8``; the loader hands over encoded
  bytes and concept ids, and the main process runs ``cabs_streaming.algorithm.cabs_step``, what
  ``ConceptAwareBatchSampling.apply`` runs in training (selection, then decode + augment +
  tokenize only the kept share).
- ``eager``: CABS-DM with ``f = 0.8`` decoding, augmenting and tokenizing the WHOLE superbatch in
  the workers, as the reference implementation does; the main process selects and gathers rows.

All three use the real code paths (``ConceptStreamingDataset``, ``ConceptCollator``,
``ImageDecoder`` with the train transform of ``--model``, ``CaptionTokenizer``, ``select``,
``cabs_step``); only WHERE and HOW MUCH is decoded differs. Worker decoders run
one thread each (``num_threads=1``); the main-process decoder of ``deferred`` uses
``--decode-threads`` (default: the library default, as in training). The main process's torch
intra-op threads are set once (``--torch-threads``) and are the same for every configuration;
DataLoader workers always run torch with one thread.

Rounds are interleaved (iid, deferred, eager, iid, ...) so machine drift hits all alike. Each
round builds a fresh dataset (shuffle seed ``seed + round``) and DataLoader, skips ``--warmup``
steps (worker start-up, lazy tokenizer, prefetch fill) and times ``--steps`` trained batches from
the delivery of the last warm-up batch to the processing of the last timed one. Warm-up and timed
step counts are multiples of the worker count, so with workers delivering in lockstep the window
holds whole production cycles.

The data is generated deterministically from ``--seed`` into a temporary MDS dataset (or
``--data DIR`` to keep and reuse it): JPEGs of 256-512 px on the long side at 30-60 KB each,
random crops, rescales, flips and mild colour changes of the real photographs that ship inside
scikit-image (and matplotlib's grace_hopper.jpg), encoded at the JPEG quality (4:2:0, or 4:4:4
where 4:2:0 cannot reach the drawn size) that lands nearest a size drawn uniformly in the range.
Every sample's image is encoded separately (no repeated bytes). Concepts are drawn as in
``cabs-bench-selection`` (its generator is imported); captions are alt-text-like phrases
built from ImageNet class names of the sample's concepts. At these sizes the decoder's reduced-size
JPEG decoding (``draft``) never applies with the default ``draft_margin=1.5`` (the train crop
would need a side of 672 px or more), so every image is fully decoded, then cropped and resized.

Memory: ``peak_rss_mb`` is the largest sum of resident set sizes over the main process and all
its DataLoader worker children, sampled by a psutil thread every ``--memory-interval`` seconds.
That sum counts shared pages (the forked interpreter and libraries, shared-memory batches in
flight, page-cached shards) once per process that touches them, so it is an upper bound.
``memory.main_maxrss_mb`` and ``memory.worker_maxrss_mb`` are the exact per-process peaks from
``getrusage`` (main, and the largest finished child: the DataLoader workers, and the data
generator's processes when the data was generated in this run). ``--pss-interval`` adds summed
proportional set sizes (shared pages split between processes); it is off by default because
reading them slows the timed code (see ``MemorySampler``).

``lookahead`` (optional, ``--configs iid,deferred,eager,lookahead``) is ``deferred`` with the
algorithm's lookahead on (a ``Lookahead`` passed to ``cabs_step``), as training runs it: step
``t + 1`` is selected right after step ``t``'s batch is handed over and its kept images are decoded
on a background thread while step ``t`` "trains". Without a model step there is nothing to
overlap with, so compare it with ``--model-step-ms X``: the main process then sleeps X ms after
every delivered batch, standing in for a GPU step during which the CPU is free (every
configuration pays it).
``decoded_per_trained`` of ``lookahead`` can exceed 1 by up to 1/steps: the step after the timed
window may be decoded before the counters are read.

``invariant`` (optional) is ``deferred`` with ``world_invariant=True``: one global quota over
the superbatch in sample-index order, then the kept samples dealt to ranks
(docs/selection.md#world-invariant-selection). Run under the launcher to compare it with
``deferred`` on several ranks:
``composer -n 2 tools/bench_pipeline.py --data DIR --configs deferred,invariant``
(``--data`` is generated by rank 0 first; every rank reads its share, ``--kept-batch`` is per
rank, and rank 0 prints the line). ``invariant_vs_deferred`` is its paired throughput ratio and
``configs.invariant.moved_per_step`` the samples and bytes moved between ranks per step. Its
crops are seeded per sample, one ``decode_pixels`` call per image on the decoder's thread
count, so its decoding time is reported apart, as thread-milliseconds.

By default no model step runs, and the main process does not read the delivered images (a
training step would copy them to the device in every configuration); ``--consume`` reads each
delivered image tensor once, as that copy would, for a more end-to-end comparison.

Run: ``cabs-bench-pipeline`` or ``python tools/bench_pipeline.py`` (on 2 cores about 2-4 minutes to
generate the data, cached with ``--data DIR``, then 5-8 minutes for the 5 rounds); ``--smoke`` is a
functional run of seconds. ``cpu_busy_share`` (CPU seconds of the process tree over wall seconds
times cores, per configuration) near 1 for the loader-bound ``iid``/``eager`` says the bench had the
machine; far below 1 says other processes took the cores and the numbers are not comparable.
``cpu_ms_per_trained`` (per configuration) is the process tree's CPU milliseconds (reading,
selection, decoding, tokenizing, in the main process and the workers) per delivered trained
image: what sizes the loader cores a GPU node needs. ``--resampler pil`` decodes with open_clip's
own PIL resize instead of the default torchvision ``uint8`` one, for the old figure.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["CONFIGS", "build_parser", "main", "parse_args"]

CONFIGS = ("iid", "deferred", "eager", "lookahead", "invariant")
DEFAULT_CONFIGS = ("iid", "deferred", "eager")


def build_parser() -> argparse.ArgumentParser:
    """The command line; this module imports nothing heavy, so ``--help`` is instant."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="MDS dir to create and keep, or reuse (None: a temporary dir, removed at the end)",
    )
    parser.add_argument("--samples", type=int, default=20_000, help="samples in the dataset")
    parser.add_argument("--seed", type=int, default=0, help="data, shuffle, crop, selection seed")
    parser.add_argument("--vocabulary", type=int, default=19_261, help="concept vocabulary size")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model (transform, tokens)")
    parser.add_argument("--kept-batch", type=int, default=256, help="trained samples per step")
    parser.add_argument(
        "--filter-ratio", type=float, default=0.8, help="filter ratio f of deferred/eager/lookahead"
    )
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (all configs)")
    parser.add_argument("--prefetch", type=int, default=2, help="DataLoader prefetch_factor")
    parser.add_argument(
        "--decode-threads",
        type=int,
        default=None,
        help="threads of the main-process decoder (deferred; None: ImageDecoder's default)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch intra-op threads of the main process (all configs; None: torch's default)",
    )
    parser.add_argument(
        "--resampler",
        choices=("torch", "pil"),
        default="torch",
        help="ImageDecoder resampler of every config (pil: open_clip's own, the old figure)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per round")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help=f"comma-separated, of {','.join(CONFIGS)}",
    )
    parser.add_argument(
        "--model-step-ms",
        type=float,
        default=0.0,
        help="sleep this long after each delivered batch: a stand-in GPU step (CPU free)",
    )
    parser.add_argument(
        "--gen-processes",
        type=int,
        default=os.cpu_count() or 1,
        help="processes generating the benchmark JPEGs (only when --data is new)",
    )
    parser.add_argument("--memory-interval", type=float, default=0.1, help="RSS sampling, s")
    parser.add_argument(
        "--pss-interval", type=float, default=0.0, help="PSS sampling, s (0: off; perturbs timing)"
    )
    parser.add_argument(
        "--consume",
        action="store_true",
        help="read every delivered image tensor once in the main process (stands in for the "
        "host-to-device copy of a training step)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny functional run: 240 samples, kept batch 8, 2+2 steps, 1 round",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line; ``--smoke`` shrinks everything for a functional check."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        args.samples, args.kept_batch, args.warmup, args.steps, args.rounds = 240, 8, 2, 2, 1
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; valid: {list(CONFIGS)}")
    workers = max(1, args.workers)
    if args.steps % workers or args.warmup % workers:
        parser.error(f"--steps and --warmup must be multiples of --workers ({args.workers})")
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    """``cabs-bench-pipeline``: run the benchmark and print its JSON line; exit status 0.

    Arguments are parsed (and ``--help`` answered) before torch and open_clip are imported.
    """
    args = parse_args(argv)
    from cabs_streaming.bench.pipeline_run import run

    run(args)
    return 0

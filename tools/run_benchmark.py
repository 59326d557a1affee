#!/usr/bin/env python
r"""Run the long-tail benchmark: recipes x seeds, then a table and figures.

A thin command line over :func:`cabs_streaming.benchmark.run_benchmark` (its module docstring
says what is measured and how)::

    python tools/make_sample.py --preset longtail --out data/longtail     # once, ~1 minute
    python tools/run_benchmark.py --data data/longtail --out results/longtail --jobs 2
    python tools/run_benchmark.py --data data/longtail --split val --seeds 0 \
        --recipes cabs-dm --set selection.options.concept_cap=4 --out results/val-cap4

Prints a progress line per finished run; ``--out`` receives ``results.json``, ``results.md``,
``benchmark_bars.png``, ``zeroshot_over_training.png`` and every run's log under ``logs/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE_NAMES = ("iid", "cabs-dm", "cabs-dm-compat", "cabs-fm")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="run_benchmark.py",
        description="Train the long-tail benchmark recipes (yamls/benchmarks/longtail-*.yaml) "
        "with several seeds and write results.json, results.md and PNG figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data",
        required=True,
        help="the benchmark data, written by tools/make_sample.py --preset longtail --out DIR",
    )
    parser.add_argument("--out", required=True, help="folder for results, figures and logs")
    parser.add_argument(
        "--recipes",
        default=",".join(RECIPE_NAMES),
        help="comma-separated recipe names (longtail-<name>.yaml in --recipe-dir)",
    )
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="comma-separated seeds")
    parser.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="evaluate on the test splits (eval_*) or the validation splits (val_*); choose "
        "settings on val",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for every run (repeatable), e.g. max_duration=500ba",
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="runs side by side (CPU: one core each is best)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch and decoding threads per run (default: CPU cores / --jobs; keep jobs x "
        "threads at or under the cores)",
    )
    parser.add_argument(
        "--evaluations", type=int, default=6, help="evaluations per run, evenly spaced"
    )
    parser.add_argument("--device", choices=("cpu", "gpu"), help="default: the recipe's")
    parser.add_argument(
        "--recipe-dir", default=str(ROOT / "yamls" / "benchmarks"), help="where the recipes are"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad arguments or data)."""
    args = build_parser().parse_args(argv)
    from cabs_streaming.benchmark import run_benchmark  # heavy: after --help

    try:
        report = run_benchmark(
            data=args.data,
            out=args.out,
            recipes=[r for r in args.recipes.split(",") if r],
            seeds=args.seeds,
            split=args.split,
            overrides=args.overrides,
            jobs=args.jobs,
            threads=args.threads,
            evaluations=args.evaluations,
            device=args.device,
            recipe_dir=args.recipe_dir,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"run_benchmark: error: {err}", file=sys.stderr)
        return 2
    print((Path(args.out) / "results.md").read_text())
    print(json.dumps({"out": args.out, "wall_s": report["wall_s"], "files": report["figures"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

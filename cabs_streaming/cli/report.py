"""``cabs-report`` (``tools/concept_report.py``): a concept report of an MDS dataset.

A thin command line over :func:`cabs_streaming.report.concept_report` (its module docstring says
what each figure shows and how the superbatches are drawn)::

    cabs-report data/sample/train --out reports/sample --batch-size 64 --concept-cap 16
    S3_ENDPOINT_URL=... cabs-report s3://bucket/mds --out reports/mds --max-samples 200000

Besides IID, CABS-DM and CABS-FM the report shows ``mixed`` (``--mixed-lambda``), ``balanced``
(``--balanced-threshold``, default the median count of the concepts present) and CABS-DM with
targets ``N_c ** alpha`` (``--dm-alpha``). Prints the summary's headline numbers as JSON; the
folder holds ``concept_frequency.png``, ``concepts_per_sample.png``,
``distinct_per_batch.png``, ``kept_concepts.png`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from cabs_streaming.report import concept_report

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="cabs-report",
        description="Concept statistics of an MDS dataset, and what IID, CABS-DM, CABS-FM, "
        "mixed, balanced and CABS-DM with alpha targets keep from the same superbatches: PNG "
        "figures and summary.json in --out.",
    )
    parser.add_argument("dataset", help="local MDS directory or remote prefix (s3://bucket/path)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--split", help="sub-directory holding index.json")
    parser.add_argument(
        "--filter-ratio",
        type=float,
        default=0.8,
        metavar="F",
        help="share of each superbatch dropped (default: 0.8)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=256,
        metavar="K",
        help="samples kept per batch; superbatches hold K / (1 - F) (default: 256)",
    )
    parser.add_argument(
        "--batches", type=int, default=20, metavar="N", help="superbatches to draw (default: 20)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the draw and the policies")
    parser.add_argument(
        "--concept-cap",
        type=int,
        metavar="M",
        help="CABS-DM per-concept cap (default: the policy's, "
        "max(1, round(K * 10 / 1024)); raise it for small vocabularies)",
    )
    parser.add_argument(
        "--mixed-lambda",
        type=float,
        default=1.0,
        metavar="L",
        help="lambda of the 'mixed' policy: DM gain + L x instances / longest (default: 1.0)",
    )
    parser.add_argument(
        "--balanced-threshold",
        type=float,
        metavar="T",
        help="threshold t of the 'balanced' policy (default: the median number of samples per "
        "concept among the concepts present in the samples read)",
    )
    parser.add_argument(
        "--dm-alpha",
        type=float,
        default=0.5,
        metavar="A",
        help="CABS-DM with targets in proportion to N_c ** A, shown beside plain CABS-DM; "
        "A in [0, 1] (default: 0.5)",
    )
    parser.add_argument(
        "--max-samples",
        type=int,
        metavar="N",
        help="read only the first N samples (bounds a remote download)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad arguments or data)."""
    args = build_parser().parse_args(argv)
    try:
        summary = concept_report(
            args.dataset,
            str(args.out),
            filter_ratio=args.filter_ratio,
            batch_size=args.batch_size,
            batches=args.batches,
            seed=args.seed,
            concept_cap=args.concept_cap,
            split=args.split,
            max_samples=args.max_samples,
            progress=not args.no_progress,
            mixed_lambda=args.mixed_lambda,
            balanced_threshold=args.balanced_threshold,
            dm_alpha=args.dm_alpha,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"cabs-report: error: {err}", file=sys.stderr)
        return 2
    policies = summary["selection"]["policies"]
    print(
        json.dumps(
            {
                "out": str(args.out),
                "samples": summary["samples"],
                "concepts_seen": summary["concepts_seen"],
                "empty_share": round(summary["empty_share"], 4),
                "distinct_per_kept_batch": {
                    p["label"]: round(p["distinct_mean"], 2) for p in policies.values()
                },
                "files": summary["figures"] + ["summary.json"],
            }
        )
    )
    return 0

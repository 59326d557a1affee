"""``cabs-count-concepts`` (``tools/count_concepts.py``): ``concept_counts.json`` for a dataset.

The converter writes ``concept_counts.json`` beside ``vocabulary.json``; a dataset converted
before it did has none, and a policy that needs dataset-wide counts refuses it
(``ConceptStreamingDataset.require_concept_counts``). This reads the dataset's concept column
once (local or ``s3://``; images are never decoded) and writes the file beside its
``index.json``, as the converter would have::

    cabs-count-concepts data/mds
    S3_ENDPOINT_URL=... cabs-count-concepts s3://bucket/mds --split train
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
from collections.abc import Sequence

from cabs_streaming.concepts import CONCEPT_COUNTS_FILENAME
from cabs_streaming.converter.output import is_remote, publish
from cabs_streaming.report import count_concepts, read_concepts

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="cabs-count-concepts",
        description=f"Count the samples and instances of every concept id of an MDS dataset and "
        f"write {CONCEPT_COUNTS_FILENAME} beside its index.json (replacing one there).",
    )
    parser.add_argument("dataset", help="local MDS directory or remote prefix (s3://bucket/path)")
    parser.add_argument(
        "--split", help="sub-directory holding index.json (default: the dataset itself)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Count, write the file, print where and the totals as JSON; 2 on a bad dataset."""
    args = build_parser().parse_args(argv)
    try:
        data = read_concepts(args.dataset, split=args.split, progress=not args.no_progress)
    except (OSError, ValueError) as err:
        print(f"cabs-count-concepts: error: {err}", file=sys.stderr)
        return 2
    counts = count_concepts(data)
    join = posixpath.join if is_remote(args.dataset) else os.path.join
    folder = join(args.dataset, args.split) if args.split else args.dataset
    publish(folder, CONCEPT_COUNTS_FILENAME, counts.to_json())
    summary = {
        "file": join(folder, CONCEPT_COUNTS_FILENAME),
        "samples": counts.written,
        "concepts": len(counts),
        "used": int((counts.samples > 0).sum()),
        "instances": int(counts.instances.sum()),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

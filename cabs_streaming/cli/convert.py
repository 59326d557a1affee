"""``cabs-convert`` (``tools/convert_to_mds.py``): convert image-text data into MDS shards.

A thin command line over :func:`cabs_streaming.converter.convert`; ``--help`` lists the options
and the exit statuses, and :mod:`cabs_streaming.converter` explains the design.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cabs_streaming.converter import (
    CONCEPT_SOURCES,
    EXIT_STATUSES,
    FORMATS,
    ConversionError,
    Limits,
    OutputBusy,
    convert,
)
from cabs_streaming.converter.tally import skip_alarm

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``cabs-convert`` (``tools/convert_to_mds.py``) argument parser."""
    statuses = "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_STATUSES.items())
    parser = argparse.ArgumentParser(
        prog="cabs-convert",
        description=(
            "Convert WebDataset tars, parquet files or a JSONL manifest into MDS shards "
            "(schema v1) with vocabulary.json, concept_counts.json and report.json beside "
            "index.json."
        ),
        epilog=f"exit status:\n{statuses}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for add_options in (
        _add_what_to_convert,
        _add_engine_options,
        _add_parquet_columns,
        _add_shard_options,
        _add_limits_and_safety,
    ):
        add_options(parser.add_argument)
    return parser


def _add_what_to_convert(add: Callable[..., Any]) -> None:
    """Inputs, output, where the concepts come from, and how many processes."""
    add(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="files, directories or glob patterns, converted in this order (required)",
    )
    add(
        "--format",
        required=True,
        choices=FORMATS,
        help="what the inputs are: WebDataset tars (.tar, .tar.gz, ...), parquet files, or JSONL "
        "manifests of {image, caption, concepts} lines (required)",
    )
    add(
        "--out",
        required=True,
        metavar="DIR_OR_URL",
        help="local directory or remote prefix (s3://bucket/path); locked while converting "
        "(required)",
    )
    add(
        "--vocabulary",
        metavar="FILE",
        help="vocabulary.json fixing concept ids (default: build one from the data, most "
        "frequent first)",
    )
    add(
        "--extend-vocabulary",
        action="store_true",
        help="append names missing from --vocabulary instead of skipping their samples "
        "(default: skip them as 'unknown concept')",
    )
    add(
        "--concepts-from",
        choices=CONCEPT_SOURCES,
        default=None,
        help="webdataset: where the concepts are, the json's classes or tags field, or the .cls "
        "member (one name or integer id per line) (default: classes)",
    )
    add(
        "--tag-captions",
        metavar="VOCABULARY",
        help="take concept ids from the captions instead: a vocabulary file (one concept per "
        "line, 'name: synonym, ...'), a vocabulary.json, or a shipped one: coco, imagenet1k "
        "(default: concepts come from the input)",
    )
    add(
        "--tagger",
        metavar="MODULE:FUNCTION",
        help="take concept names from your function(image_bytes, caption) -> list of names "
        "instead (also path/to/file.py:FUNCTION); names are mapped onto --vocabulary like "
        "detector names (default: none)",
    )
    add(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="local engine: processes; each converts whole input files, so at most one per file "
        "runs (default: 1)",
    )
    add(
        "--overwrite",
        action="store_true",
        help="replace a non-empty output directory, or write over a non-empty prefix (default: "
        "refuse)",
    )


def _add_engine_options(add: Callable[..., Any]) -> None:
    """Where the conversion runs: this machine's processes, or a Spark cluster."""
    add(
        "--engine",
        choices=("local", "spark"),
        default="local",
        help="local: this machine's processes (--workers); spark: a Spark cluster, resumable "
        "after a crash (needs the spark extra and Java 17; README: Converting at web scale on "
        "Spark) (default: local)",
    )
    add(
        "--spark-master",
        metavar="URL",
        help="spark: the master, e.g. local[8] or spark://host:7077 (default: what "
        "spark-submit or the Spark configuration says, else local[*])",
    )
    add(
        "--partitions",
        type=int,
        metavar="N",
        help="spark: parts written, contiguous runs of input files (default: one per file)",
    )


def _add_parquet_columns(add: Callable[..., Any]) -> None:
    """Which parquet columns hold what, and the numeric columns of every format."""
    add(
        "--image-column",
        default="image",
        metavar="NAME",
        help="parquet: image bytes, {bytes, path} structs or path strings (default: image)",
    )
    add(
        "--caption-column",
        default="caption",
        metavar="NAME",
        help="parquet: caption text (default: caption)",
    )
    add(
        "--concepts-column",
        default=None,
        metavar="NAME",
        help="parquet: lists of concept names or ids, or one integer id per row "
        "(default: concepts)",
    )
    add(
        "--key-column",
        metavar="NAME",
        help="parquet: sample keys (default: 'key' if present, else FILE:ROW)",
    )
    add("--recaption-column", metavar="NAME", help="parquet: synthetic captions (default: none)")
    add(
        "--numeric-column",
        action="append",
        default=[],
        metavar="NAME[:TYPE]",
        help="a per-sample number written as an MDS column of its own, repeatable: the parquet "
        "column NAME, the JSONL field NAME or the field NAME of a tar sample's .json; TYPE is "
        "float32, float64, int32 or int64 (default type: float32). A missing, null, non-numeric, "
        "NaN / infinite or out-of-range value is a 'bad numeric' skip (default: none)",
    )


def _add_shard_options(add: Callable[..., Any]) -> None:
    """How the MDS shards are written, and how much the report shows."""
    add(
        "--size-limit",
        default="64mb",
        metavar="BYTES",
        help="MDS shard size limit, bytes or e.g. 64mb (default: 64mb)",
    )
    add("--compression", metavar="NAME", help="MDS shard compression, e.g. zstd (default: none)")
    add(
        "--hashes",
        nargs="*",
        default=["xxh64"],
        metavar="ALGO",
        help="shard hashes written to index.json for validate_hash (default: xxh64; none with "
        "an empty list)",
    )
    add(
        "--max-samples-per-shard",
        type=int,
        metavar="N",
        help="also start a new shard after this many samples (default: no limit)",
    )
    add(
        "--examples-per-reason",
        type=int,
        default=5,
        metavar="N",
        help="example keys listed per skip reason in the report (default: 5)",
    )


def _add_limits_and_safety(add: Callable[..., Any]) -> None:
    """Size limits, image confinement, exit status and lock handling."""
    limits = Limits()
    add(
        "--max-member-bytes",
        type=int,
        default=limits.max_member_bytes,
        metavar="N",
        help="larger tar members, manifest lines, parquet image cells and image files are "
        f"skipped unread (default: {limits.max_member_bytes}, 128 MiB)",
    )
    add(
        "--max-caption-bytes",
        type=int,
        default=limits.max_caption_bytes,
        metavar="N",
        help="samples whose caption or recaption is longer in UTF-8 are skipped (default: "
        f"{limits.max_caption_bytes}, 1 MiB)",
    )
    add(
        "--max-image-pixels",
        type=int,
        default=limits.max_image_pixels,
        metavar="N",
        help="images with more pixels (width x height, read from the header) are skipped "
        f"(default: {limits.max_image_pixels}, PIL's decompression-bomb warning level)",
    )
    add(
        "--image-root",
        action="append",
        default=[],
        metavar="DIR",
        help="jsonl / parquet: a folder image paths may also point into, repeatable (default: "
        "only the folder of the file naming them; '..', absolute paths and symbolic links that "
        "leave it are refused)",
    )
    add(
        "--accept-skips",
        action="store_true",
        help="exit 0 even when no sample was written or one skip reason took over half of "
        "the input (default: exit status 4)",
    )
    add(
        "--break-lock",
        action="store_true",
        help="s3 output: remove the lock a crashed conversion left behind (check first that "
        "it no longer runs) (default: refuse to start)",
    )
    add("--no-progress", action="store_true", help="hide progress bars (default: shown)")


def _printable(report: dict[str, Any]) -> dict[str, Any]:
    """The report for the console: the per-concept lists stay in ``report.json``."""
    shown = dict(report)
    concepts = dict(report["concepts"])
    size = len(concepts["per_concept"]["samples"])
    concepts["per_concept"] = f"{size} samples / instances counts by concept id in report.json"
    shown["concepts"] = concepts
    return shown


def _convert_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments both engines take, from the parsed command line."""
    size_limit: int | str = args.size_limit
    if isinstance(size_limit, str) and size_limit.isdigit():
        size_limit = int(size_limit)
    return {
        "vocabulary": args.vocabulary,
        "extend_vocabulary": args.extend_vocabulary,
        "concepts_from": args.concepts_from,
        "tag_captions": args.tag_captions,
        "tagger": args.tagger,
        "overwrite": args.overwrite,
        "image_column": args.image_column,
        "caption_column": args.caption_column,
        "concepts_column": args.concepts_column,
        "key_column": args.key_column,
        "recaption_column": args.recaption_column,
        "numeric_columns": args.numeric_column,
        "size_limit": size_limit,
        "compression": args.compression,
        "hashes": args.hashes,
        "max_samples_per_shard": args.max_samples_per_shard,
        "examples_per_reason": args.examples_per_reason,
        "limits": Limits(args.max_member_bytes, args.max_caption_bytes, args.max_image_pixels),
        "image_roots": args.image_root,
        "break_lock": args.break_lock,
        "progress": not args.no_progress,
    }


def _run(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    """Convert with the chosen engine; Spark options without ``--engine spark`` are an error."""
    if args.engine == "local":
        if args.spark_master is not None or args.partitions is not None:
            raise ConversionError("--spark-master and --partitions need --engine spark")
        return convert(args.input, args.format, args.out, workers=args.workers, **options)
    if args.workers != 1:
        raise ConversionError(
            "--workers is the local engine's; with --engine spark use --partitions"
        )
    from cabs_streaming.converter.spark import convert_on_spark, spark_session

    conf = {} if options["progress"] else {"spark.ui.showConsoleProgress": "false"}
    spark = spark_session(args.spark_master, conf)
    return convert_on_spark(
        spark, args.input, args.format, args.out, partitions=args.partitions, **options
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; print the report as JSON; return an ``EXIT_STATUSES`` code."""
    args = build_parser().parse_args(argv)
    try:
        report = _run(args, _convert_options(args))
    except OutputBusy as err:
        print(f"cabs-convert: error: {err}", file=sys.stderr)
        return 5
    except ConversionError as err:
        print(f"cabs-convert: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = (
            "run the same command again to resume (completed parts are kept)"
            if args.engine == "spark"
            else "run the same command with --overwrite to start again"
        )
        print(
            f"cabs-convert: interrupted; {args.out} may hold a partial dataset: {again}",
            file=sys.stderr,
        )
        return 130
    print(json.dumps(_printable(report), indent=2, ensure_ascii=False))
    for error in report["errors"]:
        print(f"cabs-convert: damaged input {error['file']}: {error['error']}", file=sys.stderr)
    for warning in report["warnings"]:
        print(f"cabs-convert: warning: {warning}", file=sys.stderr)
    if skip_alarm(report) is not None and not args.accept_skips:
        return 4
    return 3 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

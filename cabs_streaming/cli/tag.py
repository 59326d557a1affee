r"""``cabs-tag`` (``tools/tag_concepts.py``): tag captions with concept ids, or map detector names.

A thin command line over :mod:`cabs_streaming.tagging` (the matching rules are in its
docstring), for trying a vocabulary before converting with ``cabs-convert --tag-captions``::

    cabs-tag --vocabulary coco "Two hot dogs and a puppy on a sofa"
    cabs-tag --vocabulary my_concepts.txt --input captions.jsonl --field caption \
        --output tagged.jsonl
    cabs-tag --vocabulary imagenet1k --names "Tabby_Cat" "goldfishes" "ufo"

Output is JSON lines: for captions ``{"caption", "concepts" (ids), "concept_names"}``, for a
JSONL input each object with ``concepts`` and ``concept_names`` added; ``--names`` prints one
object with the ids, the names matched and the unknown names with counts. A summary goes to
stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from cabs_streaming.tagging import CaptionTagger, ConceptNameMapper, TaggingVocabulary

__all__ = ["build_parser", "main", "tag_stream"]

_BATCH = 4096


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="cabs-tag",
        description="Tag captions with concept ids (word boundaries, case-insensitive, plurals, "
        "synonyms, longest match first), or map detector names onto a vocabulary.",
    )
    parser.add_argument(
        "captions",
        nargs="*",
        metavar="CAPTION",
        help="captions to tag, each one argument (default: none; use --input for a file)",
    )
    parser.add_argument(
        "--vocabulary",
        required=True,
        metavar="FILE_OR_NAME",
        help="one concept per line ('name: synonym, ...'), a vocabulary.json, or "
        "a shipped vocabulary: coco, imagenet1k (required)",
    )
    parser.add_argument(
        "--input",
        type=Path,
        metavar="FILE",
        help="a .txt (one caption per line) or .jsonl file of captions to tag (default: none)",
    )
    parser.add_argument(
        "--field", default="caption", help="JSONL field holding the caption (default: caption)"
    )
    parser.add_argument(
        "--output", type=Path, metavar="FILE", help="write JSON lines here (default: stdout)"
    )
    parser.add_argument(
        "--names",
        nargs="+",
        metavar="NAME",
        help="map these detector / tagger names onto the vocabulary instead of "
        "tagging captions (default: none)",
    )
    parser.add_argument(
        "--write-vocabulary",
        type=Path,
        metavar="DIR",
        help="also write the vocabulary.json these ids mean into DIR (default: not written)",
    )
    parser.add_argument(
        "--no-inflect",
        action="store_true",
        help="match names and synonyms only as written, without plural forms "
        "(default: plurals and inflections match too)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the progress bar (default: shown on stderr)",
    )
    return parser


def _jsonl_records(path: Path, field: str) -> Iterator[tuple[dict[str, Any], str]]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise SystemExit(f"cabs-tag: {path}:{number}: not JSON ({err})") from err
            if not isinstance(obj, dict) or not isinstance(obj.get(field, ""), str):
                raise SystemExit(
                    f"cabs-tag: {path}:{number}: expected an object with a string "
                    f"{field!r} (choose the field with --field)"
                )
            yield obj, obj.get(field) or ""


def _records(args: argparse.Namespace) -> Iterator[tuple[dict[str, Any], str]]:
    for caption in args.captions:
        yield {"caption": caption}, caption
    if args.input is None:
        return
    if not args.input.is_file():
        raise SystemExit(f"cabs-tag: --input {args.input} does not exist")
    if args.input.suffix == ".jsonl":
        yield from _jsonl_records(args.input, args.field)
        return
    with args.input.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            caption = line.rstrip("\n")
            yield {"caption": caption}, caption


def tag_stream(
    tagger: CaptionTagger,
    records: Iterator[tuple[dict[str, Any], str]],
    out: TextIO,
    progress: bool = False,
) -> dict[str, float]:
    """Tag ``(object, caption)`` pairs in batches, write JSON lines, return counts and speed."""
    names = tagger.names
    total = tagged = mentions = 0
    seconds = 0.0
    batch: list[tuple[dict[str, Any], str]] = []
    with tqdm(desc="tag", unit=" captions", disable=not progress) as bar:

        def flush() -> None:
            nonlocal total, tagged, mentions, seconds
            started = time.perf_counter()
            results = tagger.tag_many([caption for _, caption in batch])
            seconds += time.perf_counter() - started
            for (obj, _), ids in zip(batch, results, strict=True):
                obj["concepts"] = ids
                obj["concept_names"] = [names[i] for i in ids]
                out.write(json.dumps(obj, ensure_ascii=False) + "\n")
                tagged += bool(ids)
                mentions += len(ids)
            total += len(batch)
            bar.update(len(batch))
            batch.clear()

        for record in records:
            batch.append(record)
            if len(batch) >= _BATCH:
                flush()
        if batch:
            flush()
    return {
        "captions": total,
        "with_concepts": tagged,
        "mentions": mentions,
        "captions_per_s": round(total / seconds) if seconds else 0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad arguments)."""
    args = build_parser().parse_args(argv)
    try:
        vocabulary = TaggingVocabulary.load(args.vocabulary)
    except (OSError, ValueError) as err:
        print(f"cabs-tag: error: {err}", file=sys.stderr)
        return 2
    if args.write_vocabulary is not None:
        args.write_vocabulary.mkdir(parents=True, exist_ok=True)
        path = vocabulary.vocabulary().save(str(args.write_vocabulary))
        print(f"cabs-tag: wrote {path} ({len(vocabulary)} concepts)", file=sys.stderr)
    out = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
    try:
        if args.names:
            mapper = ConceptNameMapper(vocabulary)
            ids = mapper.map(args.names)
            report = {"concepts": ids, "concept_names": [vocabulary.names[i] for i in ids]}
            report.update(mapper.report())
            out.write(json.dumps(report, ensure_ascii=False) + "\n")
            return 0
        if not args.captions and args.input is None:
            print("cabs-tag: error: give captions, --input FILE or --names", file=sys.stderr)
            return 2
        tagger = CaptionTagger(vocabulary, inflect=not args.no_inflect)
        for conflict in tagger.conflicts:
            if conflict.written:
                print(
                    f"cabs-tag: warning: {conflict.form!r} is written for both "
                    f"{conflict.kept!r} and {conflict.lost!r}; it tags {conflict.kept!r}",
                    file=sys.stderr,
                )
        summary = tag_stream(tagger, _records(args), out, progress=not args.no_progress)
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"cabs-tag: {json.dumps(summary)}", file=sys.stderr)
    return 0

"""Where a record's concepts come from: the input, the captions, or the user's tagger.

``--tag-captions`` is cheap and tags in both passes. A ``--tagger`` may run a detector, so it
runs once, in the scan (which then reads images too); its names are kept in a spill file per
input file and read back by the write pass in the same order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

from cabs_streaming.converter.judge import image_verdict
from cabs_streaming.converter.readers import READERS
from cabs_streaming.converter.records import ConversionError, ReadOptions, Record
from cabs_streaming.converter.text import is_blank
from cabs_streaming.tagging import cached_caption_tagger, check_tagger_output, load_tagger


def read_records(
    path: str, opts: ReadOptions, *, scan: bool, spill: str | None
) -> Iterator[Record]:
    """The records of one file, with their concepts from whichever source was chosen.

    ``--tag-captions`` is cheap and tags in both passes. A ``--tagger`` may run a detector, so it
    runs once, in the scan (which then reads images too); its names go to ``spill``, one JSON line
    per record, and the write pass reads them back in the same order.
    """
    records = READERS[opts.fmt](path, opts, not scan or opts.tagger is not None)
    if opts.tag_captions is not None:
        tagger = cached_caption_tagger(opts.tag_captions)
        for rec in records:
            if rec.malformed is None and rec.skip is None:
                rec.concepts = tagger.tag(rec.caption)
            yield rec
    elif opts.tagger is None:
        yield from records
    elif scan:
        function = load_tagger(opts.tagger)
        with open(spill or os.devnull, "w", encoding="utf-8") as saved:
            for rec in records:
                names = _run_tagger(function, opts.tagger, rec, path, opts.limits.max_image_pixels)
                saved.write(json.dumps(names, ensure_ascii=False) + "\n")
                rec.concepts = names or []
                yield rec
    else:
        with open(spill or os.devnull, encoding="utf-8") as saved:
            for rec in records:
                line = saved.readline()
                rec.concepts = (json.loads(line) if line else None) or []
                yield rec


def _run_tagger(
    function: Callable[..., Any], spec: str, rec: Record, path: str, max_pixels: int
) -> list[str] | None:
    """The user's tagger on one record; None where the record will be skipped anyway."""
    if (
        rec.malformed is not None
        or rec.skip is not None
        or rec.caption is None
        or is_blank(rec.caption)
        or rec.image is None
        or image_verdict(rec.image, max_pixels) is not None
    ):
        return None
    label = rec.key or rec.label
    try:
        names = function(rec.image, rec.caption)
    except Exception as err:
        raise ConversionError(
            f"--tagger {spec!r} failed on sample {label!r} of {path} ({type(err).__name__}: "
            f"{err}); fix the function, or make it return [] for such images"
        ) from err
    try:
        return check_tagger_output(spec, label, names)
    except ValueError as err:
        raise ConversionError(f"{path}: {err}") from None

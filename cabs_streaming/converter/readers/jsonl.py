"""JSONL manifests of ``{"image", "caption", "concepts"}`` lines beside their image files.

A ``--numeric-column NAME`` is the line's field ``NAME``.

Image paths are relative to the manifest's folder and confined to it (``files.py``). An
over-long line is skipped in bounded chunks, never held whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from cabs_streaming.converter.readers.files import read_image_file
from cabs_streaming.converter.records import TAGGING_HINT, ReadOptions, Record
from cabs_streaming.converter.text import (
    clean_text,
    json_concepts,
    json_key,
    json_object,
    json_scores,
    json_text,
)


def _manifest_lines(manifest: Any, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) of the non-blank lines; None for a line over ``limit`` bytes.

    An over-long line is skipped in bounded chunks, never held whole (a manifest of one
    gigabyte-long line, or ``/dev/zero`` given as a file, cannot exhaust memory).
    """
    number = 0
    while raw := manifest.readline(limit + 1):
        number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            while (rest := manifest.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield number, None
        elif raw.strip():
            yield number, raw


def read_jsonl(path: str, opts: ReadOptions, with_images: bool) -> Iterator[Record]:
    """Lines of a manifest; image paths are relative to the manifest's directory."""
    base = opts.image_base or os.path.dirname(path)
    limit = opts.limits.max_member_bytes
    with open(path, "rb") as manifest:
        for index, (line_number, raw) in enumerate(_manifest_lines(manifest, limit)):
            rec = Record(index=index, label=f"line {line_number}")
            if raw is None:
                rec.skip = ("over a size limit", f"the line is over --max-member-bytes {limit:,}")
            else:
                _manifest_record(rec, raw, opts, base, with_images)
            yield rec


def _manifest_record(
    rec: Record, raw: bytes, opts: ReadOptions, base: str, with_images: bool
) -> None:
    """Fill ``rec`` from one manifest line."""
    obj, problem, rec.repaired = json_object(raw)
    if obj is None:
        rec.malformed = problem
        return
    rec.numbers = {name: obj[name] for name, _ in opts.numeric_columns if name in obj}
    image_path = obj.get("image")
    if "key" in obj:
        rec.key, problem = json_key(obj["key"], "key")
    elif isinstance(image_path, str) and image_path:
        rec.key = image_path
    if rec.key is not None:
        rec.key, fixed = clean_text(rec.key)
        rec.repaired |= fixed
        rec.label = rec.key
    caption, problem_caption, fixed_caption = json_text(obj, "caption")
    recaption, problem_re, fixed_re = json_text(obj, "recaption")
    rec.caption, rec.recaption = caption, recaption or ""
    rec.repaired |= fixed_caption or fixed_re
    problem = problem or problem_caption or problem_re
    if problem is None and opts.read_concepts and "concepts" not in obj:
        rec.skip = ("missing concepts", "line has no 'concepts' field" + TAGGING_HINT)
    elif problem is None and opts.read_concepts:
        concepts, problem, fixed = json_concepts(obj["concepts"], "concepts")
        rec.concepts = concepts or []
        rec.repaired |= fixed
        if problem is None:
            rec.scores, problem = json_scores(obj.get("scores"), len(rec.concepts))
    rec.malformed = problem
    if not isinstance(image_path, str) or not image_path:
        rec.image_problem = "line has no 'image' path"
    elif with_images:
        rec.image, rec.image_problem, rec.image_reason = read_image_file(image_path, base, opts)

"""Judging a record: the checks shared verbatim by the scan and the write pass, and the image.

Sharing the metadata checks is what keeps the two passes in agreement about which samples
survive. The image check decodes cheaply (JPEGs at 1/8 scale) after reading the size from the
header, so an image over ``max_image_pixels`` is refused before any pixel is decoded.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from cabs_streaming.converter.records import BAD_NUMERIC, ConversionError, Limits, Record
from cabs_streaming.converter.text import is_blank, utf8_size
from cabs_streaming.tagging import ConceptNameMapper, cached_name_mapper


@dataclass(frozen=True)
class ConceptPolicy:
    """How concept entries are checked.

    ``names`` given: a name must be in it (a fixed vocabulary, or the final one when writing).
    ``names`` None: any non-empty name is fine (building or extending a vocabulary).
    ``id_limit``: ids must lie in ``[0, id_limit)``; None means ids cannot be interpreted.
    """

    names: tuple[str, ...] | None
    id_limit: int | None

    def index(self) -> dict[str, int] | None:
        """Name -> id map (built per worker: the policy itself stays small to pickle)."""
        return None if self.names is None else {n: i for i, n in enumerate(self.names)}


class Judge:
    """The checks that do not need the image, shared verbatim by the scan and the write pass.

    Sharing them is what keeps the two passes in agreement about which samples survive.
    """

    def __init__(
        self,
        policy: ConceptPolicy,
        path: str,
        limits: Limits,
        numeric_columns: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.policy = policy
        self.limits = limits
        self.numeric_columns = tuple(numeric_columns)
        self.index = policy.index()
        self.path = path
        self.mapper: ConceptNameMapper | None = None
        # Names of samples skipped as "unknown concept", and names found only in normal form.
        self.unknown: Counter[str] = Counter()
        self.normalised: Counter[tuple[str, str]] = Counter()

    def _lookup(self, name: str) -> int | None:
        """A name not in the vocabulary as written, looked up in normal form (case, plural...)."""
        if self.mapper is None:
            self.mapper = cached_name_mapper(self.policy.names or ())
        return self.mapper.lookup(name)

    def metadata_verdict(self, rec: Record) -> tuple[tuple[str, str] | None, list[int]]:
        """(skip reason and detail, or None; concept ids when a name index is known)."""
        if rec.malformed is not None:
            return ("malformed json", rec.malformed), []
        if rec.skip is not None:
            return rec.skip, []
        if rec.caption is None or is_blank(rec.caption):
            return ("missing caption", "no caption text"), []
        too_long = self._too_long(rec)
        if too_long is not None:
            return ("over a size limit", too_long), []
        ids: list[int] = []
        unknown: list[str] = []
        normalised: list[tuple[str, str]] = []
        for entry in rec.concepts:
            if entry is None or entry == "":
                return ("unknown concept", f"{'null' if entry is None else 'empty'} concept"), []
            if isinstance(entry, str):
                if self.index is None:
                    ids.append(-1)
                    continue
                concept_id = self.index.get(entry)
                if concept_id is None:
                    concept_id = self._lookup(entry)
                    if concept_id is None:
                        unknown.append(entry)
                        continue
                    normalised.append((entry, self.index_names[concept_id]))
                ids.append(concept_id)
            elif isinstance(entry, bool) or not isinstance(entry, int):
                return ("unknown concept", f"concept {entry!r} is not a name or an integer id"), []
            else:
                limit = self.policy.id_limit
                if limit is None:
                    raise ConversionError(
                        f"{self.path} ({rec.label}): concepts are given as ids ({entry}), which "
                        "mean nothing without a vocabulary: pass --vocabulary FILE"
                    )
                if not 0 <= entry < limit:
                    return (
                        "unknown concept",
                        f"concept id {entry} is outside the vocabulary [0, {limit})",
                    ), []
                ids.append(int(entry))
        if unknown:
            self.unknown.update(unknown)
            more = f" (and {len(unknown) - 1} more unknown names)" if len(unknown) > 1 else ""
            return ("unknown concept", f"concept {unknown[0]!r} is not in the vocabulary{more}"), []
        if self.numeric_columns:
            _, problem = numeric_values(rec.numbers, self.numeric_columns)
            if problem is not None:
                return (BAD_NUMERIC, problem), []
        self.normalised.update(normalised)
        return None, ids

    def _too_long(self, rec: Record) -> str | None:
        """Why the caption or recaption is over ``max_caption_bytes``, or None."""
        limit = self.limits.max_caption_bytes
        for name, text in (("caption", rec.caption or ""), ("recaption", rec.recaption)):
            if len(text) * 4 > limit and utf8_size(text) > limit:  # 4: the most a char takes
                size = utf8_size(text)
                return f"the {name} is {size:,} bytes, over --max-caption-bytes {limit:,}"
        return None

    @property
    def index_names(self) -> tuple[str, ...]:
        """Vocabulary names by id (only asked for when the policy has names)."""
        return self.policy.names or ()


def numeric_values(
    found: dict[str, Any], columns: Sequence[tuple[str, str]]
) -> tuple[dict[str, int | float], str | None]:
    """The declared numeric columns' values as written, or the first problem naming its column.

    A value is refused rather than coerced: missing, null, not a number (a string, a boolean, a
    list), NaN or infinite, a fraction for an integer type, or out of the type's range (a float
    beyond float32's range would be written as infinity, an int beyond int32 would wrap).
    """
    values: dict[str, int | float] = {}
    for name, kind in columns:
        value, problem = _numeric_value(found, name, kind)
        if problem is not None:
            return {}, f"numeric column {name!r} ({kind}): {problem}"
        values[name] = value
    return values, None


def _numeric_value(found: dict[str, Any], name: str, kind: str) -> tuple[Any, str | None]:
    """One declared column's value, checked against its MDS scalar ``kind``."""
    if name not in found:
        return None, "missing"
    value = found[name]
    if value is None:
        return None, "null"
    numeric = int | float | np.integer | np.floating
    if isinstance(value, bool | np.bool_) or not isinstance(value, numeric):
        return None, f"{value!r} is not a number"
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return None, f"{value!r} is not finite"
    if kind.startswith("float"):
        bound = float(np.finfo(kind).max)
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if abs(number) > bound:
            return None, f"{value!r} is out of the range of {kind}"
        return number, None
    if isinstance(value, float | np.floating):
        if not float(value).is_integer():
            return None, f"{value!r} is not an integer"
        value = int(value)
    info = np.iinfo(kind)
    if not info.min <= int(value) <= info.max:
        return None, f"{value!r} is out of the range of {kind} [{info.min}, {info.max}]"
    return int(value), None


def image_problem(data: bytes, max_pixels: int = Limits.max_image_pixels) -> str | None:
    """Why ``data`` is not a usable image (undecodable, or over ``max_pixels``), or None."""
    verdict = image_verdict(data, max_pixels)
    return None if verdict is None else verdict[1]


@contextmanager
def _pixel_limit_is_ours() -> Iterator[None]:
    """Turn off PIL's decompression-bomb check while ``image_verdict`` makes its own.

    PIL warns above ``Image.MAX_IMAGE_PIXELS`` and refuses twice that, whatever the user chose
    with ``--max-image-pixels``; the converter checks the size itself, before decoding.
    """
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def image_verdict(data: bytes, max_pixels: int) -> tuple[str, str] | None:
    """(skip reason, detail) when ``data`` is not a usable image, or None when it decodes.

    The size comes from the header, so an image over ``max_pixels`` is refused before any pixel
    is decoded. ``Image.verify()`` misses truncated JPEGs, so the rest decodes; JPEGs at 1/8
    scale (``draft``), which is cheap and still reads every byte of entropy-coded data.
    """
    try:
        with _pixel_limit_is_ours(), Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                return "over a size limit", (
                    f"the image is {width:,} x {height:,} = {width * height:,} pixels, over "
                    f"--max-image-pixels {max_pixels:,}"
                )
            if image.format == "JPEG":
                image.draft(None, (1, 1))
            image.load()
    except Exception as err:  # any decoder failure means the downstream decode would fail too
        return "undecodable image", f"{type(err).__name__}: {err}"
    return None

"""Text and json fields of a record, decoded leniently and checked strictly.

Invalid UTF-8 is replaced (U+FFFD) and flagged, so the sample is kept and counted under
``repaired``; a field of the wrong type is a problem string, which the reader turns into a
``malformed json`` skip. Every function returns its problems instead of raising: one hostile
record must never end a conversion.
"""

from __future__ import annotations

import json
import math
import unicodedata
from typing import Any


def decode_text(raw: bytes) -> tuple[str, bool]:
    """Decode UTF-8, replacing invalid bytes; the flag says whether anything was replaced."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def clean_text(text: str) -> tuple[str, bool]:
    """Make ``text`` encodable as UTF-8 (json escapes can yield lone surrogates)."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="replace").decode("utf-8"), True


def as_text(value: Any) -> tuple[str | None, bool]:
    """Turn a text cell (str, bytes or None) into clean ``str``; ``None`` stays ``None``."""
    if value is None:
        return None, False
    if isinstance(value, bytes | bytearray):
        return decode_text(bytes(value))
    return clean_text(str(value))


def json_object(raw: bytes) -> tuple[dict[str, Any] | None, str | None, bool]:
    """Parse a json member or manifest line: (object, problem, repaired)."""
    text, repaired = decode_text(raw)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"json does not parse ({err})", repaired
    except RecursionError:  # one hostile record must not end the conversion
        return None, "json is nested too deeply to parse", repaired
    if not isinstance(obj, dict):
        return None, f"json is a {type(obj).__name__}, not an object", repaired
    return obj, None, repaired


def json_key(value: Any, name: str) -> tuple[str | None, str | None]:
    """Read a key from a json field (``uid`` / ``key``): non-empty str or int."""
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        return None, f"{name!r} must be a non-empty string or an integer, got {value!r}"
    return str(value), None


def json_text(obj: dict[str, Any], name: str) -> tuple[str | None, str | None, bool]:
    """Read an optional text field: (text or None, problem, repaired)."""
    value = obj.get(name)
    if value is None:
        return None, None, False
    if not isinstance(value, str):
        return None, f"{name!r} must be a string, got {type(value).__name__}", False
    text, repaired = clean_text(value)
    return text, None, repaired


def json_concepts(value: Any, name: str) -> tuple[list[Any] | None, str | None, bool]:
    """Read a json concept list (names, ids or nulls): (entries, problem, repaired)."""
    if not isinstance(value, list):
        return None, f"{name!r} must be a list, got {type(value).__name__}", False
    entries: list[Any] = []
    repaired = False
    for entry in value:
        if isinstance(entry, str):
            entry, fixed = clean_text(entry)
            repaired |= fixed
        elif entry is not None and (isinstance(entry, bool) or not isinstance(entry, int)):
            return None, f"{name!r} holds {entry!r}: entries must be names or integer ids", False
        entries.append(entry)
    return entries, None, repaired


def json_tags(value: Any) -> tuple[list[Any] | None, str | None, bool]:
    """``tags`` as found in DataConcept: one string joined by " | " (a list is accepted too)."""
    if isinstance(value, str):
        text, repaired = clean_text(value)
        return [t.strip() for t in text.split("|") if t.strip()], None, repaired
    return json_concepts(value, "tags")


def json_scores(value: Any, n: int) -> tuple[list[float] | None, str | None]:
    """Read optional per-instance confidences; when present they must align with concepts.

    A confidence is a finite number in [0, 1]: anything else (NaN, infinities, logits) would be
    stored as a meaningless float16, so the record is refused rather than silently changed.
    """
    if value is None:
        return None, None
    if not isinstance(value, list) or any(
        isinstance(s, bool) or not isinstance(s, int | float) for s in value
    ):
        return None, "'scores' must be a list of numbers"
    if len(value) != n:
        return None, f"'scores' has {len(value)} entries but there are {n} concepts"
    bad = next((s for s in value if not (math.isfinite(s) and 0 <= s <= 1)), None)
    if bad is not None:
        return None, f"'scores' holds {bad!r}: scores are confidences, finite numbers in [0, 1]"
    return [float(s) for s in value], None


def is_blank(text: str) -> bool:
    """Whether ``text`` holds nothing to read: only whitespace, control or format characters."""
    if text.isprintable():
        return not text.strip()
    return all(unicodedata.category(ch)[0] in "CZ" for ch in text)


def utf8_size(text: str) -> int:
    """UTF-8 bytes of ``text`` (errors replaced, as they are when written)."""
    return len(text.encode("utf-8", errors="replace"))

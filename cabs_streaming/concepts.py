"""Concept vocabulary and the MDS schema shared by the converter, the dataset and the tools.

A concept id is a position in ``vocabulary.json`` (``{"version": 1, "concepts": [...]}``), which
lives beside the MDS ``index.json``. Concept lists travel as little-endian int32 bytes in MDS and as
ragged CSR arrays (``offsets`` int64 ``[n + 1]``, ``ids`` int32 ``[nnz]``) in batches, the form the
selection engine takes. This module is numpy-only on purpose: the selection engine, the dataset
and the tools all read it, and none of them should pull in torch or Composer through it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

VOCABULARY_FILENAME = "vocabulary.json"
VOCABULARY_VERSION = 1

#: MDS schema version 1 (docs/design.md#mds-schema). ``image`` keeps the encoded file as found so
#: that decoding can be deferred until after selection; ``concepts`` is little-endian int32 ids
#: (one per detected instance, possibly empty, which ``ndarray`` columns cannot hold).
MDS_COLUMNS: dict[str, str] = {
    "key": "str",
    "image": "bytes",
    "caption": "str",
    "recaption": "str",
    "concepts": "bytes",
    "concept_scores": "bytes",
}

CONCEPT_DTYPE = np.dtype("<i4")
SCORE_DTYPE = np.dtype("<f2")


def encode_concepts(ids: Iterable[int] | np.ndarray) -> bytes:
    """Encode concept ids as the little-endian int32 bytes of the ``concepts`` MDS column."""
    arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(
            f"concept ids must lie in [0, 2**31): got min {arr.min()}, max {arr.max()}"
        )
    return arr.astype(CONCEPT_DTYPE, copy=False).tobytes()


def decode_concepts(raw: bytes | memoryview) -> np.ndarray:
    """Decode the ``concepts`` column into a writable native int32 array (a copy, never a view)."""
    if len(raw) % CONCEPT_DTYPE.itemsize:
        raise ValueError(
            f"concepts payload of {len(raw)} bytes is not a whole number of int32 ids; "
            "the shard is corrupt or was not written with MDS schema v1"
        )
    return np.frombuffer(raw, dtype=CONCEPT_DTYPE).astype(np.int32, copy=True)


def encode_scores(scores: Iterable[float] | np.ndarray) -> bytes:
    """Encode per-instance confidences as the float16 bytes of the ``concept_scores`` column."""
    return np.asarray(list(scores) if not isinstance(scores, np.ndarray) else scores).astype(
        SCORE_DTYPE
    ).tobytes()


def decode_scores(raw: bytes | memoryview) -> np.ndarray:
    """Decode the ``concept_scores`` column into a writable float32 array."""
    return np.frombuffer(raw, dtype=SCORE_DTYPE).astype(np.float32, copy=True)


def ragged_from_lists(lists: Sequence[Sequence[int] | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Pack per-sample concept lists into CSR form: (``offsets`` int64 ``[n+1]``, ``ids`` int32)."""
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1]:
        ids = np.concatenate([np.asarray(x, dtype=np.int32) for x in lists])
    else:
        ids = np.zeros(0, dtype=np.int32)
    return offsets, ids


def ragged_to_lists(offsets: np.ndarray, ids: np.ndarray) -> list[list[int]]:
    """Unpack CSR concept lists into Python lists (for tests, reports and logs, not hot paths)."""
    return [ids[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


@dataclass
class Vocabulary:
    """Bidirectional map between concept names and ids (id = position in ``names``)."""

    names: list[str]
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = {}
        for i, name in enumerate(self.names):
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"concept {i} has an invalid name {name!r}: names are non-empty str"
                )
            if name in self._index:
                raise ValueError(
                    f"concept name {name!r} appears twice (ids {self._index[name]} and {i}); "
                    "names must be unique"
                )
            self._index[name] = i

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def id_of(self, name: str) -> int:
        """Id of ``name``; ``KeyError`` naming the concept when it is not in the vocabulary."""
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(
                f"concept {name!r} is not in the vocabulary ({len(self)} names)"
            ) from None

    def get(self, name: str, default: int | None = None) -> int | None:
        """Id of ``name`` or ``default``."""
        return self._index.get(name, default)

    def name_of(self, concept_id: int) -> str:
        """Name of ``concept_id``; ``IndexError`` when it is out of range."""
        if not 0 <= concept_id < len(self.names):
            raise IndexError(f"concept id {concept_id} is outside the vocabulary [0, {len(self)})")
        return self.names[concept_id]

    def add(self, name: str) -> int:
        """Append ``name`` if new and return its id (used by ``--extend-vocabulary``)."""
        existing = self._index.get(name)
        if existing is not None:
            return existing
        if not isinstance(name, str) or not name:
            raise ValueError(f"invalid concept name {name!r}: names are non-empty str")
        self._index[name] = len(self.names)
        self.names.append(name)
        return self._index[name]

    def to_json(self) -> str:
        """Serialise as ``vocabulary.json`` text."""
        payload = {"version": VOCABULARY_VERSION, "concepts": self.names}
        return json.dumps(payload, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "vocabulary.json") -> Vocabulary:
        """Parse ``vocabulary.json`` text; ``source`` names the file in errors."""
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: not valid JSON ({err})") from err
        if not isinstance(obj, dict) or "concepts" not in obj:
            raise ValueError(f'{source}: expected {{"version": 1, "concepts": [...]}}')
        if obj.get("version") != VOCABULARY_VERSION:
            raise ValueError(
                f"{source}: vocabulary version {obj.get('version')!r} is not supported "
                f"(this release reads version {VOCABULARY_VERSION})"
            )
        if not isinstance(obj["concepts"], list):
            raise ValueError(f'{source}: "concepts" must be a list of names')
        return cls(list(obj["concepts"]))

    def save(self, directory: str) -> str:
        """Write ``vocabulary.json`` into a local ``directory``; returns the file path."""
        path = os.path.join(directory, VOCABULARY_FILENAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())
        return path

    @classmethod
    def load(cls, path: str) -> Vocabulary:
        """Read a local ``vocabulary.json`` (or a directory holding one)."""
        if os.path.isdir(path):
            path = os.path.join(path, VOCABULARY_FILENAME)
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read(), source=path)

"""Concept vocabulary and the MDS schema shared by the converter, the dataset and the tools.

A concept id is a position in ``vocabulary.json`` (``{"version": 1, "concepts": [...]}``), which
lives beside the MDS ``index.json``, as does ``concept_counts.json`` (:class:`ConceptCounts`: how
many written samples hold each concept, counted by the converter, so that a policy can know the
dataset-wide frequencies without a pass over the shards). Concept lists travel as little-endian
int32 bytes in MDS and as ragged CSR arrays (``offsets`` int64 ``[n + 1]``, ``ids`` int32
``[nnz]``) in batches, the form the selection engine takes. This module is numpy-only on purpose:
the selection engine, the dataset and the tools all read it, and none of them should pull in
torch or Composer through it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

VOCABULARY_FILENAME = "vocabulary.json"
VOCABULARY_VERSION = 1
CONCEPT_COUNTS_FILENAME = "concept_counts.json"
CONCEPT_COUNTS_VERSION = 1

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

#: Scalar MDS encodings a ``--numeric-column`` may declare (``float32`` is the default).
NUMERIC_TYPES = ("float32", "float64", "int32", "int64")
#: Per-sample columns the dataset derives from ``concept_scores`` (no MDS column needed): the
#: min / max detection confidence of the sample, NaN when it has none.
DERIVED_COLUMNS = ("concept_score_min", "concept_score_max")

CONCEPT_DTYPE = np.dtype("<i4")
SCORE_DTYPE = np.dtype("<f2")


def _write_file(directory: str, filename: str, text: str) -> str:
    """Write ``text`` as ``filename`` in a local ``directory``; returns the file path."""
    path = os.path.join(directory, filename)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _read_file(path: str, filename: str) -> tuple[str, str]:
    """``(text, path)`` of a local file, or of ``filename`` in ``path`` when it is a directory."""
    if os.path.isdir(path):
        path = os.path.join(path, filename)
    with open(path, encoding="utf-8") as f:
        return f.read(), path


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
        return _write_file(directory, VOCABULARY_FILENAME, self.to_json())

    @classmethod
    def load(cls, path: str) -> Vocabulary:
        """Read a local ``vocabulary.json`` (or a directory holding one)."""
        return cls.from_json(*_read_file(path, VOCABULARY_FILENAME))


@dataclass(eq=False)
class ConceptCounts:
    """Dataset-wide counts per concept id, as the converter wrote them (``concept_counts.json``).

    ``samples[i]`` is how many written samples hold concept ``i`` at least once, ``instances[i]``
    how many detected instances of it were written, ``written`` how many samples were written
    (the denominator of a frequency). Both arrays are int64 and as long as the vocabulary, in its
    order. Counts of several streams add up (``a + b``, ``sum([...])``), which is what a mixture
    of datasets sharing one vocabulary holds, whatever the streams' sampling proportions.
    """

    samples: np.ndarray
    instances: np.ndarray
    written: int

    def __post_init__(self) -> None:
        self.samples = np.array(self.samples, dtype=np.int64).reshape(-1)
        self.instances = np.array(self.instances, dtype=np.int64).reshape(-1)
        self.written = int(self.written)
        if len(self.samples) != len(self.instances):
            raise ValueError(
                f"concept counts: {len(self.samples)} sample counts but "
                f"{len(self.instances)} instance counts; both are one per concept id"
            )
        if self.written < 0 or (self.samples < 0).any() or (self.instances < 0).any():
            raise ValueError("concept counts must be non-negative")

    def __len__(self) -> int:
        return len(self.samples)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConceptCounts):
            return NotImplemented
        return (
            self.written == other.written
            and np.array_equal(self.samples, other.samples)
            and np.array_equal(self.instances, other.instances)
        )

    def __add__(self, other: ConceptCounts) -> ConceptCounts:
        """The counts of both datasets together; they must count the same vocabulary."""
        if not isinstance(other, ConceptCounts):
            return NotImplemented
        if len(self) != len(other):
            raise ValueError(
                f"cannot add concept counts over {len(self)} and {len(other)} concepts: the "
                "datasets do not share one vocabulary"
            )
        return ConceptCounts(
            self.samples + other.samples,
            self.instances + other.instances,
            self.written + other.written,
        )

    def __radd__(self, other: object) -> ConceptCounts:
        """``0 + counts`` is ``counts``, so that ``sum(counts_list)`` works."""
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self
        return NotImplemented

    def to_json(self) -> str:
        """Serialise as ``concept_counts.json`` text."""
        payload = {
            "version": CONCEPT_COUNTS_VERSION,
            "samples": self.samples.tolist(),
            "instances": self.instances.tolist(),
            "written": self.written,
        }
        return json.dumps(payload)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = CONCEPT_COUNTS_FILENAME) -> ConceptCounts:
        """Parse ``concept_counts.json`` text; ``source`` names the file in errors."""
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: not valid JSON ({err})") from err
        shape = '{"version": 1, "samples": [...], "instances": [...], "written": N}'
        if not isinstance(obj, dict) or not {"samples", "instances", "written"} <= obj.keys():
            raise ValueError(f"{source}: expected {shape}")
        if obj.get("version") != CONCEPT_COUNTS_VERSION:
            raise ValueError(
                f"{source}: concept counts version {obj.get('version')!r} is not supported "
                f"(this release reads version {CONCEPT_COUNTS_VERSION}); re-convert the dataset"
            )
        fields = (obj["samples"], obj["instances"], obj["written"])
        lists_ok = all(
            isinstance(values, list)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
            for values in fields[:2]
        )
        if not lists_ok or isinstance(fields[2], bool) or not isinstance(fields[2], int):
            raise ValueError(f"{source}: expected {shape} with integer counts")
        try:
            return cls(*fields)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err

    def write(self, directory: str) -> str:
        """Write ``concept_counts.json`` into a local ``directory``; returns the file path."""
        return _write_file(directory, CONCEPT_COUNTS_FILENAME, self.to_json())

    @classmethod
    def read(cls, path: str) -> ConceptCounts:
        """Read a local ``concept_counts.json`` (or a directory holding one)."""
        return cls.from_json(*_read_file(path, CONCEPT_COUNTS_FILENAME))

"""Convert image-text data into MDS schema v1 shards with ``vocabulary.json`` and ``report.json``.

Inputs are WebDataset tars (DataComp / DataConcept layout), parquet files, or a JSONL manifest
beside its image files. The output is a local directory or a remote prefix (``s3://bucket/path``;
the endpoint comes from ``S3_ENDPOINT_URL``, credentials from boto3's default chain) holding MDS
shards in the ``MDS_COLUMNS`` schema of :mod:`cabs_streaming.concepts`, ``vocabulary.json``
beside ``index.json``, and ``report.json`` saying what was read, written and skipped and why.
``tools/convert_to_mds.py`` is the command line; :func:`convert` is the same thing for Python.

How it works, and why
---------------------
**Two passes, no images held.** Concept ids must be final when a shard is written (shards are
never rewritten), yet a vocabulary built from the data is ordered by frequency, which is known only
after the whole input has been seen. So the converter reads the input twice:

1. *Scan* reads only what decides a sample's fate without its image: parquet projects the key,
   caption and concept columns; tar image members are streamed past unread; a JSONL manifest is
   read without opening any image. It drops malformed records, missing captions and unknown
   concepts, gives every key to the first remaining sample that carries it (input order), and
   counts concept names over those key owners. The vocabulary (most frequent first, ties by name;
   frequency = detected instances) is fixed from these counts.
2. *Write* reads everything again, checks each image (present, decodable by a cheap PIL decode),
   and writes the survivors with final ids. Images are stored exactly as found.

A consequence to know: a sample that passes the scan but is then dropped for its image (missing
or undecodable) has already been counted, so a concept seen only in such samples can appear in a
built vocabulary with no written instance. Ids are only an ordering, so nothing breaks.

**Duplicate keys are decided in the scan**, globally and in input order: the first sample whose
metadata is valid owns its key and every later sample with that key is a ``duplicate key``, even
when the owner is later dropped for its image. Deciding there makes the answer independent of
``workers`` and needs no pass over written shards. It costs one Python set of keys in the parent
process (roughly 100 bytes a key, about 1 GB per 10 M samples); convert a larger corpus as several
datasets (Streaming mixes them as streams) if that is too much.

**Parallel writing.** With ``workers > 1`` the input files are split into that many contiguous
runs (balanced by the scan's sample counts); each worker process writes its run into
``part-NNNNN/`` and ``streaming.base.util.merge_index`` joins the parts in order. Sample order is
therefore input order for every ``workers`` value, and a given input and ``workers`` always yield
the same shards. ``workers == 1`` writes the shards directly into the output directory.

**Damaged input is counted, not fatal.** A tar that ends early (cut mid-member, or without its
end-of-archive blocks) or a parquet file that stops reading keeps every sample read before the
damage. The sample being read at the cut is judged on the members that arrived whole, so it
usually becomes a ``missing image`` or ``malformed json`` skip. The file and the error are listed
under ``errors`` in the report (the CLI then exits with status 1), and ``read == written +
sum(skipped)`` holds as always.

**Text.** Invalid UTF-8 in captions, json members or manifest lines is decoded with U+FFFD
replacement, the sample is kept, and the written samples affected are counted under
``repaired["invalid utf-8"]``. A caption that is empty or only whitespace is a ``missing
caption``.

**Concept annotations.** An empty concept list is kept. A *missing* annotation is not an empty
one: a json without the field chosen by ``concepts_from`` (``classes`` or ``tags``) is
``malformed json``. In parquet a null concepts cell is read as an empty list, since Arrow writers
commonly store empty lists that way. A concept name not in a given vocabulary, an empty name, a
null entry or an id outside ``[0, len(vocabulary))`` is an ``unknown concept``. Names are matched
onto a given vocabulary as written, then in normal form (case, plural, whitespace, punctuation;
:class:`cabs_streaming.tagging.ConceptNameMapper`), so a detector's "Dogs" or "hot_dog" finds
"dog" or "hot dog"; ``report.json`` counts the names that matched nothing (``concept_names``).

**Data without concepts.** ``--tag-captions VOCABULARY`` takes the ids from the caption with
:class:`cabs_streaming.tagging.CaptionTagger` (in both passes: it is cheap), and the vocabulary
file fixes the ids. ``--tagger module:function`` calls the user's function on (image bytes,
caption) for names, e.g. an image tagger or detector on their own hardware. It may be expensive,
so it runs once per sample, in the scan, which then reads images; the names are kept in a
temporary file per input file and read back by the write pass. Either replaces the input's own
concepts, so neither can be combined with ``--concepts-from`` / ``--concepts-column``.
"""

from __future__ import annotations

import argparse
import bisect
import bz2
import glob
import gzip
import io
import itertools
import json
import logging
import lzma
import multiprocessing
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.parse
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from tqdm import tqdm

from cabs_streaming.concepts import (
    MDS_COLUMNS,
    VOCABULARY_FILENAME,
    Vocabulary,
    encode_concepts,
    encode_scores,
)
from cabs_streaming.tagging import (
    ConceptNameMapper,
    TaggingVocabulary,
    cached_caption_tagger,
    cached_name_mapper,
    check_tagger_output,
    load_tagger,
    names_report,
)

__all__ = [
    "FORMATS",
    "REPORT_FILENAME",
    "SKIP_REASONS",
    "ConversionError",
    "build_parser",
    "convert",
    "image_problem",
    "main",
]

FORMATS = ("webdataset", "parquet", "jsonl")
CONCEPT_SOURCES = ("classes", "tags")

#: Why a sample was not written; every reason always appears in ``report["skipped"]``.
SKIP_REASONS = (
    "undecodable image",
    "missing caption",
    "unknown concept",
    "duplicate key",
    "malformed json",
    "missing image",
)
INVALID_UTF8 = "invalid utf-8"
REPORT_FILENAME = "report.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

_INPUT_SUFFIXES = {
    "webdataset": (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"),
    "parquet": (".parquet",),
    "jsonl": (".jsonl",),
}
_TAR_BLOCK = 512
_PROGRESS_EVERY = 64

logger = logging.getLogger(__name__)


class ConversionError(ValueError):
    """A problem with the arguments or the input that the user must fix; the message says how."""


class _DamagedInput(Exception):
    """An input file stopped reading part-way; the samples read before stay valid."""


# ---------------------------------------------------------------------------------------------
# Records: one candidate sample as read from any format
# ---------------------------------------------------------------------------------------------


@dataclass
class _Record:
    """One candidate sample, before any judgement; readers only fill in what they found."""

    index: int  # position in its file, counting every record read (also the malformed ones)
    label: str  # the key when known, else a position ("line 3"): used in report examples
    key: str | None = None
    caption: str | None = None
    recaption: str = ""
    concepts: list[Any] = field(default_factory=list)
    scores: list[float] | None = None
    image: bytes | None = None
    malformed: str | None = None  # why the record's json / metadata cannot be used
    image_problem: str = "no image"  # why ``image`` is None
    repaired: bool = False  # some text held invalid UTF-8, replaced with U+FFFD


@dataclass(frozen=True)
class _ReadOptions:
    """How to read the input (picklable: it travels to worker processes)."""

    fmt: str
    concepts_from: str = "classes"
    image_column: str = "image"
    caption_column: str = "caption"
    concepts_column: str = "concepts"
    key_column: str | None = None
    recaption_column: str | None = None
    tag_captions: str | None = None  # vocabulary file: concept ids come from the caption
    tagger: str | None = None  # "module:function": concept names come from the user's tagger

    @property
    def read_concepts(self) -> bool:
        """Whether concepts come from the input (else from a tagger, and the input needs none)."""
        return self.tag_captions is None and self.tagger is None


def _decode_text(raw: bytes) -> tuple[str, bool]:
    """Decode UTF-8, replacing invalid bytes; the flag says whether anything was replaced."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _clean_text(text: str) -> tuple[str, bool]:
    """Make ``text`` encodable as UTF-8 (json escapes can yield lone surrogates)."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="replace").decode("utf-8"), True


def _as_text(value: Any) -> tuple[str | None, bool]:
    """Turn a text cell (str, bytes or None) into clean ``str``; ``None`` stays ``None``."""
    if value is None:
        return None, False
    if isinstance(value, bytes | bytearray):
        return _decode_text(bytes(value))
    return _clean_text(str(value))


def _json_object(raw: bytes) -> tuple[dict[str, Any] | None, str | None, bool]:
    """Parse a json member or manifest line: (object, problem, repaired)."""
    text, repaired = _decode_text(raw)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"json does not parse ({err})", repaired
    if not isinstance(obj, dict):
        return None, f"json is a {type(obj).__name__}, not an object", repaired
    return obj, None, repaired


def _json_key(value: Any, name: str) -> tuple[str | None, str | None]:
    """Read a key from a json field (``uid`` / ``key``): non-empty str or int."""
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        return None, f"{name!r} must be a non-empty string or an integer, got {value!r}"
    return str(value), None


def _json_text(obj: dict[str, Any], name: str) -> tuple[str | None, str | None, bool]:
    """Read an optional text field: (text or None, problem, repaired)."""
    value = obj.get(name)
    if value is None:
        return None, None, False
    if not isinstance(value, str):
        return None, f"{name!r} must be a string, got {type(value).__name__}", False
    text, repaired = _clean_text(value)
    return text, None, repaired


def _json_concepts(value: Any, name: str) -> tuple[list[Any] | None, str | None, bool]:
    """Read a json concept list (names, ids or nulls): (entries, problem, repaired)."""
    if not isinstance(value, list):
        return None, f"{name!r} must be a list, got {type(value).__name__}", False
    entries: list[Any] = []
    repaired = False
    for entry in value:
        if isinstance(entry, str):
            entry, fixed = _clean_text(entry)
            repaired |= fixed
        elif entry is not None and (isinstance(entry, bool) or not isinstance(entry, int)):
            return None, f"{name!r} holds {entry!r}: entries must be names or integer ids", False
        entries.append(entry)
    return entries, None, repaired


def _json_tags(value: Any) -> tuple[list[Any] | None, str | None, bool]:
    """``tags`` as found in DataConcept: one string joined by " | " (a list is accepted too)."""
    if isinstance(value, str):
        text, repaired = _clean_text(value)
        return [t.strip() for t in text.split("|") if t.strip()], None, repaired
    return _json_concepts(value, "tags")


def _json_scores(value: Any, n: int) -> tuple[list[float] | None, str | None]:
    """Read optional per-instance confidences; when present they must align with concepts."""
    if value is None:
        return None, None
    if not isinstance(value, list) or any(
        isinstance(s, bool) or not isinstance(s, int | float) for s in value
    ):
        return None, "'scores' must be a list of numbers"
    if len(value) != n:
        return None, f"'scores' has {len(value)} entries but there are {n} concepts"
    return [float(s) for s in value], None


# ---------------------------------------------------------------------------------------------
# WebDataset tars
# ---------------------------------------------------------------------------------------------


class _TailWatcher:
    """A read-only stream that remembers the last bytes it handed out.

    tarfile's streaming mode ends silently when an archive is cut at a member boundary or inside a
    header, exactly as if it had ended properly. A proper archive ends with an all-zero block, so
    after tarfile stops we look at the block where it stopped: zero means complete.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._chunks: deque[tuple[int, bytes]] = deque(maxlen=3)
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        """Read from the wrapped stream, keeping the last few chunks."""
        data = self._stream.read(size)
        if data:
            self._chunks.append((self._pos, data))
            self._pos += len(data)
        return data

    def ended_cleanly(self, offset: int) -> bool:
        """Whether the 512-byte block at ``offset`` (where tarfile stopped) is all zeros."""
        if not self._chunks:
            return False
        start = self._chunks[0][0]
        buffer = b"".join(chunk for _, chunk in self._chunks)
        if offset < start:
            return False
        block = buffer[offset - start : offset - start + _TAR_BLOCK]
        return block == bytes(_TAR_BLOCK)


def _open_decompressed(raw: Any) -> Any:
    """Undo gzip / bzip2 / xz by magic number, so that the tail check sees tar bytes."""
    magic = raw.read(6)
    raw.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if magic[:3] == b"BZh":
        return bz2.BZ2File(raw)
    if magic == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw)
    return raw


def _split_member_name(name: str) -> tuple[str | None, str]:
    """WebDataset's rule: the key is the path up to the first dot of the basename."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return None, ""
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _member_kind(ext: str) -> str | None:
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in ("json", "txt"):
        return ext
    return None


def _iter_webdataset(path: str, opts: _ReadOptions, with_images: bool) -> Iterator[_Record]:
    """Yield the samples of one tar, read in memory in tarfile's streaming mode, never extracted.

    Members of a sample are consecutive and share a key (WebDataset convention). Without
    ``with_images`` image members are streamed past unread (the scan pass).
    """
    index = 0
    prefix: str | None = None
    parts: dict[str, bytes] = {}
    damage: str | None = None
    with open(path, "rb") as raw:
        watcher = _TailWatcher(_open_decompressed(raw))
        try:
            archive = tarfile.open(fileobj=watcher, mode="r|")
            while (member := archive.next()) is not None:
                archive.members.clear()  # streaming mode keeps every header; we need none
                if not member.isfile():
                    continue
                member_prefix, ext = _split_member_name(member.name)
                if member_prefix is None:
                    continue
                if member_prefix != prefix:
                    if prefix is not None:
                        yield _webdataset_record(index, prefix, parts, opts)
                        index += 1
                    prefix, parts = member_prefix, {}
                kind = _member_kind(ext)
                if kind is None or kind in parts or (kind == "image" and not with_images):
                    continue
                fileobj = archive.extractfile(member)
                if fileobj is not None:
                    parts[kind] = fileobj.read()
            if not watcher.ended_cleanly(archive.offset):
                damage = "the archive stops without its end-of-archive blocks (truncated)"
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as err:
            damage = f"{type(err).__name__}: {err}"
    if prefix is not None:
        yield _webdataset_record(index, prefix, parts, opts)
        index += 1
    if damage is not None:
        raise _DamagedInput(
            f"{damage}; {index} samples were read from it and judged as usual (the one at the "
            "cut is usually skipped). Re-download or re-create this file to recover the rest"
        )


def _webdataset_record(
    index: int, prefix: str, parts: dict[str, bytes], opts: _ReadOptions
) -> _Record:
    """Judge nothing, just gather: key, caption, concepts and image of one tar sample."""
    base_key = prefix.rpartition("/")[2]
    rec = _Record(index=index, label=base_key, key=base_key, image=parts.get("image"))
    if rec.image is None:
        rec.image_problem = f"no .{'/.'.join(IMAGE_EXTENSIONS)} member"
    raw_json = parts.get("json")
    if raw_json is None:
        rec.malformed = "no .json member"
        return rec
    meta, problem, rec.repaired = _json_object(raw_json)
    if meta is None:
        rec.malformed = problem
        return rec
    if meta.get("uid") is not None:
        rec.key, problem = _json_key(meta["uid"], "uid")
        if problem:
            rec.malformed = problem
            return rec
        rec.key, fixed = _clean_text(rec.key or "")
        rec.label = rec.key
        rec.repaired |= fixed
    caption, problem, fixed = _json_text(meta, "caption")
    recaption, problem_re, fixed_re = _json_text(meta, "recap")
    if problem or problem_re:
        rec.malformed = problem or problem_re
        return rec
    rec.repaired |= fixed or fixed_re
    if (caption is None or not caption.strip()) and "txt" in parts:
        caption, fixed = _decode_text(parts["txt"])
        rec.repaired |= fixed
    rec.caption, rec.recaption = caption, recaption or ""
    if not opts.read_concepts:
        return rec
    name = opts.concepts_from
    if name not in meta:
        other = "tags" if name == "classes" else "classes"
        hint = f" (it has {other!r}: use --concepts-from {other})" if other in meta else ""
        rec.malformed = f"json has no {name!r} field{hint}"
        return rec
    if name == "tags":
        concepts, problem, fixed = _json_tags(meta[name])
    else:
        concepts, problem, fixed = _json_concepts(meta[name], name)
    if concepts is None:
        rec.malformed = problem
        return rec
    rec.concepts = concepts
    rec.repaired |= fixed
    if name == "classes":  # scores are per detected box, so they only align with classes
        rec.scores, problem = _json_scores(meta.get("scores"), len(concepts))
        if problem:
            rec.malformed = problem
    return rec


# ---------------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------------


def _read_image_file(path: str, base: str) -> tuple[bytes | None, str]:
    """Read an image file named relative to ``base``; (bytes or None, why None)."""
    full = os.path.join(base, path)
    try:
        with open(full, "rb") as f:
            return f.read(), ""
    except OSError as err:
        return None, f"cannot read image file {full} ({err.strerror or err})"


def _parquet_image(value: Any, base: str) -> tuple[bytes | None, str]:
    """Read an image cell: bytes, an HF-datasets ``{bytes, path}`` struct, or a path string."""
    if value is None:
        return None, "image cell is null"
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), ""
        if value.get("path"):
            return _read_image_file(str(value["path"]), base)
        return None, "image struct has neither bytes nor path"
    if isinstance(value, bytes | bytearray):
        return (bytes(value), "") if value else (None, "image cell is empty")
    if isinstance(value, str):
        return _read_image_file(value, base)
    return None, f"image cell holds a {type(value).__name__}"


def _arrow_pylist(column: Any) -> list[Any]:
    """Python values of a column, with strings as bytes so that invalid UTF-8 cannot raise."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        column = column.cast(pa.binary())
    elif (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
        pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type)
    ):
        column = column.cast(pa.list_(pa.binary()))
    return column.to_pylist()


def _iter_parquet(path: str, opts: _ReadOptions, with_images: bool) -> Iterator[_Record]:
    """Rows of one parquet file, read in record batches of the needed columns only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise _DamagedInput(f"not a readable parquet file ({err})") from err
    names = parquet.schema_arrow.names

    def need(column: str, flag: str) -> str:
        if column not in names:
            raise ConversionError(
                f"{path} has no column {column!r} (it has: {', '.join(names)}); name the right "
                f"one with {flag}"
            )
        return column

    image = need(opts.image_column, "--image-column")
    caption = need(opts.caption_column, "--caption-column")
    concepts = need(opts.concepts_column, "--concepts-column") if opts.read_concepts else None
    recaption = opts.recaption_column and need(opts.recaption_column, "--recaption-column")
    if opts.key_column:
        key: str | None = need(opts.key_column, "--key-column")
    else:
        key = "key" if "key" in names else None
    columns = [c for c in (key, caption, concepts, recaption) if c]
    if with_images:
        columns.append(image)
    columns = list(dict.fromkeys(columns))
    base, file_name = os.path.dirname(path), os.path.basename(path)
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=256 if with_images else 8192, columns=columns):
            values = {c: _arrow_pylist(batch.column(c)) for c in columns}
            for j in range(batch.num_rows):
                rec = _Record(index=row, label=f"row {row}")
                key_value, fixed = _as_text(values[key][j]) if key else (None, False)
                rec.key = key_value if key_value else f"{file_name}:{row}"
                rec.label = rec.key
                rec.caption, fixed_caption = _as_text(values[caption][j])
                recaption_value, fixed_re = (
                    _as_text(values[recaption][j]) if recaption else (None, False)
                )
                rec.recaption = recaption_value or ""
                rec.repaired = fixed or fixed_caption or fixed_re
                for entry in (values[concepts][j] if concepts else None) or []:  # null: empty
                    if isinstance(entry, bytes):
                        entry, fixed = _decode_text(entry)
                        rec.repaired |= fixed
                    rec.concepts.append(entry)
                if with_images:
                    rec.image, rec.image_problem = _parquet_image(values[image][j], base)
                yield rec
                row += 1
    except (pa.ArrowException, OSError) as err:
        raise _DamagedInput(
            f"reading stopped at row {row} ({err}); the rows before it were read and judged as "
            "usual. Rewrite this file to recover the rest"
        ) from err


# ---------------------------------------------------------------------------------------------
# JSONL manifest
# ---------------------------------------------------------------------------------------------


def _iter_jsonl(path: str, opts: _ReadOptions, with_images: bool) -> Iterator[_Record]:
    """Lines of a manifest; image paths are relative to the manifest's directory."""
    base = os.path.dirname(path)
    index = 0
    with open(path, "rb") as manifest:
        for line_number, raw in enumerate(manifest, start=1):
            if not raw.strip():
                continue
            rec = _Record(index=index, label=f"line {line_number}")
            index += 1
            obj, problem, rec.repaired = _json_object(raw)
            if obj is None:
                rec.malformed = problem
                yield rec
                continue
            image_path = obj.get("image")
            if "key" in obj:
                rec.key, problem = _json_key(obj["key"], "key")
            elif isinstance(image_path, str) and image_path:
                rec.key = image_path
            if rec.key is not None:
                rec.key, fixed = _clean_text(rec.key)
                rec.repaired |= fixed
                rec.label = rec.key
            caption, problem_caption, fixed_caption = _json_text(obj, "caption")
            recaption, problem_re, fixed_re = _json_text(obj, "recaption")
            rec.caption, rec.recaption = caption, recaption or ""
            rec.repaired |= fixed_caption or fixed_re
            problem = problem or problem_caption or problem_re
            if problem is None and opts.read_concepts and "concepts" not in obj:
                problem = "line has no 'concepts' field"
            if problem is None and opts.read_concepts:
                concepts, problem, fixed = _json_concepts(obj["concepts"], "concepts")
                rec.concepts = concepts or []
                rec.repaired |= fixed
            if problem is None and opts.read_concepts:
                rec.scores, problem = _json_scores(obj.get("scores"), len(rec.concepts))
            rec.malformed = problem
            if not isinstance(image_path, str) or not image_path:
                rec.image_problem = "line has no 'image' path"
            elif with_images:
                rec.image, rec.image_problem = _read_image_file(image_path, base)
            yield rec


_READERS: dict[str, Callable[[str, _ReadOptions, bool], Iterator[_Record]]] = {
    "webdataset": _iter_webdataset,
    "parquet": _iter_parquet,
    "jsonl": _iter_jsonl,
}


# ---------------------------------------------------------------------------------------------
# Concepts from a tagger instead of the input
# ---------------------------------------------------------------------------------------------


def _read(path: str, opts: _ReadOptions, *, scan: bool, spill: str | None) -> Iterator[_Record]:
    """The records of one file, with their concepts from whichever source was chosen.

    ``--tag-captions`` is cheap and tags in both passes. A ``--tagger`` may run a detector, so it
    runs once, in the scan (which then reads images too); its names go to ``spill``, one JSON line
    per record, and the write pass reads them back in the same order.
    """
    records = _READERS[opts.fmt](path, opts, not scan or opts.tagger is not None)
    if opts.tag_captions is not None:
        tagger = cached_caption_tagger(opts.tag_captions)
        for rec in records:
            if rec.malformed is None:
                rec.concepts = tagger.tag(rec.caption)
            yield rec
    elif opts.tagger is None:
        yield from records
    elif scan:
        function = load_tagger(opts.tagger)
        with open(spill or os.devnull, "w", encoding="utf-8") as saved:
            for rec in records:
                names = _run_tagger(function, opts.tagger, rec, path)
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
    function: Callable[..., Any], spec: str, rec: _Record, path: str
) -> list[str] | None:
    """The user's tagger on one record; None where the record will be skipped anyway."""
    if (
        rec.malformed is not None
        or rec.caption is None
        or not rec.caption.strip()
        or rec.image is None
        or image_problem(rec.image) is not None
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


# ---------------------------------------------------------------------------------------------
# Judging a record
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ConceptPolicy:
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


class _Judge:
    """The checks that do not need the image, shared verbatim by the scan and the write pass.

    Sharing them is what keeps the two passes in agreement about which samples survive.
    """

    def __init__(self, policy: _ConceptPolicy, path: str) -> None:
        self.policy = policy
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

    def metadata_verdict(self, rec: _Record) -> tuple[tuple[str, str] | None, list[int]]:
        """(skip reason and detail, or None; concept ids when a name index is known)."""
        if rec.malformed is not None:
            return ("malformed json", rec.malformed), []
        if rec.caption is None or not rec.caption.strip():
            return ("missing caption", "no caption text"), []
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
        self.normalised.update(normalised)
        return None, ids

    @property
    def index_names(self) -> tuple[str, ...]:
        """Vocabulary names by id (only asked for when the policy has names)."""
        return self.policy.names or ()


def image_problem(data: bytes) -> str | None:
    """Why ``data`` is not a usable image, or None when it decodes.

    ``Image.verify()`` misses truncated JPEGs, so this decodes; JPEGs are decoded at 1/8 scale
    (``draft``), which is cheap and still reads every byte of entropy-coded data.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG":
                image.draft(None, (1, 1))
            image.load()
    except Exception as err:  # any decoder failure means the downstream decode would fail too
        return f"{type(err).__name__}: {err}"
    return None


# ---------------------------------------------------------------------------------------------
# Progress across processes
# ---------------------------------------------------------------------------------------------

_tick_sink: Callable[[int], None] | None = None


class _Ticker:
    """Counts records and reports them to the progress sink in small batches."""

    def __init__(self) -> None:
        self.pending = 0

    def __call__(self) -> None:
        self.pending += 1
        if self.pending >= _PROGRESS_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.pending and _tick_sink is not None:
            _tick_sink(self.pending)
        self.pending = 0


def _init_worker(counter: Any) -> None:
    """Pool initializer: worker progress goes to a shared counter that the parent polls."""
    global _tick_sink

    def add(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    _tick_sink = add


@contextmanager
def _local_progress(bar: tqdm) -> Iterator[None]:
    """In-process progress goes straight to the bar."""
    global _tick_sink
    previous, _tick_sink = _tick_sink, bar.update
    try:
        yield
    finally:
        _tick_sink = previous


# ---------------------------------------------------------------------------------------------
# Pass 1: scan
# ---------------------------------------------------------------------------------------------


@dataclass
class _FileScan:
    """What the scan learnt about one file: its record count and the valid records' keys."""

    path: str
    records: int
    owners: list[tuple[int, str | None, list[str]]]  # (index, key, concept names) if valid


def _scan_file(task: tuple[str, _ReadOptions, _ConceptPolicy, str | None]) -> _FileScan:
    path, opts, policy, spill = task
    judge = _Judge(policy, path)
    tick = _Ticker()
    scan = _FileScan(path, 0, [])
    try:
        for rec in _read(path, opts, scan=True, spill=spill):
            scan.records += 1
            tick()
            verdict, _ = judge.metadata_verdict(rec)
            if verdict is None:
                names = [c for c in rec.concepts if isinstance(c, str)]
                scan.owners.append((rec.index, rec.key, names))
    except _DamagedInput:
        pass  # the write pass meets the same damage and reports it
    tick.flush()
    return scan


# ---------------------------------------------------------------------------------------------
# Pass 2: write
# ---------------------------------------------------------------------------------------------


@dataclass
class _PartTask:
    """One worker's share: a contiguous run of files written into one MDS (sub-)dataset."""

    out: str
    # (path, duplicate indices, scanned records, the scan's tagger output or None)
    files: list[tuple[str, frozenset[int], int, str | None]]
    opts: _ReadOptions
    policy: _ConceptPolicy
    writer_kwargs: dict[str, Any]
    max_samples_per_shard: int | None
    examples_per_reason: int


@dataclass
class _Tally:
    """Counts and examples of one part; parts add up in input order."""

    read: int = 0
    written: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    repaired: int = 0
    repaired_examples: list[dict[str, str]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    instances: int = 0
    without_concepts: int = 0
    shards: int = 0
    unknown_names: Counter[str] = field(default_factory=Counter)
    normalised_names: Counter[tuple[str, str]] = field(default_factory=Counter)

    def skip(self, reason: str, example: dict[str, str], limit: int) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < limit:
            shown.append(example)

    def add(self, other: _Tally, limit: int) -> None:
        self.read += other.read
        self.written += other.written
        self.skipped.update(other.skipped)
        for reason, shown in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(shown[: max(0, limit - len(mine))])
        self.repaired += other.repaired
        self.repaired_examples.extend(
            other.repaired_examples[: max(0, limit - len(self.repaired_examples))]
        )
        self.errors.extend(other.errors)
        self.instances += other.instances
        self.without_concepts += other.without_concepts
        self.shards += other.shards
        self.unknown_names.update(other.unknown_names)
        self.normalised_names.update(other.normalised_names)


def _write_part(task: _PartTask) -> _Tally:
    """Write one part; the only pass that reads images."""
    from streaming import MDSWriter

    tally = _Tally()
    limit = task.examples_per_reason
    tick = _Ticker()
    writer = MDSWriter(columns=MDS_COLUMNS, out=task.out, **task.writer_kwargs)
    try:
        for path, duplicates, scanned, spill in task.files:
            judge = _Judge(task.policy, path)
            records = 0
            try:
                for rec in _read(path, task.opts, scan=False, spill=spill):
                    records += 1
                    tick()
                    verdict, ids = judge.metadata_verdict(rec)
                    if verdict is None and rec.index in duplicates:
                        verdict = ("duplicate key", "an earlier sample of the input has this key")
                    if verdict is None and rec.image is None:
                        verdict = ("missing image", rec.image_problem)
                    if verdict is None:
                        problem = image_problem(rec.image or b"")
                        if problem is not None:
                            verdict = ("undecodable image", problem)
                    example = {"key": rec.key or rec.label, "file": path}
                    if verdict is not None:
                        tally.skip(verdict[0], {**example, "detail": verdict[1]}, limit)
                        continue
                    if task.max_samples_per_shard and (
                        len(writer.new_samples) >= task.max_samples_per_shard
                    ):
                        # What Writer.write does when size_limit is reached.
                        writer.flush_shard()
                        writer._reset_cache()
                    writer.write(
                        {
                            "key": rec.key or rec.label,
                            "image": rec.image,
                            "caption": rec.caption,
                            "recaption": rec.recaption,
                            "concepts": encode_concepts(ids),
                            "concept_scores": encode_scores(rec.scores) if rec.scores else b"",
                        }
                    )
                    tally.written += 1
                    tally.instances += len(ids)
                    tally.without_concepts += not ids
                    if rec.repaired:
                        tally.repaired += 1
                        if len(tally.repaired_examples) < limit:
                            tally.repaired_examples.append(example)
            except _DamagedInput as err:
                tally.errors.append({"file": path, "error": str(err)})
            tally.read += records
            tally.unknown_names.update(judge.unknown)
            tally.normalised_names.update(judge.normalised)
            if records != scanned:
                raise ConversionError(
                    f"{path} gave {records} samples on the write pass but {scanned} on the scan; "
                    "it changed during the conversion. Re-run when the input is stable"
                )
        writer.finish()
    except BaseException:
        writer.cancel_future_jobs()
        raise
    tick.flush()
    tally.shards = len(writer.shards)
    return tally


# ---------------------------------------------------------------------------------------------
# Inputs, outputs, plan
# ---------------------------------------------------------------------------------------------


def _expand_inputs(inputs: Sequence[str | os.PathLike[str]], fmt: str) -> list[str]:
    """Files in the order given; directories and glob patterns expand sorted, by suffix."""
    suffixes = _INPUT_SUFFIXES[fmt]
    files: list[str] = []
    seen: set[str] = set()
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            pattern = os.path.join(glob.escape(item), "**", "*")
            matches = sorted(
                p for p in glob.glob(pattern, recursive=True)
                if os.path.isfile(p) and p.lower().endswith(suffixes)
            )
            if not matches:
                raise ConversionError(
                    f"input directory {item} holds no {fmt} files ({', '.join(suffixes)}); "
                    "check --input and --format"
                )
        elif os.path.isfile(item):
            matches = [item]
        elif glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ConversionError(f"input pattern {item} matches no file; check --input")
        else:
            raise ConversionError(f"input {item} does not exist; check --input")
        for path in matches:
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                files.append(path)
    if not files:
        raise ConversionError("no input given: pass --input PATHS")
    return files


def _is_remote(out: str) -> bool:
    return urllib.parse.urlparse(out).scheme not in ("", "file")


def _check_output(out: str, overwrite: bool, files: Sequence[str]) -> bool:
    """Refuse a non-empty output unless ``overwrite``; True when the local dir must be cleared.

    MDSWriter's own ``exist_ok=True`` deletes the directory, so the decision is made here, once,
    with a message, and never deletes an input.
    """
    if _is_remote(out):
        from streaming.base.storage.upload import CloudUploader

        try:
            uploader = CloudUploader.get(out, keep_local=False, exist_ok=True)
        except Exception as err:
            raise ConversionError(
                f"cannot use --out {out}: {err}. The bucket must exist; the endpoint comes from "
                "S3_ENDPOINT_URL and credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            ) from err
        try:
            existing = uploader.list_objects() or []
        finally:
            shutil.rmtree(uploader.local, ignore_errors=True)
        if existing and not overwrite:
            raise ConversionError(
                f"--out {out} already holds {len(existing)} objects (e.g. {existing[0]}); pass "
                "--overwrite to write over them (objects not rewritten are left in place), or "
                "choose another prefix"
            )
        return False
    if not os.path.exists(out):
        return False
    if not os.path.isdir(out):
        raise ConversionError(f"--out {out} exists and is not a directory; choose a directory")
    entries = sorted(os.listdir(out))
    if not entries:
        return False
    if not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConversionError(
            f"--out {out} is not empty (it holds {shown}); pass --overwrite to replace its "
            "contents, or choose another directory"
        )
    root = os.path.realpath(out)
    for path in files:
        if os.path.commonpath([root, os.path.realpath(path)]) == root:
            raise ConversionError(
                f"input {path} lies inside --out {out}, which --overwrite would delete; write "
                "the output elsewhere"
            )
    return True


def _split_contiguous(counts: Sequence[int], parts: int) -> list[range]:
    """Split files into ``parts`` non-empty contiguous runs of roughly equal sample counts."""
    n = len(counts)
    parts = max(1, min(parts, n))
    cumulative = list(itertools.accumulate(counts, initial=0))
    total = cumulative[-1]
    bounds = [0]
    for k in range(1, parts):
        cut = bisect.bisect_left(cumulative, total * k / parts)
        bounds.append(min(max(cut, bounds[-1] + 1), n - (parts - k)))
    bounds.append(n)
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def _resolve_vocabulary(
    vocabulary: str | os.PathLike[str] | Vocabulary | None,
) -> Vocabulary | None:
    if vocabulary is None or isinstance(vocabulary, Vocabulary):
        return None if vocabulary is None else Vocabulary(list(vocabulary.names))
    try:
        return Vocabulary.load(os.fspath(vocabulary))
    except FileNotFoundError as err:
        raise ConversionError(f"--vocabulary {vocabulary} does not exist; check the path") from err
    except ValueError as err:  # from_json names the file and what is wrong with it
        raise ConversionError(f"--vocabulary: {err}") from err


def _publish(out: str, filename: str, text: str) -> None:
    """Put a small file beside ``index.json``, locally or through streaming's uploader."""
    if not _is_remote(out):
        with open(os.path.join(out, filename), "w", encoding="utf-8") as f:
            f.write(text)
        return
    from streaming.base.storage.upload import CloudUploader

    with tempfile.TemporaryDirectory() as staging:
        uploader = CloudUploader.get((staging, out), keep_local=True)  # staging still empty
        with open(os.path.join(staging, filename), "w", encoding="utf-8") as f:
            f.write(text)
        uploader.upload_file(filename)


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """``merge_index`` announces its temp folder with ``logging.warning`` on the root logger.

    That would print to the console and, through ``basicConfig``, install a handler for the rest
    of the process; keep both out of the converter's output.
    """
    root = logging.getLogger()
    placeholder = logging.NullHandler()
    added = not root.handlers
    if added:
        root.addHandler(placeholder)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
        if added:
            root.removeHandler(placeholder)


def _merge_parts(out: str, part_names: Sequence[str]) -> None:
    """Join the parts' indexes, in part order, into ``index.json`` at ``out``."""
    from streaming.base.util import merge_index

    if _is_remote(out):
        urls = [f"{out.rstrip('/')}/{name}/index.json" for name in part_names]
        with _quiet_root_logger():
            merge_index(urls, out, keep_local=False)
    else:
        urls = [os.path.join(out, name, "index.json") for name in part_names]
        with _quiet_root_logger():
            merge_index(urls, out, keep_local=True)


def _run_tasks(
    pool: Any,
    function: Callable[[Any], Any],
    tasks: Sequence[Any],
    bar: tqdm,
    counter: Any,
) -> Iterator[Any]:
    """Results in task order, in-process or on the pool, keeping the bar moving meanwhile."""
    if pool is None:
        with _local_progress(bar):
            for task in tasks:
                yield function(task)
        return
    results = pool.imap(function, tasks)
    while True:
        try:
            result = results.next(timeout=0.2)
        except multiprocessing.TimeoutError:
            if counter.value > bar.n:
                bar.update(counter.value - bar.n)
            continue
        except StopIteration:
            break
        if counter.value > bar.n:
            bar.update(counter.value - bar.n)
        yield result


# ---------------------------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------------------------


def convert(
    inputs: Sequence[str | os.PathLike[str]],
    fmt: str,
    out: str | os.PathLike[str],
    *,
    vocabulary: str | os.PathLike[str] | Vocabulary | None = None,
    extend_vocabulary: bool = False,
    concepts_from: str | None = None,
    tag_captions: str | os.PathLike[str] | None = None,
    tagger: str | None = None,
    workers: int = 1,
    overwrite: bool = False,
    image_column: str = "image",
    caption_column: str = "caption",
    concepts_column: str | None = None,
    key_column: str | None = None,
    recaption_column: str | None = None,
    size_limit: int | str | None = 1 << 26,
    compression: str | None = None,
    hashes: Sequence[str] = ("xxh64",),
    max_samples_per_shard: int | None = None,
    examples_per_reason: int = 5,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert ``inputs`` into an MDS schema v1 dataset at ``out`` and return the report.

    Args:
        inputs: Files, directories (searched recursively by suffix) or glob patterns, in order.
        fmt: ``"webdataset"``, ``"parquet"`` or ``"jsonl"``.
        out: A local directory (created; must be empty unless ``overwrite``) or a remote prefix
            such as ``s3://bucket/path`` (the bucket must exist).
        vocabulary: A ``vocabulary.json`` (or a directory holding one, or a ``Vocabulary``)
            that fixes concept ids; a name outside it is an ``unknown concept`` skip. Without
            it the vocabulary is built from the data, most frequent first, ties by name.
        extend_vocabulary: Append names missing from ``vocabulary`` (most frequent first)
            instead of skipping their samples. Ids given as numbers are never extended.
        concepts_from: WebDataset only: json field holding the concepts, ``"classes"`` (one name
            per detected box, the default) or ``"tags"`` (a " | "-joined string).
        tag_captions: Take concept ids from the caption instead of the input: a tagging
            vocabulary file (one concept per line, ``name: synonym, ...``), a
            ``vocabulary.json`` or a shipped name (``coco``, ``imagenet1k``); see
            :mod:`cabs_streaming.tagging`. Its names, in file order, are the vocabulary.
        tagger: Take concept names from your own function instead of the input:
            ``"module:function"`` or ``"path/to/file.py:function"``, called as
            ``function(image_bytes, caption) -> list[str]`` once per sample, in the scan pass
            (which then reads images); its names are mapped like detector names.
        workers: Processes; files are split into contiguous runs written as ``part-NNNNN/``
            sub-datasets and merged. Sample order is input order whatever the value.
        overwrite: Replace a non-empty local output directory (or write over a non-empty
            remote prefix).
        image_column: Parquet column of image bytes, ``{bytes, path}`` structs or paths.
        caption_column: Parquet column of captions.
        concepts_column: Parquet column of concept lists (names or ids; default ``concepts``).
        key_column: Parquet key column; by default ``key`` when present, else the key is
            ``<file name>:<row>``.
        recaption_column: Optional parquet column of synthetic captions.
        size_limit: ``MDSWriter`` shard size limit (bytes or a string such as ``"64mb"``).
        compression: ``MDSWriter`` compression (e.g. ``"zstd"``), none by default.
        hashes: Shard hashes written into ``index.json`` (``xxh64`` by default, cheap), so
            that readers can pass ``validate_hash`` and a corrupt shard is caught by name.
        max_samples_per_shard: Also start a new shard after this many samples.
        examples_per_reason: Example samples listed per skip reason in the report.
        progress: Show tqdm progress bars (on stderr).

    Returns:
        The report, also written as ``report.json`` beside ``index.json``. It always satisfies
        ``read == written + sum(skipped.values())``; damaged input files are listed under
        ``errors`` rather than raised.

    Names of a given vocabulary are matched as written, then in normal form (case, plural,
    whitespace and punctuation: "Dogs" and "hot_dog" find "dog" and "hot dog"); the report's
    ``concept_names`` lists the names that matched nothing (their samples are ``unknown concept``
    skips) and those matched only in normal form, with counts.

    Raises:
        ConversionError: Bad arguments, a non-empty output, missing parquet columns, concept ids
            without a vocabulary, a tagger that cannot be imported or fails: the message names
            the file and what to do.
    """
    started = time.monotonic()
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    tag_captions = None if tag_captions is None else os.fspath(tag_captions)
    chosen = [
        flag
        for flag, value in (
            ("--tag-captions", tag_captions),
            ("--tagger", tagger),
            ("--concepts-from", concepts_from),
            ("--concepts-column", concepts_column),
        )
        if value is not None
    ]
    if (tag_captions is not None or tagger is not None) and len(chosen) > 1:
        raise ConversionError(
            f"{' and '.join(chosen)} are mutually exclusive: concepts come either from the input "
            "(--concepts-from / --concepts-column), or from the captions (--tag-captions), or "
            "from your tagger (--tagger); choose one"
        )
    concepts_from = concepts_from or "classes"
    concepts_column = concepts_column or "concepts"
    if concepts_from not in CONCEPT_SOURCES:
        raise ConversionError(
            f"--concepts-from {concepts_from!r} is not one of {', '.join(CONCEPT_SOURCES)}"
        )
    if workers < 1:
        raise ConversionError(f"--workers must be at least 1, got {workers}")
    if max_samples_per_shard is not None and max_samples_per_shard < 1:
        raise ConversionError("--max-samples-per-shard must be at least 1")
    # Import the writer's stack (torch comes with it) once, here: forked workers inherit it
    # instead of each spending seconds importing it again.
    from streaming.base.compression import is_compression
    from streaming.base.hashing import get_hashes
    from streaming.base.util import bytes_to_int

    unknown_hashes = sorted(set(hashes) - set(get_hashes()))
    if unknown_hashes:
        raise ConversionError(
            f"--hashes {unknown_hashes} are not MDS hash algorithms; choose from "
            f"{sorted(get_hashes())}"
        )
    if compression and not is_compression(compression):
        raise ConversionError(
            f"--compression {compression!r} is not an MDS compression; try zstd, gz, br or bz2"
        )
    try:
        if size_limit is not None and not 0 < bytes_to_int(size_limit) < 2**32:
            raise ValueError("out of range")
    except ValueError as err:
        raise ConversionError(
            f"--size-limit {size_limit!r} is not a shard size between 1 byte and 4gb ({err}); "
            "write bytes or e.g. 64mb"
        ) from err
    if tag_captions is not None:
        if vocabulary is not None or extend_vocabulary:
            raise ConversionError(
                "--tag-captions fixes the vocabulary (its names in file order): leave out "
                "--vocabulary and --extend-vocabulary"
            )
        try:
            vocabulary = TaggingVocabulary.load(tag_captions).vocabulary()
        except (OSError, ValueError) as err:
            raise ConversionError(f"--tag-captions: {err}") from err
    if tagger is not None:
        try:
            load_tagger(tagger)
        except ValueError as err:
            raise ConversionError(str(err)) from err
    base_vocabulary = _resolve_vocabulary(vocabulary)
    if extend_vocabulary and base_vocabulary is None:
        raise ConversionError(
            "--extend-vocabulary extends a given vocabulary: pass --vocabulary FILE too (without "
            "one the vocabulary is built from the data anyway)"
        )
    out = os.fspath(out)
    files = _expand_inputs(inputs, fmt)
    clear_output = _check_output(out, overwrite, files)
    opts = _ReadOptions(
        fmt=fmt,
        concepts_from=concepts_from,
        image_column=image_column,
        caption_column=caption_column,
        concepts_column=concepts_column,
        key_column=key_column,
        recaption_column=recaption_column,
        tag_captions=tag_captions,
        tagger=tagger,
    )
    base_names = None if base_vocabulary is None else tuple(base_vocabulary.names)
    id_limit = None if base_names is None else len(base_names)
    scan_policy = _ConceptPolicy(None if extend_vocabulary else base_names, id_limit)
    processes = min(workers, len(files))
    context = multiprocessing.get_context()
    counter = context.Value("q", 0)
    pool = (
        context.Pool(processes, initializer=_init_worker, initargs=(counter,))
        if processes > 1
        else None
    )
    spill_dir = tempfile.mkdtemp(prefix="cabs-tagger-") if tagger is not None else None
    spills = [
        os.path.join(spill_dir, f"{j:06d}.jsonl") if spill_dir else None for j in range(len(files))
    ]
    # Extending a vocabulary: a name that is a base name in normal form is that base name.
    base_mapper = (
        ConceptNameMapper(base_vocabulary) if extend_vocabulary and base_vocabulary else None
    )
    try:
        # Pass 1: keys and concept counts, file by file, folded in input order.
        owners: set[str] = set()
        counts: Counter[str] = Counter()
        duplicates: list[frozenset[int]] = []
        records: list[int] = []
        with tqdm(desc="scan", unit=" samples", disable=not progress) as bar:
            scans = [(path, opts, scan_policy, spills[j]) for j, path in enumerate(files)]
            for scan in _run_tasks(pool, _scan_file, scans, bar, counter):
                dropped = set()
                for index, key, names in scan.owners:
                    if key is not None:
                        if key in owners:
                            dropped.add(index)
                            continue
                        owners.add(key)
                    if base_mapper is not None:
                        names = [_canonical(base_mapper, name) for name in names]
                    counts.update(names)
                duplicates.append(frozenset(dropped))
                records.append(scan.records)
        del owners

        by_frequency = sorted(counts, key=lambda name: (-counts[name], name))
        if base_vocabulary is None:
            final = Vocabulary(by_frequency)
            source, added = "built", len(final)
        elif tag_captions is not None:
            final, source, added = base_vocabulary, "tag-captions", 0
        else:
            final = base_vocabulary
            size_before = len(final)
            if extend_vocabulary:
                for name in by_frequency:
                    final.add(name)
            source, added = "given", len(final) - size_before
        write_policy = _ConceptPolicy(tuple(final.names), id_limit)

        # Pass 2: write the parts.
        if clear_output:
            shutil.rmtree(out)
        runs = _split_contiguous(records, processes)
        part_names = [f"part-{i:05d}" for i in range(len(runs))] if len(runs) > 1 else []
        writer_kwargs: dict[str, Any] = {
            "size_limit": size_limit,
            "compression": compression,
            "hashes": list(hashes),
        }
        tasks = [
            _PartTask(
                out=f"{out.rstrip('/')}/{part_names[i]}" if part_names else out,
                files=[(files[j], duplicates[j], records[j], spills[j]) for j in run],
                opts=opts,
                policy=write_policy,
                writer_kwargs=writer_kwargs,
                max_samples_per_shard=max_samples_per_shard,
                examples_per_reason=examples_per_reason,
            )
            for i, run in enumerate(runs)
        ]
        counter.value = 0
        tally = _Tally()
        with tqdm(desc="write", total=sum(records), unit=" samples", disable=not progress) as bar:
            for part in _run_tasks(pool, _write_part, tasks, bar, counter):
                tally.add(part, examples_per_reason)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if spill_dir is not None:
            shutil.rmtree(spill_dir, ignore_errors=True)

    if part_names:
        _merge_parts(out, part_names)
    _publish(out, VOCABULARY_FILENAME, final.to_json())
    report = _build_report(
        tally, fmt=fmt, files=files, out=out, workers=workers, parts=len(runs),
        vocabulary={"source": source, "size": len(final), "added": added},
        concept_source=(
            {"tag-captions": tag_captions} if tag_captions is not None
            else {"tagger": tagger} if tagger is not None
            else {"input": concepts_from if fmt == "webdataset" else concepts_column}
        ),
        seconds=time.monotonic() - started,
    )
    _publish(out, REPORT_FILENAME, json.dumps(report, indent=2, ensure_ascii=False))
    return report


def _canonical(mapper: ConceptNameMapper, name: str) -> str:
    """``name`` as the base vocabulary spells it when it is one of its names in normal form."""
    found = mapper.lookup(name)
    return name if found is None else mapper.names[found]


def _build_report(tally: _Tally, **facts: Any) -> dict[str, Any]:
    """Assemble the report: counts first, then examples, damage, vocabulary, provenance."""
    skipped = {reason: tally.skipped.get(reason, 0) for reason in SKIP_REASONS}
    if tally.read != tally.written + sum(skipped.values()):
        raise RuntimeError(
            f"internal error: read {tally.read} != written {tally.written} + skipped "
            f"{sum(skipped.values())}; please report this with the input that caused it"
        )
    return {
        "read": tally.read,
        "written": tally.written,
        "skipped": skipped,
        "examples": {r: tally.examples[r] for r in SKIP_REASONS if r in tally.examples},
        "repaired": {
            INVALID_UTF8: {"count": tally.repaired, "examples": tally.repaired_examples}
        },
        "errors": tally.errors,
        "concepts": {
            "instances": tally.instances,
            "samples_without_concepts": tally.without_concepts,
        },
        "concept_source": facts["concept_source"],
        "concept_names": names_report(tally.unknown_names, tally.normalised_names),
        "vocabulary": facts["vocabulary"],
        "shards": tally.shards,
        "format": facts["fmt"],
        "inputs": list(facts["files"]),
        "out": facts["out"],
        "workers": facts["workers"],
        "parts": facts["parts"],
        "seconds": round(facts["seconds"], 3),
    }


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Build the ``tools/convert_to_mds.py`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="convert_to_mds.py",
        description=(
            "Convert WebDataset tars, parquet files or a JSONL manifest into MDS shards "
            "(schema v1) with vocabulary.json and report.json beside index.json."
        ),
        epilog=(
            "Exit status: 0 done; 1 done, but some input files were damaged (see the report's "
            "errors); 2 stopped with an error message (bad arguments or input)."
        ),
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="files, directories or glob patterns, converted in this order")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, metavar="DIR_OR_URL",
                        help="local directory or remote prefix (s3://bucket/path)")
    parser.add_argument("--vocabulary", metavar="FILE",
                        help="vocabulary.json fixing concept ids (default: build from the data)")
    parser.add_argument("--extend-vocabulary", action="store_true",
                        help="append names missing from --vocabulary instead of skipping samples")
    parser.add_argument("--concepts-from", choices=CONCEPT_SOURCES, default=None,
                        help="webdataset json field holding the concepts (default: classes)")
    parser.add_argument("--tag-captions", metavar="VOCABULARY",
                        help="take concept ids from the captions instead: a vocabulary file (one "
                        "concept per line, 'name: synonym, ...'), a vocabulary.json, or a "
                        "shipped one: coco, imagenet1k")
    parser.add_argument("--tagger", metavar="MODULE:FUNCTION",
                        help="take concept names from your function(image_bytes, caption) -> "
                        "list of names instead (also path/to/file.py:FUNCTION); names are mapped "
                        "onto --vocabulary like detector names")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="processes; inputs are split across them (default: 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty output directory")
    parser.add_argument("--image-column", default="image", metavar="NAME",
                        help="parquet: image bytes or {bytes, path} structs (default: image)")
    parser.add_argument("--caption-column", default="caption", metavar="NAME",
                        help="parquet (default: caption)")
    parser.add_argument("--concepts-column", default=None, metavar="NAME",
                        help="parquet, names or ids (default: concepts)")
    parser.add_argument("--key-column", metavar="NAME", help="parquet (default: 'key' if present)")
    parser.add_argument("--recaption-column", metavar="NAME",
                        help="parquet synthetic caption column (default: none)")
    parser.add_argument("--size-limit", default="64mb", metavar="BYTES",
                        help="MDS shard size limit, bytes or e.g. 64mb (default: 64mb)")
    parser.add_argument("--compression", metavar="NAME", help="MDS shard compression, e.g. zstd")
    parser.add_argument("--hashes", nargs="*", default=["xxh64"], metavar="ALGO",
                        help="shard hashes written to index.json for validate_hash "
                        "(default: xxh64; none with an empty list)")
    parser.add_argument("--max-samples-per-shard", type=int, metavar="N",
                        help="also start a new shard after this many samples")
    parser.add_argument("--examples-per-reason", type=int, default=5, metavar="N",
                        help="example keys listed per skip reason in the report (default: 5)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; print the report as JSON; return the exit status."""
    args = build_parser().parse_args(argv)
    size_limit: int | str = args.size_limit
    if isinstance(size_limit, str) and size_limit.isdigit():
        size_limit = int(size_limit)
    try:
        report = convert(
            args.input,
            args.format,
            args.out,
            vocabulary=args.vocabulary,
            extend_vocabulary=args.extend_vocabulary,
            concepts_from=args.concepts_from,
            tag_captions=args.tag_captions,
            tagger=args.tagger,
            workers=args.workers,
            overwrite=args.overwrite,
            image_column=args.image_column,
            caption_column=args.caption_column,
            concepts_column=args.concepts_column,
            key_column=args.key_column,
            recaption_column=args.recaption_column,
            size_limit=size_limit,
            compression=args.compression,
            hashes=args.hashes,
            max_samples_per_shard=args.max_samples_per_shard,
            examples_per_reason=args.examples_per_reason,
            progress=not args.no_progress,
        )
    except ConversionError as err:
        print(f"convert_to_mds: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, ensure_ascii=False))
    for error in report["errors"]:
        print(f"convert_to_mds: damaged input {error['file']}: {error['error']}", file=sys.stderr)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

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
usually becomes a ``missing image`` or ``missing concepts`` skip. The file and the error are listed
under ``errors`` in the report (the CLI then exits with status 3), and ``read == written +
sum(skipped)`` holds as always.

**WebDataset layout.** A sample is a run of adjacent members sharing a key; its caption comes
from the json's ``caption`` or else from a ``.txt`` (or ``.caption``) member, so img2dataset's
``.jpg`` + ``.txt`` tars convert with ``--tag-captions``. The same member extension twice in a
run starts a new sample with the same key (a ``duplicate key`` skip, counted). Members of a key
seen earlier in the tar but not adjacent to it, with none of its extensions, are a fragment of
that sample, not a sample: they are ignored and the file is listed under ``errors``.

**Text.** Invalid UTF-8 in captions, json members or manifest lines is decoded with U+FFFD
replacement, the sample is kept, and the written samples affected are counted under
``repaired["invalid utf-8"]``. A caption that is empty or holds only whitespace and control
characters is a ``missing caption``; a json caption that is not a string is ``malformed json``.

**Concept annotations.** An empty concept list is kept. A *missing* annotation is not an empty
one: a sample without the field chosen by ``concepts_from`` (``classes`` or ``tags`` of the json,
or a ``.cls`` member), or without a json at all, is ``missing concepts``, and the report says to
take them from the captions (``--tag-captions``) or a tagger (``--tagger``). In parquet a null
concepts cell is read as an empty list, since Arrow writers commonly store empty lists that way;
the column's Arrow type is checked once per file (lists of names or integer ids, or one integer
id per row). Detection ``scores`` must be finite numbers in ``[0, 1]`` (else ``malformed json``).
A concept name not in a given vocabulary, an empty name, a
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

**Hostile input.** Nothing is extracted or executed, and sizes are bounded (:class:`Limits`, with
defaults real data never reaches): a tar member, manifest line, parquet image cell or image file
larger than ``max_member_bytes`` is never read whole, a caption over ``max_caption_bytes`` and an
image over ``max_image_pixels`` (checked from its header, before decoding) are skipped as ``over a
size limit`` naming the limit. A json nested too deeply is ``malformed json``. Image paths in a
manifest or a parquet file must resolve (after ``..`` and symbolic links) inside that file's
folder or a folder given as ``image_roots``, and name a regular file: never a device, a FIFO or a
file elsewhere on the machine.

**One conversion per output.** ``--out`` is locked for the whole conversion: a local folder with
``flock`` on the folder itself (released by the kernel if the process dies), an ``s3://`` prefix
with a lock object under ``.convert-lock/`` that is removed at the end (a crashed conversion
leaves it behind: ``break_lock`` removes it). A second conversion into the same output stops at
once with :class:`OutputBusy` instead of interleaving its shards with the first one's.
"""

from __future__ import annotations

import argparse
import bisect
import bz2
import contextlib
import fcntl
import glob
import gzip
import io
import itertools
import json
import logging
import lzma
import math
import multiprocessing
import os
import shutil
import socket
import stat
import sys
import tarfile
import tempfile
import time
import unicodedata
import urllib.parse
import uuid
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
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
    "EXIT_STATUSES",
    "ConversionError",
    "Limits",
    "OutputBusy",
    "build_parser",
    "convert",
    "image_problem",
    "main",
]

FORMATS = ("webdataset", "parquet", "jsonl")
CONCEPT_SOURCES = ("classes", "tags", "cls")

#: Why a sample was not written; every reason always appears in ``report["skipped"]``.
SKIP_REASONS = (
    "undecodable image",
    "missing caption",
    "unknown concept",
    "duplicate key",
    "malformed json",
    "missing image",
    "missing concepts",
    "over a size limit",
)
INVALID_UTF8 = "invalid utf-8"
REPORT_FILENAME = "report.json"
#: Per-concept counts of the written samples, aligned with ``vocabulary.json`` ids.
COUNTS_FILENAME = "concept_counts.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: Tar members that can hold the caption, in order of preference after the json's ``caption``.
TEXT_EXTENSIONS = ("txt", "caption")

#: One skip reason taking more than this share of the input makes the CLI exit with status 4.
SKIP_ALARM_SHARE = 0.5
#: The command line's exit statuses (also in ``--help`` and the README).
EXIT_STATUSES = {
    0: "done",
    1: "crashed with a traceback (a bug: please report it with the input that caused it)",
    2: "stopped with an error message: bad arguments or input, nothing (more) written",
    3: "done, but some input files were damaged (see the report's errors)",
    4: "done, but no sample was written or one skip reason took over half of the input "
    "(see the report's warnings; --accept-skips makes this 0)",
    5: "--out is being written by another conversion (its lock is held)",
    130: "interrupted (Ctrl-C); --out may hold a partial dataset",
}

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


class OutputBusy(ConversionError):
    """Another conversion holds ``--out``; the message says what holds it and what to do."""


class _DamagedInput(Exception):
    """An input file stopped reading part-way; the samples read before stay valid."""


@dataclass(frozen=True)
class Limits:
    """Sizes beyond which input is not read whole: far above real data, far below the machine.

    A sample that crosses one is an ``over a size limit`` skip naming the limit and its flag.
    """

    #: A tar member, a manifest line, a parquet image cell or an image file (128 MiB).
    max_member_bytes: int = 128 << 20
    #: The UTF-8 bytes of a caption or recaption (1 MiB; tokenizers keep 77 tokens anyway).
    max_caption_bytes: int = 1 << 20
    #: Width x height of an image, read from its header: PIL's own decompression-bomb warning
    #: level (about 9,459 x 9,459); training decodes each kept image, at 3 bytes a pixel or more.
    max_image_pixels: int = 89_478_485

    def __post_init__(self) -> None:
        for name in ("max_member_bytes", "max_caption_bytes", "max_image_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                flag = "--" + name.replace("_", "-")
                raise ConversionError(f"{flag} must be a positive integer, got {value!r}")


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
    skip: tuple[str, str] | None = None  # another reason (and detail) found while reading
    image_problem: str = "no image"  # why ``image`` is None
    image_reason: str = "missing image"  # the skip reason when ``image`` is None
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
    limits: Limits = field(default_factory=Limits)
    image_roots: tuple[str, ...] = ()  # real paths image paths may point into, besides the file's

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
    except RecursionError:  # one hostile record must not end the conversion
        return None, "json is nested too deeply to parse", repaired
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


def _is_blank(text: str) -> bool:
    """Whether ``text`` holds nothing to read: only whitespace, control or format characters."""
    if text.isprintable():
        return not text.strip()
    return all(unicodedata.category(ch)[0] in "CZ" for ch in text)


def _utf8_size(text: str) -> int:
    """UTF-8 bytes of ``text`` (errors replaced, as they are when written)."""
    return len(text.encode("utf-8", errors="replace"))


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
    if ext in TEXT_EXTENSIONS:
        return "text"
    if ext in ("json", "cls"):
        return ext
    return None


@dataclass
class _TarSample:
    """The members of one sample as they arrive: what was read, and what was too large to read."""

    prefix: str
    extensions: set[str] = field(default_factory=set)
    parts: dict[str, bytes] = field(default_factory=dict)
    oversize: dict[str, str] = field(default_factory=dict)  # kind -> "name is N bytes"

    def continues(self, prefix: str, ext: str) -> bool:
        """Whether a member belongs here: same key, and an extension this sample lacks."""
        return prefix == self.prefix and ext not in self.extensions

    def take(self, archive: tarfile.TarFile, member: tarfile.TarInfo, ext: str,
             opts: _ReadOptions, with_images: bool) -> None:
        """Read a member if it is wanted and within ``max_member_bytes``; never extract it."""
        self.extensions.add(ext)
        kind = _member_kind(ext)
        if kind is None or kind in self.parts or kind in self.oversize:
            return
        if kind == "image" and not with_images:
            return
        if member.size > opts.limits.max_member_bytes:  # tarfile streams past it unread
            self.oversize[kind] = f"member {member.name} is {member.size:,} bytes"
            return
        fileobj = archive.extractfile(member)
        if fileobj is not None:
            self.parts[kind] = fileobj.read()


class _TarLayout:
    """Which runs of members are samples; remembers each key's extensions within one tar.

    A run whose key was seen earlier in the tar, not adjacent, and shares none of its extensions
    is the rest of that earlier sample (a writer that did not keep members together), not a new
    sample: it is counted here and reported instead of being read as a sample of its own.
    """

    def __init__(self) -> None:
        self.seen: dict[str, frozenset[str]] = {}
        self.fragments = 0
        self.fragment_keys: list[str] = []

    def is_sample(self, run: _TarSample) -> bool:
        before = self.seen.get(run.prefix)
        if before is not None and before.isdisjoint(run.extensions):
            self.fragments += 1
            if len(self.fragment_keys) < 3:
                self.fragment_keys.append(run.prefix)
            return False
        self.seen[run.prefix] = frozenset(run.extensions) | (before or frozenset())
        return True

    def problem(self) -> str | None:
        if not self.fragments:
            return None
        return (
            f"{self.fragments} run(s) of members belong to a sample seen earlier in the tar but "
            f"not next to it (e.g. {', '.join(map(repr, self.fragment_keys))}); WebDataset keeps "
            "a sample's members together, so those members were ignored (the sample counts "
            "once, judged on its first run). Re-create the tar with each sample's members adjacent"
        )


def _iter_webdataset(path: str, opts: _ReadOptions, with_images: bool) -> Iterator[_Record]:
    """Yield the samples of one tar, read in memory in tarfile's streaming mode, never extracted.

    Members of a sample are consecutive and share a key (WebDataset convention; see the module
    docs for repeated and scattered keys). Without ``with_images`` image members are streamed
    past unread (the scan pass).
    """
    index = 0
    run: _TarSample | None = None
    layout = _TarLayout()
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
                if run is None or not run.continues(member_prefix, ext):
                    if run is not None and layout.is_sample(run):
                        yield _webdataset_record(index, run, opts)
                        index += 1
                    run = _TarSample(member_prefix)
                run.take(archive, member, ext, opts, with_images)
            if not watcher.ended_cleanly(archive.offset):
                damage = "the archive stops without its end-of-archive blocks (truncated)"
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as err:
            damage = f"{type(err).__name__}: {err}"
    if run is not None and layout.is_sample(run):
        yield _webdataset_record(index, run, opts)
        index += 1
    problems = [problem for problem in (layout.problem(),) if problem]
    if damage is not None:
        problems.append(
            f"{damage}; {index} samples were read from it and judged as usual (the one at the "
            "cut is usually skipped). Re-download or re-create this file to recover the rest"
        )
    if problems:
        raise _DamagedInput("; ".join(problems))


def _webdataset_record(index: int, run: _TarSample, opts: _ReadOptions) -> _Record:
    """Judge nothing, just gather: key, caption, concepts and image of one tar sample."""
    parts = run.parts
    base_key = run.prefix.rpartition("/")[2]
    rec = _Record(index=index, label=base_key, key=base_key, image=parts.get("image"))
    over = f", over --max-member-bytes {opts.limits.max_member_bytes:,}"
    if "image" in run.oversize:
        rec.image_problem = run.oversize["image"] + over
        rec.image_reason = "over a size limit"
    elif rec.image is None:
        rec.image_problem = f"no .{'/.'.join(IMAGE_EXTENSIONS)} member"
    too_large = [v + over for k, v in run.oversize.items() if k != "image"]
    if too_large:
        rec.skip = ("over a size limit", too_large[0])
        return rec
    meta: dict[str, Any] = {}
    if "json" in parts:
        parsed, problem, rec.repaired = _json_object(parts["json"])
        if parsed is None:
            rec.malformed = problem
            return rec
        meta = parsed
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
    if (caption is None or _is_blank(caption)) and "text" in parts:
        caption, fixed = _decode_text(parts["text"])
        rec.repaired |= fixed
    rec.caption, rec.recaption = caption, recaption or ""
    if opts.read_concepts:
        _webdataset_concepts(rec, meta, parts, opts.concepts_from)
    return rec


def _webdataset_concepts(
    rec: _Record, meta: dict[str, Any], parts: dict[str, bytes], name: str
) -> None:
    """Fill in ``rec.concepts`` (and scores) from the json field or the ``.cls`` member."""
    if name == "cls":
        if "cls" not in parts:
            rec.skip = ("missing concepts", f"no .cls member{_TAGGING_HINT}")
            return
        text, fixed = _decode_text(parts["cls"])
        rec.repaired |= fixed
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        rec.concepts = [int(line) if line.isascii() and line.isdigit() else line for line in lines]
        return
    if name not in meta:
        other = "tags" if name == "classes" else "classes"
        if "json" not in parts:
            where = "no .json member"
        elif other in meta:
            where = f"json has no {name!r} field (it has {other!r}: use --concepts-from {other})"
        else:
            where = f"json has no {name!r} field"
        rec.skip = ("missing concepts", where + _TAGGING_HINT)
        return
    if name == "tags":
        concepts, problem, fixed = _json_tags(meta[name])
    else:
        concepts, problem, fixed = _json_concepts(meta[name], name)
    if concepts is None:
        rec.malformed = problem
        return
    rec.concepts = concepts
    rec.repaired |= fixed
    if name == "classes":  # scores are per detected box, so they only align with classes
        rec.scores, problem = _json_scores(meta.get("scores"), len(concepts))
        if problem:
            rec.malformed = problem


#: Appended to a "missing concepts" detail: where concepts can come from instead.
_TAGGING_HINT = (
    "; to take concepts from the captions pass --tag-captions VOCABULARY (e.g. coco), or "
    "--tagger MODULE:FUNCTION for your own tagger"
)


# ---------------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------------

#: Why an image is missing, and the skip reason it gives (``missing image`` unless a limit).
_ImageRead = tuple[bytes | None, str, str]


def _inside(path: str, root: str) -> bool:
    """Whether the real path ``path`` lies in the real folder ``root``."""
    return os.path.commonpath([root, path]) == root


def _read_image_file(name: str, base: str, opts: _ReadOptions) -> _ImageRead:
    """Read an image file named in a manifest or parquet file, confined and bounded.

    ``name`` is relative to ``base`` (the naming file's folder) or absolute; after ``..`` and
    symbolic links it must lie in ``base`` or one of ``opts.image_roots`` and be a regular file
    of at most ``max_member_bytes``. Opened non-blocking, so a FIFO cannot hang the conversion.
    """
    full = os.path.join(base, name)
    real = os.path.realpath(full)
    allowed = (os.path.realpath(base or "."), *opts.image_roots)
    if not any(_inside(real, root) for root in allowed):
        return None, (
            f"image path {name!r} resolves to {real}, outside {allowed[0]} (the folder of the "
            "file naming it); pass --image-root FOLDER to allow another folder"
        ), "missing image"
    limit = opts.limits.max_member_bytes
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as err:
        return None, f"cannot read image file {full} ({err.strerror or err})", "missing image"
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        return None, f"image path {full} is not a regular file", "missing image"
    if info.st_size > limit:
        os.close(fd)
        return None, (
            f"image file {full} is {info.st_size:,} bytes, over --max-member-bytes {limit:,}"
        ), "over a size limit"
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)  # bounded even if the file grows meanwhile
        except OSError as err:
            return None, f"cannot read image file {full} ({err.strerror or err})", "missing image"
    if len(data) > limit:
        detail = f"image file {full} grew over --max-member-bytes {limit:,}"
        return None, detail, "over a size limit"
    return data, "", ""


def _image_bytes(value: bytes | bytearray, what: str, limit: int) -> _ImageRead:
    """Image bytes from a cell, refused when empty or over ``max_member_bytes``."""
    if not value:
        return None, f"{what} is empty", "missing image"
    if len(value) > limit:
        return None, (
            f"{what} is {len(value):,} bytes, over --max-member-bytes {limit:,}"
        ), "over a size limit"
    return bytes(value), "", ""


def _parquet_image(value: Any, base: str, opts: _ReadOptions) -> _ImageRead:
    """Read an image cell: bytes, an HF-datasets ``{bytes, path}`` struct, or a path string."""
    limit = opts.limits.max_member_bytes
    if value is None:
        return None, "image cell is null", "missing image"
    if isinstance(value, dict):
        if value.get("bytes"):
            return _image_bytes(value["bytes"], "image struct's bytes", limit)
        if value.get("path"):
            return _read_image_file(str(value["path"]), base, opts)
        return None, "image struct has neither bytes nor path", "missing image"
    if isinstance(value, bytes | bytearray):
        return _image_bytes(value, "image cell", limit)
    if isinstance(value, str):
        return _read_image_file(value, base, opts)
    return None, f"image cell holds a {type(value).__name__}", "missing image"


def _is_text_type(kind: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        return _is_text_type(kind.value_type)
    return (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_null(kind)
    )


def _is_image_type(kind: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_struct(kind):  # Hugging Face datasets' Image feature
        fields = {kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)}
        data, path = fields.get("bytes"), fields.get("path")
        return (data is not None or path is not None) and (
            data is None or _pa_is_binary(data) or pa.types.is_null(data)
        ) and (path is None or _is_text_type(path))
    return _is_text_type(kind) or pa.types.is_fixed_size_binary(kind)


def _concepts_kind(kind: Any) -> str | None:
    """``"list"`` (names or ids per row), ``"scalar"`` (one id per row) or None (refused)."""
    import pyarrow as pa

    if pa.types.is_null(kind):
        return "list"  # every cell null: no concepts anywhere
    if pa.types.is_integer(kind):
        return "scalar"
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        value = kind.value_type
        if pa.types.is_integer(value) or _is_text_type(value):
            return "list"
    return None


#: What ``--concepts-column`` accepts, for the error message.
_CONCEPT_TYPES = (
    "a list of names or integer ids per row (list<string>, list<int64>, large_list, ...; a null "
    "cell is an empty list) or one integer id per row (int64, ...)"
)


@dataclass(frozen=True)
class _ParquetColumns:
    """The columns to read from one parquet file, checked once against its schema."""

    key: str | None
    caption: str
    recaption: str | None
    concepts: str | None
    scalar_concepts: bool  # one integer id per row instead of a list
    image: str
    image_paths: bool  # the image column holds path strings


def _parquet_columns(path: str, schema: Any, opts: _ReadOptions) -> _ParquetColumns:
    """Check names and Arrow types of the needed columns; every problem in one error."""
    names = schema.names
    problems: list[str] = []

    def check(column: str | None, flag: str, accepted: Callable[[Any], bool], what: str) -> None:
        if column is None:
            return
        if column not in names:
            problems.append(f"no column {column!r} (name the right one with {flag})")
        elif not accepted(schema.field(column).type):
            problems.append(
                f"column {column!r} is {schema.field(column).type}, but {flag} needs {what}"
            )

    text = "text (string or binary)"
    check(opts.image_column, "--image-column", _is_image_type,
          "image bytes (binary), {bytes, path} structs or path strings")
    check(opts.caption_column, "--caption-column", _is_text_type, text)
    check(opts.recaption_column, "--recaption-column", _is_text_type, text)
    key = opts.key_column or ("key" if "key" in names else None)
    check(key, "--key-column", lambda t: _is_text_type(t) or _pa_is_integer(t),
          "text or integers")
    concepts = opts.concepts_column if opts.read_concepts else None
    kind = None
    if concepts is not None and concepts not in names:
        hint = (
            " or, as the file has captions, take concepts from them with --tag-captions "
            "VOCABULARY (e.g. coco) or from your own tagger with --tagger MODULE:FUNCTION"
            if opts.caption_column in names
            else ""
        )
        problems.append(
            f"no column {concepts!r} (name the right one with --concepts-column){hint}"
        )
    elif concepts is not None:
        kind = _concepts_kind(schema.field(concepts).type)
        if kind is None:
            problems.append(
                f"column {concepts!r} is {schema.field(concepts).type}, but --concepts-column "
                f"needs {_CONCEPT_TYPES}"
            )
    if problems:
        raise ConversionError(
            f"{path} cannot be converted: " + "; ".join(problems)
            + f" (its columns: {', '.join(names)})"
        )
    image_type = schema.field(opts.image_column).type
    return _ParquetColumns(
        key=key,
        caption=opts.caption_column,
        recaption=opts.recaption_column,
        concepts=concepts,
        scalar_concepts=kind == "scalar",
        image=opts.image_column,
        image_paths=_is_text_type(image_type) and not _pa_is_binary(image_type),
    )


def _pa_is_integer(kind: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_integer(kind))


def _pa_is_binary(kind: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_binary(kind) or pa.types.is_large_binary(kind))


def _arrow_pylist(column: Any) -> list[Any]:
    """Python values of a column, with strings as bytes so that invalid UTF-8 cannot raise."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.cast(kind.value_type), kind.value_type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        column = column.cast(pa.binary())
    elif (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
        pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type)
    ):
        column = column.cast(pa.list_(pa.binary()))
    return column.to_pylist()


def _concept_cell(value: Any, scalar: bool) -> list[Any]:
    """A concepts cell as a list of entries: null is empty, a scalar id is a list of one."""
    if value is None:
        return []
    return [value] if scalar else list(value)


def _iter_parquet(path: str, opts: _ReadOptions, with_images: bool) -> Iterator[_Record]:
    """Rows of one parquet file, read in record batches of the needed columns only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise _DamagedInput(f"not a readable parquet file ({err})") from err
    plan = _parquet_columns(path, parquet.schema_arrow, opts)
    key, caption, concepts, recaption = plan.key, plan.caption, plan.concepts, plan.recaption
    columns = [c for c in (key, caption, concepts, recaption) if c]
    if with_images:
        columns.append(plan.image)
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
                cell = values[concepts][j] if concepts else None
                for entry in _concept_cell(cell, plan.scalar_concepts):
                    if isinstance(entry, bytes):
                        entry, fixed = _decode_text(entry)
                        rec.repaired |= fixed
                    rec.concepts.append(entry)
                if with_images:
                    image = values[plan.image][j]
                    if plan.image_paths and isinstance(image, bytes):
                        image = os.fsdecode(image)
                    rec.image, rec.image_problem, rec.image_reason = _parquet_image(
                        image, base, opts
                    )
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


def _iter_jsonl(path: str, opts: _ReadOptions, with_images: bool) -> Iterator[_Record]:
    """Lines of a manifest; image paths are relative to the manifest's directory."""
    base = os.path.dirname(path)
    limit = opts.limits.max_member_bytes
    with open(path, "rb") as manifest:
        for index, (line_number, raw) in enumerate(_manifest_lines(manifest, limit)):
            rec = _Record(index=index, label=f"line {line_number}")
            if raw is None:
                rec.skip = ("over a size limit", f"the line is over --max-member-bytes {limit:,}")
            else:
                _manifest_record(rec, raw, opts, base, with_images)
            yield rec


def _manifest_record(
    rec: _Record, raw: bytes, opts: _ReadOptions, base: str, with_images: bool
) -> None:
    """Fill ``rec`` from one manifest line."""
    obj, problem, rec.repaired = _json_object(raw)
    if obj is None:
        rec.malformed = problem
        return
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
        rec.skip = ("missing concepts", "line has no 'concepts' field" + _TAGGING_HINT)
    elif problem is None and opts.read_concepts:
        concepts, problem, fixed = _json_concepts(obj["concepts"], "concepts")
        rec.concepts = concepts or []
        rec.repaired |= fixed
        if problem is None:
            rec.scores, problem = _json_scores(obj.get("scores"), len(rec.concepts))
    rec.malformed = problem
    if not isinstance(image_path, str) or not image_path:
        rec.image_problem = "line has no 'image' path"
    elif with_images:
        rec.image, rec.image_problem, rec.image_reason = _read_image_file(image_path, base, opts)


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
            if rec.malformed is None and rec.skip is None:
                rec.concepts = tagger.tag(rec.caption)
            yield rec
    elif opts.tagger is None:
        yield from records
    elif scan:
        function = load_tagger(opts.tagger)
        with open(spill or os.devnull, "w", encoding="utf-8") as saved:
            for rec in records:
                names = _run_tagger(
                    function, opts.tagger, rec, path, opts.limits.max_image_pixels
                )
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
    function: Callable[..., Any], spec: str, rec: _Record, path: str, max_pixels: int
) -> list[str] | None:
    """The user's tagger on one record; None where the record will be skipped anyway."""
    if (
        rec.malformed is not None
        or rec.skip is not None
        or rec.caption is None
        or _is_blank(rec.caption)
        or rec.image is None
        or _image_verdict(rec.image, max_pixels) is not None
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

    def __init__(self, policy: _ConceptPolicy, path: str, limits: Limits) -> None:
        self.policy = policy
        self.limits = limits
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
        if rec.skip is not None:
            return rec.skip, []
        if rec.caption is None or _is_blank(rec.caption):
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
        self.normalised.update(normalised)
        return None, ids

    def _too_long(self, rec: _Record) -> str | None:
        """Why the caption or recaption is over ``max_caption_bytes``, or None."""
        limit = self.limits.max_caption_bytes
        for name, text in (("caption", rec.caption or ""), ("recaption", rec.recaption)):
            if len(text) * 4 > limit and _utf8_size(text) > limit:  # 4: the most a char takes
                size = _utf8_size(text)
                return f"the {name} is {size:,} bytes, over --max-caption-bytes {limit:,}"
        return None

    @property
    def index_names(self) -> tuple[str, ...]:
        """Vocabulary names by id (only asked for when the policy has names)."""
        return self.policy.names or ()


def image_problem(data: bytes, max_pixels: int = Limits.max_image_pixels) -> str | None:
    """Why ``data`` is not a usable image (undecodable, or over ``max_pixels``), or None."""
    verdict = _image_verdict(data, max_pixels)
    return None if verdict is None else verdict[1]


@contextmanager
def _pixel_limit_is_ours() -> Iterator[None]:
    """Turn off PIL's decompression-bomb check while ``_image_verdict`` makes its own.

    PIL warns above ``Image.MAX_IMAGE_PIXELS`` and refuses twice that, whatever the user chose
    with ``--max-image-pixels``; the converter checks the size itself, before decoding.
    """
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _image_verdict(data: bytes, max_pixels: int) -> tuple[str, str] | None:
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
    judge = _Judge(policy, path, opts.limits)
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
    concept_instances: Counter[int] = field(default_factory=Counter)  # id -> written instances
    concept_samples: Counter[int] = field(default_factory=Counter)  # id -> written samples

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
        self.concept_instances.update(other.concept_instances)
        self.concept_samples.update(other.concept_samples)


def _write_part(task: _PartTask) -> _Tally:
    """Write one part; the only pass that reads images."""
    from streaming import MDSWriter

    tally = _Tally()
    limit = task.examples_per_reason
    max_pixels = task.opts.limits.max_image_pixels
    tick = _Ticker()
    writer = MDSWriter(columns=MDS_COLUMNS, out=task.out, **task.writer_kwargs)
    try:
        for path, duplicates, scanned, spill in task.files:
            judge = _Judge(task.policy, path, task.opts.limits)
            records = 0
            try:
                for rec in _read(path, task.opts, scan=False, spill=spill):
                    records += 1
                    tick()
                    verdict, ids = judge.metadata_verdict(rec)
                    if verdict is None and rec.index in duplicates:
                        verdict = ("duplicate key", "an earlier sample of the input has this key")
                    if verdict is None and rec.image is None:
                        verdict = (rec.image_reason, rec.image_problem)
                    if verdict is None:
                        verdict = _image_verdict(rec.image or b"", max_pixels)
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
                    tally.concept_instances.update(ids)
                    tally.concept_samples.update(set(ids))
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


def _uploader(out: str) -> Any:
    """Streaming's uploader for a remote ``out`` (its local staging folder already removed)."""
    from streaming.base.storage.upload import CloudUploader

    try:
        uploader = CloudUploader.get(out, keep_local=False, exist_ok=True)
    except Exception as err:
        raise ConversionError(
            f"cannot use --out {out}: {err}. The bucket must exist; the endpoint comes from "
            "S3_ENDPOINT_URL and credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        ) from err
    shutil.rmtree(uploader.local, ignore_errors=True)
    return uploader


def _check_output(out: str, overwrite: bool, files: Sequence[str]) -> bool:
    """Refuse a non-empty output unless ``overwrite``; True when the local dir must be cleared.

    MDSWriter's own ``exist_ok=True`` deletes the directory, so the decision is made here, once,
    with a message, and never deletes an input. Called with the output locked, so nobody else
    writes there between this check and the conversion.
    """
    if _is_remote(out):
        existing = [  # our own lock object is not content
            key
            for key in _uploader(out).list_objects() or []
            if f"/{_LOCK_FOLDER}/" not in f"/{key}"
        ]
        if existing and not overwrite:
            raise ConversionError(
                f"--out {out} already holds {len(existing)} objects (e.g. {existing[0]}); pass "
                "--overwrite to write over them (objects not rewritten are left in place), or "
                "choose another prefix"
            )
        return False
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


def _clear_folder(out: str) -> None:
    """Empty ``out`` but keep the folder itself: its lock is held on it."""
    for entry in os.scandir(out):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


# ---------------------------------------------------------------------------------------------
# One conversion per output
# ---------------------------------------------------------------------------------------------

#: Where an ``s3://`` output's lock objects live, under the output prefix.
_LOCK_FOLDER = ".convert-lock"


@contextmanager
def _output_lock(out: str, break_lock: bool) -> Iterator[list[str]]:
    """Hold ``out`` for one conversion; yields notes for the report (e.g. "not locked")."""
    scheme = urllib.parse.urlparse(out).scheme
    if not _is_remote(out):
        with _local_lock(out) as notes:
            yield notes
    elif scheme == "s3":
        with _s3_lock(out, break_lock):
            yield []
    else:
        yield [
            f"--out {out} was not locked (only local folders and s3:// prefixes are): never run "
            "two conversions into one output at once"
        ]


@contextmanager
def _local_lock(out: str) -> Iterator[list[str]]:
    """``flock`` on the output folder itself, so the kernel releases it if the process dies.

    Locking the folder (not a file in it) leaves the output exactly as MDSWriter wants it. A
    folder this conversion created is removed again if it fails before writing anything.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConversionError(f"--out {out} exists and is not a directory; choose a directory")
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    notes: list[str] = []
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusy(
                f"--out {out} is being written by another conversion right now (it holds the "
                "folder's lock); wait for it to finish, or choose another folder"
            ) from None
        except OSError as err:
            notes.append(
                f"--out {out} could not be locked ({err.strerror or err}; some network file "
                "systems cannot): never run two conversions into it at once"
            )
        try:
            yield notes
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(out)  # only succeeds while it is still empty
            raise
    finally:
        os.close(fd)


def _lock_keys(client: Any, bucket: str, folder: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _lock_holder(client: Any, bucket: str, key: str) -> str:
    """Who wrote a lock object, from its small json body, for the error message."""
    try:
        body = client.get_object(Bucket=bucket, Key=key, Range="bytes=0-4095")["Body"].read()
        holder = json.loads(body)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except Exception:  # an unreadable lock is still a lock
        return "an unknown conversion"


@contextmanager
def _s3_lock(out: str, break_lock: bool) -> Iterator[None]:
    """A lock object under ``<out>/.convert-lock/``, removed at the end.

    S3 lists a finished PUT in every later LIST, so of two conversions that each write their
    object and then list, at least the later one sees the other: never both proceed (both may
    stop, if they start at the same instant). A conversion that dies leaves its object behind;
    the error names it and ``break_lock`` removes it.
    """
    client = _uploader(out).s3
    parsed = urllib.parse.urlparse(out)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    folder = f"{prefix}/{_LOCK_FOLDER}/" if prefix else f"{_LOCK_FOLDER}/"
    held = _lock_keys(client, bucket, folder)
    if held and not break_lock:
        raise OutputBusy(
            f"--out {out} is locked by {_lock_holder(client, bucket, held[0])} "
            f"(s3://{bucket}/{held[0]}); wait for that conversion to finish, or, if it no "
            "longer runs (it crashed or was killed), run again with --break-lock"
        )
    for key in held:
        client.delete_object(Bucket=bucket, Key=key)
    mine = f"{folder}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex}.json"
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    client.put_object(Bucket=bucket, Key=mine, Body=json.dumps(holder).encode())
    try:
        others = [key for key in _lock_keys(client, bucket, folder) if key != mine]
        if others:
            raise OutputBusy(
                f"another conversion ({_lock_holder(client, bucket, others[0])}) started "
                f"writing into --out {out} at the same moment; let it finish (or stop it) and "
                "run again"
            )
        yield
    finally:
        try:
            client.delete_object(Bucket=bucket, Key=mine)
        except Exception as err:  # the data is whole; only the next conversion is affected
            print(
                f"convert_to_mds: warning: could not remove the lock s3://{bucket}/{mine} "
                f"({err}); the next conversion into --out needs --break-lock",
                file=sys.stderr,
            )


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
    limits: Limits | None = None,
    image_roots: Sequence[str | os.PathLike[str]] = (),
    break_lock: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert ``inputs`` into an MDS schema v1 dataset at ``out`` and return the report.

    Args:
        inputs: Files, directories (searched recursively by suffix) or glob patterns, in order.
        fmt: ``"webdataset"``, ``"parquet"`` or ``"jsonl"``.
        out: A local directory (created; must be empty unless ``overwrite``) or a remote prefix
            such as ``s3://bucket/path`` (the bucket must exist). Locked while converting.
        vocabulary: A ``vocabulary.json`` (or a directory holding one, or a ``Vocabulary``)
            that fixes concept ids; a name outside it is an ``unknown concept`` skip. Without
            it the vocabulary is built from the data, most frequent first, ties by name.
        extend_vocabulary: Append names missing from ``vocabulary`` (most frequent first)
            instead of skipping their samples. Ids given as numbers are never extended.
        concepts_from: WebDataset only: where the concepts are, the json's ``"classes"`` (one
            name per detected box, the default) or ``"tags"`` (a " | "-joined string), or the
            ``"cls"`` member (one name or integer id per line).
        tag_captions: Take concept ids from the caption instead of the input: a tagging
            vocabulary file (one concept per line, ``name: synonym, ...``), a
            ``vocabulary.json`` or a shipped name (``coco``, ``imagenet1k``); see
            :mod:`cabs_streaming.tagging`. Its names, in file order, are the vocabulary.
        tagger: Take concept names from your own function instead of the input:
            ``"module:function"`` or ``"path/to/file.py:function"``, called as
            ``function(image_bytes, caption) -> list[str]`` once per sample, in the scan pass
            (which then reads images); its names are mapped like detector names.
        workers: Processes; files are split into contiguous runs written as ``part-NNNNN/``
            sub-datasets and merged. Sample order is input order whatever the value. At most
            one process per input file runs (the report's ``warnings`` say so).
        overwrite: Replace a non-empty local output directory (or write over a non-empty
            remote prefix).
        image_column: Parquet column of image bytes, ``{bytes, path}`` structs or paths.
        caption_column: Parquet column of captions.
        concepts_column: Parquet column of concept lists (names or ids; default ``concepts``),
            or of one integer id per row.
        key_column: Parquet key column; by default ``key`` when present, else the key is
            ``<file name>:<row>``.
        recaption_column: Optional parquet column of synthetic captions.
        size_limit: ``MDSWriter`` shard size limit (bytes or a string such as ``"64mb"``).
        compression: ``MDSWriter`` compression (e.g. ``"zstd"``), none by default.
        hashes: Shard hashes written into ``index.json`` (``xxh64`` by default, cheap), so
            that readers can pass ``validate_hash`` and a corrupt shard is caught by name.
        max_samples_per_shard: Also start a new shard after this many samples.
        examples_per_reason: Example samples listed per skip reason in the report.
        limits: Size limits (:class:`Limits`; the defaults are far above real data).
        image_roots: Folders that image paths of a manifest or parquet file may point into,
            besides that file's own folder.
        break_lock: Remove the lock a crashed conversion left on an ``s3://`` output.
        progress: Show tqdm progress bars (on stderr).

    Returns:
        The report, also written as ``report.json`` beside ``index.json``. It always satisfies
        ``read == written + sum(skipped.values())``; damaged input files are listed under
        ``errors`` rather than raised, and ``warnings`` says when nothing was written or one
        skip reason took most of the input.

    Names of a given vocabulary are matched as written, then in normal form (case, plural,
    whitespace and punctuation: "Dogs" and "hot_dog" find "dog" and "hot dog"); the report's
    ``concept_names`` lists the names that matched nothing (their samples are ``unknown concept``
    skips) and those matched only in normal form, with counts.

    Raises:
        OutputBusy: Another conversion is writing into ``out``.
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
    writer_kwargs = _writer_kwargs(size_limit, compression, hashes)
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
    job = _Job(
        files=files,
        out=out,
        opts=_ReadOptions(
            fmt=fmt,
            concepts_from=concepts_from,
            image_column=image_column,
            caption_column=caption_column,
            concepts_column=concepts_column,
            key_column=key_column,
            recaption_column=recaption_column,
            tag_captions=tag_captions,
            tagger=tagger,
            limits=Limits() if limits is None else limits,
            image_roots=_image_roots(image_roots),
        ),
        base_vocabulary=base_vocabulary,
        extend_vocabulary=extend_vocabulary,
        workers=workers,
        writer_kwargs=writer_kwargs,
        max_samples_per_shard=max_samples_per_shard,
        examples_per_reason=examples_per_reason,
        progress=progress,
        started=started,
    )
    with _output_lock(out, break_lock) as notes:
        clear_output = _check_output(out, overwrite, files)
        return _convert_locked(job, clear_output, notes)


@dataclass
class _Job:
    """A checked conversion request, handed from :func:`convert` to the passes."""

    files: list[str]
    out: str
    opts: _ReadOptions
    base_vocabulary: Vocabulary | None
    extend_vocabulary: bool
    workers: int
    writer_kwargs: dict[str, Any]
    max_samples_per_shard: int | None
    examples_per_reason: int
    progress: bool
    started: float


def _writer_kwargs(
    size_limit: int | str | None, compression: str | None, hashes: Sequence[str]
) -> dict[str, Any]:
    """Check the MDSWriter settings with the writer's own tables; its keyword arguments."""
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
    return {"size_limit": size_limit, "compression": compression, "hashes": list(hashes)}


def _image_roots(roots: Sequence[str | os.PathLike[str]]) -> tuple[str, ...]:
    """Real paths of the extra folders image paths may point into; each must be a folder."""
    real = []
    for root in roots:
        if not os.path.isdir(root):
            raise ConversionError(f"--image-root {os.fspath(root)} is not a folder")
        real.append(os.path.realpath(root))
    return tuple(real)


def _convert_locked(job: _Job, clear_output: bool, notes: list[str]) -> dict[str, Any]:
    """Scan, write, merge and publish, with ``job.out`` locked and checked."""
    files, out, opts = job.files, job.out, job.opts
    base_vocabulary = job.base_vocabulary
    base_names = None if base_vocabulary is None else tuple(base_vocabulary.names)
    id_limit = None if base_names is None else len(base_names)
    scan_policy = _ConceptPolicy(None if job.extend_vocabulary else base_names, id_limit)
    processes = min(job.workers, len(files))
    if job.workers > len(files):
        notes.append(
            f"--workers {job.workers}, but there are {len(files)} input file(s) and each process "
            f"converts whole files, so {processes} process(es) ran; split large inputs into "
            "more files (several tars or parquet files) to use more"
        )
    context = multiprocessing.get_context()
    counter = context.Value("q", 0)
    pool = (
        context.Pool(processes, initializer=_init_worker, initargs=(counter,))
        if processes > 1
        else None
    )
    spill_dir = tempfile.mkdtemp(prefix="cabs-tagger-") if opts.tagger is not None else None
    spills = [
        os.path.join(spill_dir, f"{j:06d}.jsonl") if spill_dir else None for j in range(len(files))
    ]
    # Extending a vocabulary: a name that is a base name in normal form is that base name.
    base_mapper = (
        ConceptNameMapper(base_vocabulary)
        if job.extend_vocabulary and base_vocabulary
        else None
    )
    try:
        # Pass 1: keys and concept counts, file by file, folded in input order.
        owners: set[str] = set()
        counts: Counter[str] = Counter()
        duplicates: list[frozenset[int]] = []
        records: list[int] = []
        with tqdm(desc="scan", unit=" samples", disable=not job.progress) as bar:
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
        elif opts.tag_captions is not None:
            final, source, added = base_vocabulary, "tag-captions", 0
        else:
            final = base_vocabulary
            size_before = len(final)
            if job.extend_vocabulary:
                for name in by_frequency:
                    final.add(name)
            source, added = "given", len(final) - size_before
        write_policy = _ConceptPolicy(tuple(final.names), id_limit)

        # Pass 2: write the parts.
        if clear_output:
            _clear_folder(out)
        runs = _split_contiguous(records, processes)
        part_names = [f"part-{i:05d}" for i in range(len(runs))] if len(runs) > 1 else []
        tasks = [
            _PartTask(
                out=f"{out.rstrip('/')}/{part_names[i]}" if part_names else out,
                files=[(files[j], duplicates[j], records[j], spills[j]) for j in run],
                opts=opts,
                policy=write_policy,
                writer_kwargs=job.writer_kwargs,
                max_samples_per_shard=job.max_samples_per_shard,
                examples_per_reason=job.examples_per_reason,
            )
            for i, run in enumerate(runs)
        ]
        counter.value = 0
        tally = _Tally()
        with tqdm(
            desc="write", total=sum(records), unit=" samples", disable=not job.progress
        ) as bar:
            for part in _run_tasks(pool, _write_part, tasks, bar, counter):
                tally.add(part, job.examples_per_reason)
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
        tally, fmt=opts.fmt, files=files, out=out, workers=job.workers, parts=len(runs),
        vocabulary={"source": source, "size": len(final), "added": added},
        names=final.names,
        concept_source=(
            {"tag-captions": opts.tag_captions} if opts.tag_captions is not None
            else {"tagger": opts.tagger} if opts.tagger is not None
            else {"input": opts.concepts_from if opts.fmt == "webdataset"
                  else opts.concepts_column}
        ),
        limits=asdict(opts.limits),
        notes=notes,
        seconds=time.monotonic() - job.started,
    )
    _publish(out, REPORT_FILENAME, json.dumps(report, indent=2, ensure_ascii=False))
    return report


def _canonical(mapper: ConceptNameMapper, name: str) -> str:
    """``name`` as the base vocabulary spells it when it is one of its names in normal form."""
    found = mapper.lookup(name)
    return name if found is None else mapper.names[found]


def _concept_counts(tally: _Tally, names: Sequence[str], shown: int = 10) -> dict[str, Any]:
    """Per-concept counts of the written samples: aligned lists, and the head and tail.

    ``per_concept`` lists are indexed by concept id (``vocabulary.json`` order), so a program
    (e.g. a balancing policy) reads dataset-wide counts without another pass over the shards.
    """
    samples = [tally.concept_samples.get(i, 0) for i in range(len(names))]
    instances = [tally.concept_instances.get(i, 0) for i in range(len(names))]
    used = [i for i in range(len(names)) if samples[i]]

    def row(i: int) -> dict[str, Any]:
        return {"concept": names[i], "id": i, "samples": samples[i], "instances": instances[i]}

    return {
        "instances": tally.instances,
        "samples_without_concepts": tally.without_concepts,
        "distinct": len(used),
        "unused": len(names) - len(used),
        "head": [row(i) for i in sorted(used, key=lambda i: (-samples[i], i))[:shown]],
        "tail": [row(i) for i in sorted(used, key=lambda i: (samples[i], i))[:shown]],
        "per_concept": {"samples": samples, "instances": instances},
    }


def _skip_alarm(report: dict[str, Any]) -> str | None:
    """Why a finished conversion should not look like a success, or None.

    Nothing was written, or one skip reason took over ``SKIP_ALARM_SHARE`` of the input; the
    first example of that reason says why.
    """
    read = report["read"]
    reason, count = max(report["skipped"].items(), key=lambda item: item[1])
    example = (report["examples"].get(reason) or [None])[0] if count else None
    why = (
        f"; e.g. {example['key']!r} in {example['file']}: {example['detail']}" if example else ""
    )
    if report["written"] == 0:
        if not read:
            return "no sample was written: the input holds no samples"
        return f"no sample was written; {count:,} of {read:,} were skipped as {reason!r}{why}"
    if count > SKIP_ALARM_SHARE * read:
        return (
            f"{count:,} of {read:,} samples ({count / read:.0%}) were skipped as {reason!r}{why}"
        )
    return None


def _build_report(tally: _Tally, **facts: Any) -> dict[str, Any]:
    """Assemble the report: counts first, then examples, damage, vocabulary, provenance."""
    skipped = {reason: tally.skipped.get(reason, 0) for reason in SKIP_REASONS}
    if tally.read != tally.written + sum(skipped.values()):
        raise RuntimeError(
            f"internal error: read {tally.read} != written {tally.written} + skipped "
            f"{sum(skipped.values())}; please report this with the input that caused it"
        )
    report = {
        "read": tally.read,
        "written": tally.written,
        "skipped": skipped,
        "warnings": list(facts["notes"]),
        "examples": {r: tally.examples[r] for r in SKIP_REASONS if r in tally.examples},
        "repaired": {
            INVALID_UTF8: {"count": tally.repaired, "examples": tally.repaired_examples}
        },
        "errors": tally.errors,
        "concepts": _concept_counts(tally, facts["names"]),
        "concept_source": facts["concept_source"],
        "concept_names": names_report(tally.unknown_names, tally.normalised_names),
        "vocabulary": facts["vocabulary"],
        "shards": tally.shards,
        "format": facts["fmt"],
        "inputs": list(facts["files"]),
        "out": facts["out"],
        "workers": facts["workers"],
        "parts": facts["parts"],
        "limits": facts["limits"],
        "seconds": round(facts["seconds"], 3),
    }
    alarm = _skip_alarm(report)
    if alarm is not None:
        report["warnings"].insert(0, alarm)
    return report


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Build the ``tools/convert_to_mds.py`` argument parser."""
    limits = Limits()
    statuses = "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_STATUSES.items())
    parser = argparse.ArgumentParser(
        prog="convert_to_mds.py",
        description=(
            "Convert WebDataset tars, parquet files or a JSONL manifest into MDS shards "
            "(schema v1) with vocabulary.json and report.json beside index.json."
        ),
        epilog=f"exit status:\n{statuses}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--input", nargs="+", required=True, metavar="PATH",
        help="files, directories or glob patterns, converted in this order (required)")
    add("--format", required=True, choices=FORMATS,
        help="what the inputs are: WebDataset tars (.tar, .tar.gz, ...), parquet files, or JSONL "
        "manifests of {image, caption, concepts} lines (required)")
    add("--out", required=True, metavar="DIR_OR_URL",
        help="local directory or remote prefix (s3://bucket/path); locked while converting "
        "(required)")
    add("--vocabulary", metavar="FILE",
        help="vocabulary.json fixing concept ids (default: build one from the data, most "
        "frequent first)")
    add("--extend-vocabulary", action="store_true",
        help="append names missing from --vocabulary instead of skipping their samples "
        "(default: skip them as 'unknown concept')")
    add("--concepts-from", choices=CONCEPT_SOURCES, default=None,
        help="webdataset: where the concepts are, the json's classes or tags field, or the .cls "
        "member (one name or integer id per line) (default: classes)")
    add("--tag-captions", metavar="VOCABULARY",
        help="take concept ids from the captions instead: a vocabulary file (one concept per "
        "line, 'name: synonym, ...'), a vocabulary.json, or a shipped one: coco, imagenet1k "
        "(default: concepts come from the input)")
    add("--tagger", metavar="MODULE:FUNCTION",
        help="take concept names from your function(image_bytes, caption) -> list of names "
        "instead (also path/to/file.py:FUNCTION); names are mapped onto --vocabulary like "
        "detector names (default: none)")
    add("--workers", type=int, default=1, metavar="N",
        help="processes; each converts whole input files, so at most one per file runs "
        "(default: 1)")
    add("--overwrite", action="store_true",
        help="replace a non-empty output directory, or write over a non-empty prefix (default: "
        "refuse)")
    add("--image-column", default="image", metavar="NAME",
        help="parquet: image bytes, {bytes, path} structs or path strings (default: image)")
    add("--caption-column", default="caption", metavar="NAME",
        help="parquet: caption text (default: caption)")
    add("--concepts-column", default=None, metavar="NAME",
        help="parquet: lists of concept names or ids, or one integer id per row "
        "(default: concepts)")
    add("--key-column", metavar="NAME",
        help="parquet: sample keys (default: 'key' if present, else FILE:ROW)")
    add("--recaption-column", metavar="NAME",
        help="parquet: synthetic captions (default: none)")
    add("--size-limit", default="64mb", metavar="BYTES",
        help="MDS shard size limit, bytes or e.g. 64mb (default: 64mb)")
    add("--compression", metavar="NAME",
        help="MDS shard compression, e.g. zstd (default: none)")
    add("--hashes", nargs="*", default=["xxh64"], metavar="ALGO",
        help="shard hashes written to index.json for validate_hash (default: xxh64; none with "
        "an empty list)")
    add("--max-samples-per-shard", type=int, metavar="N",
        help="also start a new shard after this many samples (default: no limit)")
    add("--examples-per-reason", type=int, default=5, metavar="N",
        help="example keys listed per skip reason in the report (default: 5)")
    add("--max-member-bytes", type=int, default=limits.max_member_bytes, metavar="N",
        help="larger tar members, manifest lines, parquet image cells and image files are "
        f"skipped unread (default: {limits.max_member_bytes}, 128 MiB)")
    add("--max-caption-bytes", type=int, default=limits.max_caption_bytes, metavar="N",
        help="samples whose caption or recaption is longer in UTF-8 are skipped (default: "
        f"{limits.max_caption_bytes}, 1 MiB)")
    add("--max-image-pixels", type=int, default=limits.max_image_pixels, metavar="N",
        help="images with more pixels (width x height, read from the header) are skipped "
        f"(default: {limits.max_image_pixels}, PIL's decompression-bomb warning level)")
    add("--image-root", action="append", default=[], metavar="DIR",
        help="jsonl / parquet: a folder image paths may also point into, repeatable (default: "
        "only the folder of the file naming them; '..', absolute paths and symbolic links that "
        "leave it are refused)")
    add("--accept-skips", action="store_true",
        help="exit 0 even when no sample was written or one skip reason took over half of "
        "the input (default: exit status 4)")
    add("--break-lock", action="store_true",
        help="s3 output: remove the lock a crashed conversion left behind (check first that "
        "it no longer runs) (default: refuse to start)")
    add("--no-progress", action="store_true", help="hide progress bars (default: shown)")
    return parser


def _printable(report: dict[str, Any]) -> dict[str, Any]:
    """The report for the console: the per-concept lists stay in ``report.json``."""
    shown = dict(report)
    concepts = dict(report["concepts"])
    size = len(concepts["per_concept"]["samples"])
    concepts["per_concept"] = f"{size} samples / instances counts by concept id in report.json"
    shown["concepts"] = concepts
    return shown


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; print the report as JSON; return an ``EXIT_STATUSES`` code."""
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
            limits=Limits(args.max_member_bytes, args.max_caption_bytes, args.max_image_pixels),
            image_roots=args.image_root,
            break_lock=args.break_lock,
            progress=not args.no_progress,
        )
    except OutputBusy as err:
        print(f"convert_to_mds: error: {err}", file=sys.stderr)
        return 5
    except ConversionError as err:
        print(f"convert_to_mds: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"convert_to_mds: interrupted; {args.out} may hold a partial dataset: run the same "
            "command with --overwrite to start again",
            file=sys.stderr,
        )
        return 130
    print(json.dumps(_printable(report), indent=2, ensure_ascii=False))
    for error in report["errors"]:
        print(f"convert_to_mds: damaged input {error['file']}: {error['error']}", file=sys.stderr)
    for warning in report["warnings"]:
        print(f"convert_to_mds: warning: {warning}", file=sys.stderr)
    if _skip_alarm(report) is not None and not args.accept_skips:
        return 4
    return 3 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""WebDataset tars (DataComp / DataConcept layout, img2dataset's), read in memory, never extracted.

A sample is a run of adjacent members sharing a key; its caption comes from the json's
``caption`` or else from a ``.txt`` (or ``.caption``) member; concepts from the json's
``classes`` or ``tags`` or from a ``.cls`` member; a ``--numeric-column NAME`` from the json's
``NAME`` field (missing without a json member). The same member extension twice in a run
starts a new sample with the same key (a ``duplicate key`` skip). Members of a key seen earlier
in the tar but not adjacent to it, with none of its extensions, are a fragment of that sample:
they are ignored and the file is listed under ``errors``. A tar that ends early keeps every
sample read before the damage.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cabs_streaming.converter.records import (
    IMAGE_EXTENSIONS,
    TAGGING_HINT,
    TEXT_EXTENSIONS,
    DamagedInput,
    ReadOptions,
    Record,
)
from cabs_streaming.converter.text import (
    clean_text,
    decode_text,
    is_blank,
    json_concepts,
    json_key,
    json_object,
    json_scores,
    json_tags,
    json_text,
)

#: The tar block size: a proper archive ends with an all-zero block.
TAR_BLOCK = 512


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
        block = buffer[offset - start : offset - start + TAR_BLOCK]
        return block == bytes(TAR_BLOCK)


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

    def take(
        self,
        archive: tarfile.TarFile,
        member: tarfile.TarInfo,
        ext: str,
        opts: ReadOptions,
        with_images: bool,
    ) -> None:
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


def read_webdataset(path: str, opts: ReadOptions, with_images: bool) -> Iterator[Record]:
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
        raise DamagedInput("; ".join(problems))


def _webdataset_record(index: int, run: _TarSample, opts: ReadOptions) -> Record:
    """Judge nothing, just gather: key, caption, concepts and image of one tar sample."""
    parts = run.parts
    base_key = run.prefix.rpartition("/")[2]
    rec = Record(index=index, label=base_key, key=base_key, image=parts.get("image"))
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
        parsed, problem, rec.repaired = json_object(parts["json"])
        if parsed is None:
            rec.malformed = problem
            return rec
        meta = parsed
    rec.numbers = {name: meta[name] for name, _ in opts.numeric_columns if name in meta}
    if meta.get("uid") is not None:
        rec.key, problem = json_key(meta["uid"], "uid")
        if problem:
            rec.malformed = problem
            return rec
        rec.key, fixed = clean_text(rec.key or "")
        rec.label = rec.key
        rec.repaired |= fixed
    caption, problem, fixed = json_text(meta, "caption")
    recaption, problem_re, fixed_re = json_text(meta, "recap")
    if problem or problem_re:
        rec.malformed = problem or problem_re
        return rec
    rec.repaired |= fixed or fixed_re
    if (caption is None or is_blank(caption)) and "text" in parts:
        caption, fixed = decode_text(parts["text"])
        rec.repaired |= fixed
    rec.caption, rec.recaption = caption, recaption or ""
    if opts.read_concepts:
        _webdataset_concepts(rec, meta, parts, opts.concepts_from)
    return rec


def _webdataset_concepts(
    rec: Record, meta: dict[str, Any], parts: dict[str, bytes], name: str
) -> None:
    """Fill in ``rec.concepts`` (and scores) from the json field or the ``.cls`` member."""
    if name == "cls":
        if "cls" not in parts:
            rec.skip = ("missing concepts", f"no .cls member{TAGGING_HINT}")
            return
        text, fixed = decode_text(parts["cls"])
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
        rec.skip = ("missing concepts", where + TAGGING_HINT)
        return
    if name == "tags":
        concepts, problem, fixed = json_tags(meta[name])
    else:
        concepts, problem, fixed = json_concepts(meta[name], name)
    if concepts is None:
        rec.malformed = problem
        return
    rec.concepts = concepts
    rec.repaired |= fixed
    if name == "classes":  # scores are per detected box, so they only align with classes
        rec.scores, problem = json_scores(meta.get("scores"), len(concepts))
        if problem:
            rec.malformed = problem

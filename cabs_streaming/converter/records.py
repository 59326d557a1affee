"""What every part of the converter shares: the candidate record, the options, limits, errors.

A reader (``readers/``) turns each input sample into a :class:`Record` without judging it; the
judge (``judge.py``) decides its fate; the passes (``passes.py``) count and write it. The names
and reasons here are what the report and the command line speak in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    "bad numeric",
)
#: The skip reason of a ``--numeric-column`` value that is missing, null, not a number, NaN or
#: infinite, or out of range for its type (never written as a silent 0).
BAD_NUMERIC = "bad numeric"
INVALID_UTF8 = "invalid utf-8"
REPORT_FILENAME = "report.json"
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

INPUT_SUFFIXES = {
    "webdataset": (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"),
    "parquet": (".parquet",),
    "jsonl": (".jsonl",),
}

#: Appended to a "missing concepts" detail: where concepts can come from instead.
TAGGING_HINT = (
    "; to take concepts from the captions pass --tag-captions VOCABULARY (e.g. coco), or "
    "--tagger MODULE:FUNCTION for your own tagger"
)


class ConversionError(ValueError):
    """A problem with the arguments or the input that the user must fix; the message says how."""


class OutputBusy(ConversionError):
    """Another conversion holds ``--out``; the message says what holds it and what to do."""


class DamagedInput(Exception):
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


@dataclass
class Record:
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
    # The raw values of the declared ``--numeric-column``s found (an absent name: not found).
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReadOptions:
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
    # Where a manifest's relative image paths live when the manifest was downloaded from there
    # (an ``s3://`` prefix: the Spark engine's inputs); None: beside the file being read.
    image_base: str | None = None
    # ``--numeric-column``s: (name, MDS scalar encoding) pairs, written as columns of their own.
    numeric_columns: tuple[tuple[str, str], ...] = ()

    @property
    def read_concepts(self) -> bool:
        """Whether concepts come from the input (else from a tagger, and the input needs none)."""
        return self.tag_captions is None and self.tagger is None


#: What reading an image gives: ``(bytes or None, why it is missing, the skip reason)``.
ImageRead = tuple[bytes | None, str, str]

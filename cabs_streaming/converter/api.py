"""``convert()``: check a request, then scan, fix the vocabulary, write, merge and publish.

The passes are plain functions (``passes.py``); this module decides what runs where: input files
are scanned in order (on a pool of ``workers`` processes, or in this one), the scans are folded
in input order (first owner of a key, concept counts), the vocabulary is fixed, and contiguous
runs of files are written as parts that ``merge_index`` joins in order.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from cabs_streaming.concepts import (
    CONCEPT_COUNTS_FILENAME,
    DERIVED_COLUMNS,
    MDS_COLUMNS,
    NUMERIC_TYPES,
    VOCABULARY_FILENAME,
    Vocabulary,
)
from cabs_streaming.converter.judge import ConceptPolicy
from cabs_streaming.converter.output import (
    check_output,
    clear_folder,
    merge_parts,
    output_lock,
    publish,
    writer_kwargs,
)
from cabs_streaming.converter.passes import (
    FileScan,
    PartTask,
    scan_file,
    split_contiguous,
    write_part,
)
from cabs_streaming.converter.progress import run_tasks, start_pool, stop_pool
from cabs_streaming.converter.records import (
    CONCEPT_SOURCES,
    FORMATS,
    INPUT_SUFFIXES,
    REPORT_FILENAME,
    ConversionError,
    Limits,
    ReadOptions,
)
from cabs_streaming.converter.tally import Tally, build_report, counts_of
from cabs_streaming.tagging import ConceptNameMapper, TaggingVocabulary, load_tagger

__all__ = [
    "Job",
    "build_job",
    "convert",
    "final_vocabulary",
    "numeric_column_types",
    "policies",
    "publish_dataset",
]

#: What ``numeric_columns=`` takes: ``{name: type}``, or ``"NAME[:TYPE]"`` / ``(name, type)``s.
NumericColumns = Mapping[str, str] | Sequence[str | tuple[str, str]]


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
    numeric_columns: NumericColumns = (),
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
        numeric_columns: Per-sample numbers to write as MDS scalar columns of their own: a
            mapping ``{name: type}``, or a list of ``"NAME[:TYPE]"`` strings or ``(name, type)``
            pairs, ``type`` one of ``float32`` (the default), ``float64``, ``int32``, ``int64``.
            The value is the parquet column ``name``, the JSONL line's field ``name``, or the
            field ``name`` of a WebDataset sample's ``.json`` member. A value that is missing,
            null, not a number, NaN or infinite, a fraction for an int type or out of its type's
            range is a ``bad numeric`` skip (never written as 0). A name of the schema's own
            (``MDS_COLUMNS``) or of a derived column (``concept_score_min`` / ``_max``) is an
            error. ``ConceptStreamingDataset(columns=[...])`` reads them back.
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
    job = build_job(
        inputs,
        fmt,
        out,
        vocabulary=vocabulary,
        extend_vocabulary=extend_vocabulary,
        concepts_from=concepts_from,
        tag_captions=tag_captions,
        tagger=tagger,
        workers=workers,
        image_column=image_column,
        caption_column=caption_column,
        concepts_column=concepts_column,
        key_column=key_column,
        recaption_column=recaption_column,
        numeric_columns=numeric_columns,
        size_limit=size_limit,
        compression=compression,
        hashes=hashes,
        max_samples_per_shard=max_samples_per_shard,
        examples_per_reason=examples_per_reason,
        limits=limits,
        image_roots=image_roots,
        progress=progress,
    )
    with output_lock(job.out, break_lock) as notes:
        clear_output = check_output(job.out, overwrite, job.files)
        return _convert_locked(job, clear_output, notes)


def build_job(
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
    image_column: str = "image",
    caption_column: str = "caption",
    concepts_column: str | None = None,
    key_column: str | None = None,
    recaption_column: str | None = None,
    numeric_columns: NumericColumns = (),
    size_limit: int | str | None = 1 << 26,
    compression: str | None = None,
    hashes: Sequence[str] = ("xxh64",),
    max_samples_per_shard: int | None = None,
    examples_per_reason: int = 5,
    limits: Limits | None = None,
    image_roots: Sequence[str | os.PathLike[str]] = (),
    progress: bool = True,
    expand: Callable[[Sequence[str | os.PathLike[str]], str], list[str]] | None = None,
) -> Job:
    """Check a request (the arguments of :func:`convert`) into a :class:`Job`; reads no sample.

    Shared by every engine, so that the process pool and Spark accept exactly the same options
    with the same messages. ``expand`` turns ``inputs`` into files (default: local paths,
    directories and globs; the Spark engine also lists ``s3://`` prefixes).
    """
    started = time.monotonic()
    opts = _read_options(
        fmt,
        concepts_from=concepts_from,
        tag_captions=None if tag_captions is None else os.fspath(tag_captions),
        tagger=tagger,
        image_column=image_column,
        caption_column=caption_column,
        concepts_column=concepts_column,
        key_column=key_column,
        recaption_column=recaption_column,
        numeric_columns=numeric_column_types(numeric_columns),
        limits=Limits() if limits is None else limits,
    )
    if workers < 1:
        raise ConversionError(f"--workers must be at least 1, got {workers}")
    if max_samples_per_shard is not None and max_samples_per_shard < 1:
        raise ConversionError("--max-samples-per-shard must be at least 1")
    mds_kwargs = writer_kwargs(size_limit, compression, hashes)
    base_vocabulary = _base_vocabulary(opts, vocabulary, extend_vocabulary)
    out = os.fspath(out)
    files = (expand or _expand_inputs)(inputs, fmt)
    return Job(
        files=files,
        out=out,
        opts=_with_image_roots(opts, image_roots),
        base_vocabulary=base_vocabulary,
        extend_vocabulary=extend_vocabulary,
        workers=workers,
        writer_kwargs=mds_kwargs,
        max_samples_per_shard=max_samples_per_shard,
        examples_per_reason=examples_per_reason,
        progress=progress,
        started=started,
    )


@dataclass
class Job:
    """A checked conversion request, handed from :func:`convert` to the passes."""

    files: list[str]
    out: str
    opts: ReadOptions
    base_vocabulary: Vocabulary | None
    extend_vocabulary: bool
    workers: int
    writer_kwargs: dict[str, Any]
    max_samples_per_shard: int | None
    examples_per_reason: int
    progress: bool
    started: float


def _read_options(
    fmt: str,
    *,
    concepts_from: str | None,
    tag_captions: str | None,
    tagger: str | None,
    concepts_column: str | None,
    **columns: Any,
) -> ReadOptions:
    """How to read the input, with every choice checked: format, one concept source, tagger."""
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
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
    if concepts_from not in CONCEPT_SOURCES:
        raise ConversionError(
            f"--concepts-from {concepts_from!r} is not one of {', '.join(CONCEPT_SOURCES)}"
        )
    return ReadOptions(
        fmt=fmt,
        concepts_from=concepts_from,
        concepts_column=concepts_column or "concepts",
        tag_captions=tag_captions,
        tagger=tagger,
        **columns,
    )


def numeric_column_types(columns: NumericColumns) -> tuple[tuple[str, str], ...]:
    """``numeric_columns=`` / ``--numeric-column`` as checked ``(name, type)`` pairs, in order.

    The type defaults to ``float32``. A name may not repeat, nor be one of the schema's columns
    or the dataset's derived columns: each would shadow the other on reading.
    """
    if isinstance(columns, str):
        columns = [columns]
    items = columns.items() if isinstance(columns, Mapping) else columns
    pairs: list[tuple[str, str]] = []
    for item in items:
        if isinstance(item, str):
            name, colon, kind = item.rpartition(":")
            name, kind = (name, kind) if colon else (kind, "float32")
        else:
            name, kind = item
        if kind not in NUMERIC_TYPES:
            raise ConversionError(
                f"--numeric-column {name}:{kind}: the type must be one of "
                + ", ".join(NUMERIC_TYPES)
            )
        if not isinstance(name, str) or not name:
            raise ConversionError(f"--numeric-column {item!r}: give a column name (NAME[:TYPE])")
        if name in MDS_COLUMNS or name in DERIVED_COLUMNS:
            raise ConversionError(
                f"--numeric-column {name!r} clashes with a column of the MDS schema or a derived "
                f"column ({', '.join([*MDS_COLUMNS, *DERIVED_COLUMNS])}): rename it in the input"
            )
        if name in dict(pairs):
            raise ConversionError(f"--numeric-column {name!r} is given twice")
        pairs.append((name, kind))
    return tuple(pairs)


def _base_vocabulary(
    opts: ReadOptions,
    vocabulary: str | os.PathLike[str] | Vocabulary | None,
    extend_vocabulary: bool,
) -> Vocabulary | None:
    """The vocabulary that fixes ids before the scan: given, from ``--tag-captions``, or None.

    Also checks that a ``--tagger`` can be imported, before anything is read.
    """
    if opts.tag_captions is not None:
        if vocabulary is not None or extend_vocabulary:
            raise ConversionError(
                "--tag-captions fixes the vocabulary (its names in file order): leave out "
                "--vocabulary and --extend-vocabulary"
            )
        try:
            vocabulary = TaggingVocabulary.load(opts.tag_captions).vocabulary()
        except (OSError, ValueError) as err:
            raise ConversionError(f"--tag-captions: {err}") from err
    if opts.tagger is not None:
        try:
            load_tagger(opts.tagger)
        except ValueError as err:
            raise ConversionError(str(err)) from err
    base = _resolve_vocabulary(vocabulary)
    if extend_vocabulary and base is None:
        raise ConversionError(
            "--extend-vocabulary extends a given vocabulary: pass --vocabulary FILE too (without "
            "one the vocabulary is built from the data anyway)"
        )
    return base


def _with_image_roots(opts: ReadOptions, roots: Sequence[str | os.PathLike[str]]) -> ReadOptions:
    """``opts`` with the real paths of the extra folders image paths may point into."""
    real = []
    for root in roots:
        if not os.path.isdir(root):
            raise ConversionError(f"--image-root {os.fspath(root)} is not a folder")
        real.append(os.path.realpath(root))
    return dataclasses.replace(opts, image_roots=tuple(real))


@dataclass
class _Workers:
    """Where the passes run: a process pool (None: this process), its counter, tagger spills.

    ``spills`` holds one file per input file for a ``--tagger``'s names, else None each.
    """

    pool: Any
    counter: Any
    spills: list[str | None] = field(default_factory=list)


@contextmanager
def _workers(job: Job, processes: int) -> Iterator[_Workers]:
    """The pool and spill folder of one conversion, torn down whatever happens."""
    counter = multiprocessing.get_context("spawn").Value("q", 0)
    pool = start_pool(processes, counter) if processes > 1 else None
    spill_dir = tempfile.mkdtemp(prefix="cabs-tagger-") if job.opts.tagger is not None else None
    spills = [
        os.path.join(spill_dir, f"{j:06d}.jsonl") if spill_dir else None
        for j in range(len(job.files))
    ]
    try:
        yield _Workers(pool, counter, spills)
    except BaseException:
        if pool is not None:
            stop_pool(pool)
        raise
    else:
        if pool is not None:
            pool.shutdown()
    finally:
        if spill_dir is not None:
            shutil.rmtree(spill_dir, ignore_errors=True)


@dataclass
class _Scanned:
    """The scan folded in input order: per file its duplicate records and record count."""

    duplicates: list[frozenset[int]] = field(default_factory=list)
    records: list[int] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)


def policies(job: Job, final: Vocabulary | None = None) -> ConceptPolicy:
    """The scan's concept policy, or with ``final`` the write pass's (every engine uses these).

    The scan accepts any name while a vocabulary is built or extended, else only the given
    names; the write pass maps names onto the final vocabulary. Ids are checked against the
    given vocabulary's size (without one they mean nothing and are refused).
    """
    base = job.base_vocabulary
    base_names = None if base is None else tuple(base.names)
    id_limit = None if base_names is None else len(base_names)
    if final is not None:
        return ConceptPolicy(tuple(final.names), id_limit)
    return ConceptPolicy(None if job.extend_vocabulary else base_names, id_limit)


def _scan_all(job: Job, workers: _Workers, policy: ConceptPolicy) -> _Scanned:
    """Pass 1: keys and concept counts, file by file, folded in input order.

    The first valid record with a key owns it; every later one is a duplicate. When extending a
    vocabulary, a name that is a base name in normal form counts as that base name.
    """
    base = job.base_vocabulary
    mapper = ConceptNameMapper(base) if job.extend_vocabulary and base else None
    owners: set[str] = set()
    scanned = _Scanned()
    tasks = [(path, job.opts, policy, workers.spills[j]) for j, path in enumerate(job.files)]
    with tqdm(desc="scan", unit=" samples", disable=not job.progress) as bar:
        labels = [f"scanning {path}" for path in job.files]
        for scan in run_tasks(workers.pool, scan_file, tasks, bar, workers.counter, labels):
            scanned.duplicates.append(frozenset(_fold(scan, owners, scanned.counts, mapper)))
            scanned.records.append(scan.records)
    return scanned


def _fold(
    scan: FileScan, owners: set[str], counts: Counter[str], mapper: ConceptNameMapper | None
) -> set[int]:
    """Add one file's scan to ``owners`` and ``counts``; returns its duplicate records."""
    dropped = set()
    for index, key, names in scan.owners:
        if key is not None:
            if key in owners:
                dropped.add(index)
                continue
            owners.add(key)
        if mapper is not None:
            names = [canonical(mapper, name) for name in names]
        counts.update(names)
    return dropped


def final_vocabulary(job: Job, counts: Counter[str]) -> tuple[Vocabulary, str, int]:
    """The vocabulary the shards are written with, where it came from, and how many it added."""
    by_frequency = sorted(counts, key=lambda name: (-counts[name], name))
    base = job.base_vocabulary
    if base is None:
        final = Vocabulary(by_frequency)
        return final, "built", len(final)
    if job.opts.tag_captions is not None:
        return base, "tag-captions", 0
    size_before = len(base)
    if job.extend_vocabulary:
        for name in by_frequency:
            base.add(name)
    return base, "given", len(base) - size_before


def _write_all(
    job: Job, workers: _Workers, scanned: _Scanned, policy: ConceptPolicy, processes: int
) -> tuple[Tally, list[str]]:
    """Pass 2: write contiguous runs of files as parts; returns the tally and the part names."""
    runs = split_contiguous(scanned.records, processes)
    part_names = [f"part-{i:05d}" for i in range(len(runs))] if len(runs) > 1 else []
    out = job.out
    tasks = [
        PartTask(
            out=f"{out.rstrip('/')}/{part_names[i]}" if part_names else out,
            files=[
                (job.files[j], scanned.duplicates[j], scanned.records[j], workers.spills[j])
                for j in run
            ],
            opts=job.opts,
            policy=policy,
            writer_kwargs=job.writer_kwargs,
            max_samples_per_shard=job.max_samples_per_shard,
            examples_per_reason=job.examples_per_reason,
        )
        for i, run in enumerate(runs)
    ]
    workers.counter.value = 0
    tally = Tally()
    total = sum(scanned.records)
    with tqdm(desc="write", total=total, unit=" samples", disable=not job.progress) as bar:
        labels = [f"writing {task.files[0][0]}" for task in tasks]
        for part in run_tasks(workers.pool, write_part, tasks, bar, workers.counter, labels):
            tally.add(part, job.examples_per_reason)
    return tally, part_names


def _convert_locked(job: Job, clear_output: bool, notes: list[str]) -> dict[str, Any]:
    """Scan, write, merge and publish, with ``job.out`` locked and checked."""
    processes = min(job.workers, len(job.files))
    if job.workers > len(job.files):
        notes.append(
            f"--workers {job.workers}, but there are {len(job.files)} input file(s) and each "
            f"process converts whole files, so {processes} process(es) ran; split large inputs "
            "into more files (several tars or parquet files) to use more"
        )
    with _workers(job, processes) as workers:
        scan_policy = policies(job)
        scanned = _scan_all(job, workers, scan_policy)
        final, source, added = final_vocabulary(job, scanned.counts)
        if clear_output:
            clear_folder(job.out)
        write_policy = policies(job, final)
        tally, part_names = _write_all(job, workers, scanned, write_policy, processes)
    return publish_dataset(job, tally, part_names, (final, source, added), notes)


def publish_dataset(
    job: Job,
    tally: Tally,
    part_names: Sequence[str],
    vocabulary: tuple[Vocabulary, str, int],
    notes: list[str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge the parts in order, then publish the vocabulary, the concept counts and the report.

    ``concept_counts.json`` (:class:`~cabs_streaming.concepts.ConceptCounts`: the report's
    ``per_concept`` lists) goes beside ``vocabulary.json``, for every engine and for a resumed
    conversion too. The report goes last, so a dataset with a report is complete. ``vocabulary``
    is what :func:`final_vocabulary` returned; ``extra`` adds engine facts to the report.
    """
    final, source, added = vocabulary
    if part_names:
        merge_parts(job.out, part_names)
    publish(job.out, VOCABULARY_FILENAME, final.to_json())
    publish(job.out, CONCEPT_COUNTS_FILENAME, counts_of(tally, len(final)).to_json())
    report = build_report(
        tally,
        fmt=job.opts.fmt,
        files=job.files,
        out=job.out,
        workers=job.workers,
        parts=max(1, len(part_names)),
        vocabulary={"source": source, "size": len(final), "added": added},
        names=final.names,
        concept_source=_concept_source(job.opts),
        limits=asdict(job.opts.limits),
        numeric_columns=dict(job.opts.numeric_columns),
        notes=notes,
        seconds=time.monotonic() - job.started,
    )
    report.update(extra or {})
    publish(job.out, REPORT_FILENAME, json.dumps(report, indent=2, ensure_ascii=False))
    return report


def _concept_source(opts: ReadOptions) -> dict[str, str | None]:
    """Where the concept ids came from, for the report."""
    if opts.tag_captions is not None:
        return {"tag-captions": opts.tag_captions}
    if opts.tagger is not None:
        return {"tagger": opts.tagger}
    return {"input": opts.concepts_from if opts.fmt == "webdataset" else opts.concepts_column}


def canonical(mapper: ConceptNameMapper, name: str) -> str:
    """``name`` as the base vocabulary spells it when it is one of its names in normal form."""
    found = mapper.lookup(name)
    return name if found is None else mapper.names[found]


def _expand_inputs(inputs: Sequence[str | os.PathLike[str]], fmt: str) -> list[str]:
    """Files in the order given; directories and glob patterns expand sorted, by suffix."""
    suffixes = INPUT_SUFFIXES[fmt]
    files: list[str] = []
    seen: set[str] = set()
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            pattern = os.path.join(glob.escape(item), "**", "*")
            matches = sorted(
                p
                for p in glob.glob(pattern, recursive=True)
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

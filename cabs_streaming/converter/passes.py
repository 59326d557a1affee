"""The two passes of a conversion, each a plain function of one file or one part.

*Scan* (:func:`scan_file`) reads what decides a sample's fate without its image and returns the
keys and concept names of the valid records; the caller folds the files in input order to give
every key to its first owner and to count concept names for the vocabulary. *Write*
(:func:`write_part`) reads a contiguous run of files again, judges each record with the final
vocabulary, checks its image and writes the survivors into one MDS (sub-)dataset.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import posixpath
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from cabs_streaming import _internals
from cabs_streaming.concepts import MDS_COLUMNS, encode_concepts, encode_scores
from cabs_streaming.converter.judge import ConceptPolicy, Judge, image_verdict, numeric_values
from cabs_streaming.converter.progress import Ticker
from cabs_streaming.converter.records import ConversionError, DamagedInput, ReadOptions, Record
from cabs_streaming.converter.sources import read_records
from cabs_streaming.converter.tally import Tally

#: Makes an input readable as a local file for the time of a ``with``: ``fetch(path)`` yields
#: the local path (another engine's hook, e.g. Spark downloading an ``s3://`` input).
Fetch = Callable[[str], AbstractContextManager[str]]


@contextmanager
def readable(path: str, fetch: Fetch | None) -> Iterator[str]:
    """``path`` as a local file the readers can open (itself, unless ``fetch`` is given)."""
    with nullcontext(path) if fetch is None else fetch(path) as local:
        yield local


def options_for(path: str, opts: ReadOptions) -> ReadOptions:
    """``opts`` for reading ``path``: a remote manifest's image paths are beside it, remotely.

    A fetched ``s3://`` manifest is read from a local copy; its relative image paths still
    name objects under the manifest's own prefix, not files beside the copy.
    """
    if "://" in path:
        return dataclasses.replace(opts, image_base=posixpath.dirname(path))
    return opts


@dataclass
class FileScan:
    """What the scan learnt about one file: its record count and the valid records' keys."""

    path: str
    records: int
    owners: list[tuple[int, str | None, list[str]]]  # (index, key, concept names) if valid


def scan_file(task: tuple[Any, ...]) -> FileScan:
    """Pass 1 over one file ``(path, options, policy, tagger spill[, fetch])``; no image read.

    A damaged file ends its scan quietly: the write pass meets the same damage and reports it.
    """
    path, opts, policy, spill, *rest = task
    judge = Judge(policy, path, opts.limits, opts.numeric_columns)
    tick = Ticker()
    scan = FileScan(path, 0, [])
    try:
        with readable(path, rest[0] if rest else None) as local:
            for rec in read_records(local, options_for(path, opts), scan=True, spill=spill):
                scan.records += 1
                tick()
                verdict, _ = judge.metadata_verdict(rec)
                if verdict is None:
                    names = [c for c in rec.concepts if isinstance(c, str)]
                    scan.owners.append((rec.index, rec.key, names))
    except DamagedInput:
        pass  # the write pass meets the same damage and reports it
    tick.flush()
    return scan


@dataclass
class PartTask:
    """One worker's share: a contiguous run of files written into one MDS (sub-)dataset."""

    out: str
    # (path, duplicate indices, scanned records, the scan's tagger output or None)
    files: list[tuple[str, frozenset[int], int, str | None]]
    opts: ReadOptions
    policy: ConceptPolicy
    writer_kwargs: dict[str, Any]
    max_samples_per_shard: int | None
    examples_per_reason: int
    fetch: Fetch | None = None  # how an input becomes a local file (None: it is one)


def write_part(task: PartTask) -> Tally:
    """Pass 2 over one part: judge every record again, check its image, write the survivors.

    The only pass that reads images. A file that gives another number of records than its scan
    changed meanwhile, and stops the conversion.
    """
    from streaming import MDSWriter

    tally = Tally()
    tick = Ticker()
    columns = {**MDS_COLUMNS, **dict(task.opts.numeric_columns)}
    writer = MDSWriter(columns=columns, out=task.out, **task.writer_kwargs)
    try:
        for path, duplicates, scanned, spill in task.files:
            judge = Judge(task.policy, path, task.opts.limits, task.opts.numeric_columns)
            records = 0
            try:
                with readable(path, task.fetch) as local:
                    opts = options_for(path, task.opts)
                    for rec in read_records(local, opts, scan=False, spill=spill):
                        records += 1
                        tick()
                        _write_record(rec, judge, rec.index in duplicates, writer, task, tally)
            except DamagedInput as err:
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
        _internals.cancel_writer_uploads(writer)
        raise
    tick.flush()
    tally.shards = _internals.shards_written(writer)
    return tally


def _write_record(
    rec: Record, judge: Judge, duplicate: bool, writer: Any, task: PartTask, tally: Tally
) -> None:
    """Judge one record (metadata, key, image) and write it, or count why not."""
    limit = task.examples_per_reason
    verdict, ids = judge.metadata_verdict(rec)
    if verdict is None and duplicate:
        verdict = ("duplicate key", "an earlier sample of the input has this key")
    if verdict is None and rec.image is None:
        verdict = (rec.image_reason, rec.image_problem)
    if verdict is None:
        verdict = image_verdict(rec.image or b"", task.opts.limits.max_image_pixels)
    example = {"key": rec.key or rec.label, "file": judge.path}
    if verdict is not None:
        tally.skip(verdict[0], {**example, "detail": verdict[1]}, limit)
        return
    if task.max_samples_per_shard and (
        _internals.samples_in_open_shard(writer) >= task.max_samples_per_shard
    ):
        _internals.start_new_shard(writer)
    numbers, _ = numeric_values(rec.numbers, task.opts.numeric_columns)  # checked by the judge
    writer.write(
        {
            "key": rec.key or rec.label,
            "image": rec.image,
            "caption": rec.caption,
            "recaption": rec.recaption,
            "concepts": encode_concepts(ids),
            "concept_scores": encode_scores(rec.scores) if rec.scores else b"",
            **numbers,
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


def split_contiguous(counts: Sequence[int], parts: int) -> list[range]:
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

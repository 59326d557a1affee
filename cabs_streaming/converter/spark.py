"""The Spark engine: the converter's two passes as Spark jobs, resumable and loss-free.

One machine converts about a million samples an hour per core; a 128 M-sample corpus needs a
cluster, and a crash must not restart it. :func:`convert_on_spark` runs exactly the converter's
readers, judge, tagging and part writer (``passes.py``) as Spark tasks, so a Spark conversion
equals a local one sample for sample; only the scheduling differs:

1. *Scan*: one task per run of input files calls :func:`~.passes.scan_file` (inputs on
   ``s3://`` are downloaded to the task's local disk first: no Hadoop connector is needed).
   The first owner of each key is decided by a ``groupByKey`` on the keys, ordered by (input
   file, record): the same rule as the local fold in input order, without collecting every key
   on the driver. Concept counts of the owners are summed by ``reduceByKey``; the driver fixes
   the vocabulary exactly as the local converter does and broadcasts it.
2. *Write*: one task per part (a contiguous run of input files, by default one file) calls
   :func:`~.passes.write_part` into ``<out>/part-NNNNN.a<stage>-<attempt>/``, then
   writes a completion marker ``<out>/.cabs-spark/done/<that name>.json`` holding the part's
   fingerprint and its tally. The marker is written last (one PUT on S3, a rename locally), so
   a marker means a whole part.

The driver, never the tasks, decides what is in the dataset: per part it takes the first
completed attempt whose marker carries the part's fingerprint, deletes every other attempt
(retried, speculative, killed, or from an earlier job with other inputs or options), merges
the chosen parts with Streaming's ``merge_index`` in input order and sums the chosen markers'
tallies into one ``report.json``. So a retried or speculative task can neither count twice nor
leave a part in the index. The fingerprint covers the part's files (size and mtime, or size
and ETag), their duplicate records, the final vocabulary and every option that shapes a
sample; a rerun into the same ``out`` after a crash keeps every part whose marker matches and
writes only the rest, giving the dataset an uninterrupted run gives.

A manifest (JSONL, or parquet with image paths) on ``s3://`` names objects under its own prefix;
the tasks read them with the same confinement and size bound as local files.

Not supported here: ``--tagger`` (its names are kept on the scanning machine's disk) and glob
patterns on ``s3://``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.parse
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from cabs_streaming.concepts import CONCEPT_COUNTS_FILENAME, VOCABULARY_FILENAME
from cabs_streaming.converter.api import (
    Job,
    build_job,
    canonical,
    final_vocabulary,
    policies,
    publish_dataset,
)
from cabs_streaming.converter.api import _expand_inputs as expand_local_inputs
from cabs_streaming.converter.judge import ConceptPolicy
from cabs_streaming.converter.output import (
    LOCK_FOLDER,
    check_output,
    clear_folder,
    is_remote,
    output_lock,
    s3_client,
)
from cabs_streaming.converter.passes import FileScan, PartTask, scan_file, split_contiguous
from cabs_streaming.converter.passes import write_part as write_part_files
from cabs_streaming.converter.records import (
    INPUT_SUFFIXES,
    REPORT_FILENAME,
    ConversionError,
)
from cabs_streaming.converter.tally import Tally, tally_from_json, tally_to_json
from cabs_streaming.tagging import ConceptNameMapper

__all__ = ["SPARK_FOLDER", "SparkJobFailed", "convert_on_spark", "spark_session", "write_attempt"]

#: The engine's bookkeeping under ``out``: ``job.json`` and the parts' completion markers.
SPARK_FOLDER = ".cabs-spark"
#: Bumped when what a part holds changes for the same inputs and options (old markers go stale).
LAYOUT_VERSION = 1
_PART = re.compile(r"^part-(\d{5})\.(a\d+-\d+)$")
_OURS = {
    SPARK_FOLDER,
    LOCK_FOLDER,
    "index.json",
    VOCABULARY_FILENAME,
    CONCEPT_COUNTS_FILENAME,
    REPORT_FILENAME,
}
#: Seconds one input download may take (a DataComp tar is about 1 GB).
DOWNLOAD_TIMEOUT = 3600.0


class SparkJobFailed(ConversionError):
    """A Spark job of the conversion failed; completed parts are kept for the rerun."""


def convert_on_spark(
    spark: Any,
    inputs: Sequence[str | os.PathLike[str]] | Any,
    fmt: str,
    out: str | os.PathLike[str],
    *,
    partitions: int | None = None,
    overwrite: bool = False,
    break_lock: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Convert ``inputs`` on the cluster of ``spark`` (a ``SparkSession``); return the report.

    Args:
        spark: The user's ``SparkSession`` (or one from :func:`spark_session`).
        inputs: Files, local directories or globs, ``s3://`` files or prefixes (listed, sorted),
            in order; or a DataFrame whose first column holds them (collected, in row order).
        fmt: ``"webdataset"``, ``"parquet"`` or ``"jsonl"``.
        out: A local folder every executor sees (a shared file system) or an ``s3://`` prefix.
        partitions: Parts written (and scan tasks): contiguous runs of input files balanced by
            sample count. Default: one per input file, the finest resumable unit. Every part
            is one ``index.json`` the driver downloads to merge, so with hundreds of thousands
            of files pick a few thousand.
        overwrite: Replace what a non-empty ``out`` holds. An ``out`` holding this engine's
            parts (``.cabs-spark/``) is resumed without it: matching parts are kept.
        break_lock: Remove the lock a crashed conversion left on an ``s3://`` output.
        **options: Every other keyword of :func:`cabs_streaming.converter.convert` (vocabulary,
            concept source, columns, shard settings, limits...), except ``workers`` and
            ``tagger``.

    Raises:
        SparkJobFailed: A task failed (the message names the error); rerun to resume.
        ConversionError / OutputBusy: As :func:`~cabs_streaming.converter.convert`.
    """
    if "workers" in options:
        raise ConversionError("--workers is the local engine's; on Spark use --partitions")
    if partitions is not None and partitions < 1:
        raise ConversionError(f"--partitions must be at least 1, got {partitions}")
    if hasattr(inputs, "columns") and hasattr(inputs, "select"):  # a DataFrame of paths
        inputs = [row[0] for row in inputs.select(inputs.columns[0]).collect()]
    expand = _Inputs()
    out = os.fspath(out)
    if not is_remote(out):  # executors resolve paths in their own working folder
        out = os.path.abspath(out)
    job = build_job(inputs, fmt, out, expand=expand, **options)
    if job.opts.tagger is not None:
        raise ConversionError(
            "--tagger is not supported on the spark engine (its names would stay on the "
            "scanning executor's disk): tag with --engine local, or use --tag-captions"
        )
    store = Output(job.out)
    with output_lock(job.out, break_lock) as notes:
        resumed = _prepare_output(store, job, overwrite)
        return _convert_locked(spark, job, store, expand.identity, partitions, resumed, notes)


def spark_session(
    master: str | None = None, conf: dict[str, str] | None = None, app_name: str = "cabs-convert"
) -> Any:
    """A ``SparkSession`` for the command line: ``master`` (default: Spark's) and ``conf``.

    Checks first for what Spark needs, so that a missing piece is named instead of a Java
    stack trace: pyspark (``pip install 'cabs-streaming[spark]'``) and a Java 17 runtime. On a
    ``local`` master the executors' Python is this interpreter (``PYSPARK_PYTHON``).
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError as err:
        raise ConversionError(
            "--engine spark needs pyspark: pip install 'cabs-streaming[spark]' (pyspark>=3,<4)"
        ) from err
    if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        raise ConversionError(
            "--engine spark needs a Java 17 runtime and found none (no `java` on PATH, no "
            "JAVA_HOME): install one, e.g. `apt-get install openjdk-17-jre-headless` on Debian "
            "or Ubuntu, or set JAVA_HOME"
        )
    if master is None or master.startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if master is not None:
        builder = builder.master(master)
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


# ----------------------------------------------------------------------------- inputs


class _Inputs:
    """Expands inputs (local as the local engine does, plus ``s3://``); remembers identities.

    A file's identity (size and mtime, or size and ETag) goes into its part's fingerprint, so
    a part is rewritten when its input changed between a crash and the rerun.
    """

    def __init__(self) -> None:
        self.identity: dict[str, list[Any]] = {}

    def __call__(self, inputs: Sequence[str | os.PathLike[str]], fmt: str) -> list[str]:
        files: list[str] = []
        local: list[str] = []
        for item in [*map(os.fspath, inputs), None]:
            if item is not None and not item.startswith("s3://"):
                local.append(item)
                continue
            if local:  # keep the given order across local and remote items
                files += expand_local_inputs(local, fmt)
                local = []
            if item is not None:
                files += self._list_s3(item, fmt)
        for path in files:
            if path not in self.identity:
                info = os.stat(path)
                self.identity[path] = [info.st_size, info.st_mtime_ns]
        if len(set(files)) != len(files):
            files = list(dict.fromkeys(files))
        if not files:
            raise ConversionError("no input given: pass --input PATHS")
        return files

    def _list_s3(self, url: str, fmt: str) -> list[str]:
        """An ``s3://`` file, or the files under a prefix with ``fmt``'s suffixes, sorted."""
        parsed = urllib.parse.urlparse(url)
        bucket, key = parsed.netloc, parsed.path.lstrip("/")
        client = s3_client(f"s3://{bucket}")
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
        found = {obj["Key"]: obj for page in pages for obj in page.get("Contents", [])}
        suffixes = INPUT_SUFFIXES[fmt]
        if key in found and key.lower().endswith(suffixes):
            chosen = [key]
        else:
            folder = key.rstrip("/") + "/" if key else ""
            chosen = sorted(
                k for k in found if k.startswith(folder) and k.lower().endswith(suffixes)
            )
        if not chosen:
            raise ConversionError(
                f"input {url} is no {fmt} object and no prefix holding {', '.join(suffixes)} "
                "objects; check --input and --format (glob patterns are local only)"
            )
        for k in chosen:
            self.identity[f"s3://{bucket}/{k}"] = [found[k]["Size"], found[k].get("ETag")]
        return [f"s3://{bucket}/{k}" for k in chosen]


@contextmanager
def fetch_input(path: str) -> Iterator[str]:
    """An input as a local file: ``s3://`` objects are downloaded to the task's temp folder.

    The readers then run unchanged; a message of theirs that names the local copy is
    re-raised naming the ``s3://`` object.
    """
    if not path.startswith("s3://"):
        yield path
        return
    from streaming.base.storage.download import CloudDownloader

    with tempfile.TemporaryDirectory(prefix="cabs-spark-input-") as folder:
        local = os.path.join(folder, os.path.basename(urllib.parse.urlparse(path).path))
        try:
            CloudDownloader.direct_download(path, local, DOWNLOAD_TIMEOUT)
        except Exception as err:
            raise ConversionError(f"cannot download input {path}: {err}") from err
        try:
            yield local
        except ConversionError as err:
            raise type(err)(str(err).replace(local, path)) from err


# ----------------------------------------------------------------------------- the output


class Output:
    """The few operations the engine needs on ``out``, a local folder or an ``s3://`` prefix."""

    def __init__(self, out: str) -> None:
        self.out = out.rstrip("/")
        self.remote = is_remote(out)
        if self.remote and urllib.parse.urlparse(out).scheme != "s3":
            raise ConversionError(
                f"--out {out}: the spark engine writes to a local (shared) folder or s3:// only"
            )
        parsed = urllib.parse.urlparse(self.out)
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self._client: Any = None

    @property
    def client(self) -> Any:
        """The S3 client, made on first use (an executor makes its own)."""
        if self._client is None:
            self._client = s3_client(self.out)
        return self._client

    def url(self, name: str) -> str:
        """Where ``name`` (relative to ``out``) lives."""
        return f"{self.out}/{name}" if self.remote else os.path.join(self.out, name)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def files(self, folder: str = "") -> list[str]:
        """Every file under ``folder`` (relative to ``out``), as paths relative to ``out``."""
        if not self.remote:
            root = os.path.join(self.out, folder)
            return sorted(
                os.path.relpath(os.path.join(here, name), self.out)
                for here, _, names in os.walk(root)
                for name in names
            )
        start = self._key(folder).rstrip("/") + "/" if folder or self.prefix else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=start
        )
        cut = len(self.prefix) + 1 if self.prefix else 0
        return sorted(obj["Key"][cut:] for page in pages for obj in page.get("Contents", []))

    def top(self) -> set[str]:
        """The first path components of what ``out`` holds."""
        if not self.remote:
            return set(os.listdir(self.out)) if os.path.isdir(self.out) else set()
        return {name.split("/", 1)[0] for name in self.files()}

    def read(self, name: str) -> bytes:
        """The bytes of file ``name``."""
        if not self.remote:
            with open(os.path.join(self.out, name), "rb") as f:
                return f.read()
        return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()

    def write(self, name: str, data: bytes) -> None:
        """Write file ``name`` whole or not at all (a rename locally, one PUT on S3)."""
        if self.remote:
            self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)
            return
        path = os.path.join(self.out, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)

    def remove(self, name: str) -> None:
        """Remove file or folder ``name`` (everything under it), if present."""
        if not self.remote:
            path = os.path.join(self.out, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.unlink(path)
            return
        keys = [self._key(name)] + [self._key(f) for f in self.files(name)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})


def _prepare_output(store: Output, job: Job, overwrite: bool) -> bool:
    """Check ``out`` (locked) and mark it as this engine's; True when a job is resumed.

    An ``out`` holding ``.cabs-spark/`` is resumed: its report and index go (a dataset with a
    report is complete; its concept counts are rewritten with it), its parts are kept for the
    fingerprint check. Anything else in it is
    refused, or removed with ``overwrite``.
    """
    top = store.top()
    resumed = SPARK_FOLDER in top
    if resumed:
        foreign = sorted(name for name in top - _OURS if not _PART.match(name))
        if foreign and not overwrite:
            raise ConversionError(
                f"--out {job.out} holds an earlier Spark conversion to resume, but also "
                f"{', '.join(foreign[:5])}; pass --overwrite to remove those, or choose another "
                "output"
            )
        if foreign and not store.remote:
            root = os.path.realpath(job.out)
            inside = [
                p for p in job.files if os.path.commonpath([root, os.path.realpath(p)]) == root
            ]
            if inside:
                raise ConversionError(
                    f"input {inside[0]} lies inside --out {job.out}, which --overwrite would "
                    "delete; write the output elsewhere"
                )
        for name in [*foreign, REPORT_FILENAME, CONCEPT_COUNTS_FILENAME, "index.json"]:
            store.remove(name)
    elif check_output(job.out, overwrite, job.files):
        clear_folder(job.out)
    store.write(f"{SPARK_FOLDER}/job.json", json.dumps({"layout": LAYOUT_VERSION}).encode())
    return resumed


# ----------------------------------------------------------------------------- the passes


@dataclass
class _Part:
    """One part to write: its input files (with their scan facts) and its fingerprint."""

    index: int
    files: list[tuple[str, frozenset[int], int, None]]
    fingerprint: str


def _convert_locked(
    spark: Any,
    job: Job,
    store: Output,
    identity: dict[str, list[Any]],
    partitions: int | None,
    resumed: bool,
    notes: list[str],
) -> dict[str, Any]:
    """Scan, fix the vocabulary, write the missing parts, choose one attempt each, publish."""
    sc = spark.sparkContext
    wanted = len(job.files) if partitions is None else min(partitions, len(job.files))
    duplicates, records, counts = _scan(sc, job, policies(job), wanted)
    vocabulary = final_vocabulary(job, counts)
    write_policy = policies(job, vocabulary[0])
    parts = []
    for i, run in enumerate(split_contiguous(records, wanted)):
        files = [(job.files[j], duplicates[j], records[j], None) for j in run]
        parts.append(_Part(i, files, _fingerprint(job, write_policy, files, identity)))
    chosen, dropped = settle(store, [p.fingerprint for p in parts])
    reused = len(chosen)
    pending = [p for p in parts if p.index not in chosen]
    if pending:
        _write(sc, job, store, write_policy, pending)
    chosen, dropped_after = settle(store, [p.fingerprint for p in parts])
    missing = [p.index for p in parts if p.index not in chosen]
    if missing:
        raise SparkJobFailed(
            f"parts {missing[:5]} have no completed attempt after the write job; run the same "
            "conversion again to write them (completed parts are kept)"
        )
    tally = Tally()
    for p in parts:
        tally.add(chosen[p.index][1], job.examples_per_reason)
    extra = {
        "workers": sc.defaultParallelism,  # the cluster's cores, as Spark counts them
        "engine": "spark",
        "spark": {
            "master": sc.master,
            "parts_reused": reused if resumed else 0,
            "parts_written": len(pending),
            "attempts_discarded": dropped + dropped_after,
        },
    }
    names = [chosen[p.index][0] for p in parts]
    return publish_dataset(job, tally, names, vocabulary, notes, extra)


def _spark_job(what: str, action: Any) -> Any:
    """Run a Spark action; a failure becomes a :class:`SparkJobFailed` naming the cause."""
    try:
        return action()
    except Exception as err:  # py4j / pyspark wrap the task's exception in their own
        text = str(err)
        causes = re.findall(
            r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Busy|Died)\b: .*)$", text, re.M
        )
        cause = causes[-1].strip() if causes else text.strip().splitlines()[0][:500]
        raise SparkJobFailed(
            f"the Spark {what} failed: {cause}. Parts completed so far are kept: fix the cause "
            "and run the same conversion again to resume"
        ) from err


def _scan_task(item: tuple[int, str], shared: Any) -> tuple[int, FileScan]:
    """Executor: scan one input file (downloaded first when on ``s3://``)."""
    j, path = item
    opts, policy = shared.value
    return j, scan_file((path, opts, policy, None, fetch_input))


def _file_facts(scan: tuple[int, FileScan]) -> tuple[int, int, Counter[str]]:
    """(file, records, names of the records without a key): those always own themselves."""
    j, found = scan
    return (
        j,
        found.records,
        Counter(n for _, key, names in found.owners if key is None for n in names),
    )


def _keyed(scan: tuple[int, FileScan]) -> list[tuple[str, tuple[int, int, list[str]]]]:
    j, found = scan
    return [(key, (j, index, names)) for index, key, names in found.owners if key is not None]


def _resolve_keys(
    groups: Iterator[tuple[str, Any]],
) -> Iterator[tuple[list[tuple[int, int]], Counter[str]]]:
    """Per shuffle partition: the duplicate records and the key owners' concept names.

    A key's records are ordered by (input file, record); the first owns the key, as in the
    local converter's fold in input order, and the rest are duplicates.
    """
    duplicates: list[tuple[int, int]] = []
    counts: Counter[str] = Counter()
    for _, entries in groups:
        ordered = sorted(entries, key=lambda entry: (entry[0], entry[1]))
        counts.update(ordered[0][2])
        duplicates.extend((j, index) for j, index, _ in ordered[1:])
    yield duplicates, counts


def _scan(
    sc: Any, job: Job, policy: ConceptPolicy, slices: int
) -> tuple[list[frozenset[int]], list[int], Counter[str]]:
    """Pass 1 on the cluster: per file its duplicate records and record count; name counts.

    Two Spark jobs: the scan itself (kept for the second), then one shuffle of the keys. Only
    counts, duplicates and per-file facts come back to the driver, never every key.
    """
    from pyspark import StorageLevel

    shared = sc.broadcast((job.opts, policy))
    items = list(enumerate(job.files))
    scans = sc.parallelize(items, slices).map(partial(_scan_task, shared=shared))
    scans.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        facts = _spark_job("scan", scans.map(_file_facts).collect)
        resolved = scans.flatMap(_keyed).groupByKey(sc.defaultParallelism)
        found = _spark_job("duplicate-key pass", resolved.mapPartitions(_resolve_keys).collect)
    finally:
        scans.unpersist()
        shared.unpersist()
    records = [0] * len(job.files)
    counts: Counter[str] = Counter()
    for j, n, keyless in facts:
        records[j] = n
        counts.update(keyless)
    per_file: list[set[int]] = [set() for _ in job.files]
    for duplicates, owned in found:
        counts.update(owned)
        for j, index in duplicates:
            per_file[j].add(index)
    base = job.base_vocabulary
    if job.extend_vocabulary and base:  # a base name in normal form counts as that name
        mapper = ConceptNameMapper(base)
        folded: Counter[str] = Counter()
        for name, n in counts.items():
            folded[canonical(mapper, name)] += n
        counts = folded
    return [frozenset(s) for s in per_file], records, counts


def _fingerprint(
    job: Job,
    policy: ConceptPolicy,
    files: list[tuple[str, frozenset[int], int, None]],
    identity: dict[str, list[Any]],
) -> str:
    """What a part's bytes depend on; a marker with another fingerprint is stale."""
    facts = {
        "layout": LAYOUT_VERSION,
        "files": [[p, identity.get(p), sorted(d), n] for p, d, n, _ in files],
        "options": asdict(job.opts),
        "names": policy.names,
        "id_limit": policy.id_limit,
        "writer": job.writer_kwargs,
        "max_samples_per_shard": job.max_samples_per_shard,
        "examples_per_reason": job.examples_per_reason,
    }
    text = json.dumps(facts, sort_keys=True, ensure_ascii=False, default=list)
    return hashlib.sha256(text.encode()).hexdigest()


def _write(sc: Any, job: Job, store: Output, policy: ConceptPolicy, pending: list[_Part]) -> None:
    """Pass 2 on the cluster: one task per pending part, each writing one attempt."""
    template = PartTask(
        out="",
        files=[],
        opts=job.opts,
        policy=policy,
        writer_kwargs=job.writer_kwargs,
        max_samples_per_shard=job.max_samples_per_shard,
        examples_per_reason=job.examples_per_reason,
        fetch=fetch_input,
    )
    shared = sc.broadcast(template)
    items = [(p.index, p.fingerprint, p.files) for p in pending]
    try:
        tasks = sc.parallelize(items, len(items)).map(
            partial(_write_task, out=store.out, shared=shared)
        )
        _spark_job("write pass", tasks.collect)
    finally:
        shared.unpersist()


def _write_task(item: tuple[int, str, list[Any]], out: str, shared: Any) -> str:
    """Executor: write one part as this task attempt; the attempt names its folder."""
    from pyspark import TaskContext

    context = TaskContext.get()
    attempt = f"a{context.stageId()}-{context.attemptNumber()}" if context else "a0-0"
    index, fingerprint, files = item
    task = dataclasses.replace(shared.value, files=files)
    return write_attempt(out, index, fingerprint, task, attempt)


def write_attempt(out: str, index: int, fingerprint: str, task: PartTask, attempt: str) -> str:
    """Write part ``index`` as ``attempt`` into ``out``, then its completion marker; its name.

    The marker, written last and whole, is what makes the attempt count: a killed attempt
    leaves a folder without one, which the driver deletes. Any number of attempts of a part
    may complete; the driver keeps one.
    """
    store = Output(out)
    name = f"part-{index:05d}.{attempt}"
    store.remove(name)  # a folder of an earlier job's attempt with the same name
    tally = write_part_files(dataclasses.replace(task, out=store.url(name)))
    marker = {"fingerprint": fingerprint, "part": index, "tally": tally_to_json(tally)}
    store.write(f"{SPARK_FOLDER}/done/{name}.json", json.dumps(marker).encode())
    return name


def settle(store: Output, fingerprints: Sequence[str]) -> tuple[dict[int, tuple[str, Tally]], int]:
    """Per part the first completed attempt with its fingerprint; deletes every other attempt.

    Returns ``{part: (folder name, tally)}`` and how many attempts were deleted. A marker is
    deleted before its folder, so a crash in between leaves a folder without a marker (deleted
    next time), never a marker without its folder.
    """
    chosen: dict[int, tuple[str, Tally]] = {}
    deleted = 0
    for marker in store.files(f"{SPARK_FOLDER}/done"):
        name = os.path.basename(marker).removesuffix(".json")
        match = _PART.match(name)
        data = json.loads(store.read(marker)) if match else {}
        index = int(match.group(1)) if match else -1
        if (
            0 <= index < len(fingerprints)
            and index not in chosen
            and data.get("fingerprint") == fingerprints[index]
        ):
            chosen[index] = (name, tally_from_json(data["tally"]))
            continue
        store.remove(marker)
        if match:
            store.remove(name)
            deleted += 1
    keep = {name for name, _ in chosen.values()}
    for name in sorted(store.top()):
        if _PART.match(name) and name not in keep:
            store.remove(name)
            deleted += 1
    return chosen, deleted

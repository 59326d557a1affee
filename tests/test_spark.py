"""The converter's Spark engine on ``local[2]``: equal to the local converter, resumable, S3.

One SparkSession (a JVM) serves the module. It depends on the module's S3 server because an
executor's environment is fixed when the session starts: the S3 settings reach the executors as
``spark.executorEnv.*``, exactly as the README tells cluster users to pass them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import read_back, wds, write_tar
from s3server import HOST, S3Server

from cabs_streaming.cli.convert import main
from cabs_streaming.concepts import ConceptCounts, Vocabulary
from cabs_streaming.converter import ConversionError, convert, convert_on_spark
from cabs_streaming.converter.judge import ConceptPolicy
from cabs_streaming.converter.output import writer_kwargs
from cabs_streaming.converter.passes import PartTask
from cabs_streaming.converter.records import ReadOptions
from cabs_streaming.converter.spark import (
    SPARK_FOLDER,
    SparkJobFailed,
    spark_session,
    write_attempt,
)
from cabs_streaming.dataset import ConceptStreamingDataset

BUCKET = "cabs-spark"
#: Report fields that must equal the local converter's.
SAME = (
    "read",
    "written",
    "skipped",
    "examples",
    "repaired",
    "errors",
    "concepts",
    "concept_names",
    "vocabulary",
)


def _loopback_conf(server: S3Server) -> dict[str, str]:
    conf = {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.driver.host": HOST,
        "spark.driver.bindAddress": HOST,
        "spark.sql.shuffle.partitions": "2",
        "spark.default.parallelism": "2",
    }
    env = {**server.env(), "NO_PROXY": f"{HOST},localhost", "no_proxy": f"{HOST},localhost"}
    conf.update({f"spark.executorEnv.{name}": value for name, value in env.items()})
    return conf


@pytest.fixture(scope="module")
def server(s3: S3Server) -> S3Server:
    s3.make_bucket(BUCKET)
    return s3


@pytest.fixture(scope="module")
def spark(server: S3Server) -> Iterator[Any]:
    os.environ.setdefault("SPARK_LOCAL_IP", HOST)
    session = spark_session("local[2]", _loopback_conf(server), app_name="cabs-test-spark")
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def _tars(folder: Path, jpegs: list[bytes], files: int = 3, per_file: int = 4) -> list[str]:
    """WebDataset tars with good records and one of each kind of bad one, across files."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ["dog", "cat", "bird", "ant"]
    tars = []
    for t in range(files):
        samples = [
            wds(
                f"t{t}-{i}",
                jpegs[(per_file * t + i) % len(jpegs)],
                {"caption": f"tar {t} sample {i}", "classes": names[: (t + i) % 4]},
            )
            for i in range(per_file)
        ]
        if t == 1:
            samples += [
                wds("t0-1", jpegs[0], {"caption": "duplicate of tar 0", "classes": []}),
                wds("cut", jpegs[1][:200], {"caption": "truncated jpeg", "classes": ["dog"]}),
                wds("blank", jpegs[2], {"caption": "  ", "classes": ["cat"]}),
                wds("bad-json", jpegs[3], b"{not json"),
                wds("no-json", jpegs[4], None),
                wds("latin1", jpegs[5], {"classes": ["dog"]}, txt=b"caf\xe9 au lait"),
            ]
        if t == files - 1:
            samples.append(wds("t1-0", jpegs[6], {"caption": "duplicate of tar 1", "classes": []}))
        tars.append(str(write_tar(folder / f"shard-{t:03d}.tar", samples)))
    return tars


def _assert_same(local: dict[str, Any], spark: dict[str, Any], a: Path, b: Path) -> None:
    for field in SAME:
        assert local[field] == spark[field], field
    assert spark["engine"] == "spark"
    assert (a / "vocabulary.json").read_text() == (b / "vocabulary.json").read_text()
    assert ConceptCounts.read(str(a)) == ConceptCounts.read(str(b))
    assert read_back(a) == read_back(b)


def _parts_in_index(out: Path) -> list[str]:
    index = json.loads((out / "index.json").read_text())
    return [shard["raw_data"]["basename"].split("/")[0] for shard in index["shards"]]


@pytest.mark.slow  # a JVM, its executors and an S3 server
def test_webdataset_on_spark_equals_the_local_conversion(
    spark: Any, tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    tars = _tars(tmp_path / "in", sample_jpegs)
    local = convert(tars, "webdataset", str(tmp_path / "local"), progress=False)
    report = convert_on_spark(spark, tars, "webdataset", str(tmp_path / "spark"))

    _assert_same(local, report, tmp_path / "local", tmp_path / "spark")
    skipped = report["skipped"]
    assert skipped["duplicate key"] == 2 and skipped["undecodable image"] == 1
    assert skipped["missing caption"] == skipped["malformed json"] == 1
    assert skipped["missing concepts"] == 1 and report["repaired"]["invalid utf-8"]["count"] == 1
    assert report["read"] == report["written"] + sum(skipped.values())
    assert report["examples"]["duplicate key"][0]["file"] == tars[1]
    # one part per input file, merged in input order, each part exactly once
    parts = _parts_in_index(tmp_path / "spark")
    assert sorted(set(parts)) == list(dict.fromkeys(parts)) and len(set(parts)) == 3
    assert [p.split(".")[0] for p in dict.fromkeys(parts)] == [f"part-{i:05d}" for i in range(3)]
    assert json.loads((tmp_path / "spark" / "report.json").read_text()) == report


@pytest.mark.slow  # a JVM, its executors and an S3 server
def test_jsonl_manifest_with_a_given_vocabulary_equals_the_local_conversion(
    spark: Any, tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    vocabulary = tmp_path / "vocabulary.json"
    vocabulary.write_text(Vocabulary(["dog", "cat", "bird"]).to_json())
    manifests = []
    for m in range(2):
        lines = []
        for i in range(5):
            (folder / f"{m}-{i}.jpg").write_bytes(sample_jpegs[5 * m + i])
            lines.append({"image": f"{m}-{i}.jpg", "caption": f"m{m} {i}", "concepts": ["Dogs"]})
        lines[1]["concepts"] = ["zebra"]  # unknown to the given vocabulary
        lines[2]["image"] = "nowhere.jpg"  # missing image
        lines[3]["key"] = "0-0.jpg"  # duplicate of the first manifest's first key
        path = folder / f"manifest-{m}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines) + "{broken\n")
        manifests.append(str(path))
    options = {"vocabulary": str(vocabulary), "max_samples_per_shard": 2}
    local = convert(manifests, "jsonl", str(tmp_path / "local"), progress=False, **options)
    paths = spark.createDataFrame([(m,) for m in manifests], ["path"])  # a DataFrame works too
    report = convert_on_spark(spark, paths, "jsonl", str(tmp_path / "spark"), **options)

    _assert_same(local, report, tmp_path / "local", tmp_path / "spark")
    skipped = report["skipped"]
    assert skipped["unknown concept"] == 2 and skipped["missing image"] == 1
    # 0-0.jpg twice more, and manifest 1's nowhere.jpg (key: its image path) once
    assert skipped["duplicate key"] == 3 and skipped["malformed json"] == 2
    assert report["concept_names"] == local["concept_names"] and report["written"] == 4
    assert report["inputs"] == manifests


@pytest.mark.slow  # a JVM, its executors and an S3 server
def test_parquet_in_grouped_partitions_extending_a_vocabulary_equals_the_local_conversion(
    spark: Any, tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    vocabulary = tmp_path / "vocabulary.json"
    vocabulary.write_text(Vocabulary(["dog", "cat"]).to_json())
    files = []
    for f in range(4):
        table = pa.table(
            {
                "key": [f"p{f}-{i}" if i else "p0-1" for i in range(4)],
                "image": [sample_jpegs[4 * f + i] for i in range(4)],
                "caption": [f"parquet {f} row {i}" for i in range(4)],
                "concepts": [["Cats", "heron"], ["dog"], ["owl", "owl"], []],
            }
        )
        files.append(str(tmp_path / f"part-{f}.parquet"))
        pq.write_table(table, files[-1])
    options = {"vocabulary": str(vocabulary), "extend_vocabulary": True}
    local = convert(files, "parquet", str(tmp_path / "local"), progress=False, **options)
    report = convert_on_spark(
        spark, files, "parquet", str(tmp_path / "spark"), partitions=2, **options
    )

    _assert_same(local, report, tmp_path / "local", tmp_path / "spark")
    assert report["vocabulary"]["added"] == 2 and report["skipped"]["duplicate key"] == 4
    assert report["parts"] == 2 and len(set(_parts_in_index(tmp_path / "spark"))) == 2


@pytest.mark.slow  # a JVM, its executors and an S3 server
def test_a_second_completed_attempt_and_a_killed_one_neither_count_nor_stay(
    spark: Any, tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    # Spark may run a part twice (a retry after a lost executor, a speculative copy) and both
    # may finish; a killed attempt leaves a folder without a marker. Attempts are written here
    # by the function the executors run, then the conversion is rerun into the same output.
    tars = _tars(tmp_path / "in", sample_jpegs)
    out = tmp_path / "spark"
    first = convert_on_spark(spark, tars, "webdataset", str(out))
    chosen = sorted((out / SPARK_FOLDER / "done").glob("part-00001.*.json"))
    assert len(chosen) == 1
    marker = json.loads(chosen[0].read_text())
    names = tuple(Vocabulary.load(str(out)).names)
    task = PartTask(
        out="",
        files=[(tars[1], frozenset({4}), 10, None)],  # its record 4, t0-1, is a duplicate
        opts=ReadOptions("webdataset"),
        policy=ConceptPolicy(names, None),
        writer_kwargs=writer_kwargs(1 << 26, None, ["xxh64"]),
        max_samples_per_shard=None,
        examples_per_reason=5,
    )
    second = write_attempt(str(out), 1, marker["fingerprint"], task, "a999-1")
    killed = out / "part-00001.a999-2"
    killed.mkdir()
    (killed / "shard.00000.mds").write_bytes(b"half a shard")

    again = convert_on_spark(spark, tars, "webdataset", str(out))

    assert again["spark"]["parts_reused"] == 3 and again["spark"]["parts_written"] == 0
    assert again["spark"]["attempts_discarded"] == 2
    for field in SAME:
        assert again[field] == first[field], field
    parts = set(_parts_in_index(out))
    on_disk = {p.name for p in out.iterdir() if p.name.startswith("part-")}
    assert on_disk == parts and len(parts) == 3 and second not in parts | {killed.name}
    markers = {p.name.removesuffix(".json") for p in (out / SPARK_FOLDER / "done").iterdir()}
    assert markers == parts

    (out / "notes.txt").write_text("not the converter's")  # resumed, but never deleted unasked
    with pytest.raises(ConversionError, match="also notes.txt; pass --overwrite to remove those"):
        convert_on_spark(spark, tars, "webdataset", str(out))
    assert (out / "notes.txt").exists() and (out / "report.json").exists()


@pytest.mark.slow  # a JVM, its executors and an S3 server
def test_a_rerun_rewrites_the_parts_whose_input_or_options_changed(
    spark: Any, tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    tars = _tars(tmp_path / "in", sample_jpegs)
    out = tmp_path / "spark"
    convert_on_spark(spark, tars, "webdataset", str(out))
    # tar 2 gains a sample whose new concept changes the vocabulary: every part's ids change
    extra = wds("late", sample_jpegs[9], {"caption": "a new concept", "classes": ["zebra"] * 9})
    kept = [wds(f"t2-{i}", sample_jpegs[i], {"caption": "x", "classes": []}) for i in range(3)]
    write_tar(Path(tars[2]), [*kept, extra])
    changed = convert_on_spark(spark, tars, "webdataset", str(out))
    assert changed["spark"]["parts_reused"] == 0 and changed["spark"]["parts_written"] == 3
    assert changed["spark"]["attempts_discarded"] == 3
    local = convert(tars, "webdataset", str(tmp_path / "local"), progress=False)
    _assert_same(local, changed, tmp_path / "local", out)
    assert set(_parts_in_index(out)) == {p.name for p in out.iterdir() if p.name.startswith("p")}

    # a tar rewritten with the same samples but a new modification time is redone, alone
    os.utime(tars[0], ns=(1, 1))
    touched = convert_on_spark(spark, tars, "webdataset", str(out))
    assert touched["spark"]["parts_reused"] == 2 and touched["spark"]["parts_written"] == 1
    assert touched["spark"]["attempts_discarded"] == 1
    _assert_same(local, touched, tmp_path / "local", out)


_DRIVER = """
import sys
from cabs_streaming.converter.spark import convert_on_spark, spark_session
conf = {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
        "spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"}
spark = spark_session(sys.argv[1], conf, app_name="cabs-test-driver")
convert_on_spark(spark, sys.argv[3:], "webdataset", sys.argv[2])
"""


def _driver(master: str, out: Path, tars: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A conversion driver in its own process group (its JVM and Python workers join it)."""
    return subprocess.Popen(
        [sys.executable, "-c", _DRIVER, master, str(out), *tars],
        env={**os.environ, "SPARK_LOCAL_IP": HOST},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )


def _kill_python_workers(driver: int) -> list[int]:
    """SIGKILL the Python workers under ``driver``: children of PySpark's daemon, as it forks."""
    processes = psutil.Process(driver).children(recursive=True)
    spark_python = set()
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if "pyspark.daemon" in " ".join(process.cmdline()):
                spark_python.add(process.pid)
    workers = [p for p in processes if p.pid in spark_python and p.ppid() in spark_python]
    for worker in workers:
        worker.kill()
    return [worker.pid for worker in workers]


@pytest.mark.slow  # a JVM, its executors and an S3 server
def test_a_python_worker_killed_mid_part_is_retried_and_its_attempt_dropped(
    tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    tars = _tars(tmp_path / "in", sample_jpegs, files=4, per_file=16)
    big = [
        wds(f"big-{i}", sample_jpegs[i % 16], {"caption": "x", "classes": []}) for i in range(600)
    ]
    tars[2] = str(write_tar(tmp_path / "in" / "big.tar", big))  # part 2 takes seconds to write
    out, log = tmp_path / "spark", tmp_path / "driver.log"
    driver = _driver("local[1,3]", out, tars, log)  # one core, three tries a task
    try:
        killed: list[int] = []
        deadline = time.monotonic() + 120
        while not killed:
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "part 2 never started"
            writing = list(out.glob("part-00002.*")) if out.is_dir() else []
            if writing and not list((out / SPARK_FOLDER / "done").glob("part-00002.*")):
                killed = _kill_python_workers(driver.pid)  # part 2 is being written
            time.sleep(0.01)
        assert driver.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()

    report = json.loads((out / "report.json").read_text())
    assert report["spark"]["attempts_discarded"] >= 1 and report["spark"]["parts_written"] == 4
    local = convert(tars, "webdataset", str(tmp_path / "local"), progress=False)
    _assert_same(local, report, tmp_path / "local", out)
    parts = set(_parts_in_index(out))
    assert len(parts) == 4 == len({p.split(".")[0] for p in parts})
    assert {p.name for p in out.iterdir() if p.name.startswith("part-")} == parts


@pytest.mark.slow  # a JVM, its executors and an S3 server
def test_a_driver_killed_mid_write_is_resumed_by_a_rerun_to_the_same_dataset(
    spark: Any, tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    tars = _tars(tmp_path / "in", sample_jpegs, files=6, per_file=16)
    big = [
        wds(f"big-{i}", sample_jpegs[i % 16], {"caption": "x", "classes": []}) for i in range(600)
    ]
    tars[3] = str(write_tar(tmp_path / "in" / "big.tar", big))  # part 3 takes seconds to write
    out, log = tmp_path / "spark", tmp_path / "driver.log"
    done = out / SPARK_FOLDER / "done"
    driver = _driver("local[1]", out, tars, log)
    try:
        deadline = time.monotonic() + 120
        while not (done.is_dir() and len(list(done.glob("*.json"))) >= 2):
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no part completed in 120 s"
            time.sleep(0.02)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    completed = sorted(p.name for p in done.glob("*.json"))
    assert 2 <= len(completed) < 6, completed
    assert not (out / "report.json").exists()

    resumed = convert_on_spark(spark, tars, "webdataset", str(out))
    fresh = convert(tars, "webdataset", str(tmp_path / "local"), progress=False)

    assert resumed["spark"]["parts_reused"] == len(completed)
    assert resumed["spark"]["parts_written"] == 6 - len(completed)
    _assert_same(fresh, resumed, tmp_path / "local", out)
    kept = {name.removesuffix(".json") for name in completed}
    assert kept <= set(_parts_in_index(out))
    on_disk = {p.name for p in out.iterdir() if p.name.startswith("part-")}
    assert on_disk == set(_parts_in_index(out))


@pytest.mark.slow  # a JVM, its executors and an S3 server
def test_s3_inputs_to_s3_output_read_back_with_the_concept_dataset(
    spark: Any, server: S3Server, tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    tars = _tars(tmp_path / "in", sample_jpegs)
    client = server.client()
    for tar in tars:
        client.upload_file(tar, BUCKET, f"inputs/{Path(tar).name}")
    out = f"s3://{BUCKET}/mds/spark"
    report = convert_on_spark(spark, [f"s3://{BUCKET}/inputs/"], "webdataset", out)
    local = convert(tars, "webdataset", str(tmp_path / "local"), progress=False)

    for field in ("read", "written", "skipped", "concepts", "vocabulary"):
        assert report[field] == local[field], field
    assert report["inputs"] == [f"s3://{BUCKET}/inputs/{Path(t).name}" for t in tars]
    assert report["examples"]["duplicate key"][0]["file"] == report["inputs"][1]
    keys = server.keys(BUCKET, "mds/spark/")
    assert {"mds/spark/index.json", "mds/spark/vocabulary.json", "mds/spark/report.json"} <= set(
        keys
    )
    dataset = ConceptStreamingDataset(
        remote=out, local=str(tmp_path / "cache"), batch_size=2, shuffle=False,
        validate_hash="xxh64",
    )  # fmt: skip
    expected = read_back(tmp_path / "local")
    assert dataset.num_samples == len(expected) == report["written"]
    rows = [dataset[i] for i in range(dataset.num_samples)]
    assert [r["key"] for r in rows] == [e["key"] for e in expected]
    assert [bytes(r["image"]) for r in rows] == [e["image"] for e in expected]
    names = [[dataset.vocabulary.name_of(int(c)) for c in r["concepts"]] for r in rows]
    assert names == [e["concepts"] for e in expected]
    del dataset, rows

    again = convert_on_spark(spark, [f"s3://{BUCKET}/inputs/"], "webdataset", out)
    assert again["spark"]["parts_reused"] == 3 and again["written"] == report["written"]


@pytest.mark.slow  # a JVM, its executors and an S3 server
def test_an_s3_jsonl_manifest_reads_its_images_from_its_own_prefix_only(
    spark: Any, server: S3Server, tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    folder = tmp_path / "site" / "manifests"
    folder.mkdir(parents=True)
    (tmp_path / "site" / "outside.jpg").write_bytes(sample_jpegs[9])  # exists, not to be read
    lines = []
    for i in range(4):
        (folder / f"{i}.jpg").write_bytes(sample_jpegs[i])
        lines.append({"image": f"{i}.jpg", "caption": f"photo {i}", "concepts": ["dog"]})
    lines.append({"image": "../outside.jpg", "caption": "escapes", "concepts": ["dog"]})
    lines.append({"image": "gone.jpg", "caption": "missing", "concepts": ["cat"]})
    (folder / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    client = server.client()
    for path in (tmp_path / "site").rglob("*"):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"site/{path.relative_to(tmp_path / 'site')}")

    local = convert([str(folder / "m.jsonl")], "jsonl", str(tmp_path / "local"), progress=False)
    report = convert_on_spark(
        spark, [f"s3://{BUCKET}/site/manifests/m.jsonl"], "jsonl", str(tmp_path / "spark")
    )
    for field in ("read", "written", "skipped", "concepts", "vocabulary", "concept_names"):
        assert report[field] == local[field], field
    assert report["written"] == 4 and report["skipped"]["missing image"] == 2
    assert read_back(tmp_path / "local") == read_back(tmp_path / "spark")
    details = [e["detail"] for e in report["examples"]["missing image"]]
    assert any(f"leaves s3://{BUCKET}/site/manifests" in d for d in details), details
    assert any(f"s3://{BUCKET}/site/manifests/gone.jpg" in d for d in details), details


@pytest.mark.slow  # a JVM, its executors and an S3 server
def test_an_error_in_a_task_names_its_cause_and_the_file(
    spark: Any, tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    path = tmp_path / "ids.parquet"
    table = pa.table({"image": [sample_jpegs[0]], "caption": ["a dog"], "concepts": [[3]]})
    pq.write_table(table, path)
    with pytest.raises(SparkJobFailed) as failed:
        convert_on_spark(spark, [str(path)], "parquet", str(tmp_path / "out"))
    message = str(failed.value)
    cause = f"ConversionError: {path} (ids.parquet:0): concepts are given as ids (3)"
    assert message.startswith(f"the Spark scan failed: {cause}"), message
    assert "pass --vocabulary FILE" in message and "run the same conversion again" in message


@pytest.mark.slow  # a JVM, its executors and an S3 server
def test_the_command_line_runs_the_spark_engine_with_concepts_from_the_captions(
    spark: Any, tmp_path: Path, sample_jpegs: list[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    del spark  # the session the command line's getOrCreate finds
    words = ["dog", "cat", "bicycle", "pizza", "boat"]
    tars = []
    for t in range(3):  # img2dataset's layout: .jpg + .txt, no concepts in the input
        samples = [
            wds(f"{t}-{i}", sample_jpegs[3 * t + i], None,
                txt=f"a {words[(t + i) % 5]} beside a {words[i]}".encode())
            for i in range(3)
        ]  # fmt: skip
        tars.append(str(write_tar(tmp_path / f"img2dataset-{t}.tar", samples)))
    out = tmp_path / "cli"
    status = main(
        ["--input", *tars, "--format", "webdataset", "--out", str(out), "--engine", "spark",
         "--spark-master", "local[2]", "--partitions", "2", "--tag-captions", "coco",
         "--no-progress"]
    )  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert status == 0 and printed["engine"] == "spark" and printed["parts"] == 2
    local = convert(
        tars, "webdataset", str(tmp_path / "local"), tag_captions="coco", progress=False
    )
    _assert_same(local, json.loads((out / "report.json").read_text()), tmp_path / "local", out)
    assert local["written"] == 9 and local["concepts"]["distinct"] == 5


@pytest.mark.slow  # a JVM, its executors and an S3 server
def test_numeric_columns_and_concept_counts_equal_the_local_conversion_and_survive_a_resume(
    spark: Any, tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    lines = []
    for i in range(6):
        (folder / f"{i}.jpg").write_bytes(sample_jpegs[i])
        concepts = ["dog", "cat", "dog"][: i % 4]
        lines.append({"image": f"{i}.jpg", "caption": f"c{i}", "concepts": concepts,
                      "aesthetic": i / 4, "width": 100 * i})
    lines[3]["aesthetic"] = None  # a bad numeric skip, counted alike by both engines
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    options = {"numeric_columns": ["aesthetic", "width:int64"]}
    local = convert([str(path)], "jsonl", str(tmp_path / "local"), progress=False, **options)
    out = tmp_path / "spark"
    report = convert_on_spark(spark, [str(path)], "jsonl", str(out), **options)

    _assert_same(local, report, tmp_path / "local", out)
    assert report["skipped"]["bad numeric"] == 1 and report["written"] == 5
    assert report["numeric_columns"] == {"aesthetic": "float32", "width": "int64"}
    counts = ConceptCounts.read(str(out))
    assert counts == ConceptCounts.read(str(tmp_path / "local"))
    assert counts.samples.tolist() == report["concepts"]["per_concept"]["samples"]
    dataset = ConceptStreamingDataset(local=str(out), batch_size=5, shuffle=False,
                                      columns=["aesthetic", "width"])
    assert [dataset[i]["columns"]["width"] for i in range(5)] == [0.0, 100.0, 200.0, 400.0, 500.0]
    del dataset

    (out / "concept_counts.json").unlink()  # a crash before the end: resumed, rewritten
    (out / "report.json").unlink()
    again = convert_on_spark(spark, [str(path)], "jsonl", str(out), **options)
    assert again["spark"]["parts_reused"] == 1 and ConceptCounts.read(str(out)) == counts


def test_engine_options_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tar = str(tmp_path / "x.tar")
    Path(tar).write_bytes(b"")
    out = str(tmp_path / "out")
    for argv, message in (
        (["--engine", "spark", "--workers", "2"], "with --engine spark use --partitions"),
        (["--partitions", "2"], "--spark-master and --partitions need --engine spark"),
    ):
        status = main(["--input", tar, "--format", "webdataset", "--out", out, *argv])
        assert status == 2 and message in capsys.readouterr().err
    with pytest.raises(ConversionError, match="--tagger is not supported on the spark engine"):
        convert_on_spark(None, [tar], "webdataset", out, tagger="os.path:basename")

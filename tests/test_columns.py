"""Dataset-wide concept counts and numeric per-sample columns, from the converter to the batch.

``concept_counts.json`` is written beside ``vocabulary.json`` by every conversion and summed
over a dataset's streams; ``--numeric-column`` values are checked, written as MDS scalar columns
and carried by ``ConceptStreamingDataset(columns=...)`` into ``batch["columns"]``. Inputs are
real files (JPEGs of the embedded sample, parquet and JSONL written here).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import wds, write_mds, write_tar
from streaming import StreamingDataset
from streaming.base.format.mds.encodings import get_mds_encodings

from cabs_streaming.cli.convert import main
from cabs_streaming.cli.count import main as count_main
from cabs_streaming.concepts import (
    CONCEPT_COUNTS_FILENAME,
    NUMERIC_TYPES,
    ConceptCounts,
    Vocabulary,
    encode_concepts,
    encode_scores,
)
from cabs_streaming.converter import ConversionError, convert
from cabs_streaming.dataset import ConceptCollator, ConceptStreamingDataset

# ---------------------------------------------------------------------------------- helpers


def run(inputs: list[Path], fmt: str, out: Path, **kwargs: Any) -> dict[str, Any]:
    report = convert([str(p) for p in inputs], fmt, str(out), progress=False, **kwargs)
    assert report["read"] == report["written"] + sum(report["skipped"].values())
    return report


def manifest(folder: Path, jpegs: list[bytes], lines: list[dict[str, Any]]) -> Path:
    """A JSONL manifest of ``lines``, each given an image (``i.jpg``) and a caption if absent."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, line in enumerate(lines):
        (folder / f"{i}.jpg").write_bytes(jpegs[i % len(jpegs)])
        line.setdefault("image", f"{i}.jpg")
        line.setdefault("caption", f"caption {i}")
        line.setdefault("key", f"k{i}")
    path = folder / "manifest.jsonl"
    # allow_nan: NaN and Infinity literals are what Python's json (and many writers) emit
    path.write_text("".join(json.dumps(line, allow_nan=True) + "\n" for line in lines))
    return path


def read_columns(out: Path, names: list[str]) -> list[dict[str, Any]]:
    """The raw values of ``names`` of every sample of ``out``, as Streaming decodes them."""
    dataset = StreamingDataset(local=str(out), batch_size=1, shuffle=False)
    rows = [{name: dataset[i][name] for name in ["key", *names]} for i in range(len(dataset))]
    del dataset
    return rows


def index_encodings(out: Path) -> dict[str, str]:
    shard = json.loads((out / "index.json").read_text())["shards"][0]
    return dict(zip(shard["column_names"], shard["column_encodings"], strict=True))


# --------------------------------------------------------------------------- concept counts


def test_concept_counts_file_equals_the_reports_per_concept_lists(
    tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    lines = [
        {"concepts": ["dog", "dog", "cat"]},
        {"concepts": ["dog"]},
        {"concepts": []},
        {"concepts": ["bird"], "image": "missing.jpg"},  # skipped: not counted
    ]
    report = run([manifest(tmp_path / "in", sample_jpegs, lines)], "jsonl", tmp_path / "out")

    counts = ConceptCounts.read(str(tmp_path / "out"))
    names = Vocabulary.load(str(tmp_path / "out")).names
    assert len(counts) == len(names)
    assert counts.samples.tolist() == report["concepts"]["per_concept"]["samples"]
    assert counts.instances.tolist() == report["concepts"]["per_concept"]["instances"]
    assert counts.written == report["written"] == 3
    by_name = dict(zip(names, zip(counts.samples.tolist(), counts.instances.tolist(),
                                  strict=True), strict=True))
    assert by_name["dog"] == (2, 3) and by_name["cat"] == (1, 1) and by_name["bird"] == (0, 0)
    assert counts.samples.dtype == counts.instances.dtype == np.int64
    text = json.loads((tmp_path / "out" / CONCEPT_COUNTS_FILENAME).read_text())
    assert text == {"version": 1, "samples": counts.samples.tolist(),
                    "instances": counts.instances.tolist(), "written": 3}


def test_concept_counts_round_trip_and_add_up() -> None:
    a = ConceptCounts([1, 0, 2], [3, 0, 2], 4)
    b = ConceptCounts(np.array([0, 5, 1]), np.array([0, 7, 1]), 6)
    assert ConceptCounts.from_json(a.to_json()) == a
    assert a + b == ConceptCounts([1, 5, 3], [3, 7, 3], 10)
    assert sum([a, b]) == a + b
    with pytest.raises(ValueError, match="over 3 and 2 concepts"):
        a + ConceptCounts([1, 1], [1, 1], 1)  # noqa: B018


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"version": 2, "samples": [], "instances": [], "written": 0}', "version 2"),
        ('{"version": 1, "samples": [1]}', "expected"),
        ('{"version": 1, "samples": [1.5], "instances": [1], "written": 1}', "integer"),
        ('{"version": 1, "samples": [1, 2], "instances": [1], "written": 1}', "2 sample counts"),
        ("[1, 2", "not valid JSON"),
    ],
)
def test_a_bad_concept_counts_file_is_an_error_naming_it(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=f"^data/x/concept_counts.json: .*{match}"):
        ConceptCounts.from_json(text, source="data/x/concept_counts.json")


def _two_streams(tmp_path: Path, jpegs: list[bytes]) -> tuple[Path, Path]:
    vocabulary = tmp_path / "vocabulary.json"
    vocabulary.write_text(Vocabulary(["dog", "cat", "bird"]).to_json())
    first = [{"concepts": ["dog", "dog"]}, {"concepts": ["cat"]}]
    second = [{"concepts": ["bird", "dog"]}, {"concepts": []}, {"concepts": ["bird"]}]
    for name, lines in (("a", first), ("b", second)):
        run([manifest(tmp_path / f"in-{name}", jpegs, lines)], "jsonl", tmp_path / name,
            vocabulary=vocabulary)
    return tmp_path / "a", tmp_path / "b"


def test_the_dataset_sums_the_concept_counts_of_its_streams(
    tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    from streaming import Stream

    a, b = _two_streams(tmp_path, sample_jpegs)
    mixed = ConceptStreamingDataset(streams=[Stream(local=str(a)), Stream(local=str(b))],
                                    batch_size=1)
    expected = ConceptCounts([2, 1, 2], [3, 1, 2], 5)
    assert ConceptCounts.read(str(a)) + ConceptCounts.read(str(b)) == expected
    assert mixed.concept_counts == expected
    assert mixed.require_concept_counts("a test") is mixed.concept_counts


def test_a_stream_without_counts_gives_none_and_require_names_it(
    tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    from streaming import Stream

    a, b = _two_streams(tmp_path, sample_jpegs)
    (b / CONCEPT_COUNTS_FILENAME).unlink()  # as a dataset converted before the file existed
    mixed = ConceptStreamingDataset(streams=[Stream(local=str(a)), Stream(local=str(b))],
                                    batch_size=1)
    assert mixed.concept_counts is None
    with pytest.raises(ValueError) as raised:
        mixed.require_concept_counts("selection policy 'balanced'")
    message = str(raised.value)
    assert message.startswith("selection policy 'balanced' needs the dataset-wide concept counts")
    assert str(b) in message and f"{a} (" not in message
    assert "re-convert" in message.lower() and "cabs-count-concepts" in message


def test_a_counts_file_of_another_length_than_the_vocabulary_names_both_files(
    tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    a, _ = _two_streams(tmp_path, sample_jpegs)
    ConceptCounts([1, 2], [1, 2], 3).write(str(a))
    with pytest.raises(ValueError) as raised:
        ConceptStreamingDataset(local=str(a), batch_size=1)
    message = str(raised.value)
    assert str(a / CONCEPT_COUNTS_FILENAME) in message and str(a / "vocabulary.json") in message
    assert "counts 2 concepts" in message and "has 3" in message


def test_counts_are_downloaded_from_the_streams_remote(
    tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    a, _ = _two_streams(tmp_path, sample_jpegs)
    cache = tmp_path / "cache"
    dataset = ConceptStreamingDataset(remote=str(a), local=str(cache), batch_size=1)
    assert dataset.concept_counts == ConceptCounts.read(str(a))
    assert (cache / CONCEPT_COUNTS_FILENAME).exists()


def test_count_concepts_writes_what_the_converter_wrote_for_an_older_dataset(
    tmp_path: Path, sample_jpegs: list[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [{"concepts": ["dog", "dog", "cat"]}, {"concepts": []}, {"concepts": ["cat"]},
             {"concepts": ["owl", "cat", "owl", "owl"]}]
    out = tmp_path / "out"
    run([manifest(tmp_path / "in", sample_jpegs, lines)], "jsonl", out)
    written = ConceptCounts.read(str(out))
    (out / CONCEPT_COUNTS_FILENAME).unlink()  # as a conversion before the file existed

    assert count_main([str(out), "--no-progress"]) == 0
    assert ConceptCounts.read(str(out)) == written
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"file": str(out / CONCEPT_COUNTS_FILENAME), "samples": 4, "concepts": 3,
                       "used": 3, "instances": 8}
    assert count_main([str(tmp_path / "in"), "--no-progress"]) == 2
    assert "index.json does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------- numeric columns: write


def test_the_numeric_types_are_mds_scalar_encodings() -> None:
    assert set(NUMERIC_TYPES) <= get_mds_encodings()


def test_numeric_columns_from_parquet_round_trip_with_their_declared_types(
    tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    table = pa.table({
        "key": ["a", "b", "c"],
        "image": sample_jpegs[:3],
        "caption": ["one", "two", "three"],
        "concepts": [["dog"], [], ["cat"]],
        "aesthetic": pa.array([5.25, 6.5, 4.0], pa.float64()),
        "clip_score": pa.array([0.3125, 0.25, 0.125], pa.float32()),
        "width": pa.array([640, 1024, 2**31 - 1], pa.int64()),
        "uid": pa.array([2**40, -(2**40), 7], pa.int64()),
    })
    pq.write_table(table, tmp_path / "in.parquet")
    columns = {"aesthetic": "float64", "clip_score": "float32", "width": "int32", "uid": "int64"}
    report = run([tmp_path / "in.parquet"], "parquet", tmp_path / "out", numeric_columns=columns)

    assert report["written"] == 3 and report["numeric_columns"] == columns
    encodings = index_encodings(tmp_path / "out")
    assert {name: encodings[name] for name in columns} == columns
    rows = read_columns(tmp_path / "out", list(columns))
    assert [r["aesthetic"] for r in rows] == [5.25, 6.5, 4.0]
    assert [r["clip_score"] for r in rows] == [0.3125, 0.25, 0.125]
    assert [r["width"] for r in rows] == [640, 1024, 2**31 - 1]
    assert [r["uid"] for r in rows] == [2**40, -(2**40), 7]
    assert rows[0]["aesthetic"].dtype == np.float64 and rows[0]["clip_score"].dtype == np.float32
    assert rows[0]["width"].dtype == np.int32 and rows[0]["uid"].dtype == np.int64


def test_a_numeric_column_from_jsonl_round_trips_default_float32(
    tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    lines = [{"concepts": ["dog"], "aesthetic": v, "likes": n}
             for v, n in ((5.5, 3), (1, 0), (-2.75, 12))]
    path = manifest(tmp_path / "in", sample_jpegs, lines)
    report = run([path], "jsonl", tmp_path / "out", numeric_columns=["aesthetic", "likes:int64"])

    assert report["written"] == 3
    assert report["numeric_columns"] == {"aesthetic": "float32", "likes": "int64"}
    assert index_encodings(tmp_path / "out")["aesthetic"] == "float32"
    rows = read_columns(tmp_path / "out", ["aesthetic", "likes"])
    assert [(r["key"], float(r["aesthetic"]), int(r["likes"])) for r in rows] == [
        ("k0", 5.5, 3), ("k1", 1.0, 0), ("k2", -2.75, 12)
    ]


def test_a_numeric_column_from_a_webdataset_json_member(
    tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    samples = [
        wds("s0", sample_jpegs[0], {"caption": "a", "classes": ["dog"], "score": 0.5}),
        wds("s1", sample_jpegs[1], {"caption": "b", "classes": [], "score": 2}),
        wds("s2", sample_jpegs[2], None, txt=b"no json member"),
    ]
    tar = write_tar(tmp_path / "in.tar", samples)
    report = run([tar], "webdataset", tmp_path / "out", numeric_columns={"score": "float64"},
                 tag_captions="coco")
    assert report["written"] == 2 and report["skipped"]["bad numeric"] == 1
    assert report["examples"]["bad numeric"][0]["key"] == "s2"
    assert [float(r["score"]) for r in read_columns(tmp_path / "out", ["score"])] == [0.5, 2.0]


def test_every_kind_of_bad_numeric_value_is_a_counted_skip_naming_key_and_column(
    tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    bad = {
        "missing": {},
        "null": {"v": None, "n": 1},
        "string": {"v": "1.5", "n": 1},
        "boolean": {"v": True, "n": 1},
        "list": {"v": [1.0], "n": 1},
        "nan": {"v": float("nan"), "n": 1},
        "infinite": {"v": float("-inf"), "n": 1},
        "beyond float32": {"v": 1e39, "n": 1},
        "fraction for int32": {"v": 1.0, "n": 2.5},
        "beyond int32": {"v": 1.0, "n": 2**31},
    }
    lines = [{"key": "good", "concepts": [], "v": 0.5, "n": 4.0}]  # 4.0 is the integer 4
    lines += [{"key": key, "concepts": [], **values} for key, values in bad.items()]
    path = manifest(tmp_path / "in", sample_jpegs, lines)
    report = run([path], "jsonl", tmp_path / "out", numeric_columns=["v", "n:int32"],
                 examples_per_reason=20)

    assert report["written"] == 1 and report["skipped"]["bad numeric"] == len(bad)
    examples = {e["key"]: e for e in report["examples"]["bad numeric"]}
    assert list(examples) == list(bad)
    assert all(e["file"] == str(path) for e in examples.values())
    details = {key: e["detail"] for key, e in examples.items()}
    assert details["missing"] == "numeric column 'v' (float32): missing"
    assert details["null"] == "numeric column 'v' (float32): null"
    assert details["string"] == "numeric column 'v' (float32): '1.5' is not a number"
    assert details["boolean"] == "numeric column 'v' (float32): True is not a number"
    assert details["nan"] == "numeric column 'v' (float32): nan is not finite"
    assert details["infinite"] == "numeric column 'v' (float32): -inf is not finite"
    assert details["beyond float32"] == (
        "numeric column 'v' (float32): 1e+39 is out of the range of float32"
    )
    assert details["fraction for int32"] == "numeric column 'n' (int32): 2.5 is not an integer"
    assert details["beyond int32"].startswith("numeric column 'n' (int32): 2147483648 is out of")
    rows = read_columns(tmp_path / "out", ["v", "n"])
    assert [(r["key"], float(r["v"]), int(r["n"])) for r in rows] == [("good", 0.5, 4)]


def test_bad_numeric_parquet_cells_are_counted_skips(
    tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    table = pa.table({
        "key": ["ok", "null", "nan", "inf", "big"],
        "image": sample_jpegs[:5],
        "caption": ["c"] * 5,
        "concepts": [[]] * 5,
        "x": pa.array([1.5, None, float("nan"), float("inf"), 1.5], pa.float64()),
        "n": pa.array([1, 1, 1, 1, 2**40], pa.int64()),
    })
    pq.write_table(table, tmp_path / "in.parquet")
    report = run([tmp_path / "in.parquet"], "parquet", tmp_path / "out",
                 numeric_columns=["x:float64", "n:int32"])
    assert report["written"] == 1 and report["skipped"]["bad numeric"] == 4
    assert [e["key"] for e in report["examples"]["bad numeric"]] == ["null", "nan", "inf", "big"]
    assert "'n' (int32): 1099511627776 is out of the range" in report["examples"]["bad numeric"][3][
        "detail"]


def test_a_parquet_file_without_the_numeric_column_or_with_text_in_it_cannot_be_converted(
    tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    table = pa.table({"image": sample_jpegs[:1], "caption": ["c"], "concepts": [["dog"]],
                      "x": ["1.5"]})
    pq.write_table(table, tmp_path / "in.parquet")
    with pytest.raises(ConversionError) as raised:
        convert([str(tmp_path / "in.parquet")], "parquet", str(tmp_path / "out"),
                numeric_columns=["x", "y"], progress=False)
    message = str(raised.value)
    assert "in.parquet cannot be converted" in message
    assert "column 'x' is string, but --numeric-column needs numbers" in message
    assert "no column 'y' (name the right one with --numeric-column)" in message


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (["caption"], "'caption' clashes with a column of the MDS schema"),
        (["concept_scores:float64"], "'concept_scores' clashes"),
        (["concept_score_min"], "'concept_score_min' clashes"),
        (["x:float16"], "the type must be one of float32, float64, int32, int64"),
        (["x", "x:int32"], "'x' is given twice"),
        ([":int32"], "give a column name"),
    ],
)
def test_bad_numeric_column_declarations_are_errors(
    tmp_path: Path, sample_jpegs: list[bytes], spec: list[str], match: str
) -> None:
    path = manifest(tmp_path / "in", sample_jpegs, [{"concepts": []}])
    with pytest.raises(ConversionError, match=match):
        convert([str(path)], "jsonl", str(tmp_path / "out"), numeric_columns=spec, progress=False)
    assert not (tmp_path / "out").exists()


def test_the_command_line_takes_repeated_numeric_columns(
    tmp_path: Path, sample_jpegs: list[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    path = manifest(tmp_path / "in", sample_jpegs, [{"concepts": ["dog"], "a": 1, "b": 2}])
    out = tmp_path / "out"
    argv = ["--input", str(path), "--format", "jsonl", "--out", str(out), "--no-progress",
            "--numeric-column", "a", "--numeric-column", "b:int64"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["numeric_columns"] == {"a": "float32", "b": "int64"}
    assert (out / CONCEPT_COUNTS_FILENAME).exists()
    assert main([*argv[:5], str(tmp_path / "o2"), "--numeric-column", "key"]) == 2
    assert "'key' clashes with a column of the MDS schema" in capsys.readouterr().err


# ---------------------------------------------------------------------- numeric columns: read


@pytest.fixture
def with_columns(tmp_path: Path, sample_jpegs: list[bytes]) -> tuple[Path, list[dict[str, Any]]]:
    """A converted dataset of 6 samples with ``aesthetic`` (float32) and ``likes`` (int64)."""
    lines = [
        {"concepts": ["dog"] * (i % 3), "scores": [0.25 + 0.125 * j for j in range(i % 3)],
         "aesthetic": 0.5 * i - 1, "likes": 10 * i}
        for i in range(6)
    ]
    path = manifest(tmp_path / "in", sample_jpegs, lines)
    run([path], "jsonl", tmp_path / "out", numeric_columns=["aesthetic", "likes:int64"])
    return tmp_path / "out", lines


def test_samples_and_batches_carry_the_columns_in_order(
    with_columns: tuple[Path, list[dict[str, Any]]],
) -> None:
    out, lines = with_columns
    names = ["likes", "aesthetic", "concept_score_min", "concept_score_max"]
    dataset = ConceptStreamingDataset(local=str(out), batch_size=6, shuffle=False, columns=names)
    samples = [dataset[i] for i in range(6)]
    assert samples[2]["columns"] == {"likes": 20.0, "aesthetic": 0.0,
                                     "concept_score_min": 0.25, "concept_score_max": 0.375}
    batch = ConceptCollator()(samples[::-1])
    assert list(batch["columns"]) == names
    assert all(t.dtype == torch.float64 and t.shape == (6,) for t in batch["columns"].values())
    assert batch["columns"]["likes"].tolist() == [line["likes"] for line in lines[::-1]]
    assert batch["columns"]["aesthetic"].tolist() == [line["aesthetic"] for line in lines[::-1]]
    assert batch["keys"] == [line["key"] for line in lines[::-1]]


def test_derived_concept_score_columns_are_nan_without_scores(
    with_columns: tuple[Path, list[dict[str, Any]]],
) -> None:
    out, lines = with_columns
    names = ["concept_score_min", "concept_score_max"]
    dataset = ConceptStreamingDataset(local=str(out), batch_size=6, shuffle=False, columns=names)
    batch = ConceptCollator()([dataset[i] for i in range(6)])
    for i, line in enumerate(lines):
        low = batch["columns"]["concept_score_min"][i]
        high = batch["columns"]["concept_score_max"][i]
        if line["scores"]:
            assert (low.item(), high.item()) == (min(line["scores"]), max(line["scores"]))
        else:
            assert math.isnan(low) and math.isnan(high)


def test_derived_columns_need_no_numeric_column_in_the_shards(tmp_path: Path,
                                                              sample_jpegs: list[bytes]) -> None:
    rows = [
        {"key": f"r{i}", "image": sample_jpegs[i], "caption": "c", "recaption": "",
         "concepts": encode_concepts([0] * i), "concept_scores": encode_scores([0.5, 0.75][:i])}
        for i in range(3)
    ]
    out = write_mds(tmp_path / "mds", rows, ["dog"])
    dataset = ConceptStreamingDataset(local=str(out), batch_size=3, shuffle=False,
                                      columns=["concept_score_max"])
    values = [dataset[i]["columns"]["concept_score_max"] for i in range(3)]
    assert math.isnan(values[0]) and values[1:] == [0.5, 0.75]


def test_without_columns_nothing_changes(with_columns: tuple[Path, list[dict[str, Any]]]) -> None:
    out, _ = with_columns
    dataset = ConceptStreamingDataset(local=str(out), batch_size=6, shuffle=False)
    sample = dataset[0]
    assert "columns" not in sample and "columns" not in ConceptCollator()([sample])


def test_a_column_missing_from_a_stream_is_an_error_naming_the_stream_and_its_columns(
    with_columns: tuple[Path, list[dict[str, Any]]], tmp_path: Path, sample_jpegs: list[bytes]
) -> None:
    from streaming import Stream

    out, _ = with_columns
    vocabulary = Vocabulary.load(str(out)).names
    plain = write_mds(tmp_path / "plain", [
        {"key": "p", "image": sample_jpegs[0], "caption": "c", "recaption": "",
         "concepts": encode_concepts([0]), "concept_scores": b""}
    ], vocabulary)
    with pytest.raises(ValueError) as raised:
        ConceptStreamingDataset(streams=[Stream(local=str(out)), Stream(local=str(plain))],
                                batch_size=1, columns=["aesthetic", "likes"])
    message = str(raised.value)
    assert f"stream {str(plain)!r} has no column 'aesthetic', 'likes'" in message
    assert "its columns: caption, concept_scores, concepts, image, key, recaption" in message
    assert "--numeric-column" in message
    with pytest.raises(ValueError, match="has no column 'popularity'"):
        ConceptStreamingDataset(local=str(out), batch_size=1, columns=["popularity"])

"""cabs-convert (cabs_streaming.converter): every input format in, MDS schema v1 out.

Inputs are built here from real image files (the embedded sample's JPEGs, plus PNG and WebP) and
every written dataset is read back with ``streaming.StreamingDataset``.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import read_back, wds, write_tar
from PIL import Image
from streaming import StreamingDataset

from cabs_streaming.cli.convert import main
from cabs_streaming.concepts import Vocabulary
from cabs_streaming.converter import SKIP_REASONS, ConversionError, convert

# ---------------------------------------------------------------------------------------------
# Real images
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(sample_jpegs: list[bytes]) -> dict[str, list[bytes]]:
    """Distinct real JPEGs, plus a PNG and a WebP re-encoded from one of them."""
    jpegs = sample_jpegs
    pixels = Image.open(io.BytesIO(jpegs[0])).convert("RGB")
    encoded = {}
    for fmt in ("PNG", "WEBP"):
        buffer = io.BytesIO()
        pixels.save(buffer, format=fmt)
        encoded[fmt] = [buffer.getvalue()]
    return {"jpg": jpegs, "png": encoded["PNG"], "webp": encoded["WEBP"]}


def _truncated(jpeg: bytes) -> bytes:
    return jpeg[: len(jpeg) // 2]


def run(inputs: list[Path], fmt: str, out: Path, **kwargs: Any) -> dict[str, Any]:
    report = convert([str(p) for p in inputs], fmt, str(out), progress=False, **kwargs)
    assert report["read"] == report["written"] + sum(report["skipped"].values())
    assert json.loads((out / "report.json").read_text()) == report
    return report


def vocabulary_file(path: Path, names: list[str]) -> Path:
    path.write_text(Vocabulary(names).to_json())
    return path


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


def test_webdataset_round_trip_keeps_keys_captions_concepts_and_image_bytes(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    jpg, png, webp = images["jpg"], images["png"][0], images["webp"][0]
    samples = [
        wds("000000000", jpg[0], {"caption": "a dog on a sofa", "recap": "A brown dog naps.",
                                  "classes": ["dog", "sofa", "dog"], "scores": [0.9, 0.5, 0.25],
                                  "uid": "9f86d081884c7d65"}),
        wds("000000001", png, {"classes": ["cat"]}, ext="png", txt=b"a cat from the txt member"),
        wds("000000002", webp, {"caption": "webp bird", "classes": ["bird", "dog"]}, ext="webp"),
        wds("dir/000000003", jpg[1], {"caption": "jpeg ext", "classes": ["cat"]}, ext="jpeg"),
    ]
    tar = write_tar(tmp_path / "shard-000.tar", samples)
    report = run([tar], "webdataset", tmp_path / "out")

    assert report["read"] == 4 and report["written"] == 4
    assert (tmp_path / "out" / "index.json").exists()
    assert (tmp_path / "out" / "vocabulary.json").exists()
    rows = read_back(tmp_path / "out")
    assert [r["key"] for r in rows] == ["9f86d081884c7d65", "000000001", "000000002", "000000003"]
    assert [r["caption"] for r in rows] == [
        "a dog on a sofa", "a cat from the txt member", "webp bird", "jpeg ext"
    ]
    assert [r["recaption"] for r in rows] == ["A brown dog naps.", "", "", ""]
    assert [r["concepts"] for r in rows] == [["dog", "sofa", "dog"], ["cat"], ["bird", "dog"],
                                             ["cat"]]
    assert rows[0]["scores"] == [pytest.approx(0.9, abs=1e-3), 0.5, 0.25]  # float16
    assert rows[1]["scores"] == []
    assert [r["image"] for r in rows] == [jpg[0], png, webp, jpg[1]]


def test_parquet_round_trip_reads_bytes_and_struct_image_columns(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    jpg = images["jpg"]
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "by-path.png").write_bytes(images["png"][0])
    plain = pa.table({
        "uid": ["a", "b", "c"],
        "jpg": [jpg[0], jpg[1], images["webp"][0]],
        "text": ["first", "second", "third"],
        "labels": [["dog"], ["cat", "cat"], []],
        "synthetic": ["re 1", None, "re 3"],
    })
    struct_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    hf_style = pa.table({
        "uid": ["d", "e"],
        "jpg": pa.array([{"bytes": jpg[2], "path": "ignored.jpg"},
                         {"bytes": None, "path": "pics/by-path.png"}], type=struct_type),
        "text": ["fourth", "fifth"],
        "labels": [["bird"], ["dog"]],
        "synthetic": [None, "re 5"],
    })
    pq.write_table(plain, tmp_path / "a.parquet", row_group_size=2)
    pq.write_table(hf_style, tmp_path / "b.parquet")
    columns = {"image_column": "jpg", "caption_column": "text", "concepts_column": "labels",
               "key_column": "uid", "recaption_column": "synthetic"}
    report = run([tmp_path / "a.parquet", tmp_path / "b.parquet"], "parquet", tmp_path / "out",
                 **columns)

    assert report["written"] == 5
    rows = read_back(tmp_path / "out")
    assert [r["key"] for r in rows] == ["a", "b", "c", "d", "e"]
    assert [r["caption"] for r in rows] == ["first", "second", "third", "fourth", "fifth"]
    assert [r["recaption"] for r in rows] == ["re 1", "", "re 3", "", "re 5"]
    assert [r["concepts"] for r in rows] == [["dog"], ["cat", "cat"], [], ["bird"], ["dog"]]
    assert [r["image"] for r in rows] == [jpg[0], jpg[1], images["webp"][0], jpg[2],
                                          images["png"][0]]


def test_parquet_concept_ids_are_checked_against_the_vocabulary_size(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    jpg = images["jpg"]
    table = pa.table({"key": ["k0", "k1", "k2"], "image": jpg[:3], "caption": ["x", "y", "z"],
                      "concepts": [[0, 2], [3], [1]]})
    pq.write_table(table, tmp_path / "ids.parquet")
    vocab = vocabulary_file(tmp_path / "vocab.json", ["dog", "cat", "bird"])
    report = run([tmp_path / "ids.parquet"], "parquet", tmp_path / "out", vocabulary=vocab)

    assert report["skipped"]["unknown concept"] == 1
    assert report["examples"]["unknown concept"][0]["key"] == "k1"
    assert "outside the vocabulary [0, 3)" in report["examples"]["unknown concept"][0]["detail"]
    rows = read_back(tmp_path / "out")
    assert [(r["key"], r["concepts"]) for r in rows] == [("k0", ["dog", "bird"]), ("k2", ["cat"])]


def test_parquet_concept_ids_without_a_vocabulary_are_refused(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    table = pa.table({"image": images["jpg"][:1], "caption": ["x"], "concepts": [[4]]})
    pq.write_table(table, tmp_path / "ids.parquet")
    with pytest.raises(ConversionError, match=r"ids.parquet .*--vocabulary"):
        convert([str(tmp_path / "ids.parquet")], "parquet", str(tmp_path / "out"), progress=False)


def test_parquet_missing_column_error_names_the_file_and_the_option(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    table = pa.table({"image": images["jpg"][:1], "text": ["x"], "concepts": [["dog"]]})
    pq.write_table(table, tmp_path / "cols.parquet")
    with pytest.raises(ConversionError, match=r"cols.parquet .*no column 'caption'.*--caption"):
        convert([str(tmp_path / "cols.parquet")], "parquet", str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists(), "the output folder it made is removed again"


def test_parquet_column_problems_are_reported_all_at_once_with_the_tagging_hint(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    table = pa.table({"jpg": images["jpg"][:1], "caption": ["a dog"], "uid": [1.5]})
    pq.write_table(table, tmp_path / "cols.parquet")
    with pytest.raises(ConversionError) as caught:
        convert([str(tmp_path / "cols.parquet")], "parquet", str(tmp_path / "out"),
                key_column="uid", progress=False)
    message = str(caught.value)
    assert "no column 'image' (name the right one with --image-column)" in message
    assert "column 'uid' is double, but --key-column needs text or integers" in message
    assert "no column 'concepts'" in message
    assert "--tag-captions VOCABULARY" in message and "--tagger" in message
    assert "(its columns: jpg, caption, uid)" in message


def test_jsonl_round_trip_reads_images_relative_to_the_manifest(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    root = tmp_path / "set"
    (root / "img").mkdir(parents=True)
    (root / "img" / "0.jpg").write_bytes(images["jpg"][0])
    (root / "img" / "1.png").write_bytes(images["png"][0])
    (root / "img" / "2.webp").write_bytes(images["webp"][0])
    lines = [
        {"image": "img/0.jpg", "caption": "zero", "concepts": ["dog", "dog"], "key": "k0"},
        {"image": "img/1.png", "caption": "one", "concepts": [], "recaption": "syn one"},
        {"image": "img/2.webp", "caption": "two", "concepts": ["cat"]},
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    report = run([manifest], "jsonl", tmp_path / "out")

    assert report["read"] == 3 and report["written"] == 3
    rows = read_back(tmp_path / "out")
    assert [r["key"] for r in rows] == ["k0", "img/1.png", "img/2.webp"]
    assert [r["caption"] for r in rows] == ["zero", "one", "two"]
    assert [r["recaption"] for r in rows] == ["", "syn one", ""]
    assert [r["concepts"] for r in rows] == [["dog", "dog"], [], ["cat"]]
    assert [r["image"] for r in rows] == [images["jpg"][0], images["png"][0], images["webp"][0]]


def test_jsonl_lines_that_cannot_be_used_are_counted(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    (tmp_path / "ok.jpg").write_bytes(images["jpg"][0])
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"image": "ok.jpg", "caption": "fine", "concepts": ["dog"]}),
        json.dumps({"image": "gone.jpg", "caption": "no file", "concepts": ["dog"]}),
        '{"image": "ok.jpg", "caption": ',
        json.dumps({"image": "ok.jpg", "caption": "no concepts field", "key": "k3"}),
    ]))
    report = run([manifest], "jsonl", tmp_path / "out")

    assert report["read"] == 4 and report["written"] == 1
    assert report["skipped"]["missing image"] == 1
    assert "gone.jpg" in report["examples"]["missing image"][0]["detail"]
    assert [e["key"] for e in report["examples"]["malformed json"]] == ["line 3"]
    assert [e["key"] for e in report["examples"]["missing concepts"]] == ["k3"]
    assert "--tag-captions" in report["examples"]["missing concepts"][0]["detail"]


# ---------------------------------------------------------------------------------------------
# Skips and damage
# ---------------------------------------------------------------------------------------------


def test_every_skip_reason_is_counted_with_example_keys(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    jpg = images["jpg"]
    samples = [
        wds("good0", jpg[0], {"caption": "ok", "classes": ["dog"]}),
        wds("broken", _truncated(jpg[1]), {"caption": "cut jpeg", "classes": ["dog"]}),
        wds("nocap", jpg[2], {"classes": ["dog"]}),
        wds("blank", jpg[3], {"caption": "   ", "classes": ["dog"]}),
        wds("alien", jpg[4], {"caption": "ufo", "classes": ["dog", "ufo"]}),
        wds("dupe0", jpg[5], {"caption": "first", "classes": [], "uid": "same"}),
        wds("dupe1", jpg[6], {"caption": "second", "classes": [], "uid": "same"}),
        wds("badjson", jpg[7], b'{"caption": "oops", "classes": [}'),
        wds("nojson", jpg[8], None, txt=b"txt only"),
        wds("noimage", None, {"caption": "no picture", "classes": ["cat"]}),
        wds("good1", jpg[9], {"caption": "ok too", "classes": ["cat"]}),
    ]
    tar = write_tar(tmp_path / "mixed.tar", samples)
    vocab = vocabulary_file(tmp_path / "vocab.json", ["dog", "cat"])
    report = run([tar], "webdataset", tmp_path / "out", vocabulary=vocab)

    assert report["read"] == 11
    assert report["written"] == 3
    assert report["skipped"] == {
        "undecodable image": 1,
        "missing caption": 2,
        "unknown concept": 1,
        "duplicate key": 1,
        "malformed json": 1,
        "missing image": 1,
        "missing concepts": 1,
        "over a size limit": 0,
        "bad numeric": 0,
    }
    assert list(report["skipped"]) == list(SKIP_REASONS)
    examples = {r: [e["key"] for e in shown] for r, shown in report["examples"].items()}
    assert examples == {
        "undecodable image": ["broken"],
        "missing caption": ["nocap", "blank"],
        "unknown concept": ["alien"],
        "duplicate key": ["same"],
        "malformed json": ["badjson"],
        "missing image": ["noimage"],
        "missing concepts": ["nojson"],
    }
    assert all(e["file"] == str(tar) and e["detail"] for s in report["examples"].values()
               for e in s)
    assert [r["key"] for r in read_back(tmp_path / "out")] == ["good0", "same", "good1"]


def test_truncated_tar_keeps_what_was_read_and_reports_the_file(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    jpg = images["jpg"]
    samples = [wds(f"{i:04d}", jpg[i], {"caption": f"c{i}", "classes": ["dog"]}) for i in range(4)]
    whole = write_tar(tmp_path / "whole.tar", samples).read_bytes()
    # Cut inside the image of the third sample: two whole samples, one cut, one lost.
    with tarfile.open(tmp_path / "whole.tar") as archive:
        third = next(m for m in archive.getmembers() if m.name == "0002.jpg")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: third.offset_data + len(jpg[2]) // 2])
    good = write_tar(tmp_path / "after.tar", [wds("later", jpg[5], {"caption": "x",
                                                                     "classes": ["cat"]})])
    report = run([cut, good], "webdataset", tmp_path / "out")

    assert report["read"] == 4 and report["written"] == 3
    # The cut sample lost its image half-way and never got to its json member.
    assert report["skipped"]["missing concepts"] == 1
    assert report["examples"]["missing concepts"][0]["key"] == "0002"
    assert len(report["errors"]) == 1
    assert report["errors"][0]["file"] == str(cut)
    assert "ReadError" in report["errors"][0]["error"]
    assert [r["key"] for r in read_back(tmp_path / "out")] == ["0000", "0001", "later"]


def test_tar_cut_at_a_member_boundary_is_reported_as_truncated(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    jpg = images["jpg"]
    samples = [wds(f"{i:04d}", jpg[i], {"caption": f"c{i}", "classes": ["dog"]}) for i in range(3)]
    whole = write_tar(tmp_path / "whole.tar", samples).read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as archive:
        boundary = next(m for m in archive.getmembers() if m.name == "0002.jpg").offset
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[:boundary])  # tarfile alone would call this a complete archive
    report = run([cut], "webdataset", tmp_path / "out")

    assert report["read"] == 2 and report["written"] == 2
    assert report["errors"][0]["file"] == str(cut)
    assert "truncated" in report["errors"][0]["error"]


def test_gzipped_tars_convert_and_a_cut_one_is_reported(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    def gz_tar(name: str, prefix: str) -> bytes:
        samples = [wds(f"{prefix}{i}", images["jpg"][i], {"caption": "c", "classes": ["dog"]})
                   for i in range(6)]
        return gzip.compress(write_tar(tmp_path / name, samples).read_bytes())

    (tmp_path / "whole.tar.gz").write_bytes(gz_tar("g.tar", "g"))
    cut = gz_tar("h.tar", "h")
    (tmp_path / "cut.tar.gz").write_bytes(cut[: len(cut) // 2])
    report = run([tmp_path / "whole.tar.gz", tmp_path / "cut.tar.gz"], "webdataset",
                 tmp_path / "out")

    assert [e["file"] for e in report["errors"]] == [str(tmp_path / "cut.tar.gz")]
    keys = [r["key"] for r in read_back(tmp_path / "out")]
    salvaged = keys[6:]
    assert keys[:6] == [f"g{i}" for i in range(6)]
    assert salvaged == [f"h{i}" for i in range(len(salvaged))] and len(salvaged) < 6
    assert report["read"] - report["written"] <= 1  # at most the sample at the cut


def test_empty_concept_list_is_kept(tmp_path: Path, images: dict[str, list[bytes]]) -> None:
    tar = write_tar(tmp_path / "e.tar", [
        wds("empty", images["jpg"][0], {"caption": "nothing detected", "classes": []}),
        wds("one", images["jpg"][1], {"caption": "a dog", "classes": ["dog"]}),
    ])
    report = run([tar], "webdataset", tmp_path / "out")

    assert report["written"] == 2
    assert report["concepts"]["instances"] == 1
    assert report["concepts"]["samples_without_concepts"] == 1
    rows = read_back(tmp_path / "out")
    assert [(r["key"], r["concepts"]) for r in rows] == [("empty", []), ("one", ["dog"])]


def test_non_utf8_caption_bytes_are_replaced_not_fatal(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    latin1_json = b'{"caption": "caf\xe9 au lait", "classes": ["cup"]}'
    tar = write_tar(tmp_path / "u.tar", [
        wds("txt", images["jpg"][0], {"classes": ["cup"]}, txt=b"na\xefve \xff caption"),
        wds("json", images["jpg"][1], latin1_json),
        wds("clean", images["jpg"][2], {"caption": "plain ascii", "classes": ["cup"]}),
    ])
    report = run([tar], "webdataset", tmp_path / "out")

    assert report["written"] == 3
    assert report["repaired"]["invalid utf-8"]["count"] == 2
    assert [e["key"] for e in report["repaired"]["invalid utf-8"]["examples"]] == ["txt", "json"]
    rows = read_back(tmp_path / "out")
    assert rows[0]["caption"] == "na\ufffdve \ufffd caption"
    assert rows[1]["caption"] == "caf\ufffd au lait"


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


def _concept_tar(tmp_path: Path, images: dict[str, list[bytes]]) -> Path:
    classes = [["cat", "dog"], ["dog", "bird"], ["dog"], ["ant", "bird"], ["zebra", "cat"]]
    return write_tar(tmp_path / "v.tar", [
        wds(f"s{i}", images["jpg"][i], {"caption": f"c{i}", "classes": c})
        for i, c in enumerate(classes)
    ])


def test_built_vocabulary_is_most_frequent_first_ties_by_name(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    report = run([_concept_tar(tmp_path, images)], "webdataset", tmp_path / "out")

    # dog 3, bird 2, cat 2, ant 1, zebra 1
    assert Vocabulary.load(str(tmp_path / "out")).names == ["dog", "bird", "cat", "ant", "zebra"]
    assert report["vocabulary"] == {"source": "built", "size": 5, "added": 5}


def test_fixed_vocabulary_keeps_its_ids_and_skips_unknown_names(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    vocab = vocabulary_file(tmp_path / "vocab.json", ["zebra", "cat", "dog", "bird"])
    report = run([_concept_tar(tmp_path, images)], "webdataset", tmp_path / "out",
                 vocabulary=vocab)

    assert report["skipped"]["unknown concept"] == 1
    assert report["examples"]["unknown concept"][0]["key"] == "s3"
    assert "'ant'" in report["examples"]["unknown concept"][0]["detail"]
    assert Vocabulary.load(str(tmp_path / "out")).names == ["zebra", "cat", "dog", "bird"]
    assert [r["key"] for r in read_back(tmp_path / "out")] == ["s0", "s1", "s2", "s4"]


def test_extend_vocabulary_appends_unknown_names_most_frequent_first(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    vocab = vocabulary_file(tmp_path / "vocab.json", ["zebra", "cat"])
    report = run([_concept_tar(tmp_path, images)], "webdataset", tmp_path / "out",
                 vocabulary=vocab, extend_vocabulary=True)

    assert report["written"] == 5 and report["skipped"]["unknown concept"] == 0
    assert Vocabulary.load(str(tmp_path / "out")).names == ["zebra", "cat", "dog", "bird", "ant"]
    assert report["vocabulary"] == {"source": "given", "size": 5, "added": 3}
    rows = read_back(tmp_path / "out")
    assert rows[3]["concepts"] == ["ant", "bird"]


def test_concepts_from_tags_splits_the_joined_string(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    tar = write_tar(tmp_path / "t.tar", [
        wds("a", images["jpg"][0], {"caption": "x", "classes": ["dog"], "tags": "dog | sofa"}),
        wds("b", images["jpg"][1], {"caption": "y", "classes": ["cat"], "tags": ""}),
        wds("c", images["jpg"][2], {"caption": "z", "classes": ["cat"]}),
    ])
    report = run([tar], "webdataset", tmp_path / "out", concepts_from="tags")

    assert report["skipped"]["missing concepts"] == 1
    assert "no 'tags' field" in report["examples"]["missing concepts"][0]["detail"]
    rows = read_back(tmp_path / "out")
    assert [(r["key"], r["concepts"]) for r in rows] == [("a", ["dog", "sofa"]), ("b", [])]


# ---------------------------------------------------------------------------------------------
# Parallel conversion, output handling, command line
# ---------------------------------------------------------------------------------------------


def _many_tars(tmp_path: Path, images: dict[str, list[bytes]]) -> list[Path]:
    jpg = images["jpg"]
    names = itertools.cycle(["dog", "cat", "bird", "ant"])
    tars = []
    for t in range(4):
        samples = [
            wds(f"t{t}-{i}", jpg[(4 * t + i) % len(jpg)],
                {"caption": f"tar {t} sample {i}", "classes": [next(names) for _ in range(i)]})
            for i in range(4)
        ]
        if t == 3:  # the key of tar 0's first sample again: a duplicate across workers
            samples.append(wds("late", jpg[0], {"caption": "dup", "classes": [], "uid": "t0-0"}))
        tars.append(write_tar(tmp_path / f"shard-{t:03d}.tar", samples))
    return tars


def test_two_workers_give_the_same_dataset_as_one(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    tars = _many_tars(tmp_path, images)
    one = run(tars, "webdataset", tmp_path / "one", workers=1)
    two = run(tars, "webdataset", tmp_path / "two", workers=2)

    assert two["parts"] == 2 and (tmp_path / "two" / "part-00001" / "index.json").exists()
    for field in ("read", "written", "skipped", "examples", "concepts", "vocabulary"):
        assert one[field] == two[field], field
    assert two["skipped"]["duplicate key"] == 1
    assert two["examples"]["duplicate key"][0]["file"] == str(tars[3])
    assert (tmp_path / "one" / "vocabulary.json").read_text() == (
        tmp_path / "two" / "vocabulary.json"
    ).read_text()
    assert read_back(tmp_path / "one") == read_back(tmp_path / "two")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_workers_do_not_inherit_a_lock_held_in_the_parent(
    tmp_path: Path, images: dict[str, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # CI hung for 87 minutes in the test above: forked workers inherit the parent's locks as they
    # are at the fork, and one held by another thread then is held for ever in the child. Here
    # the parent holds a module's lock that the tagger takes; a forked worker deadlocks on it,
    # a spawned one imports the module afresh.
    (tmp_path / "heldlock.py").write_text("import threading\nLOCK = threading.Lock()\n")
    (tmp_path / "locking.py").write_text(
        "import heldlock\n\ndef tag(image, caption):\n"
        "    with heldlock.LOCK:\n        return ['dog']\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import heldlock  # type: ignore[import-not-found]

    tars = _many_tars(tmp_path, images)
    with heldlock.LOCK:
        report = run(tars, "webdataset", tmp_path / "out", workers=2,
                     tagger=f"{tmp_path / 'locking.py'}:tag")
    assert report["written"] == 16 and report["parts"] == 2


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_worker_killed_mid_conversion_is_an_error_that_names_the_input_not_a_hang(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    # multiprocessing.Pool replaced a killed worker and waited for ever for the task it lost.
    (tmp_path / "killer.py").write_text(
        "import os, signal\n\ndef tag(image, caption):\n"
        "    if 'tar 2' in caption:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return ['dog']\n"
    )
    tars = _many_tars(tmp_path, images)
    with pytest.raises(ConversionError, match="worker process died") as err:
        run(tars, "webdataset", tmp_path / "out", workers=2,
            tagger=f"{tmp_path / 'killer.py'}:tag")
    assert "shard-00" in str(err.value) and "--workers 1" in str(err.value)
    assert not (tmp_path / "out" / "index.json").exists()


def test_max_samples_per_shard_starts_new_shards(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    tars = _many_tars(tmp_path, images)
    report = run(tars[:2], "webdataset", tmp_path / "out", max_samples_per_shard=3)

    assert report["written"] == 8 and report["shards"] == 3
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [3, 3, 2]


def test_compression_is_passed_to_the_writer(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    tars = _many_tars(tmp_path, images)
    run(tars[:1], "webdataset", tmp_path / "plain")
    run(tars[:1], "webdataset", tmp_path / "zstd", compression="zstd")

    index = json.loads((tmp_path / "zstd" / "index.json").read_text())
    assert index["shards"][0]["zip_data"]["basename"].endswith(".mds.zstd")
    assert read_back(tmp_path / "zstd") == read_back(tmp_path / "plain")


def test_non_empty_output_is_refused_unless_overwrite(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    tar = write_tar(tmp_path / "o.tar", [wds("a", images["jpg"][0], {"caption": "x",
                                                                      "classes": []})])
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ConversionError, match=r"not empty .*precious.txt.*--overwrite"):
        convert([str(tar)], "webdataset", str(out), progress=False)
    assert (out / "precious.txt").exists()

    report = run([tar], "webdataset", out, overwrite=True)
    assert report["written"] == 1 and not (out / "precious.txt").exists()


def test_overwrite_never_deletes_an_input_inside_the_output(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    tar = write_tar(out / "in.tar", [wds("a", images["jpg"][0], {"caption": "x", "classes": []})])
    with pytest.raises(ConversionError, match="inside --out"):
        convert([str(tar)], "webdataset", str(out), overwrite=True, progress=False)
    assert tar.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compression": "rar"}, "not an MDS compression"),
        ({"size_limit": "lots"}, "--size-limit 'lots'"),
        ({"vocabulary": "BAD"}, r"bad.json: not valid JSON"),
        ({"extend_vocabulary": True}, "pass --vocabulary FILE too"),
        ({"workers": 0}, "--workers must be at least 1"),
    ],
)
def test_bad_arguments_say_what_to_do(
    tmp_path: Path, images: dict[str, list[bytes]], kwargs: dict[str, Any], message: str
) -> None:
    tar = write_tar(tmp_path / "a.tar", [wds("a", images["jpg"][0], {"caption": "x",
                                                                      "classes": []})])
    if kwargs.get("vocabulary") == "BAD":
        (tmp_path / "bad.json").write_text("{not json")
        kwargs = {"vocabulary": str(tmp_path / "bad.json")}
    with pytest.raises(ConversionError, match=message):
        convert([str(tar)], "webdataset", str(tmp_path / "out"), progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_prints_the_report_and_exits_3_on_damaged_input(
    tmp_path: Path, images: dict[str, list[bytes]], capsys: pytest.CaptureFixture[str]
) -> None:
    tar = write_tar(tmp_path / "c.tar", [wds("a", images["jpg"][0], {"caption": "x",
                                                                      "classes": ["dog"]})])
    status = main(["--input", str(tar), "--format", "webdataset", "--out",
                   str(tmp_path / "ok"), "--no-progress"])
    printed = json.loads(capsys.readouterr().out)
    assert status == 0 and printed["written"] == 1

    samples = [wds(f"s{i}", images["jpg"][i], {"caption": "x", "classes": ["dog"]})
               for i in range(3)]
    whole = write_tar(tmp_path / "three.tar", samples)
    with tarfile.open(whole) as archive:
        last = next(m for m in archive.getmembers() if m.name == "s2.jpg")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[: last.offset_data + 100])  # two whole samples, one cut
    status = main(["--input", str(cut), "--format", "webdataset", "--out",
                   str(tmp_path / "damaged"), "--no-progress"])
    captured = capsys.readouterr()
    assert status == 3 and json.loads(captured.out)["errors"]
    assert json.loads(captured.out)["written"] == 2
    assert str(cut) in captured.err

    status = main(["--input", str(tmp_path / "nope.tar"), "--format", "webdataset", "--out",
                   str(tmp_path / "x"), "--no-progress"])
    assert status == 2 and "nope.tar does not exist" in capsys.readouterr().err


def test_shards_carry_hashes_that_streaming_validates(
    tmp_path: Path, images: dict[str, list[bytes]]
) -> None:
    """index.json records xxh64 per shard, and a reader with validate_hash accepts the shards."""
    tar = write_tar(tmp_path / "h.tar", [
        wds(f"k{i}", images["jpg"][i], {"caption": f"item {i}", "classes": ["dog"]})
        for i in range(3)
    ])
    run([tar], "webdataset", tmp_path / "out")
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert all("xxh64" in shard["raw_data"]["hashes"] for shard in index["shards"])
    dataset = StreamingDataset(
        local=str(tmp_path / "out"), batch_size=1, shuffle=False, validate_hash="xxh64"
    )
    assert [sample["key"] for sample in dataset] == ["k0", "k1", "k2"]

"""The converter under careless or hostile input: counted skips, clear errors, refusals.

One test per fault found by probing ``tools/convert_to_mds.py`` as a careless or hostile user
would (layouts it misread, types it mis-iterated, sizes it did not bound, paths it followed,
outputs two runs shared). Inputs are real files: the embedded sample's JPEGs, real tars, parquet
files, manifests, FIFOs and symbolic links. Tests that start processes or an S3 server are
marked ``slow``.
"""

from __future__ import annotations

import fcntl
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import read_back, wds, write_tar
from paths import ROOT
from PIL import Image

from cabs_streaming.cli.convert import build_parser, main
from cabs_streaming.concepts import Vocabulary
from cabs_streaming.converter import (
    EXIT_STATUSES,
    SKIP_REASONS,
    ConversionError,
    Limits,
    OutputBusy,
    convert,
)

CONVERT = str(ROOT / "tools" / "convert_to_mds.py")


@pytest.fixture(scope="module")
def jpegs(sample_jpegs: list[bytes]) -> list[bytes]:
    return sample_jpegs[:16]


def run(inputs: list[Path], fmt: str, out: Path, **kwargs: Any) -> dict[str, Any]:
    report = convert([str(p) for p in inputs], fmt, str(out), progress=False, **kwargs)
    assert report["read"] == report["written"] + sum(report["skipped"].values())
    assert json.loads((out / "report.json").read_text()) == report
    return report


def only_skip(report: dict[str, Any], reason: str) -> list[dict[str, str]]:
    """The examples of ``reason``, asserting that no other reason was counted."""
    assert {r: n for r, n in report["skipped"].items() if n} == {reason: report["skipped"][reason]}
    return report["examples"][reason]


def cli(*args: str) -> list[str]:
    return ["--format", "webdataset", *args, "--no-progress"]


# ---------------------------------------------------------------------------------------------
# WebDataset layouts (issue points 2 and 3)
# ---------------------------------------------------------------------------------------------


def _img2dataset_tar(path: Path, jpegs: list[bytes], n: int = 4) -> Path:
    captions = ["a dog on a sofa", "two cats", "a dog and a cat", "an empty road"]
    return write_tar(path, [
        (f"{i:09d}", {"jpg": jpegs[i], "txt": captions[i % 4].encode()}) for i in range(n)
    ])


def test_img2dataset_tars_of_jpg_and_txt_convert_with_tag_captions(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    tar = _img2dataset_tar(tmp_path / "00000.tar", jpegs)
    report = run([tar], "webdataset", tmp_path / "out", tag_captions="coco")

    assert report["read"] == report["written"] == 4 and report["warnings"] == []
    rows = read_back(tmp_path / "out")
    assert [r["caption"] for r in rows] == [
        "a dog on a sofa", "two cats", "a dog and a cat", "an empty road"
    ]
    assert [r["concepts"] for r in rows] == [["dog", "couch"], ["cat"], ["dog", "cat"], []]
    assert [r["image"] for r in rows] == jpegs[:4]


def test_jpg_and_txt_without_concepts_are_skipped_with_the_hint_and_do_not_exit_0(
    tmp_path: Path, jpegs: list[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    tar = _img2dataset_tar(tmp_path / "00000.tar", jpegs)
    status = main(cli("--input", str(tar), "--out", str(tmp_path / "out")))
    captured = capsys.readouterr()
    report = json.loads(captured.out)

    assert status == 4 and report["written"] == 0
    examples = only_skip(report, "missing concepts")
    assert "no .json member" in examples[0]["detail"]
    assert "--tag-captions VOCABULARY" in examples[0]["detail"]
    assert "no sample was written; 4 of 4 were skipped as 'missing concepts'" in captured.err
    assert report["warnings"][0].startswith("no sample was written")

    status = main(cli("--input", str(tar), "--out", str(tmp_path / "accepted"), "--accept-skips"))
    assert status == 0 and json.loads(capsys.readouterr().out)["written"] == 0


def test_most_of_the_input_skipped_for_one_reason_exits_4(
    tmp_path: Path, jpegs: list[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    samples = [wds(f"k{i}", jpegs[i], {"caption": "c", "classes": ["dog"]}) for i in range(3)]
    samples += [wds(f"n{i}", jpegs[i + 3], {"caption": "c"}) for i in range(4)]
    tar = write_tar(tmp_path / "mostly.tar", samples)
    status = main(cli("--input", str(tar), "--out", str(tmp_path / "out")))
    captured = capsys.readouterr()

    assert status == 4 and json.loads(captured.out)["written"] == 3
    assert "4 of 7 samples (57%) were skipped as 'missing concepts'" in captured.err


def test_caption_members_and_cls_concepts(tmp_path: Path, jpegs: list[bytes]) -> None:
    tar = write_tar(tmp_path / "cls.tar", [
        ("a", {"jpg": jpegs[0], "caption": b"from a .caption member", "cls": b"2\n"}),
        ("b", {"jpg": jpegs[1], "txt": b"from .txt", "cls": b"dog\ncat\n"}),
        ("c", {"jpg": jpegs[2], "txt": b"no cls member"}),
    ])
    vocab = tmp_path / "vocab.json"
    vocab.write_text(Vocabulary(["dog", "cat", "bird"]).to_json())
    report = run([tar], "webdataset", tmp_path / "out", concepts_from="cls", vocabulary=vocab)

    assert report["written"] == 2
    assert "no .cls member" in only_skip(report, "missing concepts")[0]["detail"]
    rows = read_back(tmp_path / "out")
    assert [(r["caption"], r["concepts"]) for r in rows] == [
        ("from a .caption member", ["bird"]), ("from .txt", ["dog", "cat"])
    ]


def test_the_same_key_twice_in_a_row_is_read_and_skipped_as_a_duplicate(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    samples = [
        wds("a", jpegs[0], {"caption": "first a", "classes": ["dog"]}),
        wds("a", jpegs[1], {"caption": "second a", "classes": ["cat"]}),
        wds("b", jpegs[2], {"caption": "b", "classes": ["cat"]}),
    ]
    report = run([write_tar(tmp_path / "dup.tar", samples)], "webdataset", tmp_path / "out")

    assert report["read"] == 3 and report["written"] == 2 and report["errors"] == []
    assert [e["key"] for e in only_skip(report, "duplicate key")] == ["a"]
    rows = read_back(tmp_path / "out")
    assert [(r["key"], r["caption"]) for r in rows] == [("a", "first a"), ("b", "b")]


def test_members_of_a_sample_that_are_not_adjacent_count_once_and_are_reported(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    tar = tmp_path / "scattered.tar"
    with tarfile.open(tar, "w") as archive:
        for name, data in [
            ("a.jpg", jpegs[0]), ("b.jpg", jpegs[1]),
            ("a.json", b'{"caption": "a", "classes": []}'),
            ("b.json", b'{"caption": "b", "classes": []}'),
            ("c.jpg", jpegs[2]), ("c.json", b'{"caption": "c", "classes": []}'),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    report = run([tar], "webdataset", tmp_path / "out")

    assert report["read"] == 3 and report["written"] == 1  # a, b (both without json) and c
    assert report["skipped"]["missing concepts"] == 2
    assert [e["file"] for e in report["errors"]] == [str(tar)]
    assert "2 run(s) of members belong to a sample seen earlier" in report["errors"][0]["error"]
    assert "'a', 'b'" in report["errors"][0]["error"]


# ---------------------------------------------------------------------------------------------
# Parquet column types (issue points 4 and 5)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "shown"),
    [
        (pa.array(["dog", "cat"]), "string"),
        (pa.array([0.0, 1.0]), "double"),
        (pa.array([{"name": "dog"}, {"name": "cat"}]), "struct<name: string>"),
        (pa.array([[0.5], [1.5]]), "list<element: double>"),
    ],
)
def test_parquet_concept_columns_of_other_types_are_refused_saying_what_is_accepted(
    tmp_path: Path, jpegs: list[bytes], column: pa.Array, shown: str
) -> None:
    table = pa.table({"image": jpegs[:2], "caption": ["a", "b"], "concepts": column})
    pq.write_table(table, tmp_path / "t.parquet")
    with pytest.raises(ConversionError) as caught:
        convert([str(tmp_path / "t.parquet")], "parquet", str(tmp_path / "out"), progress=False)
    message = str(caught.value)
    assert f"column 'concepts' is {shown}, but --concepts-column needs" in message
    assert "list<string>, list<int64>" in message and "one integer id per row" in message


def test_parquet_integer_concepts_are_one_id_per_row_and_0_is_an_id(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    table = pa.table({"image": jpegs[:3], "caption": ["a", "b", "c"],
                      "concepts": pa.array([0, None, 2], type=pa.int16())})
    pq.write_table(table, tmp_path / "t.parquet")
    vocab = tmp_path / "vocab.json"
    vocab.write_text(Vocabulary(["dog", "cat", "bird"]).to_json())
    report = run([tmp_path / "t.parquet"], "parquet", tmp_path / "out", vocabulary=vocab)

    assert report["written"] == 3
    assert [r["concepts"] for r in read_back(tmp_path / "out")] == [["dog"], [], ["bird"]]


def test_parquet_list_of_strings_concepts_are_names_not_characters(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    table = pa.table({"image": jpegs[:2], "caption": ["a", "b"],
                      "concepts": pa.array([["dog"], ["hot dog", "cat"]],
                                           type=pa.large_list(pa.large_string()))})
    pq.write_table(table, tmp_path / "t.parquet")
    run([tmp_path / "t.parquet"], "parquet", tmp_path / "out")
    assert [r["concepts"] for r in read_back(tmp_path / "out")] == [["dog"], ["hot dog", "cat"]]


def test_parquet_image_path_strings_are_read_as_files_confined_to_its_folder(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    (tmp_path / "data" / "img").mkdir(parents=True)
    (tmp_path / "data" / "img" / "0.jpg").write_bytes(jpegs[0])
    (tmp_path / "outside.jpg").write_bytes(jpegs[1])
    table = pa.table({"image": ["img/0.jpg", "../outside.jpg"], "caption": ["in", "out"],
                      "concepts": [["dog"], ["cat"]]})
    pq.write_table(table, tmp_path / "data" / "t.parquet")
    report = run([tmp_path / "data" / "t.parquet"], "parquet", tmp_path / "out")

    assert report["written"] == 1
    assert "outside" in only_skip(report, "missing image")[0]["detail"]
    assert [r["image"] for r in read_back(tmp_path / "out")] == [jpegs[0]]


def test_a_numeric_parquet_caption_column_is_refused(tmp_path: Path, jpegs: list[bytes]) -> None:
    table = pa.table({"image": jpegs[:2], "caption": [5.5, float("nan")], "concepts": [[], []]})
    pq.write_table(table, tmp_path / "t.parquet")
    with pytest.raises(ConversionError, match=r"column 'caption' is double, but --caption-column "
                       r"needs text"):
        convert([str(tmp_path / "t.parquet")], "parquet", str(tmp_path / "out"), progress=False)


# ---------------------------------------------------------------------------------------------
# Values (issue points 7 and 8)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["NaN", "Infinity", "-0.5", "70000", "1.5"])
def test_scores_that_are_not_confidences_are_refused(
    tmp_path: Path, jpegs: list[bytes], score: str
) -> None:
    (tmp_path / "a.jpg").write_bytes(jpegs[0])
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"image": "a.jpg", "caption": "x", "concepts": ["dog", "cat"], '
        f'"scores": [0.5, {score}]}}\n'
        '{"image": "a.jpg", "key": "ok", "caption": "y", "concepts": ["dog"], "scores": [1]}\n'
    )
    report = run([manifest], "jsonl", tmp_path / "out")

    assert report["written"] == 1
    detail = only_skip(report, "malformed json")[0]["detail"]
    assert "scores are confidences, finite numbers in [0, 1]" in detail


@pytest.mark.parametrize("caption", ["\x00\x01\x02", "\u200b\u200e \t", "\x1b\x07\u00a0"])
def test_captions_of_only_control_characters_are_missing(
    tmp_path: Path, jpegs: list[bytes], caption: str
) -> None:
    tar = write_tar(tmp_path / "c.tar", [
        wds("blank", jpegs[0], {"caption": caption, "classes": []}),
        wds("fine", jpegs[1], {"caption": "a\x00b", "classes": []}),
    ])
    report = run([tar], "webdataset", tmp_path / "out")
    assert [e["key"] for e in only_skip(report, "missing caption")] == ["blank"]


def test_a_caption_that_is_not_a_string_is_malformed(tmp_path: Path, jpegs: list[bytes]) -> None:
    tar = write_tar(tmp_path / "n.tar", [wds("n", jpegs[0], {"caption": 5.5, "classes": []}),
                                         wds("ok", jpegs[1], {"caption": "ok", "classes": []})])
    report = run([tar], "webdataset", tmp_path / "out")
    assert "'caption' must be a string, got float" in only_skip(report, "malformed json")[0][
        "detail"]


def test_deeply_nested_json_is_a_counted_skip_not_a_crash(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    deep = b'{"caption": "x", "classes": []' + b', "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    tar = write_tar(tmp_path / "deep.tar", [wds("deep", jpegs[0], deep),
                                            wds("ok", jpegs[1], {"caption": "ok", "classes": []})])
    report = run([tar], "webdataset", tmp_path / "tar-out")
    assert "nested too deeply" in only_skip(report, "malformed json")[0]["detail"]

    (tmp_path / "a.jpg").write_bytes(jpegs[0])
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(deep.replace(b'"caption"', b'"image": "a.jpg", "caption"') + b"\n"
                         + b'{"image": "a.jpg", "caption": "y", "concepts": []}\n')
    report = run([manifest], "jsonl", tmp_path / "jsonl-out")
    assert report["written"] == 1
    assert only_skip(report, "malformed json")[0]["key"] == "line 1"


# ---------------------------------------------------------------------------------------------
# Size limits (issue point 11)
# ---------------------------------------------------------------------------------------------


def test_members_over_the_member_limit_are_skipped_unread(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    big = max(jpegs, key=len)
    small = min(jpegs, key=len)
    limit = (len(big) + len(small)) // 2
    samples = [wds("big", big, {"caption": "x", "classes": []}),
               wds("bigjson", small, {"caption": "y" * limit, "classes": []}),
               wds("ok", small, {"caption": "z", "classes": []})]
    raw = write_tar(tmp_path / "s.tar", samples).read_bytes()
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(raw))
    report = run([tmp_path / "s.tar.gz"], "webdataset", tmp_path / "out",
                 limits=Limits(max_member_bytes=limit))

    examples = only_skip(report, "over a size limit")
    assert [e["key"] for e in examples] == ["big", "bigjson"]
    assert examples[0]["detail"] == (
        f"member big.jpg is {len(big):,} bytes, over --max-member-bytes {limit:,}")
    assert "member bigjson.json is" in examples[1]["detail"]
    assert report["limits"]["max_member_bytes"] == limit


def test_an_image_over_the_pixel_limit_is_skipped_before_decoding(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    buffer = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buffer, format="PNG")  # 17 KB, 144 megapixels
    tar = write_tar(tmp_path / "bomb.tar", [
        wds("bomb", buffer.getvalue(), {"caption": "x", "classes": []}, ext="png"),
        wds("ok", jpegs[0], {"caption": "y", "classes": []}),
    ])
    report = run([tar], "webdataset", tmp_path / "out")
    detail = only_skip(report, "over a size limit")[0]["detail"]
    assert detail == ("the image is 12,000 x 12,000 = 144,000,000 pixels, over "
                      "--max-image-pixels 89,478,485")

    small = run([tar], "webdataset", tmp_path / "small", limits=Limits(max_image_pixels=1000))
    assert small["skipped"]["over a size limit"] == 2  # the 64 x 64 JPEG too


def test_captions_over_the_caption_limit_are_skipped(tmp_path: Path, jpegs: list[bytes]) -> None:
    tar = write_tar(tmp_path / "c.tar", [
        wds("long", jpegs[0], {"caption": "é" * 60, "classes": []}),
        wds("longre", jpegs[1], {"caption": "x", "recap": "y" * 101, "classes": []}),
        wds("ok", jpegs[2], {"caption": "z" * 100, "classes": []}),
    ])
    report = run([tar], "webdataset", tmp_path / "out", limits=Limits(max_caption_bytes=100))
    examples = only_skip(report, "over a size limit")
    assert [e["detail"] for e in examples] == [
        "the caption is 120 bytes, over --max-caption-bytes 100",
        "the recaption is 101 bytes, over --max-caption-bytes 100",
    ]


def test_a_manifest_line_over_the_limit_is_skipped_and_the_next_lines_read(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    (tmp_path / "a.jpg").write_bytes(jpegs[0])
    line = json.dumps({"image": "a.jpg", "caption": "c" * 5000, "concepts": []})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(line + "\n" + json.dumps(
        {"image": "a.jpg", "caption": "short", "concepts": []}) + "\n")
    report = run([manifest], "jsonl", tmp_path / "out", limits=Limits(max_member_bytes=4096))
    examples = only_skip(report, "over a size limit")
    assert [(e["key"], e["detail"]) for e in examples] == [
        ("line 1", "the line is over --max-member-bytes 4,096")
    ]
    assert [r["caption"] for r in read_back(tmp_path / "out")] == ["short"]


@pytest.fixture()
def watchdog() -> Iterator[None]:
    """Fail (instead of hanging the session) if the code under test blocks for 30 s."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError("blocked for 30 s: something opened a FIFO or a device")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 30)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def test_fifos_and_devices_named_as_images_are_refused_without_reading(
    tmp_path: Path, jpegs: list[bytes], watchdog: None
) -> None:
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    (tmp_path / "a.jpg").write_bytes(jpegs[0])
    lines = [{"image": name, "caption": "c", "concepts": []}
             for name in ("fifo.jpg", "dir.jpg", "zero.jpg", "/dev/zero", "a.jpg")]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = run([manifest], "jsonl", tmp_path / "out", image_roots=["/dev"])

    details = [e["detail"] for e in only_skip(report, "missing image")]
    assert details == [
        f"image path {tmp_path / 'fifo.jpg'} is not a regular file",
        f"image path {tmp_path / 'dir.jpg'} is not a regular file",
        f"image path {tmp_path / 'zero.jpg'} is not a regular file",
        "image path /dev/zero is not a regular file",
    ]


# ---------------------------------------------------------------------------------------------
# Confinement (issue point 12)
# ---------------------------------------------------------------------------------------------


def test_manifest_paths_that_leave_its_folder_are_refused_unless_allowed(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    (tmp_path / "set").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.jpg").write_bytes(jpegs[1])
    (tmp_path / "set" / "in.jpg").write_bytes(jpegs[0])
    (tmp_path / "set" / "link.jpg").symlink_to(tmp_path / "elsewhere" / "x.jpg")
    (tmp_path / "set" / "inner-link.jpg").symlink_to("in.jpg")
    names = ["in.jpg", "../elsewhere/x.jpg", str(tmp_path / "elsewhere" / "x.jpg"), "link.jpg",
             "/etc/passwd", "/proc/self/environ", "inner-link.jpg"]
    manifest = tmp_path / "set" / "m.jsonl"
    manifest.write_text("".join(
        json.dumps({"image": name, "caption": "c", "concepts": [], "key": str(i)}) + "\n"
        for i, name in enumerate(names)
    ))
    report = run([manifest], "jsonl", tmp_path / "out")

    examples = only_skip(report, "missing image")
    assert [e["key"] for e in examples] == ["1", "2", "3", "4", "5"]
    assert all("outside" in e["detail"] and "--image-root" in e["detail"] for e in examples)
    assert [r["key"] for r in read_back(tmp_path / "out")] == ["0", "6"]

    allowed = run([manifest], "jsonl", tmp_path / "allowed",
                  image_roots=[tmp_path / "elsewhere"])
    assert [e["key"] for e in allowed["examples"]["missing image"]] == ["4", "5"]
    assert allowed["written"] == 5
    with pytest.raises(ConversionError, match="--image-root .*nope is not a folder"):
        convert([str(manifest)], "jsonl", str(tmp_path / "x"), image_roots=[tmp_path / "nope"],
                progress=False)


# ---------------------------------------------------------------------------------------------
# One conversion per output (issue point 1)
# ---------------------------------------------------------------------------------------------


def _small_tar(tmp_path: Path, jpegs: list[bytes], name: str = "in.tar") -> Path:
    return write_tar(tmp_path / name, [
        wds(f"{Path(name).stem}-{i}", jpegs[i], {"caption": f"dog {i}", "classes": ["dog"]})
        for i in range(3)
    ])


def test_an_output_folder_locked_by_another_conversion_is_refused(
    tmp_path: Path, jpegs: list[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    tar = _small_tar(tmp_path, jpegs)
    out = tmp_path / "out"
    out.mkdir()
    holder = os.open(out, os.O_RDONLY | os.O_DIRECTORY)  # what a running conversion holds
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(OutputBusy, match=r"being written by another conversion"):
            convert([str(tar)], "webdataset", str(out), progress=False)
        assert main(cli("--input", str(tar), "--out", str(out))) == 5
        assert "another conversion" in capsys.readouterr().err
        assert os.listdir(out) == []
    finally:
        os.close(holder)
    assert run([tar], "webdataset", out)["written"] == 3  # free again


BLOCKING_TAGGER = """
import os, time

def tag(image, caption):
    open(os.environ["CABS_TEST_HOLDING"], "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(os.environ["CABS_TEST_RELEASE"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return ["dog"]
"""


def _start_holding(tmp_path: Path, tar: Path, out: str) -> tuple[subprocess.Popen[str], Path]:
    """A real conversion process into ``out`` that waits inside its scan until released."""
    (tmp_path / "blocking.py").write_text(BLOCKING_TAGGER)
    holding, release = tmp_path / "holding", tmp_path / "release"
    env = {**os.environ, "CABS_TEST_HOLDING": str(holding), "CABS_TEST_RELEASE": str(release)}
    process = subprocess.Popen(
        [sys.executable, CONVERT, *cli("--input", str(tar), "--out", out,
                                        "--tagger", f"{tmp_path / 'blocking.py'}:tag")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 180
    while not holding.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the first conversion never started its scan"
        time.sleep(0.1)
    return process, release


@pytest.mark.slow
def test_a_second_conversion_into_a_folder_being_written_stops_with_status_5(
    tmp_path: Path, jpegs: list[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    first, release = _start_holding(tmp_path, _small_tar(tmp_path, jpegs, "first.tar"),
                                    str(tmp_path / "out"))
    try:
        second = _small_tar(tmp_path, jpegs, "second.tar")
        assert main(cli("--input", str(second), "--out", str(tmp_path / "out"))) == 5
        assert "being written by another conversion" in capsys.readouterr().err
    finally:
        release.touch()
        stdout, stderr = first.communicate(timeout=180)
    assert first.returncode == 0, stderr
    assert json.loads(stdout)["written"] == 3
    assert [r["key"] for r in read_back(tmp_path / "out")] == [f"first-{i}" for i in range(3)]


@pytest.fixture(scope="module")
def s3(s3: Any) -> Any:
    """The session's S3 server (``conftest.py``) with this module's bucket."""
    s3.make_bucket("locks")
    return s3


@pytest.mark.slow
def test_an_s3_output_is_locked_while_a_conversion_writes_it(
    s3: Any, tmp_path: Path, jpegs: list[bytes]
) -> None:
    out = "s3://locks/busy"
    first, release = _start_holding(tmp_path, _small_tar(tmp_path, jpegs, "first.tar"), out)
    try:
        (lock,) = s3.keys("locks", "busy/.convert-lock/")
        with pytest.raises(OutputBusy, match=r"--out s3://locks/busy is locked by pid \d+ on "):
            convert([str(_small_tar(tmp_path, jpegs, "second.tar"))], "webdataset", out,
                    progress=False)
    finally:
        release.touch()
        stdout, stderr = first.communicate(timeout=180)
    assert first.returncode == 0, stderr
    keys = s3.keys("locks", "busy/")
    assert lock not in keys and not any(".convert-lock" in key for key in keys)
    assert "busy/index.json" in keys and json.loads(stdout)["written"] == 3


@pytest.mark.slow
def test_a_lock_left_by_a_crashed_s3_conversion_is_named_and_can_be_broken(
    s3: Any, tmp_path: Path, jpegs: list[bytes]
) -> None:
    stale = "stale/.convert-lock/20250101T000000Z-dead.json"
    s3.client().put_object(Bucket="locks", Key=stale, Body=json.dumps(
        {"host": "gone-host", "pid": 4242, "started": "2025-01-01 00:00:00 UTC"}).encode())
    tar = _small_tar(tmp_path, jpegs)
    with pytest.raises(OutputBusy, match=r"locked by pid 4242 on gone-host, started 2025-01-01"
                       r".*--break-lock"):
        convert([str(tar)], "webdataset", "s3://locks/stale", progress=False)
    report = convert([str(tar)], "webdataset", "s3://locks/stale", break_lock=True,
                     progress=False)
    assert report["written"] == 3
    assert not any(".convert-lock" in key for key in s3.keys("locks", "stale/"))


# ---------------------------------------------------------------------------------------------
# Exit statuses, workers, per-concept counts, help (issue 12's "your own data")
# ---------------------------------------------------------------------------------------------


def test_ctrl_c_exits_130_not_a_documented_done_status(
    tmp_path: Path, jpegs: list[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "interrupt.py").write_text(
        "def tag(image, caption):\n    raise KeyboardInterrupt\n")
    tar = _small_tar(tmp_path, jpegs)
    status = main(cli("--input", str(tar), "--out", str(tmp_path / "out"),
                      "--tagger", f"{tmp_path / 'interrupt.py'}:tag"))
    assert status == 130 and "interrupted" in capsys.readouterr().err
    assert set(EXIT_STATUSES) == {0, 1, 2, 3, 4, 5, 130}
    assert "damaged" in EXIT_STATUSES[3] and "crashed" in EXIT_STATUSES[1]


def test_more_workers_than_input_files_is_said(
    tmp_path: Path, jpegs: list[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    tar = _small_tar(tmp_path, jpegs)
    assert main(cli("--input", str(tar), "--out", str(tmp_path / "out"), "--workers", "2")) == 0
    captured = capsys.readouterr()
    warning = json.loads(captured.out)["warnings"][0]
    assert "--workers 2, but there are 1 input file(s)" in warning
    assert "1 process(es) ran" in warning
    assert warning in captured.err


def test_report_counts_samples_and_instances_per_concept_id(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    classes = [["dog", "dog", "cat"], ["dog"], ["bird"], [], ["cat", "cat"]]
    tar = write_tar(tmp_path / "c.tar", [
        wds(f"s{i}", jpegs[i], {"caption": "c", "classes": c}) for i, c in enumerate(classes)
    ])
    vocab = tmp_path / "vocab.json"
    vocab.write_text(Vocabulary(["cat", "dog", "bird", "zebra"]).to_json())
    concepts = run([tar], "webdataset", tmp_path / "out", vocabulary=vocab)["concepts"]

    assert concepts["per_concept"] == {"samples": [2, 2, 1, 0], "instances": [3, 3, 1, 0]}
    assert (concepts["distinct"], concepts["unused"]) == (3, 1)
    assert [(c["concept"], c["samples"]) for c in concepts["head"]] == [
        ("cat", 2), ("dog", 2), ("bird", 1)
    ]
    assert [c["concept"] for c in concepts["tail"]] == ["bird", "cat", "dog"]


def test_help_shows_every_option_with_a_description_and_its_default() -> None:
    from cabs_streaming.cli import tag

    for parser in (build_parser(), tag.build_parser()):
        for action in parser._actions:
            if action.dest == "help":
                continue
            text = action.help or ""
            assert len(text) > 15, (parser.prog, action.dest)
            if action.option_strings:
                assert "(default" in text or "(required)" in text, (parser.prog, action.dest)
    help_text = build_parser().format_help()
    for code, meaning in EXIT_STATUSES.items():
        assert f"{code:>3}  {meaning[:30]}" in help_text


@pytest.mark.parametrize("flag", ["--max-member-bytes", "--max-caption-bytes",
                                  "--max-image-pixels"])
def test_a_limit_that_is_not_positive_is_an_argument_error(
    tmp_path: Path, jpegs: list[bytes], capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    tar = _small_tar(tmp_path, jpegs)
    assert main(cli("--input", str(tar), "--out", str(tmp_path / "out"), flag, "0")) == 2
    assert f"{flag} must be a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_every_skip_reason_is_in_the_report_in_order(tmp_path: Path, jpegs: list[bytes]) -> None:
    report = run([_small_tar(tmp_path, jpegs)], "webdataset", tmp_path / "out")
    assert list(report["skipped"]) == list(SKIP_REASONS)
    assert {"missing concepts", "over a size limit"} <= set(SKIP_REASONS)


@pytest.mark.slow
def test_a_conversion_into_a_bucket_root_is_not_refused_for_its_own_lock(
    s3: Any, tmp_path: Path, jpegs: list[bytes]
) -> None:
    s3.make_bucket("whole-bucket")
    report = convert([str(_small_tar(tmp_path, jpegs))], "webdataset", "s3://whole-bucket",
                     progress=False)
    assert report["written"] == 3
    assert "index.json" in s3.keys("whole-bucket") and not any(
        key.startswith(".convert-lock/") for key in s3.keys("whole-bucket")
    )

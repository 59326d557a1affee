"""Property tests of the converter's readers: whatever the input, nothing escapes or is lost.

Hypothesis draws random bytes in every format, random tar layouts (keys, extensions, member
contents, order, compression, truncation), random parquet column types and random manifest
lines. Every conversion must either stop with a ``ConversionError`` (a message for the user) or
finish with a report where ``read == written + skipped``, and what was written must read back.
Examples are derandomized, so every run checks the same inputs.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import read_back
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cabs_streaming.converter import FORMATS, ConversionError, Limits, convert

FUZZ = settings(
    derandomize=True,
    deadline=None,
    max_examples=120,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def jpeg(sample_jpegs: list[bytes]) -> bytes:
    return sample_jpegs[0]


@contextmanager
def workdir() -> Iterator[Path]:
    """A fresh folder per example (pytest's ``tmp_path`` is one per test, not per example)."""
    with tempfile.TemporaryDirectory(prefix="cabs-fuzz-") as folder:
        yield Path(folder)


def convert_checked(paths: list[Path], fmt: str, out: Path, **kwargs: Any) -> dict[str, Any] | None:
    """Convert; None for a ConversionError, else the report after checking its invariants."""
    try:
        report = convert([str(p) for p in paths], fmt, str(out), progress=False, **kwargs)
    except ConversionError as err:
        assert str(err), "an error without a message"
        return None
    assert report["read"] == report["written"] + sum(report["skipped"].values())
    assert all(e["file"] and e["error"] for e in report["errors"])
    if report["written"]:
        rows = read_back(out)
        assert len(rows) == report["written"]
        assert len({r["key"] for r in rows}) == len(rows), "written keys are unique"
    return report


SUFFIX = {"webdataset": ".tar", "parquet": ".parquet", "jsonl": ".jsonl"}


@FUZZ
@given(data=st.binary(max_size=3000), fmt=st.sampled_from(FORMATS), gz=st.booleans())
def test_random_bytes_in_every_format(data: bytes, fmt: str, gz: bool) -> None:
    with workdir() as tmp:
        path = tmp / f"input{SUFFIX[fmt]}"
        path.write_bytes(gzip.compress(data) if gz and fmt == "webdataset" else data)
        convert_checked([path], fmt, tmp / "out")


# ---------------------------------------------------------------------------------------------
# Tar layouts
# ---------------------------------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "dir/a", "x.y"])
EXTENSIONS = st.sampled_from(["jpg", "png", "json", "txt", "caption", "cls", "JPG", "bin", ""])
JSON_BODIES = st.sampled_from([
    b'{"caption": "a dog", "classes": ["dog"]}',
    b'{"caption": "two", "classes": ["dog", "cat"], "scores": [0.5, 0.25]}',
    b'{"caption": "nan", "classes": ["dog"], "scores": [NaN]}',
    b'{"classes": []}',
    b'{"caption": 5, "classes": []}',
    b'{"caption": "x", "classes": [1, null, ""]}',
    b'{"caption": "x", "tags": "dog | cat"}',
    b'{"caption": "u", "uid": "a", "classes": ["cat"]}',
    b"[" * 5000 + b"]" * 5000,
    b"\xff\xfe not json",
    b"",
])


@st.composite
def tar_members(draw: st.DrawFn, jpeg: bytes) -> list[tuple[str, bytes]]:
    members = []
    for _ in range(draw(st.integers(0, 12))):
        key, ext = draw(KEYS), draw(EXTENSIONS)
        name = f"{key}.{ext}" if ext else key
        body = draw(st.one_of(
            st.just(jpeg), st.just(jpeg[: len(jpeg) // 2]), JSON_BODIES,
            st.binary(max_size=64), st.text(max_size=40).map(str.encode),
        ))
        members.append((name, body))
    return members


@FUZZ
@given(data=st.data(), gz=st.booleans(), cut=st.one_of(st.none(), st.floats(0, 1)),
       concepts_from=st.sampled_from(["classes", "tags", "cls"]), tag=st.booleans())
def test_random_tar_layouts(
    jpeg: bytes, data: st.DataObject, gz: bool, cut: float | None, concepts_from: str, tag: bool
) -> None:
    members = data.draw(tar_members(jpeg))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, body in members:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            archive.addfile(info, io.BytesIO(body))
    raw = buffer.getvalue()
    if cut is not None:
        raw = raw[: int(len(raw) * cut)]
    with workdir() as tmp:
        path = tmp / ("s.tar.gz" if gz else "s.tar")
        path.write_bytes(gzip.compress(raw) if gz else raw)
        options = {"tag_captions": "coco"} if tag else {"concepts_from": concepts_from}
        report = convert_checked([path], "webdataset", tmp / "out",
                                 limits=Limits(max_member_bytes=4096), **options)
        assert report is not None, "a tar never raises: damage is counted and reported"
        assert report["read"] <= len(members)


# ---------------------------------------------------------------------------------------------
# Parquet column types
# ---------------------------------------------------------------------------------------------


def _columns(jpeg: bytes) -> dict[str, st.SearchStrategy[pa.Array]]:
    """Strategies for columns of 3 rows in the types real parquet files hold."""
    n = 3
    texts = st.lists(st.one_of(st.none(), st.text(max_size=12)), min_size=n, max_size=n)
    ints = st.lists(st.one_of(st.none(), st.integers(-3, 2**40)), min_size=n, max_size=n)
    return {
        "string": texts.map(lambda v: pa.array(v, type=pa.string())),
        "large_string": texts.map(lambda v: pa.array(v, type=pa.large_string())),
        "binary": st.lists(st.sampled_from([jpeg, b"", b"junk", None]), min_size=n,
                           max_size=n).map(lambda v: pa.array(v, type=pa.binary())),
        "int": ints.map(lambda v: pa.array(v, type=pa.int64())),
        "uint8": st.lists(st.integers(0, 255), min_size=n, max_size=n).map(
            lambda v: pa.array(v, type=pa.uint8())),
        "float": st.lists(st.floats(allow_nan=True), min_size=n, max_size=n).map(pa.array),
        "bool": st.lists(st.booleans(), min_size=n, max_size=n).map(pa.array),
        "null": st.just(pa.nulls(n)),
        "list<int>": st.lists(st.one_of(st.none(), st.lists(st.integers(-2, 5), max_size=3)),
                              min_size=n, max_size=n).map(lambda v: pa.array(
                                  v, type=pa.list_(pa.int32()))),
        "list<string>": st.lists(st.lists(st.sampled_from(["dog", "Cats", "", "ufo"]),
                                          max_size=3), min_size=n, max_size=n).map(
                                              lambda v: pa.array(v, type=pa.list_(pa.string()))),
        "list<float>": st.just(pa.array([[0.5], [], None], type=pa.list_(pa.float32()))),
        "struct": st.just(pa.array([{"bytes": jpeg, "path": None}, {"bytes": None,
                                                                    "path": "x.jpg"}, None])),
        "dictionary": texts.map(lambda v: pa.array(v, type=pa.string()).dictionary_encode()),
    }


@FUZZ
@given(data=st.data(), vocabulary=st.booleans())
def test_random_parquet_column_types(
    jpeg: bytes, data: st.DataObject, vocabulary: bool
) -> None:
    columns = _columns(jpeg)
    names = st.sampled_from(sorted(columns))
    table = pa.table({
        "image": data.draw(st.sampled_from(["binary", "struct", "string", "int", "null"])
                           .flatmap(lambda k: columns[k])),
        "caption": data.draw(names.flatmap(lambda k: columns[k])),
        "concepts": data.draw(names.flatmap(lambda k: columns[k])),
        "key": data.draw(st.sampled_from(["string", "int", "float", "null"])
                         .flatmap(lambda k: columns[k])),
    })
    with workdir() as tmp:
        (tmp / "x.jpg").write_bytes(jpeg)
        pq.write_table(table, tmp / "t.parquet")
        vocab = tmp / "vocabulary.json"
        vocab.write_text(json.dumps({"version": 1, "concepts": ["dog", "cat", "bird"]}))
        convert_checked([tmp / "t.parquet"], "parquet", tmp / "out",
                        vocabulary=str(vocab) if vocabulary else None)


# ---------------------------------------------------------------------------------------------
# Manifest lines
# ---------------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)
IMAGE_PATHS = st.sampled_from(["a.jpg", "../a.jpg", "/etc/passwd", "missing.jpg", "sub", "", "."])


@st.composite
def manifest_line(draw: st.DrawFn) -> bytes:
    fields: dict[str, Any] = {}
    for name, strategy in (
        ("image", st.one_of(IMAGE_PATHS, JSON_VALUES)),
        ("caption", st.one_of(st.text(max_size=20), JSON_VALUES)),
        ("concepts", st.one_of(st.lists(st.sampled_from(["dog", "cat", "", 1]), max_size=3),
                               JSON_VALUES)),
        ("scores", st.one_of(st.lists(st.floats(), max_size=3), JSON_VALUES)),
        ("key", st.one_of(st.text(max_size=4), JSON_VALUES)),
    ):
        if draw(st.booleans()):
            fields[name] = draw(strategy)
    line = json.dumps(fields).encode()
    return draw(st.sampled_from([line, line[: len(line) // 2], b"   ", line + b"\xff"]))


@FUZZ
@given(lines=st.lists(manifest_line(), max_size=8))
def test_random_manifest_lines(jpeg: bytes, lines: list[bytes]) -> None:
    with workdir() as tmp:
        (tmp / "set" / "sub").mkdir(parents=True)
        (tmp / "a.jpg").write_bytes(jpeg)
        (tmp / "set" / "a.jpg").write_bytes(jpeg)
        manifest = tmp / "set" / "m.jsonl"
        manifest.write_bytes(b"\n".join(lines))
        report = convert_checked([manifest], "jsonl", tmp / "out",
                                 limits=Limits(max_member_bytes=1 << 16))
        if report is not None:
            assert report["read"] == sum(1 for line in lines if line.strip())

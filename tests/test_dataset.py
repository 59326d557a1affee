"""ConceptStreamingDataset and ConceptCollator: samples, captions, vocabulary, batches, resumption.

The fixture writes a small MDS dataset (schema v1) of real JPEG tiles cut from matplotlib's
grace_hopper.jpg; the embedded sample under data/sample is checked too.
"""

from __future__ import annotations

import gc
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from helpers import photo_tiles, write_mds
from paths import SAMPLE
from PIL import Image
from streaming import MDSWriter, Stream
from torch.utils.data import DataLoader

from cabs_streaming.concepts import (
    MDS_COLUMNS,
    VOCABULARY_FILENAME,
    Vocabulary,
    encode_concepts,
    encode_scores,
    ragged_to_lists,
)
from cabs_streaming.dataset import (
    CaptionTokenizer,
    ConceptCollator,
    ConceptStreamingDataset,
    LookaheadDataLoader,
    ShardError,
    collate_concepts,
    num_samples_in_batch,
)

NAMES = ["person", "tie", "flag", "uniform", "medal", "hair", "face"]
NUM_SAMPLES = 96
SUPERBATCH = 8


@dataclass(frozen=True)
class Record:
    image: bytes
    caption: str
    recaption: str
    concepts: list[int]


def _write_mds(
    out: str, records: dict[str, Record], vocabulary: Vocabulary, hashes: list[str] | None = None
) -> None:
    rows = (
        {
            "key": key,
            "image": rec.image,
            "caption": rec.caption,
            "recaption": rec.recaption,
            "concepts": encode_concepts(rec.concepts),
            "concept_scores": encode_scores(np.full(len(rec.concepts), 0.5)),
        }
        for key, rec in records.items()
    )
    write_mds(Path(out), rows, vocabulary.names, size_limit=1 << 15, hashes=hashes)


@pytest.fixture(scope="module")
def records() -> dict[str, Record]:
    rng = np.random.default_rng(1)
    out = {}
    for i, image in enumerate(photo_tiles(NUM_SAMPLES)):
        concepts = rng.integers(0, len(NAMES), int(rng.integers(0, 5))).tolist()  # some empty
        recaption = f"a synthetic caption {i}" if i % 4 else ""  # a quarter have none
        out[f"uid{i:04d}"] = Record(image, f"alt text {i}", recaption, concepts)
    return out


@pytest.fixture(scope="module")
def mds_dir(tmp_path_factory: pytest.TempPathFactory, records: dict[str, Record]) -> str:
    out = str(tmp_path_factory.mktemp("mds") / "train")
    _write_mds(out, records, Vocabulary(list(NAMES)))
    assert len([f for f in os.listdir(out) if f.endswith(".mds")]) > 3  # several shards
    return out


def _loader(dataset: ConceptStreamingDataset, **kwargs: Any) -> DataLoader:
    args = {"batch_size": SUPERBATCH, "num_workers": 2, "drop_last": True}
    args.update(kwargs)
    return DataLoader(dataset, collate_fn=ConceptCollator(), **args)


def _keys(loader: DataLoader) -> list[list[str]]:
    """Every batch's keys; the loader's workers are stopped here, also when reading fails.

    An iterator that raised is kept in a reference cycle by the traceback, and one collected by
    the garbage collector costs 5 s: the collector closes its queues before its finaliser can
    tell the workers to stop, so torch waits out its join timeout.
    """
    batches = iter(loader)
    try:
        return [batch["keys"] for batch in batches]
    finally:
        if hasattr(batches, "_shutdown_workers"):  # torch's own clean-up, now, not in the collector
            batches._shutdown_workers()


# ------------------------------------------------------------------------------------------------
# Samples
# ------------------------------------------------------------------------------------------------


def test_sample_keeps_the_encoded_image_and_a_writable_int32_copy_of_concepts(
    mds_dir: str, records: dict[str, Record]
) -> None:
    dataset = ConceptStreamingDataset(local=mds_dir)
    sample = dataset[5]
    rec = records[sample["key"]]
    assert set(sample) == {"key", "index", "image", "caption", "concepts"}
    assert sample["index"] == 5
    assert isinstance(sample["key"], str)
    assert isinstance(sample["image"], bytes) and sample["image"] == rec.image
    assert sample["caption"] == rec.caption
    concepts = sample["concepts"]
    assert isinstance(concepts, np.ndarray) and concepts.dtype == np.int32
    assert concepts.tolist() == rec.concepts
    assert concepts.flags.writeable and concepts.flags.owndata
    concepts[...] = -1
    assert dataset[5]["concepts"].tolist() == rec.concepts


def test_empty_concept_lists_come_back_empty(mds_dir: str, records: dict[str, Record]) -> None:
    dataset = ConceptStreamingDataset(local=mds_dir)
    empty = [i for i in range(len(dataset)) if not records[dataset[i]["key"]].concepts]
    assert empty
    sample = dataset[empty[0]]
    assert sample["concepts"].shape == (0,) and sample["concepts"].dtype == np.int32


def test_tokenizer_adds_caption_tokens_and_keeps_the_caption(mds_dir: str) -> None:
    dataset = ConceptStreamingDataset(local=mds_dir, tokenizer="ViT-B-32", context_length=32)
    sample = dataset[3]
    text = sample["text"]
    assert isinstance(text, torch.Tensor) and text.dtype == torch.long and text.shape == (32,)
    expected = open_clip.get_tokenizer("ViT-B-32", context_length=32)([sample["caption"]])[0]
    assert torch.equal(text, expected)


def test_vocabulary_is_exposed(mds_dir: str) -> None:
    dataset = ConceptStreamingDataset(local=mds_dir)
    assert isinstance(dataset.vocabulary, Vocabulary)
    assert dataset.vocabulary.names == NAMES


def test_vocabulary_is_downloaded_from_the_remote(mds_dir: str, tmp_path: Path) -> None:
    local = tmp_path / "cache"
    dataset = ConceptStreamingDataset(remote=mds_dir, local=str(local))
    assert dataset.vocabulary.names == NAMES
    assert (local / VOCABULARY_FILENAME).is_file()
    assert not [p for p in os.listdir(local) if p.endswith(".tmp")]


def test_missing_vocabulary_is_an_error_naming_the_file(mds_dir: str, tmp_path: Path) -> None:
    copy = tmp_path / "novocab"
    shutil.copytree(mds_dir, copy)
    (copy / VOCABULARY_FILENAME).unlink()
    with pytest.raises(FileNotFoundError, match=VOCABULARY_FILENAME):
        ConceptStreamingDataset(local=str(copy))


def test_streams_must_share_one_vocabulary(
    mds_dir: str, records: dict[str, Record], tmp_path: Path
) -> None:
    same, other = str(tmp_path / "same"), str(tmp_path / "other")
    subset = dict(list(records.items())[:16])
    _write_mds(same, subset, Vocabulary(list(NAMES)))
    _write_mds(other, subset, Vocabulary([*NAMES[:3], "cat", *NAMES[4:]]))
    mixed = ConceptStreamingDataset(streams=[Stream(local=mds_dir), Stream(local=same)])
    assert mixed.vocabulary.names == NAMES and len(mixed) == NUM_SAMPLES + 16
    del mixed
    gc.collect()
    with pytest.raises(ValueError, match="different vocabularies") as info:
        ConceptStreamingDataset(streams=[Stream(local=mds_dir), Stream(local=other)])
    assert mds_dir in str(info.value) and other in str(info.value)
    assert "first difference at id 3" in str(info.value)


def test_concepts_payload_that_is_not_whole_int32_names_the_sample_and_shard(
    tmp_path: Path,
) -> None:
    out = str(tmp_path / "corrupt")
    with MDSWriter(out=out, columns=MDS_COLUMNS) as writer:
        for i, payload in enumerate([encode_concepts([1, 2]), b"\x01\x00\x00\x00\x02"]):
            writer.write(
                {
                    "key": f"k{i}",
                    "image": b"",
                    "caption": "c",
                    "recaption": "",
                    "concepts": payload,
                    "concept_scores": b"",
                }
            )
    Vocabulary(list(NAMES)).save(out)
    dataset = ConceptStreamingDataset(local=out)
    assert dataset[0]["concepts"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="whole number of int32") as info:
        dataset[1]
    assert "'k1'" in str(info.value) and "shard.00000.mds" in str(info.value)


# ------------------------------------------------------------------------------------------------
# Captions
# ------------------------------------------------------------------------------------------------


def test_caption_mode_uses_the_alt_text(mds_dir: str, records: dict[str, Record]) -> None:
    dataset = ConceptStreamingDataset(local=mds_dir, caption="caption")
    for i in range(0, NUM_SAMPLES, 7):
        sample = dataset[i]
        assert sample["caption"] == records[sample["key"]].caption


def test_recaption_mode_falls_back_to_the_alt_text_where_there_is_none(
    mds_dir: str, records: dict[str, Record]
) -> None:
    dataset = ConceptStreamingDataset(local=mds_dir, caption="recaption")
    for i in range(NUM_SAMPLES):
        sample = dataset[i]
        rec = records[sample["key"]]
        assert sample["caption"] == (rec.recaption or rec.caption)


@pytest.mark.parametrize("bad", ["recaptions", 1.5, -0.1, True])
def test_invalid_caption_choice_is_refused(mds_dir: str, bad: Any) -> None:
    with pytest.raises((ValueError, TypeError), match="caption"):
        ConceptStreamingDataset(local=mds_dir, caption=bad)


def _captions_by_epoch(mds_dir: str, epochs: int, **kwargs: Any) -> list[dict[str, str]]:
    """Captions per key for each epoch, iterating in the main process."""
    dataset = ConceptStreamingDataset(
        local=mds_dir, caption=0.5, shuffle_seed=123, batch_size=SUPERBATCH, **kwargs
    )
    return [{s["key"]: s["caption"] for s in dataset} for _ in range(epochs)]


def test_caption_probability_is_deterministic_and_changes_with_the_epoch(
    mds_dir: str, records: dict[str, Record]
) -> None:
    first = _captions_by_epoch(mds_dir, 2)
    second = _captions_by_epoch(mds_dir, 1)
    assert first[0] == second[0]  # a fresh instance draws the same captions
    with_recaption = [k for k, r in records.items() if r.recaption]
    used = [first[0][k] == records[k].recaption for k in with_recaption]
    assert 0.3 < np.mean(used) < 0.7  # p = 0.5
    assert any(first[0][k] != first[1][k] for k in with_recaption)  # epoch 1 draws anew
    for key, rec in records.items():
        assert first[0][key] in {rec.caption, rec.recaption}
        if not rec.recaption:
            assert first[0][key] == rec.caption


def test_caption_probability_does_not_depend_on_dataloader_workers(mds_dir: str) -> None:
    serial = _captions_by_epoch(mds_dir, 1)[0]
    dataset = ConceptStreamingDataset(
        local=mds_dir, caption=0.5, shuffle_seed=123, batch_size=SUPERBATCH
    )
    parallel = {}
    for batch in _loader(dataset):
        parallel.update(zip(batch["keys"], batch["captions"], strict=True))
    assert parallel == serial


def test_caption_probability_extremes(mds_dir: str, records: dict[str, Record]) -> None:
    never = ConceptStreamingDataset(local=mds_dir, caption=0.0)
    always = ConceptStreamingDataset(local=mds_dir, caption=1.0)
    for i in range(0, NUM_SAMPLES, 5):
        rec = records[never[i]["key"]]
        assert never[i]["caption"] == rec.caption
        assert always[i]["caption"] == (rec.recaption or rec.caption)


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------


def test_superbatches_from_two_workers_carry_the_ragged_concepts_of_their_samples(
    mds_dir: str, records: dict[str, Record]
) -> None:
    dataset = ConceptStreamingDataset(local=mds_dir, batch_size=SUPERBATCH, shuffle=True)
    batches = list(_loader(dataset))
    assert len(batches) == NUM_SAMPLES // SUPERBATCH
    seen = []
    for batch in batches:
        n = SUPERBATCH
        assert num_samples_in_batch(batch) == n
        assert len(batch["keys"]) == len(batch["image_bytes"]) == len(batch["captions"]) == n
        assert "text" not in batch
        offsets, ids = batch["concept_offsets"], batch["concept_ids"]
        assert offsets.dtype == torch.int64 and offsets.shape == (n + 1,)
        assert ids.dtype == torch.int32 and ids.shape == (int(offsets[-1]),)
        assert offsets[0] == 0 and bool((offsets[1:] >= offsets[:-1]).all())
        lists = ragged_to_lists(offsets.numpy(), ids.numpy())
        for key, image, concepts in zip(batch["keys"], batch["image_bytes"], lists, strict=True):
            assert image == records[key].image
            assert concepts == records[key].concepts
        seen += batch["keys"]
    assert sorted(seen) == sorted(records)  # every sample exactly once


@pytest.mark.parametrize("workers", [0, 2])
def test_lookahead_loader_shows_the_next_batch_without_changing_the_sequence(
    mds_dir: str, workers: int
) -> None:
    def loader(cls: type[DataLoader]) -> DataLoader:
        dataset = ConceptStreamingDataset(local=mds_dir, batch_size=SUPERBATCH, shuffle=True)
        return cls(
            dataset, batch_size=SUPERBATCH, collate_fn=ConceptCollator(), num_workers=workers,
            drop_last=True, persistent_workers=workers > 0,
        )

    plain = loader(DataLoader)
    expected = [[batch["keys"] for batch in plain] for _ in range(2)]  # two epochs
    del plain
    ahead = loader(LookaheadDataLoader)
    assert ahead.peek() is None  # nothing is being iterated yet
    for epoch in range(2):
        got = []
        iterator = iter(ahead)
        while (upcoming := ahead.peek()) is not None:
            assert ahead.peek() is upcoming  # peeking again draws nothing more
            batch = next(iterator)
            assert batch is upcoming
            got.append(batch["keys"])
        assert ahead.peek() is None
        with pytest.raises(StopIteration):
            next(iterator)
        assert got == expected[epoch]
    del ahead
    gc.collect()


def test_tokens_from_the_dataset_are_stacked(mds_dir: str) -> None:
    dataset = ConceptStreamingDataset(
        local=mds_dir, batch_size=SUPERBATCH, tokenizer="ViT-B-32", context_length=24
    )
    batch = next(iter(_loader(dataset, num_workers=0)))
    assert batch["text"].shape == (SUPERBATCH, 24) and batch["text"].dtype == torch.long
    tokens = open_clip.get_tokenizer("ViT-B-32", context_length=24)(batch["captions"])
    assert torch.equal(batch["text"], tokens)


def test_tokenization_can_be_deferred_to_the_collator_or_after_selection(mds_dir: str) -> None:
    dataset = ConceptStreamingDataset(local=mds_dir, batch_size=SUPERBATCH)
    collate = ConceptCollator(tokenizer="ViT-B-32")
    loader = DataLoader(
        dataset, batch_size=SUPERBATCH, num_workers=2, drop_last=True, collate_fn=collate
    )
    batch = next(iter(loader))
    tokenizer = CaptionTokenizer("ViT-B-32")
    assert torch.equal(batch["text"], tokenizer(batch["captions"]))
    kept = [1, 4, 6]  # what a selection policy might keep
    kept_tokens = tokenizer([batch["captions"][i] for i in kept])
    assert torch.equal(kept_tokens, batch["text"][kept])
    assert tokenizer.context_length == 77


def test_collating_an_empty_superbatch_and_all_empty_concepts() -> None:
    samples = [
        {"key": "a", "image": b"1", "caption": "x", "concepts": np.zeros(0, np.int32)},
        {"key": "b", "image": b"2", "caption": "y", "concepts": np.zeros(0, np.int32)},
    ]
    batch = collate_concepts(samples)
    assert batch["concept_offsets"].tolist() == [0, 0, 0]
    assert batch["concept_ids"].shape == (0,) and batch["concept_ids"].dtype == torch.int32


# ------------------------------------------------------------------------------------------------
# Resumption
# ------------------------------------------------------------------------------------------------


def _make(local: str, **kwargs: Any) -> ConceptStreamingDataset:
    args = {
        "batch_size": SUPERBATCH,
        "shuffle": True,
        "shuffle_seed": 7,
        "num_canonical_nodes": 1,
        "caption": 0.5,
    }
    args.update(kwargs)
    return ConceptStreamingDataset(local=local, **args)


@pytest.fixture(scope="module")
def uninterrupted(mds_dir: str) -> list[list[dict[str, list]]]:
    """Two epochs of (keys, captions) per superbatch, from one dataset and 2 workers."""
    dataset = _make(mds_dir)
    loader = _loader(dataset)
    epochs = [[{"keys": b["keys"], "captions": b["captions"]} for b in loader] for _ in range(2)]
    del loader, dataset
    gc.collect()
    assert epochs[0] != epochs[1]  # shuffled differently per epoch
    return epochs


@pytest.mark.parametrize("done", [3, 5])
def test_mid_epoch_resume_continues_at_the_next_sample(
    mds_dir: str, uninterrupted: list[list[dict[str, list]]], done: int
) -> None:
    dataset = _make(mds_dir)
    loader = _loader(dataset)
    it = iter(loader)
    head = [next(it)["keys"] for _ in range(done)]
    assert head == [b["keys"] for b in uninterrupted[0][:done]]
    # Samples drawn so far on this (single) rank; from_beginning=False: this run's count.
    state = dataset.state_dict(done * SUPERBATCH, from_beginning=False)
    assert state["epoch"] == 0 and state["sample_in_epoch"] == done * SUPERBATCH
    del it, loader, dataset
    gc.collect()

    fresh = _make(mds_dir)
    fresh.load_state_dict(state)
    rest = [{"keys": b["keys"], "captions": b["captions"]} for b in _loader(fresh)]
    assert rest == uninterrupted[0][done:]


def test_resume_with_a_remote_uses_a_fresh_local_dir(
    mds_dir: str, uninterrupted: list[list[dict[str, list]]], tmp_path: Path
) -> None:
    dataset = _make(str(tmp_path / "cache1"), remote=mds_dir)
    loader = _loader(dataset)
    it = iter(loader)
    [next(it) for _ in range(4)]
    state = dataset.state_dict(4 * SUPERBATCH, from_beginning=False)
    del it, loader, dataset
    gc.collect()

    fresh = _make(str(tmp_path / "cache2"), remote=mds_dir)
    fresh.load_state_dict(state)
    assert [b["keys"] for b in _loader(fresh)] == [b["keys"] for b in uninterrupted[0][4:]]


def test_resume_from_an_epoch_boundary_starts_the_next_epoch(
    mds_dir: str, uninterrupted: list[list[dict[str, list]]]
) -> None:
    dataset = _make(mds_dir)
    loader = _loader(dataset)
    assert [b["keys"] for b in loader] == [b["keys"] for b in uninterrupted[0]]
    # What Composer saves after an epoch: sample_in_epoch 0, counted from the epoch's start.
    state = dataset.state_dict(0, from_beginning=True)
    assert state["epoch"] == 1 and state["sample_in_epoch"] == 0
    del loader, dataset
    gc.collect()

    fresh = _make(mds_dir)
    fresh.load_state_dict(state)
    rest = [{"keys": b["keys"], "captions": b["captions"]} for b in _loader(fresh)]
    assert rest == uninterrupted[1]


def test_state_before_any_iteration_resumes_at_the_start(
    mds_dir: str, uninterrupted: list[list[dict[str, list]]]
) -> None:
    dataset = _make(mds_dir)
    state = dataset.state_dict(0, from_beginning=True)
    del dataset
    gc.collect()
    fresh = _make(mds_dir)
    fresh.load_state_dict(state)
    assert [b["keys"] for b in _loader(fresh)] == [b["keys"] for b in uninterrupted[0]]


# ------------------------------------------------------------------------------------------------
# The embedded sample
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "eval_classification", "eval_retrieval"])
def test_embedded_sample_splits_load_with_their_vocabulary(split: str) -> None:
    dataset = ConceptStreamingDataset(local=str(SAMPLE / split), batch_size=4)
    assert len(dataset.vocabulary) > 0
    batch = collate_concepts([dataset[i] for i in range(4)])
    ids = batch["concept_ids"]
    assert ids.numel() == 0 or int(ids.max()) < len(dataset.vocabulary)
    for image in batch["image_bytes"]:
        assert Image.open(io.BytesIO(image)).size == (64, 64)


# ------------------------------------------------------------------------------------------------
# Damaged shards
# ------------------------------------------------------------------------------------------------


@pytest.fixture()
def hashed_remote(tmp_path: Path, records: dict[str, Record]) -> Path:
    remote = tmp_path / "remote"
    _write_mds(str(remote), records, Vocabulary(list(NAMES)), hashes=["xxh64"])
    return remote


def _damage(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the sample data
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_shard_stops_iteration_with_an_error_naming_it(
    hashed_remote: Path, tmp_path: Path, workers: int
) -> None:
    _damage(hashed_remote / "shard.00001.mds")
    dataset = ConceptStreamingDataset(
        remote=str(hashed_remote),
        local=str(tmp_path / f"cache{workers}"),
        batch_size=SUPERBATCH,
        shuffle=False,
        validate_hash="xxh64",
    )
    with pytest.raises(ShardError, match=r"shard\.00001\.mds: Checksum failure.*corrupt"):
        _keys(_loader(dataset, num_workers=workers))


def test_intact_hashed_shards_validate_and_read_completely(
    hashed_remote: Path, tmp_path: Path
) -> None:
    dataset = ConceptStreamingDataset(
        remote=str(hashed_remote),
        local=str(tmp_path / "cache"),
        batch_size=SUPERBATCH,
        shuffle=False,
        validate_hash="xxh64",
    )
    assert sum(len(keys) for keys in _keys(_loader(dataset))) == NUM_SAMPLES


def test_asking_for_a_hash_the_index_lacks_says_what_to_do(mds_dir: str, tmp_path: Path) -> None:
    dataset = ConceptStreamingDataset(
        remote=mds_dir,
        local=str(tmp_path / "cache"),
        batch_size=SUPERBATCH,
        shuffle=False,
        validate_hash="xxh64",
    )
    with pytest.raises(ShardError, match=r"shard\.00000\.mds.*set train_data.validate_hash"):
        _keys(_loader(dataset, num_workers=0))


# Streaming checks validate_hash only right after a download; files already on disk are ours.


def _hashed(local: Path, remote: Path | None = None, workers: int = 0) -> list[list[str]]:
    dataset = ConceptStreamingDataset(
        remote=None if remote is None else str(remote),
        local=str(local),
        batch_size=SUPERBATCH,
        shuffle=False,
        validate_hash="xxh64",
    )
    try:
        return _keys(_loader(dataset, num_workers=workers))
    finally:
        del dataset
        gc.collect()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_shard_of_a_local_dataset_is_caught_under_validate_hash(
    hashed_remote: Path, workers: int
) -> None:
    _damage(hashed_remote / "shard.00002.mds")
    with pytest.raises(ShardError, match=r"shard\.00002\.mds: Checksum failure.*corrupt"):
        _hashed(hashed_remote, workers=workers)
    assert (hashed_remote / "shard.00002.mds").exists(), "a dataset's own files are never deleted"


def test_a_cached_shard_that_failed_its_hash_is_never_trusted_on_the_next_run(
    hashed_remote: Path, tmp_path: Path
) -> None:
    shard = hashed_remote / "shard.00001.mds"
    intact = shard.read_bytes()
    _damage(shard)
    cache = tmp_path / "cache"
    for _ in range(2):  # the second run finds the cache the first one left
        with pytest.raises(ShardError, match=r"shard\.00001\.mds: Checksum failure"):
            _hashed(cache, hashed_remote)
        assert not (cache / "shard.00001.mds").exists(), "the bad copy left the cache"

    shard.write_bytes(intact)  # the remote is repaired: the next run downloads it again
    assert sum(len(keys) for keys in _hashed(cache, hashed_remote)) == NUM_SAMPLES


def test_a_cached_shard_changed_on_disk_is_caught_before_it_is_read(
    hashed_remote: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    assert sum(len(keys) for keys in _hashed(cache, hashed_remote)) == NUM_SAMPLES
    _damage(cache / "shard.00003.mds")  # e.g. a disk error, or a copy interrupted by hand
    with pytest.raises(ShardError, match=r"shard\.00003\.mds: Checksum failure"):
        _hashed(cache, hashed_remote)
    assert sum(len(keys) for keys in _hashed(cache, hashed_remote)) == NUM_SAMPLES

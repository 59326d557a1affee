"""The Composer adapter around the selection engine, without a Trainer (see test_train.py)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cabs_streaming.algorithm import (
    ConceptAwareBatchSampling,
    gather_concepts,
    keep_per_rank,
    selection_digest,
)
from cabs_streaming.config import ConfigError
from cabs_streaming.dataset import ConceptCollator
from cabs_streaming.decode import ImageDecodeError, ImageDecoder
from cabs_streaming.train import superbatch_per_rank


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((48, 40, 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def superbatch(concepts: list[list[int]], broken: tuple[int, ...] = ()) -> dict:
    """Samples ``s0, s1, ...`` with real JPEGs, except the ``broken`` ones."""
    samples = [
        {
            "key": f"s{i}",
            "image": broken_jpeg() if i in broken else jpeg(i),
            "caption": f"caption {i}",
            "concepts": np.array(c),
        }
        for i, c in enumerate(concepts)
    ]
    return ConceptCollator()(samples)


def algorithm(**kwargs) -> ConceptAwareBatchSampling:
    decoder = ImageDecoder(32, is_train=True, seed=3, num_threads=1)
    return ConceptAwareBatchSampling(decoder=decoder, tokenizer="ViT-B-32", **kwargs)


def test_keep_per_rank_must_be_whole():
    assert keep_per_rank(80, 0.8) == 16
    assert keep_per_rank(16, 0.0) == 16
    with pytest.raises(ValueError, match="not a whole number"):
        keep_per_rank(81, 0.8)


def test_superbatch_per_rank_from_the_global_batch():
    assert superbatch_per_rank(4096, 4, 0.8) == 5120
    assert superbatch_per_rank(32, 2, 0.0) == 16
    with pytest.raises(ConfigError, match="does not divide over 3 ranks"):
        superbatch_per_rank(32, 3, 0.8)
    with pytest.raises(ConfigError, match="not a whole number"):
        superbatch_per_rank(30, 2, 0.6)  # 15 / 0.4 = 37.5


def test_gather_on_one_process_returns_the_local_arrays():
    batch = superbatch([[1, 2], [], [3]])
    offsets, ids = gather_concepts(batch["concept_offsets"], batch["concept_ids"])
    assert offsets.tolist() == [0, 2, 2, 3]
    assert ids.tolist() == [1, 2, 3]


def test_digest_tells_selections_apart():
    a = np.array([[0, 2], [1, 3]])
    assert selection_digest(a) == selection_digest(a.copy())
    assert selection_digest(a) != selection_digest(np.array([[0, 2], [1, 4]]))


def test_kept_batch_decodes_and_tokenizes_only_the_kept_samples():
    batch = superbatch([[0], [0], [1], [0, 1], []])
    cabs = algorithm(filter_ratio=0.6, policy="diversity")
    kept = np.array([1, 3])
    out = cabs.kept_batch(batch, kept, step=4, rank=0)
    assert out["keys"] == ["s1", "s3"]
    assert out["images"].shape == (2, 3, 32, 32) and out["images"].dtype == torch.float32
    assert out["text"].shape[0] == 2
    expected = ImageDecoder(32, is_train=True, seed=3, num_threads=1)(
        [batch["image_bytes"][1], batch["image_bytes"][3]], ["s1", "s3"], step=4, rank=0
    )
    assert torch.equal(out["images"], expected)


def test_state_dict_is_plain_and_a_changed_policy_warns():
    saved = algorithm(filter_ratio=0.8, policy="diversity").state_dict()
    assert saved["policy"] == {"name": "diversity", "concept_cap": None, "official_compat": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        algorithm(filter_ratio=0.8, policy="diversity").load_state_dict(saved)
    with pytest.warns(UserWarning, match="different CABS configuration"):
        algorithm(filter_ratio=0.8, policy="frequency").load_state_dict(saved)


def broken_jpeg() -> bytes:
    return jpeg(99)[:40]  # a JPEG header and nothing else


def test_an_undecodable_kept_image_raises_naming_the_sample_by_default():
    batch = superbatch([[0], [1], [2], [3]], broken=(1,))
    cabs = algorithm(filter_ratio=0.5, policy="diversity")
    with pytest.raises(ImageDecodeError, match=r"'s1'.*step 7, rank 0.*on_error=replace"):
        cabs.kept_batch(batch, np.array([0, 1]), step=7, rank=0, reserve=lambda: np.array([2, 3]))
    assert cabs.replacements == []


def test_replace_trains_on_the_first_decodable_stand_in_in_the_slot_of_the_failed_one(caplog):
    batch = superbatch([[0], [1], [2], [3]], broken=(1, 3))  # the first stand-in fails too
    cabs = algorithm(filter_ratio=0.5, policy="diversity", on_decode_error="replace")
    out = cabs.kept_batch(
        batch, np.array([0, 1]), step=7, rank=0, reserve=lambda: np.array([3, 2])
    )
    assert out["keys"] == ["s0", "s2"]
    assert cabs.replacements == [(7, 0, "s1", "s2")]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("stand-in 's3' cannot be decoded either" in m for m in warned), warned
    assert any("kept sample 's1' cannot be decoded" in m and "'s2' instead" in m for m in warned)
    # The stand-in takes the failed slot's augmentation seed (index 1), as a kept s2 in slot 1.
    expected = ImageDecoder(32, is_train=True, seed=3, num_threads=1)(
        [batch["image_bytes"][0], batch["image_bytes"][2]], ["s0", "s2"], step=7, rank=0
    )
    assert torch.equal(out["images"], expected)
    assert torch.equal(out["text"], cabs.tokenizer(["caption 0", "caption 2"]))


def test_replace_fails_clearly_when_no_stand_in_decodes():
    batch = superbatch([[0], [1], [2]], broken=(1, 2))
    cabs = algorithm(filter_ratio=0.5, policy="iid", on_decode_error="replace")
    with pytest.raises(ImageDecodeError, match=r"'s1'.*no unkept sample of rank 0 at step 2"):
        cabs.kept_batch(batch, np.array([0, 1]), step=2, rank=0, reserve=lambda: np.array([2]))


def test_on_decode_error_accepts_raise_and_replace_only():
    with pytest.raises(ValueError, match="on_decode_error must be one of"):
        algorithm(filter_ratio=0.5, on_decode_error="skip")

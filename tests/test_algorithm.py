"""The Composer adapter around the selection engine, without a Trainer (see test_train.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import noise_jpeg

from cabs_streaming.algorithm import (
    ConceptAwareBatchSampling,
    Lookahead,
    Replacement,
    cabs_step,
    gather_concepts,
    kept_batch,
    selection_digest,
)
from cabs_streaming.dataset import CaptionTokenizer, ConceptCollator
from cabs_streaming.decode import ImageDecodeError, ImageDecoder
from cabs_streaming.selection import get_policy


def superbatch(concepts: list[list[int]], broken: tuple[int, ...] = ()) -> dict:
    """Samples ``s0, s1, ...`` with real JPEGs, except the ``broken`` ones."""
    samples = [
        {
            "key": f"s{i}",
            "image": broken_jpeg() if i in broken else noise_jpeg(i),
            "caption": f"caption {i}",
            "concepts": np.array(c),
        }
        for i, c in enumerate(concepts)
    ]
    return ConceptCollator()(samples)


def algorithm(**kwargs) -> ConceptAwareBatchSampling:
    decoder = ImageDecoder(32, is_train=True, seed=3, num_threads=1)
    return ConceptAwareBatchSampling(decoder=decoder, tokenizer="ViT-B-32", **kwargs)


DECODER = ImageDecoder(32, is_train=True, seed=3, num_threads=1)
TOKENIZER = CaptionTokenizer("ViT-B-32")


def keep(batch: dict, kept: list[int], step: int, **kwargs) -> tuple[dict, list[Replacement]]:
    """The model's batch for rank 0's kept local indices ``kept`` at ``step``."""
    return kept_batch(batch, np.array(kept), step, 0, decoder=DECODER, tokenizer=TOKENIZER,
                      **kwargs)


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
    out, replaced = keep(batch, [1, 3], step=4)
    assert replaced == []
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
    return noise_jpeg(99)[:40]  # a JPEG header and nothing else


def test_an_undecodable_kept_image_raises_naming_the_sample_by_default():
    batch = superbatch([[0], [1], [2], [3]], broken=(1,))
    with pytest.raises(ImageDecodeError, match=r"'s1'.*step 7, rank 0.*on_error=replace"):
        keep(batch, [0, 1], step=7, stand_ins=lambda: np.array([2, 3]))


def test_replace_trains_on_the_first_decodable_stand_in_in_the_slot_of_the_failed_one(caplog):
    batch = superbatch([[0], [1], [2], [3]], broken=(1, 3))  # the first stand-in fails too
    out, replaced = keep(
        batch, [0, 1], step=7, stand_ins=lambda: np.array([3, 2]), on_decode_error="replace"
    )
    assert out["keys"] == ["s0", "s2"]
    assert [r[:4] for r in replaced] == [(7, 0, "s1", "s2")]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("stand-in 's3' cannot be decoded either" in m for m in warned), warned
    assert any("kept sample 's1' cannot be decoded" in m and "'s2' instead" in m for m in warned)
    # The stand-in takes the failed slot's augmentation seed (index 1), as a kept s2 in slot 1.
    expected = ImageDecoder(32, is_train=True, seed=3, num_threads=1)(
        [batch["image_bytes"][0], batch["image_bytes"][2]], ["s0", "s2"], step=7, rank=0
    )
    assert torch.equal(out["images"], expected)
    assert torch.equal(out["text"], TOKENIZER(["caption 0", "caption 2"]))


def test_replace_fails_clearly_when_no_stand_in_decodes():
    batch = superbatch([[0], [1], [2]], broken=(1, 2))
    with pytest.raises(ImageDecodeError, match=r"'s1'.*no unkept sample of rank 0 at step 2"):
        keep(batch, [0, 1], step=2, stand_ins=lambda: np.array([2]), on_decode_error="replace")


def test_on_decode_error_accepts_raise_and_replace_only():
    with pytest.raises(ValueError, match="on_decode_error must be one of"):
        algorithm(filter_ratio=0.5, on_decode_error="skip")


def test_a_step_prepared_ahead_is_the_step_decoded_when_due():
    """``cabs_step`` with a lookahead: steps 1 and 2 come from the background, unchanged."""
    batches = [superbatch([[t % 3], [1], [2, t % 2], [0], [], [3]]) for t in range(3)]
    settings = {"policy": get_policy("diversity", {"concept_cap": 2}), "filter_ratio": 0.5,
                "seed": 1, "decoder": DECODER, "tokenizer": TOKENIZER}
    due = [cabs_step(batch, t, **settings) for t, batch in enumerate(batches)]
    ahead = Lookahead()
    early = [
        cabs_step(batch, t, lookahead=ahead, peek=lambda t=t: (batches + [None])[t + 1],
                  **settings)
        for t, batch in enumerate(batches)
    ]
    assert [step.looked_ahead for step in early] == [False, True, True]
    for a, b in zip(due, early, strict=True):
        assert a.batch["keys"] == b.batch["keys"]
        assert torch.equal(a.batch["images"], b.batch["images"])
        assert torch.equal(a.batch["text"], b.batch["text"])
        assert np.array_equal(a.record.kept, b.record.kept)

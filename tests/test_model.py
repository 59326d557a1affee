"""ComposerCLIP: shipped architectures, offline construction, CLIP and SigLIP training steps.

Training batches follow the contract with the CABS algorithm: ``{"images": float32 [k, 3, H, W]
(decoded by ImageDecoder), "text": int64 [k, context_length], "keys": list[str]}``. Images are
real: the first samples of the embedded sample's train split.
"""

from __future__ import annotations

import gc
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from composer import DataSpec, Trainer
from composer.loggers import InMemoryLogger
from composer.utils.reproducibility import seed_all
from helpers import free_port
from paths import ROOT, SAMPLE

from cabs_streaming.dataset import ConceptStreamingDataset, num_samples_in_batch
from cabs_streaming.model import MODEL_CONFIG_DIR, SIGLIP_DIST_IMPLS, ComposerCLIP

BATCH = 8


@pytest.fixture(scope="module")
def samples() -> list[tuple[str, bytes, str]]:
    """The first ``BATCH`` (key, encoded image, caption) triples of the sample's train split."""
    dataset = ConceptStreamingDataset(local=str(SAMPLE / "train"), batch_size=BATCH, shuffle=False)
    out = [(s["key"], s["image"], s["caption"]) for s in (dataset[i] for i in range(BATCH))]
    del dataset
    gc.collect()
    return out


def _batch(model: ComposerCLIP, samples: list[tuple[str, bytes, str]]) -> dict:
    keys = [k for k, _, _ in samples]
    with model.image_decoder(is_train=True, seed=0) as decoder:
        images = decoder([b for _, b, _ in samples], keys, step=0, rank=0)
    return {"images": images, "text": model.tokenizer([c for _, _, c in samples]), "keys": keys}


# ------------------------------------------------------------------------------------------------
# Shipped architectures and construction
# ------------------------------------------------------------------------------------------------


def test_tiny_architectures_ship_with_the_package_and_are_registered_on_import():
    names = sorted(p.name for p in MODEL_CONFIG_DIR.iterdir() if p.name.endswith(".json"))
    assert names == ["cabs-tiny-clip.json", "cabs-tiny-rn-clip.json", "cabs-tiny-sigmoid.json"]
    assert {"cabs-tiny-clip", "cabs-tiny-rn-clip", "cabs-tiny-sigmoid"} <= set(
        open_clip.list_models()
    )


@pytest.mark.parametrize("name", ["cabs-tiny-clip", "cabs-tiny-rn-clip", "cabs-tiny-sigmoid"])
def test_tiny_architectures_use_the_offline_bpe_tokenizer(name: str):
    model = ComposerCLIP(name)
    tokens = model.tokenizer(["a photo of a sandal.", "digit nine"])
    assert tokens.dtype == torch.int64 and tokens.shape == (2, 32) == (2, model.context_length)
    assert isinstance(open_clip.get_tokenizer(name), open_clip.SimpleTokenizer)
    assert len(pickle.dumps(model.tokenizer)) < 1000  # named, not carried, into workers


def test_sigmoid_architecture_is_initialised_like_open_clip_siglip():
    model = ComposerCLIP("cabs-tiny-sigmoid", loss="siglip")
    assert float(model.clip.logit_scale) == pytest.approx(math.log(10))
    assert float(model.clip.logit_bias) == -10


def test_siglip_loss_on_an_architecture_without_bias_gets_open_clip_train_init():
    model = ComposerCLIP("cabs-tiny-clip", loss="siglip")
    assert float(model.clip.logit_scale) == pytest.approx(math.log(10))
    assert float(model.clip.logit_bias) == -10
    assert getattr(ComposerCLIP("cabs-tiny-clip", loss="clip").clip, "logit_bias", None) is None


def test_pretrained_tags_that_would_download_are_refused():
    with pytest.raises(FileNotFoundError, match="never downloads"):
        ComposerCLIP("ViT-B-32", pretrained="openai")
    with pytest.raises(ValueError, match="never downloads"):
        ComposerCLIP("hf-hub:timm/ViT-B-16-SigLIP")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ComposerCLIP("no-such-model")
    with pytest.raises(ValueError, match="loss="):
        ComposerCLIP("cabs-tiny-clip", loss="triplet")


def test_a_local_pretrained_checkpoint_is_loaded(tmp_path: Path):
    seed_all(1)
    source = ComposerCLIP("cabs-tiny-clip")
    path = tmp_path / "tiny.pt"
    torch.save(source.clip.state_dict(), path)
    seed_all(2)
    loaded = ComposerCLIP("cabs-tiny-clip", pretrained=str(path))
    for (name, a), (_, b) in zip(
        source.clip.state_dict().items(), loaded.clip.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_image_decoder_follows_the_model_preprocessing(samples):
    model = ComposerCLIP("cabs-tiny-clip")
    assert model.preprocess_cfg["size"] == (64, 64)
    keys = [k for k, _, _ in samples]
    images = model.image_decoder(is_train=False)([b for _, b, _ in samples], keys)
    assert images.shape == (BATCH, 3, 64, 64) and images.dtype == torch.float32


def test_param_groups_exclude_gains_biases_and_temperature_from_weight_decay():
    model = ComposerCLIP("cabs-tiny-sigmoid", loss="siglip")
    no_decay, decay = model.param_groups(0.2)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.2
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert ids(no_decay).isdisjoint(ids(decay))
    assert ids(no_decay) | ids(decay) == {id(p) for p in model.parameters()}
    assert {id(model.clip.logit_scale), id(model.clip.logit_bias)} <= ids(no_decay)
    assert all(p.ndim >= 2 for p in decay["params"])


# ------------------------------------------------------------------------------------------------
# Forward and loss
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,loss", [("cabs-tiny-clip", "clip"), ("cabs-tiny-sigmoid", "siglip")])
def test_forward_gives_normalised_features_and_the_exponentiated_scale(name, loss, samples):
    seed_all(0)
    model = ComposerCLIP(name, loss=loss)
    outputs = model(_batch(model, samples))
    for key in ("image_features", "text_features"):
        assert outputs[key].shape == (BATCH, 64)
        torch.testing.assert_close(outputs[key].norm(dim=-1), torch.ones(BATCH))
    assert float(outputs["logit_scale"]) == pytest.approx(math.exp(float(model.clip.logit_scale)))
    assert ("logit_bias" in outputs) == (loss == "siglip")


def test_training_forward_clamps_the_temperature_like_open_clip_train(samples):
    model = ComposerCLIP("cabs-tiny-clip")
    batch = _batch(model, samples)
    with torch.no_grad():
        model.clip.logit_scale.fill_(7.0)
    model.eval()
    model(batch)
    assert float(model.clip.logit_scale) == 7.0  # evaluation never touches the weights
    model.train()
    outputs = model(batch)
    assert float(model.clip.logit_scale) == pytest.approx(math.log(100))
    assert float(outputs["logit_scale"]) == pytest.approx(100.0)


@pytest.mark.parametrize("name,loss", [("cabs-tiny-clip", "clip"), ("cabs-tiny-sigmoid", "siglip")])
def test_one_trainer_step_has_a_finite_loss_and_updates_the_weights(name, loss, samples):
    seed_all(0)
    model = ComposerCLIP(name, loss=loss)
    batch = _batch(model, samples)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logger = InMemoryLogger()
    trainer = Trainer(
        model=model,
        train_dataloader=DataSpec([batch], get_num_samples_in_batch=num_samples_in_batch),
        max_duration="1ba",
        optimizers=torch.optim.AdamW(model.param_groups(0.1), lr=1e-3),
        device_train_microbatch_size=BATCH,
        loggers=[logger],
        device="cpu",
        seed=0,
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    value = float(logger.most_recent_values["loss/train/total"])
    assert math.isfinite(value) and value > 0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for name_ in ("clip.logit_scale", "clip.visual.conv1.weight", "clip.token_embedding.weight"):
        assert name_ in changed
    if loss == "siglip":
        assert "clip.logit_bias" in changed
    assert len(changed) == len(before)  # AdamW moves every weight that has a gradient


def test_loss_backward_reaches_both_towers_directly(samples):
    seed_all(0)
    model = ComposerCLIP("cabs-tiny-sigmoid", loss="siglip")
    batch = _batch(model, samples)
    loss = model.loss(model(batch), batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.clip.visual.conv1.weight.grad.abs().sum() > 0
    assert model.clip.token_embedding.weight.grad.abs().sum() > 0
    assert model.clip.logit_bias.grad is not None


def test_training_has_no_metrics_and_evaluation_names_every_score():
    model = ComposerCLIP("cabs-tiny-clip")
    assert model.get_metrics(is_train=True) == {}
    assert sorted(model.get_metrics(is_train=False)) == sorted(
        [
            "top1_accuracy",
            "top5_accuracy",
            "image_to_text_recall_at_1",
            "image_to_text_recall_at_5",
            "text_to_image_recall_at_1",
            "text_to_image_recall_at_5",
            "mean_recall",
        ]
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_training_step_runs_on_cuda(samples):
    seed_all(0)
    model = ComposerCLIP("cabs-tiny-sigmoid", loss="siglip").to("cuda")
    batch = _batch(model, samples)
    batch = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in batch.items()}
    loss = model.loss(model(batch), batch)
    loss.backward()
    assert torch.isfinite(loss) and model.clip.logit_bias.grad.device.type == "cuda"


# ------------------------------------------------------------------------------------------------
# Two ranks (real composer launcher, gloo)
# ------------------------------------------------------------------------------------------------


DIST_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from composer.utils import dist, get_device
    from composer.utils.reproducibility import seed_all
    from cabs_streaming.model import ComposerCLIP

    batch_path, out = sys.argv[1], sys.argv[2]
    dist.initialize_dist(get_device("cpu"))
    rank, world = dist.get_global_rank(), dist.get_world_size()
    full = torch.load(batch_path)
    k = len(full["keys"]) // world
    batch = {key: value[rank * k:(rank + 1) * k] for key, value in full.items()}
    results = {}
    for name, loss, impl in json.loads(sys.argv[3]):
        seed_all(0)
        model = ComposerCLIP(name, loss=loss, siglip_dist_impl=impl)
        value = model.loss(model(batch), batch)
        value.backward()
        grads = {}
        for n, p in model.named_parameters():
            g = p.grad.clone()
            torch.distributed.all_reduce(g)
            grads[n] = g / world  # what DDP hands the optimiser
        losses = [None] * world
        torch.distributed.all_gather_object(losses, float(value))
        results[f"{name}/{loss}/{impl}"] = {"losses": losses, "grads": grads}
    if rank == 0:
        torch.save(results, out)
    """
)

DIST_CASES = [
    ("cabs-tiny-clip", "clip", "gather"),
    ("cabs-tiny-sigmoid", "siglip", "gather"),
    ("cabs-tiny-sigmoid", "siglip", "bidir"),
]


@pytest.mark.slow
def test_two_ranks_on_gloo_reproduce_the_single_process_loss_and_gradients(tmp_path, samples):
    """ClipLoss(local_loss, gather_with_grad) and SigLipLoss(gather and bidir) across 2 ranks."""
    assert "gather" in SIGLIP_DIST_IMPLS
    composer = shutil.which("composer", path=str(Path(sys.executable).parent))
    assert composer, "the composer launcher is missing from the environment"
    seed_all(0)
    batch = _batch(ComposerCLIP("cabs-tiny-clip"), samples)
    torch.save(batch, tmp_path / "batch.pt")
    script = tmp_path / "dist_loss.py"
    script.write_text(DIST_SCRIPT)
    out = tmp_path / "results.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        composer, "-n", "2", "--master_port", str(free_port()),
        "--stdout", str(tmp_path / "o{rank}"), "--stderr", str(tmp_path / "e{rank}"),
        str(script), str(tmp_path / "batch.pt"), str(out), json.dumps(DIST_CASES),
    ]  # fmt: skip
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=240, env=env, check=False
    )
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("e*")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs[-3000:]
    results = torch.load(out)
    for name, loss, impl in DIST_CASES:
        seed_all(0)
        model = ComposerCLIP(name, loss=loss, siglip_dist_impl=impl)
        value = model.loss(model(batch), batch)
        value.backward()
        got = results[f"{name}/{loss}/{impl}"]
        # Each rank's loss covers its own rows; their mean is the loss of the whole batch.
        assert len(got["losses"]) == 2 and got["losses"][0] != got["losses"][1]
        assert np.mean(got["losses"]) == pytest.approx(float(value), rel=1e-5)
        for n, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-4, atol=1e-6, msg=n)

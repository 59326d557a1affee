"""train.py end to end: the quickstart on two gloo ranks, single-process steps, config errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from composer import Callback, Trainer
from composer.utils import reproducibility
from helpers import sample_subset
from paths import ROOT, SAMPLE
from torch.utils.data import DataLoader

from cabs_streaming.config import load_config
from cabs_streaming.dataset import ConceptCollator, ConceptStreamingDataset
from cabs_streaming.train import (
    build_optimizer,
    build_scheduler,
    build_trainer,
    cpu_threads_per_rank,
    main,
)

QUICKSTART = ROOT / "yamls" / "quickstart.yaml"
BIN = Path(sys.executable).parent


def overrides(tmp_path: Path, *extra: str) -> list[str]:
    """Point the quickstart at the sample and keep every output under ``tmp_path``.

    32 kept per step (2 ranks x 16, 18 steps an epoch), whatever the recipe's own batch, and
    the tiny ViT: these tests check the training mechanics, which do not depend on the image
    tower, and the tiny ViT trains a step about twice as fast on the CPU as the recipe's ResNet.
    """
    return [
        f"variables.data={SAMPLE}",
        "global_train_batch_size=32",
        "model.name=cabs-tiny-clip",
        f"run_folder={tmp_path}",
        f"save_folder={tmp_path}/checkpoints",
        f"selection.selection_log={tmp_path}/selection.jsonl",
        f"metrics_file={tmp_path}/metrics.json",
        "progress_bar=false",
        *extra,
    ]


class LossRecorder(Callback):
    """Keeps the training loss of every batch."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def batch_end(self, state, logger) -> None:
        self.losses.append(float(state.loss.detach()))


@pytest.mark.parametrize(
    ("model", "loss"), [("cabs-tiny-clip", "clip"), ("cabs-tiny-sigmoid", "siglip")]
)
def test_one_step_single_process(tmp_path, model, loss):
    cfg = load_config(
        QUICKSTART,
        overrides(
            tmp_path, f"model.name={model}", f"model.loss={loss}", "max_duration=1ba",
            "scheduler.t_warmup=0ba",  # a warmup would start at lr 0: nothing would move
            "eval_data.zeroshot=null", "eval_data.retrieval=null", "train_data.num_workers=0",
        ),
    )
    trainer = build_trainer(cfg)
    recorder = LossRecorder()
    trainer.state.callbacks.append(recorder)
    before = [p.detach().clone() for p in trainer.state.model.parameters()]
    trainer.fit()
    assert len(recorder.losses) == 1 and np.isfinite(recorder.losses[0])
    after = list(trainer.state.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    trainer.close()


class EagerCollator:
    """Plain training without CABS: decode and tokenize every drawn sample in the loader.

    Uses the same decoder seeds (seed, step, rank, position) the algorithm uses, so with IID at
    filter ratio 0 both paths see identical tensors.
    """

    def __init__(self, decoder, tokenizer) -> None:
        self.decoder, self.tokenizer = decoder, tokenizer
        self.step = 0

    def __call__(self, samples):
        batch = ConceptCollator()(samples)
        images = self.decoder(batch["image_bytes"], batch["keys"], step=self.step, rank=0)
        self.step += 1
        return {"images": images, "text": self.tokenizer(batch["captions"]), "keys": batch["keys"]}


def test_iid_at_filter_ratio_zero_equals_training_without_the_algorithm(tmp_path):
    extra = (
        "selection.policy=iid", "selection.options=null", "filter_ratio=0.0",
        "max_duration=3ba", "eval_data.zeroshot=null", "eval_data.retrieval=null",
        "train_data.num_workers=0", "save_folder=null",
    )
    cfg = load_config(QUICKSTART, overrides(tmp_path, *extra))
    with_cabs = build_trainer(cfg)
    recorder = LossRecorder()
    with_cabs.state.callbacks.append(recorder)
    with_cabs.fit()
    with_cabs.close()

    # The same run by hand: same seed before the model, same data order, no algorithm.
    reproducibility.seed_all(cfg.seed)
    from cabs_streaming.model import ComposerCLIP

    model = ComposerCLIP(cfg.model.name, loss=cfg.model.loss)
    dataset = ConceptStreamingDataset(
        local=cfg.train_data.local, batch_size=32, shuffle=True, shuffle_seed=cfg.seed,
        caption=cfg.train_data.caption,
    )
    decoder = model.image_decoder(is_train=True, seed=cfg.seed)
    loader = DataLoader(
        dataset, batch_size=32, drop_last=True,
        collate_fn=EagerCollator(decoder, model.tokenizer),
    )
    plain_recorder = LossRecorder()
    plain = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration="3ba",
        optimizers=build_optimizer(cfg, model),
        schedulers=build_scheduler(cfg),
        callbacks=[plain_recorder],
        seed=cfg.seed,
        device="cpu",
        progress_bar=False,
        device_train_microbatch_size=32,
    )
    plain.fit()
    plain.close()
    assert len(recorder.losses) == 3
    assert recorder.losses == plain_recorder.losses


@pytest.mark.parametrize("workers", [0, 2])
def test_lookahead_trains_on_exactly_the_batches_of_decoding_when_due(tmp_path, workers):
    """Step t + 1 selected and decoded in the background during step t: the same run."""
    runs = {}
    for lookahead in (True, False):
        folder = tmp_path / f"lookahead-{lookahead}"
        cfg = load_config(
            QUICKSTART,
            overrides(
                folder, "max_duration=4ba", "eval_data.zeroshot=null", "eval_data.retrieval=null",
                f"train_data.num_workers={workers}", "save_folder=null",
                f"decode.lookahead={str(lookahead).lower()}",
            ),
        )
        trainer = build_trainer(cfg)
        recorder = LossRecorder()
        trainer.state.callbacks.append(recorder)
        trainer.fit()
        (cabs,) = trainer.state.algorithms
        weights = {k: v.clone() for k, v in trainer.state.model.state_dict().items()}
        log = (folder / "selection.jsonl").read_text()
        runs[lookahead] = (cabs.looked_ahead, recorder.losses, log, weights)
        trainer.close()
    assert runs[True][0] == 3 and runs[False][0] == 0  # every step after the first
    assert runs[True][1] == runs[False][1] and len(runs[True][1]) == 4
    assert runs[True][2] == runs[False][2]
    assert all(torch.equal(runs[True][3][k], runs[False][3][k]) for k in runs[False][3])


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), str(QUICKSTART), *args],
        capture_output=True, text=True, timeout=300, check=False,
    )


def test_a_misspelt_key_fails_suggesting_the_close_one():
    run = run_train("optimizer.lrr=1e-3")
    assert run.returncode == 2
    assert "unknown config key(s) optimizer.lrr; did you mean 'optimizer.lr'?" in run.stderr


def test_a_superbatch_that_does_not_divide_fails_clearly(tmp_path, capsys):
    # 30 kept on one rank at f = 0.6 would need a superbatch of 30 / 0.4 = 75: fine; at
    # f = 0.45 it would need 54.54...: refused before anything is built.
    args = overrides(tmp_path, "global_train_batch_size=30", "filter_ratio=0.45")
    assert main([str(QUICKSTART), *args]) == 2
    err = capsys.readouterr().err
    assert "needs a superbatch of 54.5455 samples per rank, not a whole number" in err


@pytest.fixture(scope="module")
def damaged_sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    """The first 480 training samples, every 9th image cut short after its JPEG header."""
    broken: set[str] = set()

    def damage(i: int, row: dict) -> dict:
        if i % 9 == 4:
            row["image"] = bytes(row["image"])[:64]
            broken.add(row["key"])
        return row

    root = tmp_path_factory.mktemp("damaged")
    sample_subset(root / "train", 480, damage)
    return root, broken


def damaged_run(tmp_path: Path, data: Path, *extra: str):
    cfg = load_config(
        QUICKSTART,
        overrides(
            tmp_path, f"train_data.local={data}/train", "max_duration=3ba",
            "eval_data.zeroshot=null", "eval_data.retrieval=null", "train_data.num_workers=0",
            *extra,
        ),
    )
    return build_trainer(cfg)


def test_an_undecodable_kept_image_stops_training_naming_it(tmp_path, damaged_sample):
    data, broken = damaged_sample
    trainer = damaged_run(tmp_path, data)  # decode.on_error defaults to raise
    message = r"cannot decode the image of sample '[\w-]+'.*training step 0"
    with pytest.raises(ValueError, match=message) as err:
        trainer.fit()
    assert re.search(r"sample '([\w-]+)'", str(err.value)).group(1) in broken
    trainer.close()


def test_replace_trains_on_stand_ins_and_logs_every_replacement(tmp_path, damaged_sample):
    data, broken = damaged_sample
    trainer = damaged_run(tmp_path, data, "decode.on_error=replace")
    trainer.fit()
    (cabs,) = trainer.state.algorithms
    records = [json.loads(line) for line in (tmp_path / "selection.jsonl").open()]
    assert [r["step"] for r in records] == [0, 1, 2]
    logged = [pair for r in records for rank in r.get("replaced", []) for pair in rank]
    assert logged == [[r.failed, r.stand_in] for r in cabs.replacements]
    assert len(logged) >= 3  # about one in nine of 3 x 32 kept samples
    assert {bad for bad, _ in logged} <= broken
    trained = [key for r in records for rank in r["keys"] for key in rank]
    assert len(trained) == 3 * 32 and not broken & set(trained)
    assert {good for _, good in logged} <= set(trained)
    trainer.close()


def test_cpu_ranks_share_the_cores_unless_the_user_set_the_threads():
    """Two CPU ranks on 2 cores ran 4 busy torch threads; each gets its share now."""
    assert cpu_threads_per_rank(2, 2, {}) == 1
    assert cpu_threads_per_rank(16, 4, {}) == 4
    assert cpu_threads_per_rank(2, 4, {}) == 1  # never 0
    assert cpu_threads_per_rank(8, 1, {}) is None  # one process: torch's own default
    assert cpu_threads_per_rank(2, 2, {"OMP_NUM_THREADS": "2"}) is None  # the user's choice

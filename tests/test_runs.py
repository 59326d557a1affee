"""A run's files and checkpoints: they follow the run name, a new run never writes into another
run's files, autoresume continues from the newest complete checkpoint, a finished run says so,
and no checkpoint is unpickled unless it holds nothing but a training state.

The runs are single-process ``train.py`` runs (``main``) on a 480-sample cut of the embedded
sample: 3 steps an epoch at the quickstart's superbatch of 160, no evaluation.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers import sample_subset
from paths import ROOT, SAMPLE

from cabs_streaming.runs import (
    UnsafeCheckpoint,
    check_checkpoint,
    list_checkpoints,
    newest_checkpoint,
)
from cabs_streaming.train import main

QUICKSTART = ROOT / "yamls" / "quickstart.yaml"
SAMPLES = 480  # 3 superbatches of 160 (global batch 32 at filter ratio 0.8)


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 480 training samples of the embedded sample, with its vocabulary."""
    return sample_subset(tmp_path_factory.mktemp("small") / "train", SAMPLES)


def run(folder: Path, data: Path, *extra: str) -> int:
    """``train.py`` on the small sample, every run's files under ``folder/<run_name>``."""
    return main(
        [
            str(QUICKSTART),
            f"train_data.local={data}",
            "train_data.num_workers=0",
            "eval_data.zeroshot=null",
            "eval_data.retrieval=null",
            f"run_folder={folder}/{{run_name}}",
            "progress_bar=false",
            "status_interval=null",
            "scheduler.t_warmup=0ba",
            "global_train_batch_size=32",  # 3 steps an epoch of the 480 samples
            "model.name=cabs-tiny-clip",  # faster than the recipe's ResNet; the model is no matter
            *extra,
        ]
    )


def steps_logged(run_folder: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_folder / "selection.jsonl").open()]


def test_rerunning_a_run_is_refused_autoresume_continues_it_and_a_finished_one_says_so(
    tmp_path: Path, small_sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tmp_path / "quickstart"
    assert run(tmp_path, small_sample, "max_duration=2ba", "save_interval=1ba") == 0
    metrics = (first / "metrics.json").read_bytes()
    history = (first / "history.jsonl").read_text()
    assert [json.loads(line)["step"] for line in history.splitlines()] == [0, 1]
    capsys.readouterr()

    # The same command again: refused before anything is built; nothing of the run changes.
    assert run(tmp_path, small_sample, "max_duration=2ba", "save_interval=1ba") == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: run 'quickstart' already has files: ")
    assert "add autoresume=true; for a new run, choose another name (run_name=quickstart-2)" in err
    assert (first / "metrics.json").read_bytes() == metrics
    assert steps_logged(first) == [0, 1]

    # Another run name: every file goes to its own folder, the first run's stay as they were.
    assert run(tmp_path, small_sample, "max_duration=1ba", "run_name=other") == 0
    other = tmp_path / "other"
    assert sorted(p.name for p in other.iterdir()) == [
        "checkpoints",
        "curves.png",
        "history.jsonl",
        "metrics.json",
        "run.json",
        "selection.jsonl",
        "summary.json",
    ]
    assert json.loads((other / "run.json").read_text())["run_name"] == "other"
    assert (first / "metrics.json").read_bytes() == metrics
    assert (first / "history.jsonl").read_text() == history

    # autoresume continues the first run from its newest checkpoint (step 2), appending.
    capsys.readouterr()
    assert run(tmp_path, small_sample, "max_duration=3ba", "autoresume=true") == 0
    assert steps_logged(first) == [0, 1, 2]
    summary = json.loads((first / "summary.json").read_text())
    assert (summary["steps"], summary["resumed_from_step"], summary["steps_this_session"]) == (
        3,
        2,
        1,
    )

    # Rerun once more: the run is complete; exit 0 and nothing is trained or written.
    capsys.readouterr()
    assert run(tmp_path, small_sample, "max_duration=3ba", "autoresume=true") == 0
    out = capsys.readouterr().out
    assert "run 'quickstart' is complete: its checkpoint " in out
    assert "ep1-ba3-rank0.pt is at max_duration=3ba; nothing to train" in out
    assert steps_logged(first) == [0, 1, 2]


def test_a_checkpoint_at_an_epoch_end_resumes_without_composers_no_batches_warning(
    tmp_path: Path, small_sample: Path
) -> None:
    """Saved at the batch that ends an epoch, the resumed run would first iterate an empty
    epoch and Composer would warn "No batches were trained"; the save moves past the epoch."""
    assert run(tmp_path, small_sample, "max_duration=3ba", "save_interval=3ba") == 0
    folder = tmp_path / "quickstart" / "checkpoints"
    assert sorted(p.name for p in folder.glob("ep*.pt")) == ["ep1-ba3-rank0.pt"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = run(tmp_path, small_sample, "max_duration=4ba", "autoresume=true")
    assert status == 0
    assert not [w for w in caught if "No batches were trained" in str(w.message)]
    assert steps_logged(tmp_path / "quickstart") == [0, 1, 2, 3]


def test_the_newest_complete_checkpoint_wins_and_a_cut_one_is_set_aside(tmp_path: Path) -> None:
    for name in ("ep0-ba3-rank0.pt", "ep0-ba18-rank0.pt", "ep1-ba18-rank0.pt", "ep1-ba21-rank0.pt"):
        torch.save({"state": {"model": {"w": torch.ones(64)}}}, tmp_path / name)
    data = (tmp_path / "ep1-ba21-rank0.pt").read_bytes()
    (tmp_path / "ep1-ba24-rank0.pt").write_bytes(data[: len(data) // 2])  # a crash mid-write
    os.symlink("ep0-ba3-rank0.pt", tmp_path / "latest-rank0.pt")  # a pointer that lags behind
    (tmp_path / "ep1-ba30-rank1.pt").write_bytes(data)  # another rank's file: not a checkpoint
    found = list_checkpoints(str(tmp_path))
    assert [(c.epoch, c.batch) for c in found] == [(0, 3), (0, 18), (1, 18), (1, 21)]
    assert newest_checkpoint(str(tmp_path)).path == str(tmp_path / "ep1-ba21-rank0.pt")
    assert (tmp_path / "ep1-ba24-rank0.pt.incomplete").exists()
    assert not (tmp_path / "ep1-ba24-rank0.pt").exists()
    assert newest_checkpoint(str(tmp_path / "nothing-here")) is None


class _RunsCode:
    """Pickles to a call of ``os.system``: what a crafted checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_is_refused_before_it_is_unpickled(
    tmp_path: Path, small_sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(tmp_path, small_sample, "max_duration=1ba", "save_interval=1ba") == 0
    genuine = tmp_path / "quickstart" / "checkpoints" / "ep0-ba1-rank0.pt"
    check_checkpoint(str(genuine))  # Composer's own state passes

    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pt"
    state = torch.load(genuine, weights_only=False)
    state["state"]["integrations"] = {"payload": _RunsCode(marker)}
    torch.save(state, crafted)
    with pytest.raises(UnsafeCheckpoint, match=r"\(the global posix.system\)"):
        check_checkpoint(str(crafted))
    capsys.readouterr()
    assert run(tmp_path, small_sample, "run_name=b", f"load_path={crafted}") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: checkpoint {crafted} holds more than a Composer")
    assert "set trust_checkpoints=true" in err
    assert not marker.exists()

    # Planted in the run's own save_folder, autoresume refuses it too.
    planted = tmp_path / "quickstart" / "checkpoints" / "ep0-ba2-rank0.pt"
    shutil.copy(crafted, planted)
    assert run(tmp_path, small_sample, "max_duration=3ba", "autoresume=true") == 2
    assert f"config error: checkpoint {planted} holds more" in capsys.readouterr().err
    assert not marker.exists()


def test_an_eval_set_of_other_data_is_named_in_a_warning(
    tmp_path: Path, small_sample: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Your own data (here: the small sample under other concept names) evaluated on the
    embedded sample's sets, as the quickstart's eval_data does: say so."""
    from cabs_streaming.concepts import Vocabulary
    from cabs_streaming.config import load_config
    from cabs_streaming.train import build_run

    own = tmp_path / "own"
    shutil.copytree(small_sample, own)
    names = Vocabulary.load(str(small_sample)).names
    Vocabulary([f"my concept {i}" for i in range(len(names))]).save(str(own))
    common = [f"variables.data={SAMPLE}", f"run_folder={tmp_path}/{{run_name}}"]
    with caplog.at_level("WARNING", logger="cabs_streaming.train"):
        build_run(load_config(QUICKSTART, [*common, f"train_data.local={own}"])).trainer.close()
    warned = [r.getMessage() for r in caplog.records if "vocabulary differs" in r.getMessage()]
    assert len(warned) == 2, warned
    assert warned[0].startswith(
        "eval_data.zeroshot evaluates on a set whose vocabulary differs from the training "
        "data's: 20 of its 20 concepts (e.g. 'sandal', 't-shirt', 'digit nine') are not among "
        "the 20 training concepts"
    )
    assert "or set eval_data.zeroshot=null to train without it" in warned[0]
    assert warned[1].startswith("eval_data.retrieval evaluates on a set whose vocabulary")

    caplog.clear()
    with caplog.at_level("WARNING", logger="cabs_streaming.train"):
        build_run(
            load_config(QUICKSTART, [*common, "run_name=same", f"train_data.local={small_sample}"])
        ).trainer.close()
    assert not [r for r in caplog.records if "vocabulary differs" in r.getMessage()]


def test_checkpoints_that_cannot_be_checked_need_trust(
    tmp_path: Path, small_sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(tmp_path, small_sample, "save_folder=gs://bucket/{run_name}", "autoresume=true") == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: autoresume from gs://bucket/quickstart: only local")
    assert "set trust_checkpoints=true" in err
    assert (
        run(tmp_path, small_sample, "run_name=other", "load_path=gs://bucket/ep0-ba1-rank0.pt") == 2
    )
    assert "config error: cannot check gs://bucket/ep0-ba1-rank0.pt before it is unpickled" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.name=ViT-Nope", "config error: model: unknown open_clip model 'ViT-Nope'"),
        ("model.options.colour=1", "config error: model: "),
        ("train_data.local=/nonexistent/data", "config error: train_data: "),
    ],
)
def test_what_only_the_libraries_can_check_is_a_config_error_too(
    tmp_path: Path,
    small_sample: Path,
    capsys: pytest.CaptureFixture[str],
    override: str,
    expected: str,
) -> None:
    assert run(tmp_path, small_sample, override) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected), err
    assert "Traceback" not in err

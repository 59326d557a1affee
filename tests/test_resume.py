"""Exact resumption on two gloo ranks: a run killed with SIGKILL and restarted with autoresume
selects exactly what the uninterrupted run selected at every step, and ends with bitwise equal
weights (CPU). Selection is a pure function of the step; Streaming's sample order and the
dataset's saved position do the rest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from paths import ROOT, SAMPLE

RUN = Path(__file__).with_name("resume_run.py")
QUICKSTART = ROOT / "yamls" / "quickstart.yaml"
COMPOSER = Path(sys.executable).with_name("composer")
STEPS = 22  # an epoch is 18 steps: 3000 samples / (2 ranks x 80 drawn)


def train(folder: Path, kill_at: int | None, *extra: str) -> tuple[int, str]:
    """Run the launcher in a session of its own; returns (exit status, the output's tail).

    The session makes a kill reach every process of the run, and lets us sweep up whatever a
    killed run leaves behind, so that nothing outlives it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    args = [
        f"variables.data={SAMPLE}",
        f"run_name={folder.name}",
        f"save_folder={folder}/checkpoints",
        f"selection.selection_log={folder}/selection.jsonl",
        f"metrics_file={folder}/metrics.json",
        f"max_duration={STEPS}ba",
        "autoresume=true",
        "eval_data.zeroshot=null",
        "eval_data.retrieval=null",
        "progress_bar=false",
        "log_to_console=false",
        *extra,
    ]
    command = [str(COMPOSER), "-n", "2", str(RUN), str(QUICKSTART), str(kill_at or "none")]
    log = folder / "launcher.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [*command, str(folder / "weights.pt"), *args],
            cwd=folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            status = process.wait(timeout=600)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return status, log.read_text(errors="replace")[-3000:]


def selections(folder: Path) -> dict[int, list[list[str]]]:
    """Step -> kept keys of every rank; a replayed step must repeat exactly what it logged."""
    out: dict[int, list[list[str]]] = {}
    for line in (folder / "selection.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["step"] in out:
            assert out[record["step"]] == record["keys"], f"step {record['step']} changed"
        out[record["step"]] = record["keys"]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("resume") / "uninterrupted"
    status, output = train(folder, None, "save_interval=1ep", "train_data.num_workers=1")
    assert status == 0, output
    return folder


@pytest.mark.parametrize(
    ("case", "kill_at", "first", "second"),
    [
        # A checkpoint every 4 steps; killed mid-epoch at step 10, resumed from batch 8.
        ("mid_epoch", 10, ("save_interval=4ba",), ("save_interval=4ba",)),
        # The only checkpoint is the one taken exactly at the end of epoch 0 (batch 18).
        ("epoch_boundary", 20, ("save_interval=1ep",), ("save_interval=1ep",)),
        # Resumed with a different number of DataLoader workers.
        (
            "other_workers",
            10,
            ("save_interval=4ba", "train_data.num_workers=1"),
            ("save_interval=4ba", "train_data.num_workers=2"),
        ),
    ],
)
def test_killed_and_resumed_run_equals_the_uninterrupted_one(
    uninterrupted, tmp_path, case, kill_at, first, second
):
    folder = tmp_path / case
    status, output = train(folder, kill_at, *first)
    assert status == -signal.SIGKILL, output
    assert not (folder / "weights.pt").exists()
    assert len(selections(folder)) == kill_at
    status, output = train(folder, None, *second)
    assert status == 0, output

    assert selections(folder) == selections(uninterrupted)
    expected = torch.load(uninterrupted / "weights.pt")
    actual = torch.load(folder / "weights.pt")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)

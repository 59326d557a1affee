"""Exact resumption on two gloo ranks: a run killed with SIGKILL and restarted with autoresume
selects exactly what the uninterrupted run selected at every step, and ends with bitwise equal
weights (CPU). Selection is a pure function of the step; Streaming's sample order and the
dataset's saved position do the rest.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from launch import selections, train

STEPS = 22  # an epoch is 9 steps: 3000 samples / (2 ranks x 160 drawn)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("resume") / "uninterrupted"
    status, output = train(
        folder, None, f"max_duration={STEPS}ba", "save_interval=1ep", "train_data.num_workers=1"
    )
    assert status == 0, output
    return folder


@pytest.mark.parametrize(
    ("case", "kill_at", "first", "second"),
    [
        # A checkpoint every 4 steps; killed mid-epoch at step 10, resumed from batch 8.
        ("mid_epoch", 10, ("save_interval=4ba",), ("save_interval=4ba",)),
        # The last checkpoint is the one taken exactly at the end of epoch 1 (batch 18).
        ("epoch_boundary", 20, ("save_interval=1ep",), ("save_interval=1ep",)),
        # Resumed with a different number of DataLoader workers, and decoding each step when
        # it is due instead of one step ahead (decode.lookahead, on in every other run): the
        # two-rank check that the lookahead changes no batch.
        (
            "other_workers_no_lookahead",
            10,
            ("save_interval=4ba", "train_data.num_workers=1"),
            ("save_interval=4ba", "train_data.num_workers=2", "decode.lookahead=false"),
        ),
    ],
)
def test_killed_and_resumed_run_equals_the_uninterrupted_one(
    uninterrupted, tmp_path, case, kill_at, first, second
):
    folder = tmp_path / case
    status, output = train(folder, kill_at, f"max_duration={STEPS}ba", *first)
    assert status == -signal.SIGKILL, output
    assert not (folder / "weights.pt").exists()
    assert len(selections(folder)) == kill_at
    status, output = train(folder, None, f"max_duration={STEPS}ba", *second)
    assert status == 0, output

    assert selections(folder) == selections(uninterrupted)
    expected = torch.load(uninterrupted / "weights.pt")
    actual = torch.load(folder / "weights.pt")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)

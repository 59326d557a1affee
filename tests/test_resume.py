"""Exact resumption on two gloo ranks: a run killed with SIGKILL and restarted with autoresume
selects exactly what the uninterrupted run selected at every step, and ends with bitwise equal
weights (CPU). Selection is a pure function of the step; Streaming's sample order and the
dataset's saved position do the rest.

The runs train on a subset whose epoch is ``EPOCH_STEPS`` steps (``launch.py``) and are compared
with the session's ``uninterrupted`` run (``conftest.py``), which the S3 fault tests share.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from launch import EPOCH_STEPS, selections, train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("case", "kill_at", "first", "second"),
    [
        # Killed mid-epoch (checkpoint at step 4 of 5), and resumed with another number of
        # DataLoader workers and decoding each step when it is due instead of one step ahead
        # (decode.lookahead, on in every other run): the two-rank check that neither the worker
        # count nor the lookahead changes a batch.
        (
            "mid_epoch_other_workers_no_lookahead",
            EPOCH_STEPS - 1,
            ("save_interval=2ba", "train_data.num_workers=1"),
            ("save_interval=2ba", "train_data.num_workers=2", "decode.lookahead=false"),
        ),
        # The only checkpoint is the one taken exactly at the end of epoch 0.
        ("epoch_boundary", EPOCH_STEPS + 2, ("save_interval=1ep",), ("save_interval=1ep",)),
    ],
)
def test_killed_and_resumed_run_equals_the_uninterrupted_one(
    uninterrupted: Path, resume_data: Path, tmp_path: Path, case, kill_at, first, second
):
    folder = tmp_path / case
    data = f"train_data.local={resume_data}"
    status, output = train(folder, kill_at, data, *first)
    assert status == -signal.SIGKILL, output
    assert not (folder / "weights.pt").exists()
    assert len(selections(folder)) == kill_at
    status, output = train(folder, None, data, *second)
    assert status == 0, output

    assert selections(folder) == selections(uninterrupted)
    expected = torch.load(uninterrupted / "weights.pt")
    actual = torch.load(folder / "weights.pt")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


#: FM for steps 0-2, ``mixed`` with ``lambda`` ramping 0 -> 2 over steps 3-6, then CABS-DM with
#: the quickstart's shared ``concept_cap``: a kill at step 4 lands inside the ramp.
SCHEDULE = (
    "selection.schedule=[{until: 3ba, policy: frequency}, {until: 0.78dur, policy: mixed, "
    "ramp: {option: lambda, from: 0.0, to: 2.0}}, {policy: diversity}]"
)


def test_a_run_killed_inside_a_schedule_resumes_across_its_phase_changes(
    uninterrupted: Path, resume_data: Path, tmp_path: Path
):
    # 0.78 of 9 steps is step 7 (rounded down): the DM phase is steps 7-8, where the schedule
    # run must select exactly what the plain CABS-DM run selected (same data order, policy and
    # options: selection is a pure function of the step's superbatch), while its FM steps differ.
    data = f"train_data.local={resume_data}"
    whole = tmp_path / "schedule-whole"
    status, output = train(whole, None, data, SCHEDULE, "save_interval=1ep")
    assert status == 0, output
    killed = tmp_path / "schedule-killed"
    status, output = train(killed, 4, data, SCHEDULE, "save_interval=2ba")
    assert status == -signal.SIGKILL, output
    status, output = train(killed, None, data, SCHEDULE, "save_interval=2ba")
    assert status == 0, output

    assert selections(killed) == selections(whole)
    expected = torch.load(whole / "weights.pt")
    actual = torch.load(killed / "weights.pt")
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    plain, scheduled = selections(uninterrupted), selections(whole)
    assert [scheduled[s] for s in (7, 8)] == [plain[s] for s in (7, 8)]
    assert all(scheduled[s] != plain[s] for s in (0, 1, 2))

"""World-invariant selection with the real ``composer`` launcher on gloo: 1, 2 and 4 ranks.

Every run trains the tiny ViT CLIP (``cabs-tiny-clip``: LayerNorm only, so no per-rank batch
statistics) with CABS-DM and ``selection.world_invariant=true`` on the resumption tests' subset
(``launch.py``: 5 steps an epoch, global batch 32 kept of 160 drawn; 7 steps here) through
``elastic_run.py``, which also selects each step with IID, CABS-FM and CABS-DM through the same
collectives and logs every kept sample's key, index, image digest and caption.

- Uninterrupted runs on 1, 2 and 4 ranks keep the same global set at every step, for every
  policy, before and after the epoch boundary; the bytes a rank received for a sample are that
  sample's (digests and captions equal those of the 1-rank run, where nothing moves).
- A 2-rank run killed mid-epoch resumes on 4 ranks, and one killed after the epoch boundary
  resumes on 1 rank with data and checkpoints in S3 (SeaweedFS): both keep the uninterrupted
  2-rank run's sets at every step.

Weights cannot be bitwise equal across world sizes (the reduction order changes); the model
sees the same global batch with the same crops (seeded by sample index), so the loss curves
agree to float32 rounding: measured at most 2.4e-7 apart over 9 steps; asserted 1e-4.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from launch import EPOCH_STEPS, train
from s3server import S3Server

pytestmark = pytest.mark.slow

RUN = Path(__file__).with_name("elastic_run.py")
#: Steps of every run: the epoch boundary after step 4, and two steps of epoch 1.
STEPS = EPOCH_STEPS + 2
BUCKET = "elastic"
POLICIES = ("iid", "frequency", "diversity")
#: How far the training loss (mean over ranks) of two world sizes may be apart at any step.
LOSS_TOLERANCE = 1e-4


def elastic(
    folder: Path, kill_at: int | None, ranks: int, *extra: str, env: dict | None = None
) -> tuple[int, str]:
    """One world-invariant run of ``elastic_run.py`` on ``ranks`` gloo ranks."""
    env = {"CABS_TEST_ALSO_SELECT": str(folder / "also.jsonl"), **(env or {})}
    return train(
        folder, kill_at, "selection.world_invariant=true", "train_data.num_workers=1",
        "model.name=cabs-tiny-clip", f"max_duration={STEPS}ba", *extra, ranks=ranks, script=RUN,
        env=env,
    )  # fmt: skip


def world_sizes(folder: Path) -> dict[int, set[int]]:
    """Step -> the numbers of ranks that trained it (two when a step was replayed on resume)."""
    out: dict[int, set[int]] = {}
    for line in (folder / "selection.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.setdefault(record["step"], set()).add(len(record["keys"]))
    return out


def trained_sets(folder: Path) -> dict[int, list[tuple[str, int]]]:
    """Step -> the global kept (key, sample index) pairs trained on, whatever the world size.

    A step replayed after a resume (on any world size) must repeat the same set.
    """
    out: dict[int, list[tuple[str, int]]] = {}
    for line in (folder / "selection.jsonl").read_text().splitlines():
        record = json.loads(line)
        pairs = sorted(
            (key, index)
            for keys, indices in zip(record["keys"], record["indices"], strict=True)
            for key, index in zip(keys, indices, strict=True)
        )
        assert out.setdefault(record["step"], pairs) == pairs, f"step {record['step']} changed"
    return out


def policy_sets(folder: Path) -> dict[tuple[str, int], list[tuple]]:
    """(policy, step) -> the sorted kept (key, index, image digest, caption) of every rank."""
    out: dict[tuple[str, int], list[tuple]] = {}
    for line in (folder / "also.jsonl").read_text().splitlines():
        record = json.loads(line)
        rows = sorted(tuple(row) for row in record["kept"])
        assert out.setdefault((record["policy"], record["step"]), rows) == rows
    return out


def moved(folder: Path) -> list[tuple[int, int]]:
    """(samples, bytes) moved between ranks, per policy and step, from ``also.jsonl``."""
    lines = (folder / "also.jsonl").read_text().splitlines()
    return [(r["moved"], r["moved_bytes"]) for r in map(json.loads, lines)]


def losses(folder: Path) -> dict[int, float]:
    """Step -> training loss (the mean over ranks Composer logs), from ``history.jsonl``."""
    out = {}
    for line in (folder / "history.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss/train/total" in record:
            out[record["step"]] = record["loss/train/total"]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, resume_data: Path) -> dict[int, Path]:
    """Uninterrupted world-invariant runs on 1, 2 and 4 ranks, by world size."""
    out = {}
    for ranks in (1, 2, 4):
        folder = tmp_path_factory.mktemp("elastic") / f"world{ranks}"
        status, output = elastic(folder, None, ranks, f"train_data.local={resume_data}")
        assert status == 0, output
        out[ranks] = folder
    return out


def test_one_two_and_four_ranks_keep_the_same_global_sets(runs: dict[int, Path]):
    trained = {ranks: trained_sets(folder) for ranks, folder in runs.items()}
    assert sorted(trained[1]) == list(range(STEPS))  # both epochs, every step
    assert trained[2] == trained[1] and trained[4] == trained[1]
    for step, pairs in trained[1].items():
        assert len(pairs) == 32 and len({key for key, _ in pairs}) == 32, step

    selected = {ranks: policy_sets(folder) for ranks, folder in runs.items()}
    assert sorted(selected[1]) == sorted((p, s) for p in POLICIES for s in range(STEPS))
    assert selected[2] == selected[1] and selected[4] == selected[1]
    # The policy the run trains on selected the same samples in the side selection.
    for step, pairs in trained[1].items():
        assert [(row[0], row[1]) for row in selected[1][("diversity", step)]] == pairs
    # The policies differ (the comparison is not of one set three times).
    assert selected[1][("iid", 0)] != selected[1][("frequency", 0)]

    assert all(m == (0, 0) for m in moved(runs[1]))  # one rank: nothing to move
    for ranks in (2, 4):  # samples did change rank, and their bytes arrived intact
        assert sum(samples for samples, _ in moved(runs[ranks])) > 0
        assert all((samples == 0) == (size == 0) for samples, size in moved(runs[ranks]))

    curves = {ranks: losses(folder) for ranks, folder in runs.items()}
    for ranks in (2, 4):
        assert sorted(curves[ranks]) == sorted(curves[1]) == list(range(STEPS))
        assert curves[ranks] == pytest.approx(curves[1], abs=LOSS_TOLERANCE), (ranks, curves)


def test_two_rank_run_killed_mid_epoch_resumes_on_four(
    runs: dict[int, Path], resume_data: Path, tmp_path: Path
):
    folder = tmp_path / "two-then-four"
    data = f"train_data.local={resume_data}"
    status, output = elastic(folder, EPOCH_STEPS - 2, 2, data, "save_interval=2ba")
    assert status == -signal.SIGKILL, output
    assert sorted(trained_sets(folder)) == list(range(EPOCH_STEPS - 2))
    status, output = elastic(folder, None, 4, data, "save_interval=2ba")
    assert status == 0, output
    assert "rank-local selection keeps different samples" not in output
    # It resumed from the checkpoint after step 2: steps 0 and 1 ran on 2 ranks only.
    assert world_sizes(folder) == {0: {2}, 1: {2}, 2: {2, 4}, **{s: {4} for s in range(3, STEPS)}}
    # Step 2 ran on 2 ranks before the kill and again on 4 after it (trained_sets checks).
    assert trained_sets(folder) == trained_sets(runs[2])
    assert policy_sets(folder) == policy_sets(runs[2])
    assert losses(folder) == pytest.approx(losses(runs[2]), abs=LOSS_TOLERANCE)


@pytest.fixture(scope="module")
def bucket(s3: S3Server, resume_data: Path) -> str:
    """The training shards in the session's S3 server; returns their ``s3://`` prefix."""
    s3.make_bucket(BUCKET)
    client = s3.client()
    for path in sorted(resume_data.iterdir()):
        client.upload_file(str(path), BUCKET, f"sample/train/{path.name}")
    return f"s3://{BUCKET}/sample/train"


def test_two_rank_run_killed_after_the_epoch_boundary_resumes_on_one_from_s3(
    runs: dict[int, Path], bucket: str, tmp_path: Path
):
    folder = tmp_path / "two-then-one"
    options = (
        f"train_data.remote={bucket}",
        f"train_data.local={tmp_path}/cache",
        f"save_folder=s3://{BUCKET}/checkpoints/{{run_name}}",
        "save_interval=1ep",
        "save_latest_poll_s=0.5",
    )
    # Killed once the epoch's checkpoint is in the bucket (uploads are asynchronous: a kill
    # on a step count alone may come before it), one step into epoch 1.
    kill = {"CABS_TEST_KILL_BEFORE_POINTER": str(EPOCH_STEPS + 1)}
    status, output = elastic(folder, None, 2, *options, env=kill)
    assert status == -signal.SIGKILL, output
    status, output = elastic(folder, None, 1, *options)
    assert status == 0, output
    # It resumed at the epoch boundary: epoch 0 ran on 2 ranks only, epoch 1 on 1 rank.
    sizes = world_sizes(folder)
    assert all(sizes[s] == {2} for s in range(EPOCH_STEPS)), sizes
    assert all(1 in sizes[s] for s in range(EPOCH_STEPS, STEPS)), sizes
    assert trained_sets(folder) == trained_sets(runs[2])
    assert policy_sets(folder) == policy_sets(runs[2])
    assert losses(folder) == pytest.approx(losses(runs[2]), abs=LOSS_TOLERANCE)

"""Faults at the storage edge, against a real S3 server (SeaweedFS on 127.0.0.1).

- S3 unreachable at start, or the credentials refused: one clear error before anything is
  built, naming ``S3_ENDPOINT_URL`` or the credential variables, and the secret in no output.
- The server stopped and restarted during training (2 gloo ranks, data and checkpoints in the
  bucket): with the default retries the run rides out the outage; with one upload attempt it
  stops with a clear error, and autoresume from the bucket, on a fresh working directory (as on
  a new node), completes it. Both end with the selection log and bitwise weights of a run that
  saw no outage (the session's ``uninterrupted`` run, on the same samples as local files).
- A run killed when its first checkpoint is in the bucket but Composer's "latest" pointer is
  not: autoresume continues from that checkpoint (found by listing the bucket) instead of
  starting over and failing to upload over the existing object.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from launch import QUICKSTART, STEPS, checkpoint_name, selections, train
from paths import SAMPLE
from s3server import HOST, S3Server, free_ports

from cabs_streaming.train import main

pytestmark = pytest.mark.slow

BUCKET = "faults"
DATA = f"s3://{BUCKET}/sample/train"
SAVE_EVERY = 3
OUTAGE_AFTER = 6  # checkpoint 3 and its pointer are in the bucket, 6 uploads into the outage


@pytest.fixture(scope="module")
def server(s3: S3Server, resume_data: Path) -> S3Server:
    """The session's S3 server (clients pointed at it) holding the runs' training shards."""
    s3.make_bucket(BUCKET)
    client = s3.client()
    for path in sorted(resume_data.iterdir()):
        client.upload_file(str(path), BUCKET, f"sample/train/{path.name}")
    return s3


def s3_run(folder: Path, *extra: str) -> list[str]:
    """Overrides for a run whose data and checkpoints live in the bucket."""
    return [
        f"train_data.remote={DATA}",
        f"train_data.local={folder}/cache",
        f"save_folder=s3://{BUCKET}/checkpoints/{{run_name}}",
        f"save_interval={SAVE_EVERY}ba",
        "save_latest_poll_s=0.5",
        "train_data.num_workers=1",
        *extra,
    ]


def with_outage(server: S3Server, folder: Path, down_s: float) -> threading.Thread:
    """Stop the server when the run asks (``CABS_TEST_OUTAGE``), restart it ``down_s`` later."""
    signals = folder / "outage"
    signals.mkdir(parents=True, exist_ok=True)

    def run() -> None:
        deadline = time.monotonic() + 300
        while not (signals / "requested").exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        server.stop()
        (signals / "down").touch()
        time.sleep(down_s)
        server.start()
        (signals / "up").touch()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def train_through_outage(
    server: S3Server,
    folder: Path,
    down_s: float,
    join_s: float,
    *extra: str,
    cwd: Path | None = None,
) -> tuple[int, str]:
    """Train in the bucket, with the server down for ``down_s`` when the run asks.

    The run asks after checkpoint ``OUTAGE_AFTER`` (``OutageAfter`` in ``tests/resume_run.py``);
    the outage thread is given ``join_s`` to finish after the run ends.
    """
    outage = with_outage(server, folder, down_s)
    status, output = train(
        folder,
        None,
        *s3_run(folder, *extra),
        cwd=cwd,
        env={"CABS_TEST_OUTAGE": f"{OUTAGE_AFTER}:{folder / 'outage'}"},
    )
    outage.join(timeout=join_s)
    return status, output


def same_weights(a: Path, b: Path) -> bool:
    expected, actual = torch.load(a / "weights.pt"), torch.load(b / "weights.pt")
    return expected.keys() == actual.keys() and all(
        torch.equal(expected[k], actual[k]) for k in expected
    )


@pytest.fixture(scope="module")
def no_outage(server: S3Server, uninterrupted: Path) -> Path:
    """What every run through a fault must equal: the session's run without one."""
    assert len(selections(uninterrupted)) == STEPS
    return uninterrupted


# ------------------------------------------------------------------------------ at start


def test_an_unreachable_endpoint_is_named_before_anything_starts(
    server: S3Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (port,) = free_ports(1)  # nothing listens there
    endpoint = f"http://{HOST}:{port}"
    monkeypatch.setenv("S3_ENDPOINT_URL", endpoint)
    status = main([str(QUICKSTART), f"variables.data={SAMPLE}", f"train_data.remote={DATA}"])
    err = capsys.readouterr().err
    assert status == 2
    assert f"cannot reach S3 for train_data.remote ({DATA}) at S3_ENDPOINT_URL={endpoint}" in err
    assert "Traceback" not in err


def test_a_missing_dataset_is_named(server: S3Server, capsys: pytest.CaptureFixture[str]) -> None:
    remote = f"s3://{BUCKET}/nothing/here"
    status = main([str(QUICKSTART), f"variables.data={SAMPLE}", f"train_data.remote={remote}"])
    err = capsys.readouterr().err
    assert status == 2
    assert f"{remote}/index.json does not exist" in err


def test_wrong_credentials_fail_clearly_and_the_secret_is_never_written(
    server: S3Server, tmp_path: Path
) -> None:
    secret = "wrong-secret-Zq81xWv"
    folder = tmp_path / "wrong_secret"
    status, _ = train(
        folder,
        None,
        *s3_run(folder),
        "progress_bar=true",
        "log_to_console=true",
        env={"AWS_SECRET_ACCESS_KEY": secret, "CABS_LOG_LEVEL": "DEBUG"},
        timeout=300,
        entry_point=True,
    )
    assert status == 2
    written = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    output = written[folder / "launcher.log"].decode(errors="replace")
    assert "rejected the credentials for train_data.remote" in output, output[-3000:]
    assert "AWS_ACCESS_KEY_ID=cabs... (secret not shown)" in output
    leaks = [str(path) for path, data in written.items() if secret.encode() in data]
    leaks += [str(path) for path, data in written.items() if server.secret_key.encode() in data]
    assert leaks == []


# -------------------------------------------------------------------- during training


def test_a_short_outage_costs_retries_not_the_run(
    server: S3Server, no_outage: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "short_outage"
    status, output = train_through_outage(server, folder, 5.0, 60)
    assert (folder / "outage" / "up").exists(), "the outage never happened"
    assert status == 0, output
    uploaded = server.keys(BUCKET, f"checkpoints/{folder.name}/")
    expected = [checkpoint_name(b) for b in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]
    assert sorted(k.rsplit("/", 1)[-1] for k in uploaded if k.endswith(".pt")) == sorted(expected)
    assert selections(folder) == selections(no_outage)
    assert same_weights(folder, no_outage)


def test_an_outage_beyond_the_retries_stops_clearly_and_autoresume_completes(
    server: S3Server, no_outage: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "long_outage"
    status, output = train_through_outage(
        server, folder, 20.0, 120, "save_upload_attempts=1", cwd=tmp_path / "node-a"
    )
    assert status != 0
    output = (folder / "launcher.log").read_text(errors="replace")
    assert (folder / "outage" / "up").exists()
    assert f"uploading a checkpoint to s3://{BUCKET}/checkpoints/{folder.name}" in output, output
    assert "run the same command with autoresume=true" in output
    assert checkpoint_name(OUTAGE_AFTER) in output, "another upload than the outage's failed"
    assert not (folder / "weights.pt").exists()
    logged = [json.loads(line)["step"] for line in (folder / "selection.jsonl").open()]

    # A fresh working directory: no local checkpoint, so autoresume must read the bucket.
    node_b = tmp_path / "node-b"
    status, output = train(folder, None, *s3_run(folder), cwd=node_b)
    assert status == 0, output
    steps = [json.loads(line)["step"] for line in (folder / "selection.jsonl").open()]
    second_run = steps[len(logged) :]
    # Steps count from 0: checkpoint 3 holds steps 0-2, so the resumed run starts at step 3.
    assert second_run == list(range(OUTAGE_AFTER - SAVE_EVERY, STEPS)), "not resumed from ba3"
    assert selections(folder) == selections(no_outage)
    assert same_weights(folder, no_outage)


# -------------------------------------------------------------------- killed mid-upload


def test_a_checkpoint_in_the_bucket_without_its_pointer_is_resumed_from(
    server: S3Server, no_outage: Path, tmp_path: Path
) -> None:
    """Killed after checkpoint 3 reached the bucket and before the "latest" pointer.

    Composer's autoresume found no pointer, started from step 0 and at step 3 could not upload
    ``ep0-ba3-rank0.pt`` over the object that exists; the run then blamed S3 and asked for
    autoresume again, which looped. The bucket's own listing is what counts now.
    """
    folder = tmp_path / "killed_before_pointer"
    prefix = f"checkpoints/{folder.name}/"
    status, output = train(
        folder, None, *s3_run(folder), env={"CABS_TEST_KILL_BEFORE_POINTER": str(SAVE_EVERY)}
    )
    assert status == -signal.SIGKILL, output
    names = [k[len(prefix) :] for k in server.keys(BUCKET, prefix)]
    assert names == [checkpoint_name(SAVE_EVERY)], "the sequence did not happen"
    logged = len((folder / "selection.jsonl").read_text().splitlines())

    # Resumed up to the next checkpoint only: exactness to the end is the other tests' subject.
    end = 2 * SAVE_EVERY
    status, output = train(
        folder, None, *s3_run(folder), f"max_duration={end}ba", cwd=tmp_path / "node-b"
    )
    assert status == 0, output
    steps = [json.loads(line)["step"] for line in (folder / "selection.jsonl").open()]
    assert steps[logged:] == list(range(SAVE_EVERY, end)), "not resumed from the checkpoint"
    expected = selections(no_outage)
    assert selections(folder) == {step: expected[step] for step in range(end)}
    assert f"{prefix}{checkpoint_name(end)}" in server.keys(BUCKET, prefix)
    assert not (tmp_path / "node-b" / "s3:").exists()  # Composer's autoresume made this folder

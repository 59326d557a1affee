"""Train a recipe and optionally die with SIGKILL after a given batch: the resumption tests' run.

``python resume_run.py RECIPE KILL_AT WEIGHTS [key=value ...]`` (under ``composer -n N`` for
several ranks, started in a session of its own). ``KILL_AT`` is a batch count after which the
whole process group (launcher, ranks, DataLoader workers) is killed with SIGKILL, as when a node
dies, or ``none``; rank 0 writes the final model weights to ``WEIGHTS`` when training completes.

``CABS_TEST_OUTAGE=BATCH:FOLDER`` asks the test for an S3 outage after ``BATCH`` (see
``OutageAfter``): rank 0 creates ``FOLDER/requested`` and waits for ``FOLDER/down`` (the test
has stopped the server), so that the next checkpoint upload meets a server that is down.

``CABS_TEST_KILL_BEFORE_POINTER=BATCH`` kills the run once the checkpoint saved after ``BATCH``
batches is in the bucket but before Composer has uploaded its "latest" pointer (see
``KillBeforePointer``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch
from composer import Callback
from composer.callbacks import CheckpointSaver
from composer.utils import dist

from cabs_streaming._internals import wait_for_checkpoint_uploads
from cabs_streaming.config import load_config
from cabs_streaming.train import build_trainer


class KillAfter(Callback):
    """SIGKILL the process group once ``batches`` batches are done: no cleanup, no final save."""

    def __init__(self, batches: int | None) -> None:
        self.batches = batches

    def batch_end(self, state, logger) -> None:
        if self.batches is not None and int(state.timestamp.batch) == self.batches:
            os.killpg(os.getpgrp(), signal.SIGKILL)


class OutageAfter(Callback):
    """At batch ``batch``, rank 0 has the S3 server stopped with the last checkpoint in it.

    Composer uploads checkpoints from spawned processes and moves the remote "latest" pointer
    only at a batch end after it has seen the upload, so on a busy machine both can lag many
    batches. To make the outage meet a known state, rank 0 first waits for the uploads in
    flight and for the pointer to follow them, then asks the test to stop the server and waits
    until it is down: the next checkpoint's upload meets the outage, and an autoresume after it
    finds the previous checkpoint in the bucket.
    """

    def __init__(self, spec: str) -> None:
        batch, folder = spec.split(":", 1)
        self.batch = int(batch)
        self.folder = Path(folder)

    def batch_end(self, state, logger) -> None:
        if int(state.timestamp.batch) != self.batch or dist.get_global_rank() != 0:
            return
        saver = next(cb for cb in state.callbacks if isinstance(cb, CheckpointSaver))
        wait_for_checkpoint_uploads(saver)
        saver.batch_end(state, logger)  # now uploads the pointer to the newest checkpoint
        saver.remote_uploader.wait()
        (self.folder / "requested").touch()
        deadline = time.monotonic() + 120
        while not (self.folder / "down").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the test did not stop the S3 server within 120 s")
            time.sleep(0.05)


class KillBeforePointer(Callback):
    """SIGKILL everything when checkpoint ``batch`` is in the bucket and its pointer is not.

    Composer saves at ``BATCH_CHECKPOINT`` and submits the upload of the "latest" pointer only
    at a later ``BATCH_END``, once it has seen the checkpoint object. At the next
    ``BATCH_START`` rank 0 waits for the upload (and for the check that sees it), so the bucket
    holds the checkpoint, and no pointer has been submitted yet: the state of a node that died
    between the two.
    """

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def batch_start(self, state, logger) -> None:
        if int(state.timestamp.batch) != self.batch or dist.get_global_rank() != 0:
            return
        saver = next(cb for cb in state.callbacks if isinstance(cb, CheckpointSaver))
        saver.remote_uploader.wait()
        os.killpg(os.getpgrp(), signal.SIGKILL)


def main() -> None:
    level = os.environ.get("CABS_LOG_LEVEL", "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    recipe, kill_at, weights, *overrides = sys.argv[1:]
    trainer = build_trainer(load_config(recipe, overrides))
    trainer.state.callbacks.append(KillAfter(None if kill_at == "none" else int(kill_at)))
    if os.environ.get("CABS_TEST_OUTAGE"):
        trainer.state.callbacks.append(OutageAfter(os.environ["CABS_TEST_OUTAGE"]))
    if os.environ.get("CABS_TEST_KILL_BEFORE_POINTER"):
        batch = int(os.environ["CABS_TEST_KILL_BEFORE_POINTER"])
        trainer.state.callbacks.append(KillBeforePointer(batch))
    trainer.fit()
    if dist.get_global_rank() == 0:
        torch.save(trainer.state.model.state_dict(), weights)
    trainer.close()


if __name__ == "__main__":
    main()

"""Train a recipe and optionally die with SIGKILL after a given batch: the resumption tests' run.

``python resume_run.py RECIPE KILL_AT WEIGHTS [key=value ...]`` (under ``composer -n N`` for
several ranks, started in a session of its own). ``KILL_AT`` is a batch count after which the
whole process group (launcher, ranks, DataLoader workers) is killed with SIGKILL, as when a node
dies, or ``none``; rank 0 writes the final model weights to ``WEIGHTS`` when training completes.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
from composer import Callback
from composer.utils import dist

from cabs_streaming.config import load_config
from cabs_streaming.train import build_trainer


class KillAfter(Callback):
    """SIGKILL the process group once ``batches`` batches are done: no cleanup, no final save."""

    def __init__(self, batches: int | None) -> None:
        self.batches = batches

    def batch_end(self, state, logger) -> None:
        if self.batches is not None and int(state.timestamp.batch) == self.batches:
            os.killpg(os.getpgrp(), signal.SIGKILL)


def main() -> None:
    recipe, kill_at, weights, *overrides = sys.argv[1:]
    trainer = build_trainer(load_config(recipe, overrides))
    trainer.state.callbacks.append(KillAfter(None if kill_at == "none" else int(kill_at)))
    trainer.fit()
    if dist.get_global_rank() == 0:
        torch.save(trainer.state.model.state_dict(), weights)
    trainer.close()


if __name__ == "__main__":
    main()

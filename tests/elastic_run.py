"""``resume_run.py`` that also selects every step with each policy in world-invariant mode.

``python elastic_run.py RECIPE KILL_AT WEIGHTS [key=value ...]`` under ``composer -n N``, with
``CABS_TEST_ALSO_SELECT=PATH``. Before the training selection of each step, every rank runs
the collective half of a world-invariant step for IID, CABS-FM and CABS-DM on the superbatch it
drew (``select_superbatch`` and ``exchange_kept``, the code training runs) and rank 0 appends to
PATH one JSON line per policy: ``{"policy", "step", "world", "moved", "moved_bytes", "kept":
[[key, sample index, blake2b of the image bytes, caption], ...]}`` over all ranks. The digests
and captions show that the bytes a rank received are those of the sample it was given.
"""

from __future__ import annotations

import hashlib
import json
import os

import resume_run
from composer.core import Event
from composer.utils import dist

from cabs_streaming.algorithm import (
    ConceptAwareBatchSampling,
    collective_device,
    exchange_kept,
    select_superbatch,
)
from cabs_streaming.selection import get_policy

#: The policies compared across world sizes (CABS-DM with the quickstart's cap).
POLICIES = {
    "iid": get_policy("iid"),
    "frequency": get_policy("frequency"),
    "diversity": get_policy("diversity", {"concept_cap": 8}),
}


def also_select(cabs: ConceptAwareBatchSampling, path: str) -> None:
    """Wrap ``cabs.apply`` so that each step first selects with every policy and logs it."""
    apply = cabs.apply

    def wrapped(event, state, logger) -> None:
        if event == Event.AFTER_DATALOADER:
            step, device = int(state.timestamp.batch), collective_device(state)
            for name, policy in POLICIES.items():
                record = select_superbatch(
                    state.batch, step, policy=policy, filter_ratio=cabs.filter_ratio,
                    seed=cabs.seed, num_concepts=cabs.num_concepts, device=device,
                    world_invariant=True,
                )  # fmt: skip
                batch, kept = exchange_kept(state.batch, record, device)
                mine = [
                    [
                        batch["keys"][i],
                        int(batch["sample_indices"][i]),
                        hashlib.blake2b(bytes(batch["image_bytes"][i]), digest_size=8).hexdigest(),
                        batch["captions"][i],
                    ]
                    for i in kept.tolist()
                ]
                every = dist.all_gather_object(mine)
                if dist.get_global_rank() == 0:
                    line = {
                        "policy": name, "step": step, "world": dist.get_world_size(),
                        "moved": record.moved, "moved_bytes": record.moved_bytes,
                        "kept": [row for rows in every for row in rows],
                    }  # fmt: skip
                    with open(path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(line) + "\n")
        apply(event, state, logger)

    cabs.apply = wrapped  # type: ignore[method-assign]


def main() -> None:
    path = os.environ["CABS_TEST_ALSO_SELECT"]
    build = resume_run.build_trainer

    def build_trainer(cfg):
        trainer = build(cfg)
        cabs = next(a for a in trainer.state.algorithms if isinstance(a, ConceptAwareBatchSampling))
        also_select(cabs, path)
        return trainer

    resume_run.build_trainer = build_trainer
    resume_run.main()


if __name__ == "__main__":
    main()

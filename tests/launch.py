"""Run the quickstart recipe on two gloo ranks with the real ``composer`` launcher, for the
resumption and fault tests, and read back the selection log it writes.

Those tests train on the first ``SUBSET`` samples of the embedded sample with 32 kept per step,
so that an epoch is ``EPOCH_STEPS`` steps and a run crosses an epoch boundary in ``STEPS``; the
uninterrupted run they all compare with is trained once per session (``conftest.py``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from paths import ROOT, SAMPLE

RUN = Path(__file__).with_name("resume_run.py")
QUICKSTART = ROOT / "yamls" / "quickstart.yaml"
COMPOSER = Path(sys.executable).with_name("composer")

#: Samples of the training data (a superbatch is 2 ranks x 80 drawn: 5 steps an epoch).
SUBSET = 800
EPOCH_STEPS = 5
#: Steps of every run unless it says otherwise: one epoch boundary, after step 4.
STEPS = 9


def checkpoint_name(batch: int) -> str:
    """Composer's name of rank 0's checkpoint after ``batch`` steps (not at an epoch's end)."""
    return f"ep{(batch - 1) // EPOCH_STEPS}-ba{batch}-rank0.pt"


def train(
    folder: Path,
    kill_at: int | None,
    *extra: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
    entry_point: bool = False,
    ranks: int = 2,
    script: Path = RUN,
) -> tuple[int, str]:
    """Run the launcher in a session of its own; returns (exit status, the output's tail).

    ``folder`` holds the run's outputs (checkpoints unless ``extra`` sets ``save_folder``, the
    selection log, the final weights, the launcher's log); ``cwd`` is where the processes run
    (``folder`` by default); ``env`` is added to this process's environment. The session makes
    a kill reach every process of the run, and lets us sweep up whatever a killed or failed run
    leaves behind, so that nothing outlives it. ``entry_point`` runs the users' ``train.py``
    instead of ``resume_run.py`` (then ``kill_at`` must be None and no weights are written);
    ``script`` runs another script with ``resume_run.py``'s arguments; ``ranks`` is the number
    of gloo ranks.
    """
    folder.mkdir(parents=True, exist_ok=True)
    cwd = cwd or folder
    cwd.mkdir(parents=True, exist_ok=True)
    args = [
        f"variables.data={SAMPLE}",
        "global_train_batch_size=32",
        f"max_duration={STEPS}ba",
        f"run_name={folder.name}",
        f"run_folder={folder}",
        f"save_folder={folder}/checkpoints",
        f"selection.selection_log={folder}/selection.jsonl",
        f"metrics_file={folder}/metrics.json",
        "autoresume=true",
        "eval_data.zeroshot=null",
        "eval_data.retrieval=null",
        "progress_bar=false",
        "log_to_console=false",
        *extra,
    ]
    if entry_point:
        assert kill_at is None, "train.py cannot be killed on cue"
        command = [str(COMPOSER), "-n", str(ranks), str(ROOT / "train.py"), str(QUICKSTART)]
    else:
        command = [
            str(COMPOSER),
            "-n",
            str(ranks),
            str(script),
            str(QUICKSTART),
            str(kill_at or "none"),
            str(folder / "weights.pt"),
        ]
    log = folder / "launcher.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [*command, *args],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        try:
            status = process.wait(timeout=timeout)
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

"""A run's files: where they go, whose they are, and which checkpoint a resumed run starts from.

Three rules, checked before anything is built:

- **Every per-run path follows the effective run name.** ``{run_name}`` (and ``{run_folder}``)
  in ``run_folder``, ``save_folder``, ``selection.selection_log`` and ``metrics_file`` are
  replaced by the run's name, so ``run_name=other`` moves all of a run's files at once.
- **A new run never writes into another run's files.** A run that resumes nothing (no
  ``autoresume``, or nothing to resume) refuses to start when its selection log, metrics,
  history or checkpoints already exist, and says how to continue that run (``autoresume=true``)
  or start another (``run_name=...``). ``run.json`` in the run folder names the run that owns
  it, so a hard-coded folder cannot be shared by two run names either.
- **Resume from the newest complete checkpoint in save_folder.** Composer's autoresume reads a
  "latest" pointer that is written after the checkpoint; a run killed in between restarted from
  step 0 and then could not upload its first checkpoint over the existing object. Here the
  folder itself is listed: an S3 object is whole once it is listed, a local file is whole when
  its zip directory (``torch.save``'s format) is readable. Composer's default names
  ``ep{epoch}-ba{batch}-rank0.pt`` (rank 0 holds the whole state without FSDP) give the order.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cabs_streaming import _internals
from cabs_streaming.config import ConfigError, RunConfig, format_run_path

__all__ = [
    "CHECKPOINT_NAME",
    "Checkpoint",
    "RunConflict",
    "RunPaths",
    "UnsafeCheckpoint",
    "check_checkpoint",
    "claim_run",
    "list_checkpoints",
    "newest_checkpoint",
    "save_schedule",
]

log = logging.getLogger(__name__)

#: Composer's default checkpoint file name (``CheckpointSaver``), rank 0's file.
CHECKPOINT_NAME = re.compile(r"^ep(?P<epoch>\d+)-ba(?P<batch>\d+)-rank0\.pt$")
#: The file in the run folder that says which run owns it.
MARKER = "run.json"
#: The run folder's own files (see ``cabs_streaming.runlog``).
HISTORY, CURVES, SUMMARY = "history.jsonl", "curves.png", "summary.json"


class RunConflict(ConfigError):
    """The run would write into files of another run (or of an earlier run of the same name)."""


@dataclass(frozen=True, order=True)
class Checkpoint:
    """One complete checkpoint of a run, ordered by (batch, epoch): later is greater."""

    batch: int
    epoch: int
    path: str = field(compare=False)
    """A local path or an ``s3://`` URL, as Composer's ``load_path`` takes it."""


@dataclass(frozen=True)
class RunPaths:
    """A run's name and every path of its own, placeholders replaced."""

    run_name: str
    run_folder: str | None
    save_folder: str | None
    selection_log: str | None
    metrics_file: str | None

    @classmethod
    def of(cls, cfg: RunConfig, run_name: str) -> RunPaths:
        """Replace ``{run_name}`` / ``{run_folder}`` in every per-run path of ``cfg``."""
        folder = format_run_path(cfg.run_folder, run_name, None)
        return cls(
            run_name=run_name,
            run_folder=folder,
            save_folder=format_run_path(cfg.save_folder, run_name, cfg.run_folder),
            selection_log=format_run_path(cfg.selection.selection_log, run_name, cfg.run_folder),
            metrics_file=format_run_path(cfg.metrics_file, run_name, cfg.run_folder),
        )

    def in_run_folder(self, name: str) -> str | None:
        """``run_folder/name``, or None without a run folder."""
        return os.path.join(self.run_folder, name) if self.run_folder else None

    def own_files(self) -> list[str]:
        """The local files this run writes that must not belong to someone else."""
        names = [self.selection_log, self.metrics_file]
        names += [self.in_run_folder(n) for n in (HISTORY, CURVES, SUMMARY)]
        return [n for n in names if n]


# ------------------------------------------------------------------------------ checkpoints


def _is_remote(folder: str) -> bool:
    return "://" in folder


def _complete_local(path: Path) -> bool:
    """A ``torch.save`` file is a zip; a file cut short by a crash has no readable directory."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _list_local(folder: str) -> tuple[list[Checkpoint], list[str]]:
    complete, broken = [], []
    if not os.path.isdir(folder):
        return [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        match = CHECKPOINT_NAME.match(entry.name)
        if not match or entry.is_symlink() or not entry.is_file():
            continue
        if _complete_local(Path(entry.path)):
            complete.append(Checkpoint(int(match["batch"]), int(match["epoch"]), entry.path))
        else:
            broken.append(entry.path)
    return complete, broken


def _list_s3(folder: str) -> list[Checkpoint]:
    from cabs_streaming.storage import list_objects

    parsed = urlparse(folder)
    prefix = parsed.path.strip("/")
    found = []
    for key in list_objects(folder):
        name = key[len(prefix) :].lstrip("/") if prefix else key
        match = CHECKPOINT_NAME.match(name)
        if match:
            url = f"s3://{parsed.netloc}/{key}"
            found.append(Checkpoint(int(match["batch"]), int(match["epoch"]), url))
    return found


def resolvable(folder: str | None) -> bool:
    """Whether ``list_checkpoints`` can list ``folder`` (local or ``s3://``)."""
    return bool(folder) and (not _is_remote(folder) or folder.startswith("s3://"))


def list_checkpoints(folder: str) -> list[Checkpoint]:
    """The complete checkpoints in ``folder`` (local or ``s3://``), oldest first.

    A local file that a crash cut short is renamed ``<name>.incomplete`` (with a warning), so
    that neither this function nor Composer's check for files "from the future" trips on it.
    """
    if folder.startswith("s3://"):
        return sorted(_list_s3(folder))
    if _is_remote(folder):
        raise ValueError(f"cannot list checkpoints in {folder}: only local folders and s3://")
    complete, broken = _list_local(folder)
    for path in broken:
        log.warning("%s is incomplete (cut short by a crash?): renamed to .incomplete", path)
        os.replace(path, path + ".incomplete")
    return sorted(complete)


def newest_checkpoint(folder: str | None) -> Checkpoint | None:
    """The newest complete checkpoint in ``folder``, or None (no folder, or nothing saved)."""
    if not folder:
        return None
    found = list_checkpoints(folder)
    return found[-1] if found else None


def save_schedule(interval: str) -> Callable[[Any, Any], bool]:
    """Composer's checkpoint schedule for ``interval``, moving an epoch's-end save past the epoch.

    A checkpoint due at the batch that ends an epoch is taken at ``EPOCH_CHECKPOINT`` instead
    (after the epoch is closed: named ``ep{e+1}-ba{b}``), not at that batch's
    ``BATCH_CHECKPOINT``. Saved at the batch, it records a position at the very end of the epoch:
    a run resumed from it first iterates the exhausted epoch, gets no batch and Composer warns
    "No batches were trained ... may cause other issues or crashes" on a correct resume. Same
    step, same state otherwise; only where in the epoch bookkeeping the save happens.
    """
    from composer.core import Event

    due = _internals.create_interval_scheduler(interval, checkpoint_events=True)
    deferred = False

    def schedule(state: Any, event: Any) -> bool:
        nonlocal deferred
        if event == Event.EPOCH_CHECKPOINT and deferred:
            deferred = False
            return True
        wanted = due(state, event)
        per_epoch = state.dataloader_len
        at_epoch_end = per_epoch is not None and int(state.timestamp.batch_in_epoch) >= int(
            per_epoch
        )
        if wanted and event == Event.BATCH_CHECKPOINT and at_epoch_end:
            deferred = True
            return False
        return wanted

    return schedule


# ------------------------------------------------------------------------------ ownership


def _read_marker(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise RunConflict(f"{path} is not readable run information ({err}); delete it") from err


def claim_run(
    paths: RunPaths,
    *,
    autoresume: bool,
    resume_from: Checkpoint | None,
    checkpoints: list[Checkpoint],
    command: list[str] | None = None,
) -> None:
    """Refuse to start a run that would write into another run's files; then mark the folder.

    ``checkpoints`` are those already in ``save_folder``. Rules: the run folder's ``run.json``
    must name this run; a run that resumes nothing must find none of its files, except an
    ``autoresume`` run whose earlier attempt died before its first checkpoint (same name: its
    files are appended to, as a resumed run's are). Runs on global rank 0 only.
    """
    marker_path = paths.in_run_folder(MARKER)
    marker = _read_marker(marker_path) if marker_path else None
    if marker is not None and marker.get("run_name") != paths.run_name:
        raise RunConflict(
            f"{paths.run_folder} belongs to run {marker.get('run_name')!r}, not "
            f"{paths.run_name!r}: put {{run_name}} in run_folder (run_folder=./runs/{{run_name}}) "
            "or choose another folder"
        )
    if resume_from is None:
        existing = [p for p in paths.own_files() if os.path.exists(p)]
        existing += [c.path for c in checkpoints]
        same_run_restarting = autoresume and (marker is not None or not paths.run_folder)
        if existing and not same_run_restarting:
            shown = ", ".join(existing[:4]) + (
                f" and {len(existing) - 4} more" if existing[4:] else ""
            )
            where = paths.run_folder or os.path.dirname(existing[0]) or "."
            raise RunConflict(
                f"run {paths.run_name!r} already has files: {shown}. To continue that run, add "
                f"autoresume=true; for a new run, choose another name (run_name="
                f"{paths.run_name}-2); to start it over, delete {where}"
                + (f" and {paths.save_folder}" if paths.save_folder and checkpoints else "")
            )
    if marker_path and marker is None:
        os.makedirs(paths.run_folder or ".", exist_ok=True)
        info = {
            "run_name": paths.run_name,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command,
            "save_folder": paths.save_folder,
        }
        tmp = f"{marker_path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
        os.replace(tmp, marker_path)


# ------------------------------------------------------------------------------ safety


class UnsafeCheckpoint(ConfigError):
    """A checkpoint holds pickled objects beyond a Composer training state's plain types."""


def _composer_state_globals() -> list[Any]:
    """The non-tensor types a Composer 0.32 checkpoint of this package's runs pickles.

    Measured on the quickstart's checkpoints: ``datetime.timedelta`` (the checkpoint saver's
    timestamps), ``TorchVersion`` (metadata) and numpy arrays of the RNG states (the array
    reconstructor, ``ndarray``, ``dtype`` and the ``uint32`` dtype class). None of them runs
    code of the file's choosing.
    """
    import datetime

    import numpy as np
    from torch.torch_version import TorchVersion

    reconstruct = _internals.numpy_reconstruct()
    return [datetime.timedelta, TorchVersion, reconstruct, np.ndarray, np.dtype, *_uint_dtypes()]


def _uint_dtypes() -> list[Any]:
    import numpy as np

    dtypes = getattr(np, "dtypes", None)
    return [dtypes.UInt32DType] if hasattr(dtypes, "UInt32DType") else []


def check_checkpoint(path: str) -> None:
    """Refuse a checkpoint that torch's weights-only unpickler cannot read.

    Composer loads checkpoints with ``torch.load(weights_only=False)`` (a full unpickle: a
    crafted file runs code). Reading the same file first with ``weights_only=True``, which
    builds nothing but tensors, containers, plain values and the types of
    ``_composer_state_globals``, proves that the file holds no code to run. It costs one extra
    read of the checkpoint at start-up.
    """
    import torch

    try:
        with torch.serialization.safe_globals(_composer_state_globals()):
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        text = str(err)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        lines = [line.strip() for line in text.splitlines() if "error" in line.lower()]
        what = f"the global {found.group(1)}" if found else (lines or [text])[-1]
        raise UnsafeCheckpoint(
            f"checkpoint {path} holds more than a Composer training state ({what}); loading it "
            "would unpickle it with weights_only=False, which can run code. Load only "
            "checkpoints you or someone you trust wrote; if this is one, set "
            "trust_checkpoints=true"
        ) from None

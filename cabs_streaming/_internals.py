"""Every private or undocumented part of Streaming, Composer and torch that cabs-streaming uses.

The package reaches past the public API of its pinned stack in a few places, each for a reason
given where it is used (``dataset.py``, ``storage.py``, ``runs.py``, ``converter/``). Those places
go through the functions here, so that this module is the one list of what an upgrade of
mosaicml-streaming or Composer must re-check:

==========================  ==================================================================
Streaming 0.13.0
--------------------------  ------------------------------------------------------------------
``StreamingDataset``        hooks overridden by ``ConceptStreamingDataset``: ``_resume_incr_epoch``
                            (where the epoch is resolved), ``prepare_shard``, ``on_exception``;
                            attributes read: ``spanner``, ``stream_per_shard``, ``shards``,
                            ``next_epoch``, ``_event`` (the threads' stop event)
reader (``Reader``)         ``file_pairs`` of ``(raw, zip)`` ``FileInfo`` (``basename``,
                            ``hashes``), ``raw_data``; MDS readers' ``column_names``
``CloudDownloader``         ``direct_download(remote, local, timeout)``
``streaming.base.util``     ``retry``; ``merge_index`` and ``bytes_to_int`` are documented
``MDSWriter``               ``new_samples``, ``flush_shard``, ``_reset_cache`` (start a shard
                            early), ``cancel_future_jobs``, ``shards``
``CloudUploader``           ``get``, ``local`` (its staging folder), ``s3`` (the boto3 client),
                            ``list_objects``, ``upload_file``
shared memory (tests)       ``streaming.base.shared.memory.atexit``,
                            ``streaming.base.constant.SHM_TO_CLEAN``, ``_shm_prefix_int``
Composer 0.32.1
``CheckpointSaver``         ``remote_uploader``, ``folder``, ``filename.folder``,
                            ``latest_filename.folder``, ``num_checkpoints_to_keep``,
                            ``num_concurrent_uploads``,
                            ``_symlink_upload_wait_before_next_try_in_seconds``
``RemoteUploader``          ``num_attempts``, ``backend_kwargs``, ``remote_backend_name``,
                            ``remote_folder``, ``_tempdir``, ``_upload_staging_folder``,
                            ``upload_executor``, ``check_remote_files_exist_executor``,
                            ``check_workers``, ``wait``; ``symlink_upload_tasks`` (tests)
``composer.utils.misc``     ``create_interval_scheduler``
torch 2.7 / numpy
``UntypedStorage``          ``_new_shared`` (a shared-memory buffer, as ``default_collate`` makes)
numpy                       ``_core.multiarray._reconstruct`` (in a checkpoint's RNG state)
==========================  ==================================================================

**The version policy.** ``pyproject.toml`` pins ``mosaicml==0.32.1`` and
``mosaicml-streaming==0.13.0`` exactly, so another version only runs when a user overrides the
pin on purpose. Importing this module then *warns* once (``RuntimeWarning``) naming the pinned
and installed versions, rather than refusing: a patch release usually keeps these internals.
Each function below checks the attributes it touches and raises :class:`InternalsMoved`, naming
the internal and the pinned version, when one is missing, so a moved internal fails loudly at
its first use, never silently (a dataset whose ``_resume_incr_epoch`` hook is no longer called
would resume at the wrong epoch without a word: ``ConceptStreamingDataset`` checks its hooks
when it is built).
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Iterable
from typing import Any

__all__ = [
    "PINNED",
    "InternalsMoved",
    "cancel_writer_uploads",
    "check_versions",
    "create_interval_scheduler",
    "direct_download",
    "numpy_reconstruct",
    "replace_upload_pools",
    "require",
    "require_dataset_hooks",
    "retry",
    "route_shared_memory_exit_handlers",
    "samples_in_open_shard",
    "set_checkpoint_scratch",
    "set_latest_poll",
    "set_upload_attempts",
    "shared_memory_names",
    "shared_memory_prefix",
    "shard_basename",
    "shard_columns",
    "shard_files",
    "shard_of_sample",
    "shards_written",
    "shared_uint8_buffer",
    "start_new_shard",
    "stop_dataset_threads",
    "stream_of_shard",
    "uploader_s3_client",
    "uploader_staging_folder",
    "wait_for_checkpoint_uploads",
]

#: The distributions whose internals are used, and the versions they were read from.
PINNED = {"mosaicml-streaming": "0.13.0", "mosaicml": "0.32.1"}


class InternalsMoved(RuntimeError):
    """An internal of Streaming or Composer this package relies on is not where it was."""


def check_versions() -> list[str]:
    """The pinned distributions installed at another version, as ``"name X (pinned Y)"``."""
    found = []
    for name, pinned in PINNED.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "not installed"
        if installed != pinned:
            found.append(f"{name} {installed} (pinned {pinned})")
    return found


def _warn_about_versions() -> None:
    mismatched = check_versions()
    if mismatched:
        warnings.warn(
            f"cabs-streaming relies on internals of {', '.join(mismatched)}; they are checked "
            "where they are used and fail with InternalsMoved if they moved (the list is in "
            "cabs_streaming/_internals.py). Install the pinned versions: pip install -e .",
            RuntimeWarning,
            stacklevel=2,
        )


_warn_about_versions()


def require(obj: Any, names: Iterable[str], what: str) -> None:
    """Raise :class:`InternalsMoved` unless ``obj`` has every attribute in ``names``."""
    missing = [name for name in names if not hasattr(obj, name)]
    if missing:
        versions = ", ".join(f"{n}=={v}" for n, v in PINNED.items())
        raise InternalsMoved(
            f"{what} has no {', '.join(missing)} in this version; cabs-streaming was written "
            f"against {versions} (see cabs_streaming/_internals.py): install those"
        )


# ------------------------------------------------------------------ Streaming: StreamingDataset

#: Methods of ``StreamingDataset`` that ``ConceptStreamingDataset`` overrides or relies on.
DATASET_HOOKS = ("_resume_incr_epoch", "prepare_shard", "on_exception", "next_epoch")


def require_dataset_hooks(base: type) -> None:
    """Fail unless ``base`` (``StreamingDataset``) still has the hooks the subclass overrides."""
    require(base, DATASET_HOOKS, "streaming.StreamingDataset")


def shard_of_sample(dataset: Any, index: int) -> int:
    """The shard holding global sample ``index`` (Streaming's ``spanner``)."""
    shard_id, _ = dataset.spanner[index]
    return int(shard_id)


def stream_of_shard(dataset: Any, shard_id: int) -> Any:
    """The ``Stream`` a shard belongs to."""
    return dataset.streams[int(dataset.stream_per_shard[shard_id])]


def shard_files(dataset: Any, shard_id: int) -> list[tuple[Any, Any]]:
    """A shard's ``(raw, zip)`` file infos (``basename``, ``hashes``); ``zip`` may be None."""
    return list(dataset.shards[shard_id].file_pairs)


def shard_basename(dataset: Any, shard_id: int) -> str:
    """The file name of a shard's raw data, for messages (a placeholder if it has none)."""
    raw = getattr(dataset.shards[shard_id], "raw_data", None)
    return getattr(raw, "basename", f"shard {shard_id}")


def shard_columns(dataset: Any, shard_id: int) -> list[str]:
    """The column names of a shard, from its ``index.json`` entry (MDS shards; else none)."""
    return list(getattr(dataset.shards[shard_id], "column_names", None) or [])


def stop_dataset_threads(dataset: Any) -> None:
    """Tell a dataset's download and ready threads to stop, as Streaming's ``on_exception`` does."""
    dataset._event.set()


def direct_download(remote: str, local: str, timeout: float) -> None:
    """Download one file with Streaming's own downloader (0.13 has no ``download_file``)."""
    from streaming.base.storage import CloudDownloader

    CloudDownloader.direct_download(remote, local, timeout=timeout)


def retry(num_attempts: int) -> Any:
    """Streaming's retry decorator (``streaming.base.util.retry``)."""
    from streaming.base.util import retry as streaming_retry

    return streaming_retry(num_attempts=num_attempts)


# ------------------------------------------------------------------------ Streaming: MDSWriter


def samples_in_open_shard(writer: Any) -> int:
    """How many samples the writer holds for the shard it has not flushed yet."""
    return len(writer.new_samples)


def start_new_shard(writer: Any) -> None:
    """Close the open shard now, as ``Writer.write`` does when ``size_limit`` is reached."""
    require(writer, ("flush_shard", "_reset_cache"), "streaming.MDSWriter")
    writer.flush_shard()
    writer._reset_cache()


def cancel_writer_uploads(writer: Any) -> None:
    """Cancel the uploads a failing writer has queued."""
    writer.cancel_future_jobs()


def shards_written(writer: Any) -> int:
    """How many shards a finished writer wrote."""
    return len(writer.shards)


# --------------------------------------------------------------------- Streaming: CloudUploader


def uploader_s3_client(uploader: Any) -> Any:
    """The boto3 S3 client of an ``s3://`` ``CloudUploader``."""
    require(uploader, ("s3",), "streaming's S3Uploader")
    return uploader.s3


def uploader_staging_folder(uploader: Any) -> str:
    """The local folder a ``CloudUploader`` stages files in."""
    return uploader.local


# ---------------------------------------------------------------- Streaming: shared memory (tests)


def shared_memory_names() -> tuple[str, ...]:
    """The names Streaming gives a dataset's shared-memory blocks, after a six-digit prefix."""
    from streaming.base.constant import SHM_TO_CLEAN

    return tuple(SHM_TO_CLEAN)


def shared_memory_prefix(dataset: Any) -> int:
    """The prefix of a dataset's shared-memory block names (``{prefix:06d}_<name>``)."""
    return int(dataset._shm_prefix_int)


def route_shared_memory_exit_handlers(handlers: Any) -> None:
    """Send Streaming's per-block ``atexit`` registrations to ``handlers`` (``.register``).

    Streaming 0.13 registers an exit handler for every shared-memory block a dataset opens; the
    tests run them when each test module ends instead of at process exit.
    """
    import streaming.base.shared.memory as memory

    require(memory, ("atexit",), "streaming.base.shared.memory")
    memory.atexit = handlers  # type: ignore[assignment]


# ---------------------------------------------------------------------------- Composer: uploads

#: What ``storage.tune_checkpoint_uploads`` changes on a ``CheckpointSaver`` and its uploader.
SAVER_ATTRIBUTES = (
    "remote_uploader",
    "folder",
    "filename",
    "latest_filename",
    "num_checkpoints_to_keep",
    "num_concurrent_uploads",
    "_symlink_upload_wait_before_next_try_in_seconds",
)
UPLOADER_ATTRIBUTES = (
    "num_attempts",
    "backend_kwargs",
    "remote_backend_name",
    "remote_folder",
    "_tempdir",
    "_upload_staging_folder",
    "upload_executor",
    "check_remote_files_exist_executor",
    "check_workers",
    "wait",
)


def require_saver(saver: Any) -> None:
    """Fail unless a ``CheckpointSaver`` and its ``RemoteUploader`` have what is changed here."""
    require(saver, SAVER_ATTRIBUTES, "composer.callbacks.CheckpointSaver")
    require(saver.remote_uploader, UPLOADER_ATTRIBUTES, "composer.utils.RemoteUploader")


def set_upload_attempts(uploader: Any, attempts: int) -> None:
    """Composer's own retry count, and boto3's for S3 (whose errors Composer never retries)."""
    uploader.num_attempts = attempts
    if uploader.remote_backend_name == "s3":
        client_config = uploader.backend_kwargs.setdefault("client_config", {})
        client_config["retries"] = {"mode": "standard", "max_attempts": attempts}


def set_latest_poll(saver: Any, seconds: float) -> None:
    """How often the saver looks for a finished upload before moving the "latest" pointer."""
    saver._symlink_upload_wait_before_next_try_in_seconds = float(seconds)


def set_checkpoint_scratch(saver: Any, local: str, staging: str, keep_local: int) -> str:
    """Point the saver's local copies at ``local`` and its uploader's staging at ``staging``.

    Returns the folder the saver used before (Composer's ``tempfile.mkdtemp()``). Composer's own
    temporary staging folder is removed.
    """
    old = saver.folder
    saver.folder = local
    saver.filename.folder = local
    if saver.latest_filename is not None:
        saver.latest_filename.folder = local
    saver.num_checkpoints_to_keep = keep_local
    uploader = saver.remote_uploader
    uploader._tempdir.cleanup()
    uploader._upload_staging_folder = staging
    return old


def replace_upload_pools(uploader: Any, upload: Any, check: Any) -> None:
    """Swap the uploader's upload and pointer-check pools (not started yet) for new ones.

    The old pools are shut down; nothing was submitted to them yet, so no process had started.
    """
    for name, pool in (("upload_executor", upload), ("check_remote_files_exist_executor", check)):
        old = getattr(uploader, name)
        setattr(uploader, name, pool)
        old.shutdown(wait=False)


def wait_for_checkpoint_uploads(saver: Any) -> None:
    """Wait for a saver's checkpoint uploads and the checks of its "latest" pointer (tests)."""
    saver.remote_uploader.wait()
    for check, _, _ in saver.symlink_upload_tasks:
        check.result()


def create_interval_scheduler(interval: Any, **kwargs: Any) -> Any:
    """Composer's own schedule of when a checkpoint is due (``composer.utils.misc``)."""
    from composer.utils import misc

    require(misc, ("create_interval_scheduler",), "composer.utils.misc")
    return misc.create_interval_scheduler(interval, **kwargs)


# ------------------------------------------------------------------------------- torch / numpy


def shared_uint8_buffer(nbytes: int) -> Any:
    """An uninitialised ``uint8`` tensor in shared memory, as ``default_collate`` makes in workers.

    A DataLoader worker hands such a tensor to the main process without pickling its bytes.
    """
    import torch

    storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def numpy_reconstruct() -> Any:
    """The array unpickling helper every pickled numpy array names (numpy 1 and 2)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct

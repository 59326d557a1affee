"""Object storage at the edges of a run: start-up checks and outage-proof checkpoint uploads.

Why a start-up check: Streaming and Composer reach S3 from DataLoader workers, upload processes
and autoresume code, and when the endpoint is wrong or the credentials are rejected they fail
late, several times over and with messages that do not say which setting is at fault. One
``ListObjectsV2`` per location before anything is built turns that into a single error that
names ``S3_ENDPOINT_URL`` or the AWS credential variables. The secret key is never part of a
message: only the access key id's first characters are shown, so a user can tell which
credentials were used.

Why the upload tuning: Composer's ``CheckpointSaver`` uploads to S3 with boto3's default of 3
attempts (its own retry loop never fires for S3: the S3 store raises no "transient" errors),
polls for the remote "latest" pointer every 30 s, uploads from process pools that take up to a
minute to start on a busy machine, and keeps its local copies and staging files in the system
temp folder; none of it is a Trainer argument. ``tune_checkpoint_uploads`` fixes all four on the
built trainer, so a short S3 outage costs retries rather than the run, a checkpoint is in the
bucket seconds after it is saved, and nothing of a run is left outside its run folder. When the
retries run out, ``CheckpointUploadGuard`` stops the run with an error that says where the
upload went, which endpoint setting was used and how to continue (autoresume), instead of the
upload worker's bare exception; an object that already exists is not blamed on S3.

``list_objects`` and ``download_object`` serve ``cabs_streaming.runs``: autoresume lists the
checkpoints in the bucket, and a remote checkpoint is downloaded once to be checked and loaded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

from composer.callbacks import CheckpointSaver
from composer.core import Callback, State
from composer.loggers import Logger

from cabs_streaming import _internals

__all__ = [
    "CheckpointUploadGuard",
    "StorageError",
    "UploadScratch",
    "check_s3",
    "check_s3_locations",
    "describe_endpoint",
    "download_object",
    "list_objects",
    "tune_checkpoint_uploads",
]

#: Error codes an S3 server answers when it does not accept the credentials.
CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "InvalidToken",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
        "InvalidSecurity",
        "403",
    }
)


class StorageError(RuntimeError):
    """Object storage is unreachable, refuses the credentials, or lacks what a run needs."""


def describe_endpoint() -> str:
    """Where S3 requests go, in words that name the variable that decides it."""
    endpoint = os.environ.get("S3_ENDPOINT_URL")
    if endpoint:
        return f"S3_ENDPOINT_URL={endpoint}"
    return "the default AWS endpoint (S3_ENDPOINT_URL is not set; set it for any other S3 server)"


def _credential_hint() -> str:
    key = os.environ.get("AWS_ACCESS_KEY_ID")
    shown = f"AWS_ACCESS_KEY_ID={key[:4]}... (secret not shown)" if key else "no AWS_ACCESS_KEY_ID"
    return (
        f"{shown}; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and that "
        "these credentials may read and write the bucket"
    )


def _client(timeout: float, attempts: int) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None,
        config=Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"max_attempts": attempts, "mode": "standard"},
        ),
    )


@contextlib.contextmanager
def _s3_errors(where: str) -> Iterator[None]:
    """Turn boto3's exceptions into a ``StorageError`` naming ``where`` and the setting at fault."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    try:
        yield
    except StorageError:
        raise
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as err:
        raise StorageError(
            f"cannot reach S3 for {where} at {describe_endpoint()}: {type(err).__name__}. Check "
            "that S3_ENDPOINT_URL names a running S3 server reachable from this machine"
        ) from None
    except NoCredentialsError:
        raise StorageError(
            f"no AWS credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE)"
        ) from None
    except ClientError as err:
        code = _code(err)
        bucket = err.response.get("Error", {}).get("BucketName") or where
        if code in CREDENTIAL_CODES:
            raise StorageError(
                f"S3 at {describe_endpoint()} rejected the credentials for {where} ({code}): "
                f"{_credential_hint()}"
            ) from None
        if code in ("NoSuchBucket", "404"):
            raise StorageError(
                f"{where}: bucket {bucket!r} does not exist at {describe_endpoint()}; create it "
                "or fix the URL"
            ) from None
        raise StorageError(f"S3 refused {where} at {describe_endpoint()}: {code}") from None
    except BotoCoreError as err:
        raise StorageError(
            f"S3 request for {where} at {describe_endpoint()} failed: {type(err).__name__}"
        ) from None


def _split(url: str, purpose: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"{purpose}: {url!r} is not an s3://bucket/prefix URL")
    return parsed.netloc, parsed.path.lstrip("/")


def check_s3(
    url: str,
    purpose: str,
    *,
    expect: str | None = None,
    timeout: float = 10.0,
    attempts: int = 3,
) -> None:
    """Raise ``StorageError`` unless ``url`` (``s3://bucket/prefix``) can be listed.

    ``purpose`` says what the location is for (``"train_data.remote"``), ``expect`` names an
    object that must exist under the prefix (``"index.json"`` for a dataset). Errors name the
    location, the endpoint setting or the credential variables, and what to do; never the
    secret key.
    """
    from botocore.exceptions import ClientError

    bucket, prefix = _split(url, purpose)
    where = f"{purpose} ({url})"
    with _s3_errors(where):
        client = _client(timeout, attempts)
        listing = prefix.rstrip("/") + "/" if prefix else ""
        client.list_objects_v2(Bucket=bucket, Prefix=listing, MaxKeys=1)
        if expect is not None:
            key = f"{listing}{expect}"
            try:
                client.head_object(Bucket=bucket, Key=key)
            except ClientError as err:
                if _code(err) in ("404", "NoSuchKey", "NotFound"):
                    raise StorageError(
                        f"{where}: s3://{bucket}/{key} does not exist; point {purpose} at a "
                        "folder written by tools/convert_to_mds.py"
                    ) from None
                raise


def list_objects(
    url: str, purpose: str = "save_folder", *, timeout: float = 10.0, attempts: int = 3
) -> list[str]:
    """Every object key directly or indirectly under the folder ``url`` (``s3://bucket/p``).

    An S3 object is listed only once its upload has completed, so what this returns is whole.
    """
    bucket, prefix = _split(url, purpose)
    listing = prefix.rstrip("/") + "/" if prefix else ""
    keys: list[str] = []
    with _s3_errors(f"{purpose} ({url})"):
        paginator = _client(timeout, attempts).get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=listing):
            keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def download_object(url: str, path: str, purpose: str = "load_path") -> None:
    """Download the object ``url`` (``s3://bucket/key``) to the local file ``path``."""
    bucket, key = _split(url, purpose)
    with _s3_errors(f"{purpose} ({url})"):
        from botocore.exceptions import ClientError

        try:
            _client(60.0, 5).download_file(bucket, key, path)
        except ClientError as err:
            if _code(err) in ("404", "NoSuchKey", "NotFound"):
                raise StorageError(f"{purpose}: {url} does not exist") from None
            raise


def _code(err: Any) -> str:
    return str(
        err.response.get("Error", {}).get("Code")
        or err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "unknown")
    )


def check_s3_locations(locations: Iterable[tuple[str, str | None, str | None]]) -> None:
    """``check_s3`` every ``(purpose, url, expected object)`` whose url is ``s3://``; once each."""
    seen: set[str] = set()
    for purpose, url, expect in locations:
        if not url or not url.startswith("s3://") or url in seen:
            continue
        seen.add(url)
        check_s3(url, purpose, expect=expect)


class CheckpointUploadGuard(Callback):
    """Turns a failed checkpoint upload into a ``StorageError`` that says how to go on.

    Composer's ``CheckpointSaver`` re-raises an upload worker's exception at the next batch end
    (or at ``fit_end``); this callback runs just before it, checks the same uploads and adds
    the context: where the upload went, the endpoint setting, and how to continue.
    """

    def __init__(self, uploader: Any, folder: str, attempts: int) -> None:
        self.uploader = uploader
        self.folder = folder
        self.attempts = attempts

    def _check(self, check: Callable[[], None], state: State) -> None:
        try:
            check()
        except FileExistsError as err:
            folder = self.folder.replace("{run_name}", state.run_name)
            raise StorageError(
                f"a checkpoint of this run is already in {folder}, and save_overwrite is false: "
                f"{err}. S3 is fine; another run with the same run_name wrote there, or is "
                "writing there now. Training stops here. Continue the run in that folder with "
                "autoresume=true (it starts from the newest checkpoint there), or give this run "
                "another run_name"
            ) from err
        except Exception as err:
            folder = self.folder.replace("{run_name}", state.run_name)
            raise StorageError(
                f"uploading a checkpoint to {folder} failed after {self.attempts} "
                f"attempt(s) at {describe_endpoint()}: {type(err).__name__}: {err}. Training "
                "stops here. Once S3 answers again, run the same command with autoresume=true "
                "to continue from the last checkpoint that reached the bucket; raise "
                "save_upload_attempts to ride out longer outages"
            ) from err

    def batch_end(self, state: State, logger: Logger) -> None:
        """Raise if an upload has failed since the last batch."""
        self._check(self.uploader.check_workers, state)

    def fit_end(self, state: State, logger: Logger) -> None:
        """Wait for the last uploads; raise if one failed."""
        self._check(self.uploader.wait, state)


class UploadScratch(Callback):
    """Keeps Composer's local copies and staging files of uploaded checkpoints in the run folder.

    Composer writes each checkpoint for a remote ``save_folder`` first to a folder made with
    ``tempfile.mkdtemp()`` (never removed: 128 MB a checkpoint for the published models) and
    copies it to a staging folder in the system temp folder for the upload worker. Here both
    live under ``folder`` (per rank), are cleared when a run starts (S3 holds what counts), and
    the staging folder is removed once the last upload is done (``post_close`` runs after
    Composer's own, which waits for the uploads).
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def post_close(self) -> None:
        """Remove the staging folder: every upload has finished or failed by now."""
        shutil.rmtree(os.path.join(self.folder, "staging"), ignore_errors=True)


def _move_scratch(saver: CheckpointSaver, folder: str, keep_local: int) -> None:
    """Point ``saver``'s local copies and its uploader's staging at ``folder`` (emptied first)."""
    shutil.rmtree(folder, ignore_errors=True)
    local, staging = os.path.join(folder, "checkpoints"), os.path.join(folder, "staging")
    os.makedirs(local, exist_ok=True)
    os.makedirs(staging, exist_ok=True)
    # Only the newest local copy: the bucket keeps them all (Composer keeps every local one).
    old_local = _internals.set_checkpoint_scratch(
        saver, local, staging, keep_local if keep_local >= 0 else 1
    )
    if old_local.startswith(tempfile.gettempdir()) and os.path.isdir(old_local):
        with contextlib.suppress(OSError):  # only empty folders; something else may be there
            os.removedirs(old_local)


def tune_checkpoint_uploads(
    trainer: Any,
    attempts: int,
    latest_poll_s: float,
    *,
    local_folder: str | None = None,
    keep_local: int = -1,
) -> bool:
    """Give Composer's checkpoint uploads ``attempts`` tries and poll the pointer every N s.

    For S3 the attempts are boto3's (``standard`` retry mode: exponential back-off with full
    jitter, at most 20 s apart, so 10 attempts ride out about a minute of outage on average);
    for other stores Composer's own retry loop gets the same number. A
    :class:`CheckpointUploadGuard` goes first in the callbacks, so an upload that still fails
    stops the run with a clear error. Returns whether the trainer uploads checkpoints at all (a
    remote ``save_folder``). Fails loudly (``InternalsMoved``) if Composer's internals moved,
    rather than silently keeping its defaults.

    Composer uploads from process pools it spawns at the first save; a spawned process that
    imports Composer took 50 s on a busy 2-core machine, so the first checkpoint reached the
    bucket about a minute after it was saved and the next ones queued behind it. The uploads
    are network I/O (boto3 releases the GIL), so here they run on threads of the training
    process, which start at once: measured, the first checkpoint's lag fell from 55 s to a
    few seconds. ``local_folder`` (the run folder's scratch) receives Composer's local copies
    and staging files instead of the system temp folder; ``keep_local`` local copies are kept
    (default 1).
    """
    if attempts < 1 or latest_poll_s <= 0:
        raise ValueError(
            f"save_upload_attempts must be >= 1 and save_latest_poll_s > 0, got {attempts} "
            f"and {latest_poll_s}"
        )
    from composer.utils import dist

    savers = [cb for cb in trainer.state.callbacks if isinstance(cb, CheckpointSaver)]
    uploaders = [s for s in savers if getattr(s, "remote_uploader", None) is not None]
    for saver in uploaders:
        _internals.require_saver(saver)
        uploader = saver.remote_uploader
        _internals.set_upload_attempts(uploader, attempts)
        _internals.set_latest_poll(saver, latest_poll_s)
        trainer.state.callbacks.insert(
            0, CheckpointUploadGuard(uploader, uploader.remote_folder, attempts)
        )
        if local_folder:
            scratch = os.path.join(local_folder, f"rank{dist.get_global_rank()}")
            _move_scratch(saver, scratch, keep_local)
            trainer.state.callbacks.append(UploadScratch(scratch))
        _upload_on_threads(uploader, saver.num_concurrent_uploads)
    return bool(uploaders)


def _upload_on_threads(uploader: Any, concurrent: int) -> None:
    """Swap the uploader's (not yet started) process pools for thread pools of the same size.

    Composer's upload and pointer-check functions take plain arguments and only build an object
    store and call it, so they run unchanged on a thread; ``submit``, ``done``, ``exception``
    and ``shutdown`` are the same calls on both kinds of executor.
    """
    _internals.replace_upload_pools(
        uploader,
        ThreadPoolExecutor(max_workers=concurrent, thread_name_prefix="ckpt-upload"),
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckpt-check"),
    )

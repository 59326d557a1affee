"""Where a conversion writes: checking and clearing ``--out``, locking it, publishing files.

One conversion per output: a local folder is locked with ``flock`` on the folder itself
(released by the kernel if the process dies), an ``s3://`` prefix with a lock object under
``.convert-lock/`` that is removed at the end (a crashed conversion leaves it behind:
``break_lock`` removes it). A second conversion into the same output stops at once with
``OutputBusy`` instead of interleaving its shards with the first one's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from cabs_streaming import _internals
from cabs_streaming.converter.records import ConversionError, OutputBusy


def is_remote(out: str) -> bool:
    """Whether ``out`` is a remote prefix (``s3://...``) rather than a local folder."""
    return urllib.parse.urlparse(out).scheme not in ("", "file")


def uploader_for(out: str) -> Any:
    """Streaming's uploader for a remote ``out`` (its local staging folder already removed)."""
    from streaming.base.storage.upload import CloudUploader

    try:
        uploader = CloudUploader.get(out, keep_local=False, exist_ok=True)
    except Exception as err:
        raise ConversionError(
            f"cannot use --out {out}: {err}. The bucket must exist; the endpoint comes from "
            "S3_ENDPOINT_URL and credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        ) from err
    shutil.rmtree(_internals.uploader_staging_folder(uploader), ignore_errors=True)
    return uploader


def s3_client(url: str) -> Any:
    """A boto3 S3 client set up as Streaming's (``S3_ENDPOINT_URL``, boto3's credentials)."""
    return _internals.uploader_s3_client(uploader_for(url))


def check_output(out: str, overwrite: bool, files: Sequence[str]) -> bool:
    """Refuse a non-empty output unless ``overwrite``; True when the local dir must be cleared.

    MDSWriter's own ``exist_ok=True`` deletes the directory, so the decision is made here, once,
    with a message, and never deletes an input. Called with the output locked, so nobody else
    writes there between this check and the conversion.
    """
    if is_remote(out):
        existing = [  # our own lock object is not content
            key
            for key in uploader_for(out).list_objects() or []
            if f"/{LOCK_FOLDER}/" not in f"/{key}"
        ]
        if existing and not overwrite:
            raise ConversionError(
                f"--out {out} already holds {len(existing)} objects (e.g. {existing[0]}); pass "
                "--overwrite to write over them (objects not rewritten are left in place), or "
                "choose another prefix"
            )
        return False
    entries = sorted(os.listdir(out))
    if not entries:
        return False
    if not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConversionError(
            f"--out {out} is not empty (it holds {shown}); pass --overwrite to replace its "
            "contents, or choose another directory"
        )
    root = os.path.realpath(out)
    for path in files:
        if os.path.commonpath([root, os.path.realpath(path)]) == root:
            raise ConversionError(
                f"input {path} lies inside --out {out}, which --overwrite would delete; write "
                "the output elsewhere"
            )
    return True


def clear_folder(out: str) -> None:
    """Empty ``out`` but keep the folder itself: its lock is held on it."""
    for entry in os.scandir(out):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


#: Where an ``s3://`` output's lock objects live, under the output prefix.
LOCK_FOLDER = ".convert-lock"


@contextmanager
def output_lock(out: str, break_lock: bool) -> Iterator[list[str]]:
    """Hold ``out`` for one conversion; yields notes for the report (e.g. "not locked")."""
    scheme = urllib.parse.urlparse(out).scheme
    if not is_remote(out):
        with _local_lock(out) as notes:
            yield notes
    elif scheme == "s3":
        with _s3_lock(out, break_lock):
            yield []
    else:
        yield [
            f"--out {out} was not locked (only local folders and s3:// prefixes are): never run "
            "two conversions into one output at once"
        ]


@contextmanager
def _local_lock(out: str) -> Iterator[list[str]]:
    """``flock`` on the output folder itself, so the kernel releases it if the process dies.

    Locking the folder (not a file in it) leaves the output exactly as MDSWriter wants it. A
    folder this conversion created is removed again if it fails before writing anything.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConversionError(f"--out {out} exists and is not a directory; choose a directory")
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    notes: list[str] = []
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusy(
                f"--out {out} is being written by another conversion right now (it holds the "
                "folder's lock); wait for it to finish, or choose another folder"
            ) from None
        except OSError as err:
            notes.append(
                f"--out {out} could not be locked ({err.strerror or err}; some network file "
                "systems cannot): never run two conversions into it at once"
            )
        try:
            yield notes
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(out)  # only succeeds while it is still empty
            raise
    finally:
        os.close(fd)


def _lock_keys(client: Any, bucket: str, folder: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _lock_holder(client: Any, bucket: str, key: str) -> str:
    """Who wrote a lock object, from its small json body, for the error message."""
    try:
        body = client.get_object(Bucket=bucket, Key=key, Range="bytes=0-4095")["Body"].read()
        holder = json.loads(body)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except Exception:  # an unreadable lock is still a lock
        return "an unknown conversion"


@contextmanager
def _s3_lock(out: str, break_lock: bool) -> Iterator[None]:
    """A lock object under ``<out>/.convert-lock/``, removed at the end.

    S3 lists a finished PUT in every later LIST, so of two conversions that each write their
    object and then list, at least the later one sees the other: never both proceed (both may
    stop, if they start at the same instant). A conversion that dies leaves its object behind;
    the error names it and ``break_lock`` removes it.
    """
    client = _internals.uploader_s3_client(uploader_for(out))
    parsed = urllib.parse.urlparse(out)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    folder = f"{prefix}/{LOCK_FOLDER}/" if prefix else f"{LOCK_FOLDER}/"
    held = _lock_keys(client, bucket, folder)
    if held and not break_lock:
        raise OutputBusy(
            f"--out {out} is locked by {_lock_holder(client, bucket, held[0])} "
            f"(s3://{bucket}/{held[0]}); wait for that conversion to finish, or, if it no "
            "longer runs (it crashed or was killed), run again with --break-lock"
        )
    for key in held:
        client.delete_object(Bucket=bucket, Key=key)
    mine = f"{folder}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex}.json"
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    client.put_object(Bucket=bucket, Key=mine, Body=json.dumps(holder).encode())
    try:
        others = [key for key in _lock_keys(client, bucket, folder) if key != mine]
        if others:
            raise OutputBusy(
                f"another conversion ({_lock_holder(client, bucket, others[0])}) started "
                f"writing into --out {out} at the same moment; let it finish (or stop it) and "
                "run again"
            )
        yield
    finally:
        try:
            client.delete_object(Bucket=bucket, Key=mine)
        except Exception as err:  # the data is whole; only the next conversion is affected
            print(
                f"cabs-convert: warning: could not remove the lock s3://{bucket}/{mine} "
                f"({err}); the next conversion into --out needs --break-lock",
                file=sys.stderr,
            )


def publish(out: str, filename: str, text: str) -> None:
    """Put a small file beside ``index.json``, locally or through streaming's uploader."""
    if not is_remote(out):
        with open(os.path.join(out, filename), "w", encoding="utf-8") as f:
            f.write(text)
        return
    from streaming.base.storage.upload import CloudUploader

    with tempfile.TemporaryDirectory() as staging:
        uploader = CloudUploader.get((staging, out), keep_local=True)  # staging still empty
        with open(os.path.join(staging, filename), "w", encoding="utf-8") as f:
            f.write(text)
        uploader.upload_file(filename)


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """``merge_index`` announces its temp folder with ``logging.warning`` on the root logger.

    That would print to the console and, through ``basicConfig``, install a handler for the rest
    of the process; keep both out of the converter's output.
    """
    root = logging.getLogger()
    placeholder = logging.NullHandler()
    added = not root.handlers
    if added:
        root.addHandler(placeholder)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
        if added:
            root.removeHandler(placeholder)


def merge_parts(out: str, part_names: Sequence[str]) -> None:
    """Join the parts' indexes, in part order, into ``index.json`` at ``out``."""
    from streaming.base.util import merge_index

    if is_remote(out):
        urls = [f"{out.rstrip('/')}/{name}/index.json" for name in part_names]
        with _quiet_root_logger():
            merge_index(urls, out, keep_local=False)
    else:
        urls = [os.path.join(out, name, "index.json") for name in part_names]
        with _quiet_root_logger():
            merge_index(urls, out, keep_local=True)


def writer_kwargs(
    size_limit: int | str | None, compression: str | None, hashes: Sequence[str]
) -> dict[str, Any]:
    """Check the MDSWriter settings with the writer's own tables; its keyword arguments."""
    # Import the writer's stack (torch comes with it) once, here: forked workers inherit it
    # instead of each spending seconds importing it again.
    from streaming.base.compression import is_compression
    from streaming.base.hashing import get_hashes
    from streaming.base.util import bytes_to_int

    unknown_hashes = sorted(set(hashes) - set(get_hashes()))
    if unknown_hashes:
        raise ConversionError(
            f"--hashes {unknown_hashes} are not MDS hash algorithms; choose from "
            f"{sorted(get_hashes())}"
        )
    if compression and not is_compression(compression):
        raise ConversionError(
            f"--compression {compression!r} is not an MDS compression; try zstd, gz, br or bz2"
        )
    try:
        if size_limit is not None and not 0 < bytes_to_int(size_limit) < 2**32:
            raise ValueError("out of range")
    except ValueError as err:
        raise ConversionError(
            f"--size-limit {size_limit!r} is not a shard size between 1 byte and 4gb ({err}); "
            "write bytes or e.g. 64mb"
        ) from err
    return {"size_limit": size_limit, "compression": compression, "hashes": list(hashes)}

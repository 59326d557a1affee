"""Image files named by a manifest or a parquet file: confined to allowed folders, bounded.

A path must resolve (after ``..`` and symbolic links) inside the naming file's folder or one of
``ReadOptions.image_roots`` and name a regular file of at most ``max_member_bytes``; it is opened
non-blocking, so devices and FIFOs are refused, never read, and nothing elsewhere on the
machine is opened. A manifest read from ``s3://`` (the Spark engine) names objects under its own
prefix instead: the same confinement and bound, on keys.
"""

from __future__ import annotations

import os
import posixpath
import stat
import urllib.parse
from typing import Any

from cabs_streaming.converter.output import s3_client
from cabs_streaming.converter.records import ImageRead, ReadOptions


def _inside(path: str, root: str) -> bool:
    """Whether the real path ``path`` lies in the real folder ``root``."""
    return os.path.commonpath([root, path]) == root


def read_image_file(name: str, base: str, opts: ReadOptions) -> ImageRead:
    """Read an image file named in a manifest or parquet file, confined and bounded.

    ``name`` is relative to ``base`` (the naming file's folder) or absolute; after ``..`` and
    symbolic links it must lie in ``base`` or one of ``opts.image_roots`` and be a regular file
    of at most ``max_member_bytes``. Opened non-blocking, so a FIFO cannot hang the conversion.
    """
    if base.startswith("s3://"):
        return read_image_object(name, base, opts)
    full = os.path.join(base, name)
    real = os.path.realpath(full)
    allowed = (os.path.realpath(base or "."), *opts.image_roots)
    if not any(_inside(real, root) for root in allowed):
        return (
            None,
            (
                f"image path {name!r} resolves to {real}, outside {allowed[0]} (the folder of the "
                "file naming it); pass --image-root FOLDER to allow another folder"
            ),
            "missing image",
        )
    limit = opts.limits.max_member_bytes
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as err:
        return None, f"cannot read image file {full} ({err.strerror or err})", "missing image"
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        return None, f"image path {full} is not a regular file", "missing image"
    if info.st_size > limit:
        os.close(fd)
        return (
            None,
            (f"image file {full} is {info.st_size:,} bytes, over --max-member-bytes {limit:,}"),
            "over a size limit",
        )
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)  # bounded even if the file grows meanwhile
        except OSError as err:
            return None, f"cannot read image file {full} ({err.strerror or err})", "missing image"
    if len(data) > limit:
        detail = f"image file {full} grew over --max-member-bytes {limit:,}"
        return None, detail, "over a size limit"
    return data, "", ""


#: One S3 client per bucket and process (an executor reads many images of one manifest).
_clients: dict[str, Any] = {}


def read_image_object(name: str, base: str, opts: ReadOptions) -> ImageRead:
    """Read the image a remote manifest names: an object under its prefix ``base``, bounded.

    ``name`` is relative to ``base``; after ``..`` it must stay under ``base`` (``--image-root``
    applies to local folders only). The size is checked before the body is read, and at most
    ``max_member_bytes + 1`` bytes are asked for even if the object changes meanwhile.
    """
    parsed = urllib.parse.urlparse(base)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    key = posixpath.normpath(posixpath.join(prefix, name)).lstrip("/")
    inside = not name.startswith("/") and (not prefix or key.startswith(prefix + "/"))
    if not inside or key in (".", ".."):
        return (
            None,
            (f"image path {name!r} leaves {base} (the prefix of the manifest naming it)"),
            "missing image",
        )
    url, limit = f"s3://{bucket}/{key}", opts.limits.max_member_bytes
    client = _clients.get(bucket)
    if client is None:
        client = _clients[bucket] = s3_client(f"s3://{bucket}")
    try:
        size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        if size > limit:
            detail = f"image object {url} is {size:,} bytes, over --max-member-bytes {limit:,}"
            return None, detail, "over a size limit"
        body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{limit}")["Body"]
        data = body.read()
    except Exception as err:  # botocore's ClientError and connection errors alike
        return None, f"cannot read image object {url} ({err})", "missing image"
    if len(data) > limit:
        detail = f"image object {url} grew over --max-member-bytes {limit:,}"
        return None, detail, "over a size limit"
    return data, "", ""

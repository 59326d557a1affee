"""What several test modules build the same way: images, small MDS datasets, a free port.

Fixtures built on these (the sample's JPEGs, the S3 server) are in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import socket
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from paths import PHOTO, SAMPLE
from PIL import Image

from cabs_streaming.concepts import MDS_COLUMNS, Vocabulary, decode_concepts, decode_scores


def noise_jpeg(seed: int, size: tuple[int, int] = (40, 48), quality: int = 90) -> bytes:
    """A JPEG of seeded random pixels, ``size`` = (width, height): distinct for every seed."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def solid_jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> bytes:
    """A small one-colour JPEG."""
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="JPEG")
    return out.getvalue()


def photo_tiles(n: int, size: int = 64) -> list[bytes]:
    """``n`` real-photo JPEG tiles of ``size`` pixels from different places and scales."""
    photo = Image.open(PHOTO).convert("RGB")
    rng = np.random.default_rng(0)
    tiles = []
    for _ in range(n):
        side = int(rng.integers(size, 400))
        left = int(rng.integers(0, photo.width - side))
        top = int(rng.integers(0, photo.height - side))
        tile = photo.crop((left, top, left + side, top + side)).resize((size, size))
        buf = io.BytesIO()
        tile.save(buf, format="JPEG", quality=85)
        tiles.append(buf.getvalue())
    return tiles


def sample_rows(count: int, cache: Path) -> list[dict[str, Any]]:
    """The first ``count`` samples of the embedded sample's train split, as MDS rows.

    Read through a cache folder of its own (``cache``), so that no other dataset's claim on
    ``data/sample/train`` gets in the way.
    """
    from streaming import StreamingDataset

    dataset = StreamingDataset(
        remote=str(SAMPLE / "train"), local=str(cache), batch_size=1, shuffle=False
    )
    rows = [dict(dataset[i]) for i in range(count)]
    del dataset
    gc.collect()  # releases the cache folder's claim now
    return rows


def write_mds(
    out: Path, rows: Iterable[dict[str, Any]], names: Sequence[str], **writer: Any
) -> Path:
    """An MDS schema v1 dataset of ``rows`` with its ``vocabulary.json`` (``names``) at ``out``."""
    from streaming import MDSWriter

    with MDSWriter(out=str(out), columns=MDS_COLUMNS, **writer) as mds:
        for row in rows:
            mds.write(row)
    Vocabulary(list(names)).save(str(out))
    return out


def sample_subset(
    out: Path, count: int, change: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None
) -> Path:
    """The first ``count`` training samples of the embedded sample as a dataset of their own.

    ``change(i, row)`` may alter each row (e.g. damage an image) before it is written.
    """
    rows = sample_rows(count, out.parent / f"{out.name}-cache")
    if change is not None:
        rows = [change(i, row) for i, row in enumerate(rows)]
    names = Vocabulary.load(str(SAMPLE / "train")).names
    return write_mds(out, rows, names)


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int) -> Iterator[None]:
    """Run the body as ``rank`` of a ``world``-process gloo group on loopback, then leave it.

    For workers started with ``torch.multiprocessing.start_processes``: sets the environment
    Composer's ``dist`` reads and initialises ``torch.distributed``.
    """
    import os

    import torch.distributed as torch_dist

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        torch_dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (for a launcher's master)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- converter inputs and outputs


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A WebDataset tar: each sample's members are consecutive, ``<name>.<ext>``."""
    with tarfile.open(path, "w") as archive:
        for name, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def wds(
    name: str,
    image: bytes | None,
    meta: dict[str, Any] | bytes | None,
    *,
    ext: str = "jpg",
    txt: bytes | None = None,
) -> tuple[str, dict[str, bytes]]:
    """One WebDataset sample; ``meta`` None leaves out the json member, bytes are used raw."""
    members: dict[str, bytes] = {}
    if image is not None:
        members[ext] = image
    if meta is not None:
        members["json"] = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    if txt is not None:
        members["txt"] = txt
    return name, members


def read_back(out: Path) -> list[dict[str, Any]]:
    """Every sample of ``out`` in order, concept ids mapped to names through vocabulary.json."""
    vocabulary = Vocabulary.load(str(out))
    from streaming import StreamingDataset

    dataset = StreamingDataset(local=str(out), batch_size=1, shuffle=False)
    rows = []
    for i in range(dataset.num_samples):
        sample = dataset[i]
        ids = decode_concepts(sample["concepts"])
        rows.append(
            {
                "key": sample["key"],
                "caption": sample["caption"],
                "recaption": sample["recaption"],
                "concepts": [vocabulary.name_of(int(c)) for c in ids],
                "scores": decode_scores(sample["concept_scores"]).tolist(),
                "image": bytes(sample["image"]),
            }
        )
    del dataset
    return rows

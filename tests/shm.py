"""Remove the shared memory that crashed Streaming runs left behind, and only that.

Streaming's ``clean_stale_shared_memory()`` unlinks every block of every prefix from 0 up to
the first free one: it cannot tell a crashed run's blocks from those of a run that is still
going. Called at the start of a test session while a training run was going (a user running
the quickstart beside the tests), it removed that run's blocks; the run went on through its
mappings, and at its exit Python's resource tracker, which had registered them, printed a
"leaked shared_memory objects" warning and a "No such file or directory" line for each (about
20 lines per run). Here a block is stale only when no live process maps it or holds it open
(Linux: ``/dev/shm/<name>`` in ``/proc/<pid>/maps`` or ``/proc/<pid>/fd``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cabs_streaming._internals import shared_memory_names

SHM_ROOT = Path("/dev/shm")
#: Streaming's block names: a six-digit prefix and one of its shared-memory names.
STREAMING_BLOCK = re.compile(r"^\d{6}_(" + "|".join(map(re.escape, shared_memory_names())) + r")$")


def blocks_in_use() -> set[str]:
    """Names of the ``/dev/shm`` blocks that a live process maps or holds open.

    Python's ``SharedMemory`` keeps the descriptor of ``shm_open`` open as long as the block is
    attached, so a block being created is seen before it is mapped.
    """
    names: set[str] = set()
    for process in Path("/proc").glob("[0-9]*"):
        try:
            text = (process / "maps").read_text()
            links = [os.readlink(fd) for fd in (process / "fd").iterdir()]
        except OSError:  # the process ended, or is not ours to read
            continue
        for line in [*text.splitlines(), *links]:
            _, found, rest = line.partition("/dev/shm/")
            if found:
                names.add(rest.split(" ")[0])
    return names


def clean_stale_streaming_memory() -> list[str]:
    """Unlink Streaming's blocks that no live process uses; returns their names."""
    if not SHM_ROOT.is_dir():
        return []
    in_use = blocks_in_use()
    removed = []
    for entry in sorted(SHM_ROOT.iterdir()):
        if STREAMING_BLOCK.match(entry.name) and entry.name not in in_use:
            try:
                os.unlink(entry)
            except FileNotFoundError:
                continue
            removed.append(entry.name)
    return removed

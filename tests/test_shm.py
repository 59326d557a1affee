"""The test session's clean-up of Streaming's shared memory spares the blocks of live runs.

Streaming's ``clean_stale_shared_memory()`` removed a training run's blocks when the tests
started beside it, and the run ended with ~20 lines of ``resource_tracker`` warnings about
"leaked" shared memory it could no longer find (reproduced by unlinking a live run's blocks).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import pytest
from paths import SAMPLE
from shm import SHM_ROOT, clean_stale_streaming_memory


@pytest.mark.slow
def test_stale_blocks_go_and_a_live_datasets_blocks_stay() -> None:
    live_script = textwrap.dedent(
        f"""
        import sys
        from streaming import StreamingDataset
        from cabs_streaming._internals import shared_memory_prefix
        dataset = StreamingDataset(local={str(SAMPLE / "train")!r}, batch_size=8)
        print(f"{{shared_memory_prefix(dataset):06d}}", flush=True)
        sys.stdin.readline()  # alive until the test is done
        """
    )
    live = subprocess.Popen(
        [sys.executable, "-c", live_script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        prefix = live.stdout.readline().strip()
        assert prefix, "the live dataset did not start"
        live_blocks = sorted(p.name for p in SHM_ROOT.glob(f"{prefix}_*"))
        assert f"{prefix}_locals" in live_blocks and f"{prefix}_next_epoch" in live_blocks

        # What a crashed run leaves: a block nobody maps or holds open any more.
        stale = SharedMemory("999990_locals", create=True, size=8)
        resource_tracker.unregister(stale._name, "shared_memory")  # ours is not a leak
        stale.close()

        removed = clean_stale_streaming_memory()
        assert "999990_locals" in removed
        assert not (SHM_ROOT / "999990_locals").exists()
        assert sorted(p.name for p in SHM_ROOT.glob(f"{prefix}_*")) == live_blocks
        assert not set(removed) & set(live_blocks)
    finally:
        live.communicate("\n", timeout=60)
    assert live.returncode == 0
    assert not list(Path(SHM_ROOT).glob(f"{prefix}_locals"))  # the dataset cleaned up itself

"""Session checks, resource fixes and the fixtures several test modules share.

- The embedded sample is required by the tests, never silently replaced.
- Shared memory left by a crashed earlier run is removed once, at the start (only blocks no
  live process uses, ``shm.clean_stale_streaming_memory``: Streaming's own
  ``clean_stale_shared_memory`` also removed the blocks of a training run going beside the
  tests). Every session also holds a shared lock on one file for its lifetime and cleans only
  when it can take that lock exclusively, i.e. when no other session is running.
- A dataset releases its claim on its local directory when it is garbage-collected, so a test
  that leaves a dataset alive in a reference cycle is followed by ``gc.collect()``: only such a
  test, told by the Streaming shared-memory blocks it created and left behind, because a
  collection costs 0.3-0.6 s once torch and Composer are loaded. Those imported modules are
  moved out of the collector's sight once collection has imported them (``gc.freeze``), which
  makes each collection a few milliseconds.
- Streaming 0.13 registers an ``atexit`` handler for every shared-memory block a dataset opens,
  so the handler list keeps each block (and its file descriptor) alive until the process ends:
  hundreds of datasets across the suite exhaust the 20,000 descriptors this machine allows. We
  route those registrations into a list and run them when each test module finishes, which is
  what process exit would do, once every dataset of the module is gone.
"""

from __future__ import annotations

import atexit
import fcntl
import gc
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import sample_rows, sample_subset
from launch import SUBSET, selections, train
from paths import SAMPLE
from s3server import S3Server, point_clients_at
from shm import SHM_ROOT, STREAMING_BLOCK, clean_stale_streaming_memory

from cabs_streaming import _internals

_SESSION_LOCK = pytest.StashKey[object]()


def pytest_sessionstart(session: pytest.Session) -> None:
    if not (SAMPLE / "train" / "index.json").is_file():
        raise pytest.UsageError(
            f"the embedded sample data/sample is missing ({SAMPLE / 'train' / 'index.json'} "
            "not found): regenerate it with tools/make_sample.py"
        )
    lock = (Path(tempfile.gettempdir()) / "cabs-streaming-pytest.lock").open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # another session is running: its blocks are not stale
        pass
    else:
        clean_stale_streaming_memory()
    fcntl.flock(lock, fcntl.LOCK_SH)  # held (the file stays open) until this process ends
    session.config.stash[_SESSION_LOCK] = lock


class _ModuleExitHandlers:
    """Stands in for the ``atexit`` module inside ``streaming.base.shared.memory``."""

    def __init__(self) -> None:
        self.handlers: list[Callable[[], object]] = []
        atexit.register(self.run)  # whatever a module left behind still runs at exit

    def register(self, func: Callable[[], object]) -> Callable[[], object]:
        self.handlers.append(func)
        return func

    def run(self) -> None:
        handlers, self.handlers = self.handlers, []
        for func in reversed(handlers):
            try:
                func()
            except Exception:  # a block another process already removed
                pass


_EXIT_HANDLERS = _ModuleExitHandlers()
_internals.route_shared_memory_exit_handlers(_EXIT_HANDLERS)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what the test modules imported: never garbage, and 0.3-0.6 s per collection."""
    gc.collect()
    gc.freeze()


def _streaming_blocks() -> set[str]:
    try:
        return {name for name in os.listdir(SHM_ROOT) if STREAMING_BLOCK.match(name)}
    except FileNotFoundError:  # not Linux: no cheap way to tell, so always collect
        return {str(id(object()))}


@pytest.fixture(scope="module", autouse=True)
def _release_streaming_shared_memory() -> Iterator[None]:
    yield
    if _EXIT_HANDLERS.handlers:
        gc.collect()
        _EXIT_HANDLERS.run()


@pytest.fixture(autouse=True)
def _collect_datasets() -> Iterator[None]:
    """Collect after a test that left a dataset alive (a block it created still exists)."""
    before = _streaming_blocks()
    yield
    if _streaming_blocks() - before:
        gc.collect()  # a dataset releases its claim on its local directory in __del__


# ------------------------------------------------------------------------------ shared fixtures


@pytest.fixture(scope="session")
def sample_jpegs(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """Distinct real JPEG files: the images of the embedded sample's first training samples."""
    rows = sample_rows(24, tmp_path_factory.mktemp("sample-cache"))
    jpegs = list(dict.fromkeys(bytes(row["image"]) for row in rows))
    assert len(jpegs) >= 16 and all(j[:2] == b"\xff\xd8" for j in jpegs)
    return jpegs


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS server on loopback for the session, started by the first test needing it."""
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="module")
def s3(s3_server: S3Server) -> Iterator[S3Server]:
    """The session's S3 server, with boto3, Streaming and Composer pointed at it in this module.

    A module that stopped the server (an outage) leaves it running for the next one.
    """
    if not s3_server.running:
        s3_server.start()
    with pytest.MonkeyPatch.context() as mp:
        point_clients_at(s3_server, mp)
        yield s3_server
    if not s3_server.running:
        s3_server.start()


@pytest.fixture(scope="session")
def resume_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The training data of the resumption and fault tests (``launch.SUBSET`` samples)."""
    return sample_subset(tmp_path_factory.mktemp("resume-data") / "train", SUBSET)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, resume_data: Path) -> Path:
    """The run every killed, resumed or faulted run must equal: trained once per session.

    Nothing it is compared on depends on where the data or checkpoints live, on the checkpoint
    schedule, the DataLoader workers or the lookahead, so local files and one worker serve all.
    """
    folder = tmp_path_factory.mktemp("resume") / "uninterrupted"
    status, output = train(
        folder, None, f"train_data.local={resume_data}", "save_interval=1ep",
        "train_data.num_workers=1",
    )  # fmt: skip
    assert status == 0, output
    assert len(selections(folder)) > 0
    return folder

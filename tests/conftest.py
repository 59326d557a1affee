"""Session checks and one resource fix for the test process.

- The embedded sample is required by the tests, never silently replaced.
- Shared memory left by a crashed earlier run is removed once, at the start (``streaming``'s
  ``clean_stale_shared_memory``; it would also remove a concurrent run's blocks, so run one
  pytest at a time, as the README's command does), and datasets are garbage-collected after
  every test so that a fresh dataset on the same local directory can claim it.
- Streaming 0.13 registers an ``atexit`` handler for every shared-memory block a dataset opens,
  so the handler list keeps each block (and its file descriptor) alive until the process ends:
  hundreds of datasets across the suite exhaust the 20,000 descriptors this machine allows. We
  route those registrations into a list and run them when each test module finishes, which is
  what process exit would do, once every dataset of the module is gone.
"""

from __future__ import annotations

import atexit
import gc
from collections.abc import Callable, Iterator

import pytest
import streaming.base.shared.memory as streaming_memory
from paths import SAMPLE
from streaming.base.util import clean_stale_shared_memory


def pytest_sessionstart(session: pytest.Session) -> None:
    if not (SAMPLE / "train" / "index.json").is_file():
        raise pytest.UsageError(
            f"the embedded sample data/sample is missing ({SAMPLE / 'train' / 'index.json'} "
            "not found): regenerate it with tools/make_sample.py"
        )
    clean_stale_shared_memory()


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
streaming_memory.atexit = _EXIT_HANDLERS  # type: ignore[assignment]


@pytest.fixture(scope="module", autouse=True)
def _release_streaming_shared_memory() -> Iterator[None]:
    yield
    gc.collect()
    _EXIT_HANDLERS.run()


@pytest.fixture(autouse=True)
def _collect_datasets() -> Iterator[None]:
    yield
    gc.collect()  # a dataset releases its claim on its local directory in __del__

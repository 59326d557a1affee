"""Progress bars that count records across worker processes.

Readers tick a :class:`Ticker` per record; in a pool worker the ticks go to a shared counter
the parent polls (``init_worker``), in-process straight to the bar. ``run_tasks`` runs a pass's
tasks in order on the pool or in-process and keeps the bar moving meanwhile.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

#: Records counted before a worker reports them.
PROGRESS_EVERY = 64

_tick_sink: Callable[[int], None] | None = None


class Ticker:
    """Counts records and reports them to the progress sink in small batches."""

    def __init__(self) -> None:
        self.pending = 0

    def __call__(self) -> None:
        """Count one record."""
        self.pending += 1
        if self.pending >= PROGRESS_EVERY:
            self.flush()

    def flush(self) -> None:
        """Report what was counted since the last report."""
        if self.pending and _tick_sink is not None:
            _tick_sink(self.pending)
        self.pending = 0


def init_worker(counter: Any) -> None:
    """Pool initializer: worker progress goes to a shared counter that the parent polls."""
    global _tick_sink

    def add(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    _tick_sink = add


@contextmanager
def _local_progress(bar: tqdm) -> Iterator[None]:
    """In-process progress goes straight to the bar."""
    global _tick_sink
    previous, _tick_sink = _tick_sink, bar.update
    try:
        yield
    finally:
        _tick_sink = previous


def run_tasks(
    pool: Any,
    function: Callable[[Any], Any],
    tasks: Sequence[Any],
    bar: tqdm,
    counter: Any,
) -> Iterator[Any]:
    """Results in task order, in-process or on the pool, keeping the bar moving meanwhile."""
    if pool is None:
        with _local_progress(bar):
            for task in tasks:
                yield function(task)
        return
    results = pool.imap(function, tasks)
    while True:
        try:
            result = results.next(timeout=0.2)
        except multiprocessing.TimeoutError:
            if counter.value > bar.n:
                bar.update(counter.value - bar.n)
            continue
        except StopIteration:
            break
        if counter.value > bar.n:
            bar.update(counter.value - bar.n)
        yield result

"""Progress bars that count records across worker processes.

Readers tick a :class:`Ticker` per record; in a pool worker the ticks go to a shared counter
the parent polls (``init_worker``), in-process straight to the bar. ``run_tasks`` runs a pass's
tasks in order on the pool (``start_pool``) or in-process and keeps the bar moving meanwhile.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

from cabs_streaming.converter.records import ConversionError

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


class WorkerDied(ConversionError):
    """A pool worker ended without an answer (killed, out of memory, or crashed in native code)."""


def start_pool(processes: int, counter: Any) -> ProcessPoolExecutor:
    """A pool of ``processes`` fresh interpreters whose progress goes to ``counter``.

    The workers are spawned, not forked: a fork copies every lock of the parent as it is at that
    moment, so a lock held by another thread of the parent (a logger's, an allocator's, a test
    framework's) stays held for ever in the child and the conversion hangs. Spawning costs an
    import of the converter (about 0.2 s a worker). A ``ProcessPoolExecutor`` rather than a
    ``multiprocessing.Pool``: when a worker dies the executor says so (``BrokenProcessPool``), where
    the pool silently replaces it and waits for ever for the task it lost.
    """
    return ProcessPoolExecutor(
        processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(counter,),
    )


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Stop ``pool`` now: queued tasks are dropped and running workers are terminated.

    Used when the parent stops early (an error, Ctrl-C): waiting for a running pass over a large
    file would keep the user waiting for work that is thrown away. ``terminate_workers`` is public
    from Python 3.14; before it the executor's own process table is the only handle.
    """
    terminate = getattr(pool, "terminate_workers", None)
    if terminate is not None:
        terminate()
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join()


def run_tasks(
    pool: ProcessPoolExecutor | None,
    function: Callable[[Any], Any],
    tasks: Sequence[Any],
    bar: tqdm,
    counter: Any,
    labels: Sequence[str] = (),
) -> Iterator[Any]:
    """Results in task order, in-process or on the pool, keeping the bar moving meanwhile.

    ``labels`` name each task's input for the error raised when a worker dies under it.
    """
    if pool is None:
        with _local_progress(bar):
            for task in tasks:
                yield function(task)
        return
    futures = [pool.submit(function, task) for task in tasks]
    for i, future in enumerate(futures):
        while True:
            try:
                result = future.result(timeout=0.2)
            except FuturesTimeout:
                if counter.value > bar.n:
                    bar.update(counter.value - bar.n)
                continue
            except BrokenProcessPool as err:
                label = labels[i] if i < len(labels) else f"task {i}"
                raise WorkerDied(
                    f"a converter worker process died without an answer while {label} (or a "
                    "file converted beside it) was being read: it was killed (out of memory? "
                    "`dmesg` says) or crashed in native code. Nothing was published; rerun with "
                    "--workers 1 to find the file, or with fewer workers for more memory each"
                ) from err
            break
        if counter.value > bar.n:
            bar.update(counter.value - bar.n)
        yield result

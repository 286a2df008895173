"""A process pool runner: batches of lines to ``workers`` processes, results back in input order."""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from mmoffload.errors import Where
from mmoffload.io.outputs import adopt_temp_owner
from mmoffload.runners import Line, LineTask, Results, batches

_task: LineTask | None = None


@contextlib.contextmanager
def pool_runner(task: LineTask, workers: int) -> Iterator[Results]:
    """Yield a function running ``task`` over lines on a pool of ``workers`` processes, in order.

    Ctrl-C reaches the whole process group: the parent alone handles it, and stops
    every worker at once (``_stop``), whatever each was doing.
    """
    context = multiprocessing.get_context("spawn" if os.name == "nt" else "forkserver")
    pool = None
    try:
        with _sigint_deferred():  # A Ctrl-C held back is raised here, the pool made: it is stopped.
            pool = context.Pool(workers, initializer=_init_worker, initargs=(task, os.getpid()))
        yield lambda lines: _ordered(pool, workers, lines)
    except BaseException:
        if pool is not None:
            _stop(pool)
        raise
    pool.close()
    pool.join()


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Start processes so that the Ctrl-C meant for the run stops none of them half started.

    This process holds Ctrl-C back (blocked: pending, delivered at the end of the block)
    while the processes start. The fork server and the resource tracker are new
    interpreters, started while Ctrl-C is also ignored here: that is inherited through
    exec (a handler is not), so they ignore it from their first instruction, and so do
    the workers the fork server forks. A blocked signal is never discarded as ignored
    (Linux queues it), so a Ctrl-C meanwhile still stops the run.
    """
    if os.name == "nt" or threading.current_thread() is not threading.main_thread():
        yield
        return
    from multiprocessing import forkserver, resource_tracker

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            resource_tracker.ensure_running()
            # Starting the tracker unblocks SIGINT and SIGTERM on its way out: block again at once.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGINT, previous)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _stop(pool: Any) -> None:
    """Stop a pool at once, whatever its workers are doing.

    ``Pool.terminate`` alone can wait forever: it takes the task queue's read lock, which
    an idle worker holds while it waits for work, and the result queue's write lock,
    which a worker stopped in the middle of sending a result never gives back. So every
    worker is killed first, a lock a killed worker held is freed, then the pool is ended.
    """
    workers = list(pool._pool)
    for process in workers:
        process.kill()
    for process in workers:
        process.join()
    # Only the workers take these locks while the pool runs (its threads write without them).
    for lock in (pool._inqueue._rlock, getattr(pool._outqueue, "_wlock", None)):
        if lock is None:
            continue
        if lock.acquire(block=False):
            lock.release()
        else:
            lock.release()  # Held by a killed worker: a plain lock may be released by anyone.
    pool.terminate()


def _ordered(pool: Any, workers: int, lines: Iterable[Line]) -> Iterator[tuple[Where, bytes, Any]]:
    """Run batches in the pool, yielding results in input order.

    At most two batches per worker are in flight, so memory stays bounded by the
    batch size rather than the file size.
    """
    pending: collections.deque[tuple[list[Line], Any]] = collections.deque()
    for batch in batches(lines):
        pending.append((batch, pool.apply_async(_run_batch, (batch,))))
        if len(pending) >= 2 * workers:
            yield from _collect(*pending.popleft())
    while pending:
        yield from _collect(*pending.popleft())


def _collect(batch: list[Line], async_result: Any) -> Iterator[tuple[Where, bytes, Any]]:
    for (where, line), result in zip(batch, async_result.get(), strict=True):
        yield where, line, result


def _init_worker(task: LineTask, run_pid: int) -> None:
    """Set up a pool worker: Ctrl-C left to the parent, temporaries named as the run's, the task."""
    global _task
    # Ctrl-C reaches the whole process group: the parent alone stops the run (and these workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    adopt_temp_owner(run_pid)
    _task = task


def _run_batch(batch: list[Line]) -> list[Any]:
    assert _task is not None
    return _task(batch)

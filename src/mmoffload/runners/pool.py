"""A process pool runner: batches of lines to ``workers`` processes, results back in input order."""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import signal
from collections.abc import Iterable, Iterator
from typing import Any

from mmoffload.errors import Where
from mmoffload.io.outputs import adopt_temp_owner
from mmoffload.runners import Line, LineTask, Results, batches

_task: LineTask | None = None


@contextlib.contextmanager
def pool_runner(task: LineTask, workers: int) -> Iterator[Results]:
    """Yield a function running ``task`` over lines on a pool of ``workers`` processes, in order."""
    context = multiprocessing.get_context("spawn" if os.name == "nt" else "forkserver")
    with context.Pool(workers, initializer=_init_worker, initargs=(task, os.getpid())) as pool:
        yield lambda lines: _ordered(pool, workers, lines)


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

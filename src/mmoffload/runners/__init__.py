"""Ordered maps of a stage's per-batch work over lines: here, on a process pool, or on Ray Data.

A runner knows no stage. A stage hands it a ``LineTask``: a picklable callable that
turns a batch of ``(where, line)`` pairs into one result per line (errors are
returned as values, never raised, so one bad line does not stop a batch). Every
runner yields ``(where, line, result)`` in input order, so outputs are the same
bytes whichever ran them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from mmoffload.errors import Where

if TYPE_CHECKING:
    from mmoffload.runners.ray import RayOptions

Line = tuple[Where, bytes]
# Lines per batch handed to a worker, and bytes per batch at most (memory stays bounded).
BATCH_LINES, BATCH_BYTES = 64, 16 << 20


class LineTask(Protocol):
    """A stage's per-batch work; pickled once to each worker process, which keeps its own state."""

    def __call__(self, batch: list[Line]) -> list[Any]: ...


Results = Callable[[Iterable[Line]], Iterator[tuple[Where, bytes, Any]]]


@contextlib.contextmanager
def line_runner(task: LineTask, workers: int = 1, ray: RayOptions | None = None) -> Iterator[Results]:
    """Yield a function mapping ``task`` over a stream of lines, in order: here, on ``workers`` processes,
    or on Ray (the ``ray`` extra)."""
    if ray is not None:
        from mmoffload.runners.ray import ray_runner  # The optional `ray` extra.

        with ray_runner(task, ray) as results:
            yield results
    elif workers > 1:
        from mmoffload.runners.pool import pool_runner  # multiprocessing: a share of start-up otherwise.

        with pool_runner(task, workers) as results:
            yield results
    else:
        yield lambda lines: _here(task, lines)


def batches(
    lines: Iterable[Line], max_lines: int = BATCH_LINES, max_bytes: int = BATCH_BYTES
) -> Iterator[list[Line]]:
    """Group lines into batches of at most ``max_lines`` lines or about ``max_bytes`` bytes."""
    batch: list[Line] = []
    size = 0
    for item in lines:
        batch.append(item)
        size += len(item[1])
        if len(batch) >= max_lines or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _here(task: LineTask, lines: Iterable[Line]) -> Iterator[tuple[Where, bytes, Any]]:
    for batch in batches(lines):
        for (where, line), result in zip(batch, task(batch), strict=True):
            yield where, line, result

"""Ray Data runner: a stage's per-batch task on a Ray cluster (docs/scale.md).

The driver streams the input lines exactly as the local path does; each line
is one row with one binary column (never parsed into nested columns: that
crashed Ray workers), rows go through ``map_batches`` in input order
(``preserve_order``) and each task runs the very function the local path runs.
Results come back in order, so outputs are the same bytes as a local run and
are still written atomically by the caller. Tasks are retried a bounded number
of times (Ray's default retries forever), so a task that keeps failing fails the
run with one clear error.

Optional: needs the ``ray`` extra (``ray[data]``); ``ray`` is imported only here.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import msgspec

from mmoffload.errors import MMOffloadError, UsageError, Where
from mmoffload.runners import BATCH_LINES, Line, LineTask, Results

if TYPE_CHECKING:
    import numpy as np

# Input bytes handed to one Ray Dataset at a time: the driver's memory bound.
WINDOW_BYTES = 256 << 20


class RayOptions(msgspec.Struct, frozen=True):
    """Where and how to run on Ray.

    Attributes:
        address: the cluster (``host:port``, ``ray://host:port``, ``auto``); None: ``$RAY_ADDRESS``,
            else a local cluster for the run. Ignored when this process is connected already.
        num_cpus: CPUs of a local cluster (None: all).
        max_retries: retries of a task whose worker died; a task failing more fails the run.
        window_bytes: input bytes per Ray Dataset run, bounding the driver's memory.
    """

    address: str | None = None
    num_cpus: int | None = None
    max_retries: int = 2
    window_bytes: int = WINDOW_BYTES


@contextlib.contextmanager
def ray_session(options: RayOptions) -> Iterator[None]:
    """Connect to Ray (or start a local cluster) for a block; disconnect only what this opened.

    Raises:
        UsageError: the ``ray`` extra is not installed.
    """
    ray = _import_ray()
    if ray.is_initialized():
        yield
        return
    local = {} if options.address else {"num_cpus": options.num_cpus}
    ray.init(address=options.address, include_dashboard=False, log_to_driver=False, **local)
    # A run this opened is a command's: its stderr carries mmoffload's messages, not Ray Data's progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        yield
    finally:
        # Only this process's connection (and the local cluster it started): never `ray stop`.
        ray.shutdown()


@contextlib.contextmanager
def ray_runner(task: LineTask, options: RayOptions) -> Iterator[Results]:
    """Yield a function running ``task`` over lines as Ray tasks, results in input order."""
    with ray_session(options):
        yield lambda lines: _ordered(lines, options, task)


# --- the driver side --------------------------------------------------------------------------------


def _ordered(
    lines: Iterable[Line], ray_options: RayOptions, task: LineTask
) -> Iterator[tuple[Where, bytes, Any]]:
    """Run ``task`` over windows of lines on Ray; yield ``(where, line, result)`` in input order."""
    ray = _import_ray()
    # Ray Data reorders rows by default; outputs must keep the input's order.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    for window in _windows(lines, ray_options.window_bytes):
        rows = [{"where": pickle.dumps(where), "line": line} for where, line in window]
        dataset = ray.data.from_items(rows).map_batches(
            _run_rows,
            batch_format="numpy",
            batch_size=BATCH_LINES,
            fn_kwargs={"task": task},
            max_retries=ray_options.max_retries,
            retry_exceptions=False,
        )
        try:
            results = [row["result"] for row in dataset.iter_rows()]
        except Exception as exc:  # Ray wraps a dead worker or a task's exception in its own classes.
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise MMOffloadError(
                f"Ray task failed after up to {ray_options.max_retries} retries: {first}",
                window[0][0].at(line=None),
            ) from exc
        for (where, line), result in zip(window, results, strict=True):
            yield where, line, pickle.loads(result)


def _windows(lines: Iterable[Line], limit: int) -> Iterator[list[Line]]:
    window: list[Line] = []
    size = 0
    for item in lines:
        window.append(item)
        size += len(item[1])
        if size >= limit:
            yield window
            window, size = [], 0
    if window:
        yield window


# --- the task side (runs in Ray workers) ---------------------------------------------------------


def _run_rows(batch: dict[str, np.ndarray], task: LineTask) -> dict[str, list[bytes]]:
    """Run the task on a batch of rows; each result travels back pickled (errors included)."""
    lines = [
        (pickle.loads(where), bytes(line)) for where, line in zip(batch["where"], batch["line"], strict=True)
    ]
    return {"result": [pickle.dumps(result) for result in task(lines)]}


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise UsageError("`--ray` needs the `ray` extra: pip install 'mmoffload[ray]'") from exc
    return ray

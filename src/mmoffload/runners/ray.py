"""Ray Data backend: the per-line work of offload and audit as tasks on a Ray cluster (docs/scale.md).

The driver streams the input lines exactly as the local path does; each line
is one row with one binary column (never parsed into nested columns: that
crashed Ray workers), rows go through ``map_batches`` in input order
(``preserve_order``) and each task runs the very function the local path runs
per line. Results come back in order, so outputs are the same bytes as a local
run and are still written atomically by the caller. Tasks are retried a
bounded number of times (Ray's default retries forever), so a task that keeps
failing fails the run with one clear error.

Optional: needs the ``ray`` extra (``ray[data]``); ``ray`` is imported only here.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from mmoffload.errors import MMOffloadError, UsageError, Where
from mmoffload.io.inputs import iter_lines
from mmoffload.offload import stage as offload
from mmoffload.store.backend import open_store

if TYPE_CHECKING:
    import numpy as np
    import ray.data

    from mmoffload.store.local import AssetStore
    from mmoffload.store.objects import ObjectStore

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
def ray_line_results(
    store: AssetStore | ObjectStore, options: offload.OffloadOptions, ray_options: RayOptions
) -> Iterator[offload.Results]:
    """Yield offload's per-line results function, running its work as Ray tasks, in input order."""
    with ray_session(ray_options):
        yield lambda lines: _ordered(
            lines, ray_options, _offload_rows, {"store": store, "options": options}, _offload_result
        )


def audit_jsonl_on_ray(auditor: Any, paths: list[Path], ray_options: RayOptions) -> None:
    """Audit JSONL files' lines as Ray tasks, merging each line's findings into ``auditor`` in order."""
    lines = (
        (where.at(index=index), line)
        for path in paths
        for index, (where, line) in enumerate(iter_lines(path))
    )
    with ray_session(ray_options):
        for _where, _line, (report, files) in _ordered(
            lines, ray_options, _audit_rows, {"auditor": _empty_copy(auditor)}, pickle.loads
        ):
            auditor.merge(report, files)


def _empty_copy(auditor: Any) -> Any:
    """An auditor with ``auditor``'s settings and nothing found yet: what a task needs to know."""
    return type(auditor)(
        auditor.families, auditor.report.hashes_verified, auditor.remap, auditor.allowed_roots
    )


def offload_dataset(
    dataset: ray.data.Dataset,
    assets: Path | str | AssetStore | ObjectStore,
    *,
    column: str = "text",
    options: offload.OffloadOptions | None = None,
    max_retries: int = 2,
) -> ray.data.Dataset:
    """Map a Ray Dataset of JSONL lines through offload; return the same rows, offloaded.

    Each row's ``column`` (one JSON record as a string, as ``ray.data.read_text``
    gives) is replaced by the offloaded record; a new ``offload_error`` column
    holds why a line could not be offloaded (None when it was).

    Args:
        dataset: rows with a string or binary ``column``.
        assets: the asset directory or object-store URL, or a store on it (reachable from every node).
        column: the column holding one JSON record per row.
        options: what to do with ``file://`` and remote sources.
        max_retries: retries of a task whose worker died.

    Returns:
        The lazily offloaded dataset (run it with ``write_json``, ``iter_rows``, ...).
    """
    store = open_store(assets)
    return dataset.map_batches(
        _offload_column,
        batch_format="numpy",
        batch_size=offload.BATCH_LINES,
        fn_kwargs={"store": store, "options": options or offload.OffloadOptions(), "column": column},
        max_retries=max_retries,
        retry_exceptions=False,
    )


# --- the driver side --------------------------------------------------------------------------------


def _ordered(
    lines: Iterable[tuple[Where, bytes]],
    ray_options: RayOptions,
    task: Any,
    task_kwargs: dict[str, Any],
    decode: Any,
) -> Iterator[tuple[Where, bytes, Any]]:
    """Run ``task`` over windows of lines on Ray; yield ``(where, line, result)`` in input order."""
    ray = _import_ray()
    # Ray Data reorders rows by default; outputs must keep the input's order.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    for window in _windows(lines, ray_options.window_bytes):
        rows = [{"where": pickle.dumps(where), "line": line} for where, line in window]
        dataset = ray.data.from_items(rows).map_batches(
            task,
            batch_format="numpy",
            batch_size=offload.BATCH_LINES,
            fn_kwargs=task_kwargs,
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
            yield where, line, decode(result)


def _windows(lines: Iterable[tuple[Where, bytes]], limit: int) -> Iterator[list[tuple[Where, bytes]]]:
    window: list[tuple[Where, bytes]] = []
    size = 0
    for item in lines:
        window.append(item)
        size += len(item[1])
        if size >= limit:
            yield window
            window, size = [], 0
    if window:
        yield window


def _offload_result(result: bytes) -> offload.LineResult:
    value = pickle.loads(result)
    if isinstance(value, tuple) and len(value) == 3:
        error_class, message, where = value
        return error_class(message, where)
    return value


# --- the task side (runs in Ray workers) ---------------------------------------------------------


def _offload_rows(
    batch: dict[str, np.ndarray], store: AssetStore | ObjectStore, options: offload.OffloadOptions
) -> dict[str, list[bytes]]:
    """Offload a batch of rows with the local path's own per-batch function."""
    _ensure_worker(store, options)
    lines = _rows(batch)
    return {"result": [pickle.dumps(result) for result in offload._offload_batch(lines)]}


def _audit_rows(batch: dict[str, np.ndarray], auditor: Any) -> dict[str, list[bytes]]:
    """Audit each row with the local path's per-line method, on a fresh copy of ``auditor``."""
    results: list[bytes] = []
    for where, line in _rows(batch):
        fresh = _empty_copy(auditor)
        fresh.jsonl_line(where.index or 0, where.at(index=None), line)
        results.append(pickle.dumps((fresh.report, fresh.files)))
    return {"result": results}


def _rows(batch: dict[str, np.ndarray]) -> list[tuple[Where, bytes]]:
    return [
        (pickle.loads(where), bytes(line)) for where, line in zip(batch["where"], batch["line"], strict=True)
    ]


def _offload_column(
    batch: dict[str, np.ndarray],
    store: AssetStore | ObjectStore,
    options: offload.OffloadOptions,
    column: str,
) -> dict[str, Any]:
    """Offload a user's dataset column in place, adding ``offload_error``."""
    _ensure_worker(store, options)
    assert offload._worker is not None
    texts: list[str] = []
    errors: list[str | None] = []
    for index, value in enumerate(batch[column]):
        raw = value.encode() if isinstance(value, str) else bytes(value)
        result = offload._offload_line(offload._worker, Where(index=index), raw)
        if isinstance(result, MMOffloadError):
            texts.append(raw.decode())
            errors.append(str(result))
        else:
            # A rewritten line gets a line break; rows of read_text have none.
            out = result[0] if raw.endswith(b"\n") else result[0].removesuffix(b"\n")
            texts.append(out.decode())
            errors.append(None)
    return {**batch, column: texts, "offload_error": errors}


_worker_for: tuple[str, offload.OffloadOptions] | None = None


def _ensure_worker(store: AssetStore | ObjectStore, options: offload.OffloadOptions) -> None:
    """Set up this worker process's offloader once per store and options (its cache lives on)."""
    global _worker_for
    key = (str(store.root), options)
    if _worker_for != key:
        offload.set_worker(store, options)
        _worker_for = key


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise UsageError("`--ray` needs the `ray` extra: pip install 'mmoffload[ray]'") from exc
    return ray

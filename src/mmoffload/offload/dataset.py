"""Offload a Ray Dataset of JSONL lines in place (docs/scale.md): the same per-line work as the CLI's."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmoffload.errors import MMOffloadError, Where
from mmoffload.offload.records import OffloadOptions, OffloadTask, offload_line_result
from mmoffload.runners import BATCH_LINES
from mmoffload.store.backend import open_store

if TYPE_CHECKING:
    import numpy as np
    import ray.data

    from mmoffload.store.local import AssetStore
    from mmoffload.store.objects import ObjectStore


def offload_dataset(
    dataset: ray.data.Dataset,
    assets: Path | str | AssetStore | ObjectStore,
    *,
    column: str = "text",
    options: OffloadOptions | None = None,
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
    task = OffloadTask(open_store(assets), options or OffloadOptions())
    return dataset.map_batches(
        _offload_column,
        batch_format="numpy",
        batch_size=BATCH_LINES,
        fn_kwargs={"task": task, "column": column},
        max_retries=max_retries,
        retry_exceptions=False,
    )


def _offload_column(batch: dict[str, np.ndarray], task: OffloadTask, column: str) -> dict[str, Any]:
    """Offload a user's dataset column in place, adding ``offload_error``."""
    offloader = task.offloader()
    texts: list[str] = []
    errors: list[str | None] = []
    for index, value in enumerate(batch[column]):
        raw = value.encode() if isinstance(value, str) else bytes(value)
        result = offload_line_result(offloader, Where(index=index), raw)
        if isinstance(result, MMOffloadError):
            texts.append(raw.decode())
            errors.append(str(result))
        else:
            # A rewritten line gets a line break; rows of read_text have none.
            out = result[0] if raw.endswith(b"\n") else result[0].removesuffix(b"\n")
            texts.append(out.decode())
            errors.append(None)
    return {**batch, column: texts, "offload_error": errors}

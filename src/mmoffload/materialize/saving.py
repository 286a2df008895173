"""Materialized micro batches saved as safetensors, with the space they need checked first."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from mmoffload.contract.wire import MicroBatch
from mmoffload.errors import UsageError, Where
from mmoffload.extras import require
from mmoffload.families import Families
from mmoffload.io.outputs import atomic_write
from mmoffload.materialize.materializer import MaterializedMicroBatch


def saved_path(save_dir: Path, step: int, rank_file: Path, index: int) -> Path:
    """Return where ``--save`` writes a micro batch: ``DIR/step_<N>/rank_<R>_mb_<K>.safetensors``."""
    return save_dir / f"step_{step}" / f"{rank_file.stem}_mb_{index}.safetensors"


def save_micro_batch(path: Path, batch: MaterializedMicroBatch, *, pixels: bool = True) -> None:
    """Write a materialized micro batch as one safetensors file, atomically.

    Metadata records the family, the forward policy, the missing URIs (JSON list) and
    whether pixels were left out (``pixels: false``, a dummy micro batch saved without them).
    """
    metadata = {
        "family": batch.family or "",
        "missing_uris": json.dumps(list(batch.missing_uris)),
        "pixels": json.dumps(pixels),
    }
    if batch.policy is not None:
        for name, value in dataclasses.asdict(batch.policy).items():
            metadata[name] = json.dumps(value)
    tensors = {
        name: np.ascontiguousarray(array)
        for name, array in batch.tensors().items()
        if pixels or name not in PIXEL_KWARGS
    }
    atomic_write(path, require("safetensors.numpy", "Saving tensors").save(tensors, metadata=metadata))


# The vision kwargs holding pixels, left out of a dummy micro batch's saved file.
PIXEL_KWARGS = ("pixel_values",)


# Bytes per token of the saved token arrays: three int64 kwargs, the bool mask, float32 advantages
# and up to three float32 weight streams (an upper bound: safetensors headers are small).
_TOKEN_BYTES = 3 * 8 + 1 + 4 + 3 * 4


def saved_bytes(micro_batch: MicroBatch, families: Families, save_dummies: bool) -> int:
    """Estimate the bytes ``--save`` writes for a micro batch, from its descriptors' grids."""
    size = len(micro_batch.input_ids) * _TOKEN_BYTES
    if micro_batch.mm_refs is None or not (save_dummies or any(micro_batch.loss_mask)):
        return size
    for image, ref in enumerate(micro_batch.mm_refs.images):
        at = Where(image=image)
        family = families.get(str(ref.item.get("family")), at)
        grid = family.grid(ref.item.get("payload"), at)
        # np.zeros is lazily zeroed by the OS: this sizes the array without touching memory.
        size += family.zero_pixels(grid).nbytes
    return size


def check_free_space(save_dir: Path, needed: int) -> None:
    """Refuse to start saving what cannot fit.

    Raises:
        UsageError: less free space than ``needed`` where ``save_dir`` (or its nearest parent) is.
    """
    existing = next(p for p in (save_dir, *save_dir.absolute().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise UsageError(
            f"Expected room for about {needed:,} bytes of tensors, got {free:,} bytes free",
            Where(file=str(save_dir)),
        )

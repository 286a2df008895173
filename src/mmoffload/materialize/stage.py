"""Trainer-side materialization: a micro batch's image refs become model kwargs (families.md).

The micro batch is checked with the contract's one checker (``check_micro_batch``),
then each ref against its descriptor and family. For each ref, in token order:
read the file its URI names, check its content hash, decode it to RGB, let the
family prepare it, and check the grid against the descriptor; the family then
writes each image's pixel rows straight into the micro batch's one array.
Missing files follow the missing-image policy; a wrong hash or grid is
corruption and always an error. Prepared images are cached by (family
configuration, content hash), so an image shared by several micro batches is
read and decoded once.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec

from mmoffload.contract import rundir
from mmoffload.contract.wire import read_rank_file
from mmoffload.errors import UsageError, Where
from mmoffload.extras import require
from mmoffload.families import Families, resolve_model_dir
from mmoffload.families.pixel_cache import DEFAULT_CACHE_BYTES, PixelCache
from mmoffload.io.staging import remove_dead_temps
from mmoffload.materialize.materializer import Materializer, MissingImagePolicy
from mmoffload.materialize.saving import check_free_space, save_micro_batch, saved_bytes, saved_path
from mmoffload.store.read import AllowedRoots
from mmoffload.store.remap import Remap


class MaterializeReport(msgspec.Struct, kw_only=True):
    """Figures of ``mmoffload materialize``; phase seconds are summed over processed images."""

    run_dir: str
    model: str | None
    missing_image_policy: str
    steps: int
    rank_files: int
    micro_batches: int
    micro_batches_multimodal: int
    micro_batches_zero_loss: int
    images: int
    images_processed: int
    cache_hits: int
    images_placeholdered: int
    pixel_bytes: int
    files_saved: int
    save_dir: str | None
    setup_seconds: float
    read_seconds: float
    hash_seconds: float
    decode_seconds: float
    process_seconds: float
    seconds: float
    # Each family the micro batches used, with its config (a model directory or "defaults").
    families: dict[str, str] = msgspec.field(default_factory=dict)
    warnings: list[str] = msgspec.field(default_factory=list)


def iter_rank_files(run_dir: str | os.PathLike[str]) -> Iterator[tuple[int, Path]]:
    """Yield ``(step, rank file)`` for every rank file of a run, steps and ranks in order."""
    for step in rundir.steps(run_dir):
        for path in rundir.rank_paths(run_dir, step):
            yield step, path


def materialize_run(
    run_dir: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    missing_image_policy: MissingImagePolicy = MissingImagePolicy.PLACEHOLDER_ZERO_LOSS,
    save_dir: str | os.PathLike[str] | None = None,
    save_dummies: bool = False,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    remap: Remap | None = None,
    advance: Callable[[int, int], None] | None = None,
    add_total: Callable[[int], None] | None = None,
    on_estimate: Callable[[int, int], None] | None = None,
    allowed_roots: AllowedRoots = None,
) -> MaterializeReport:
    """Materialize every micro batch of every rank file of a run, as a trainer would.

    Args:
        run_dir: the run directory (``RUN/rollouts/step_<N>/rank_<R>.bin``).
        model: a model directory or bundled config name; family defaults when None.
        missing_image_policy: what an absent image file does.
        save_dir: when given, write each micro batch's tensors under it (see ``saved_path``).
        save_dummies: also save the pixels of dummy micro batches (all-false loss mask),
            which pack adds so that every rank runs the vision tower and which train nothing.
        cache_bytes: bound of the processed-image cache.
        remap: URI prefix rewrites applied before each image is read (``--remap``).
        advance: called with ``(1, images)`` after each micro batch (progress).
        add_total: called once with the number of micro batches, before any is materialized.
        on_estimate: called with the estimated bytes to save and the micro batch count
            before anything is materialized.
        allowed_roots: directories image refs may point into; None allows any regular file.

    Raises:
        UsageError: the run has no rank files, the model cannot be used, or the estimated
            size to save exceeds the free space of ``save_dir``.
        BadInputError: a rank file or micro batch breaks the contract.
        IntegrityError: an image disagrees with its ref, or is missing under policy ``error``.
    """
    started = time.perf_counter()
    require("PIL.Image", "mmoffload materialize")  # Fail before any work, naming the extra.
    families = Families(resolve_model_dir(model) if model is not None else None)
    materializer = Materializer(
        families,
        missing_image_policy=missing_image_policy,
        cache=PixelCache(cache_bytes),
        remap=remap,
        allowed_roots=allowed_roots,
    )
    remove_dead_temps(run_dir)  # Killed processes' temporaries, never a live writer's.
    rank_files = list(iter_rank_files(run_dir))
    if not rank_files:
        raise UsageError(
            f"Expected rank files `rollouts/step_<N>/rank_<R>.bin`, found none: run `mmoffload pack {run_dir}` "
            "first (after `mmoffload refs`)",
            Where(file=str(run_dir)),
        )
    decoded = [(step, path, read_rank_file(path)) for step, path in rank_files]
    micro_batches = sum(len(batches) for _, _, batches in decoded)
    if add_total is not None:
        add_total(micro_batches)
    if save_dir is not None:
        estimate = sum(
            saved_bytes(micro_batch, families, save_dummies)
            for _, _, batches in decoded
            for micro_batch in batches
        )
        if on_estimate is not None:
            on_estimate(estimate, micro_batches)
        check_free_space(Path(save_dir), estimate)
    files_saved = 0
    for step, path, batches in decoded:
        for index, micro_batch in enumerate(batches):
            batch = materializer.materialize(micro_batch, Where(file=str(path), index=index))
            if save_dir is not None:
                pixels = save_dummies or any(micro_batch.loss_mask)
                save_micro_batch(saved_path(Path(save_dir), step, path, index), batch, pixels=pixels)
                files_saved += 1
            if advance is not None:
                advance(1, len(micro_batch.mm_refs.images) if micro_batch.mm_refs else 0)
    return MaterializeReport(
        run_dir=str(run_dir),
        model=str(model) if model is not None else None,
        missing_image_policy=str(materializer.missing_image_policy),
        steps=len({step for step, _ in rank_files}),
        rank_files=len(rank_files),
        files_saved=files_saved,
        save_dir=str(save_dir) if save_dir is not None else None,
        seconds=time.perf_counter() - started,
        families=families.configs(),
        warnings=families.warnings(),
        **dataclasses.asdict(materializer.stats),
    )

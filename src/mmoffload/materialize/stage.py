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
import enum
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from mmoffload.contract import rundir
from mmoffload.contract.addresses import asset_location
from mmoffload.contract.checks import check_micro_batch
from mmoffload.contract.descriptors import descriptor_uri, validate_descriptor
from mmoffload.contract.wire import WEIGHT_STREAMS, MicroBatch, read_rank_file
from mmoffload.errors import BadInputError, IntegrityError, MissingImageError, UsageError, Where
from mmoffload.extras import require
from mmoffload.families import DEFAULT_TOKEN_NAMES, Families, Family, ForwardPolicy, Grid, resolve_model_dir
from mmoffload.families.base import prepared_grid
from mmoffload.families.pixel_cache import DEFAULT_CACHE_BYTES, PixelCache
from mmoffload.io.outputs import atomic_write
from mmoffload.io.staging import remove_dead_temps
from mmoffload.store.images import decode_rgb
from mmoffload.store.read import read_verified, verify_hash
from mmoffload.store.remap import Remap

if TYPE_CHECKING:
    pass


class MissingImagePolicy(enum.StrEnum):
    """What to do when an image file is absent (families.md, missing images)."""

    PLACEHOLDER_ZERO_LOSS = "placeholder_zero_loss"
    ERROR = "error"


@dataclass
class MaterializeStats:
    """Running figures of a materializer; setup is loading processors, the other seconds sum over images."""

    micro_batches: int = 0
    micro_batches_multimodal: int = 0
    micro_batches_zero_loss: int = 0
    images: int = 0
    images_processed: int = 0
    cache_hits: int = 0
    images_placeholdered: int = 0
    pixel_bytes: int = 0
    setup_seconds: float = 0.0
    read_seconds: float = 0.0
    hash_seconds: float = 0.0
    decode_seconds: float = 0.0
    process_seconds: float = 0.0


# Model kwargs with one entry per token, shaped (1, T) as Hugging Face models take them.
BATCHED_KWARGS = ("input_ids", "position_ids", "mm_token_type_ids")


@dataclass(frozen=True)
class MaterializedMicroBatch:
    """What a trainer needs to run one micro batch.

    Attributes:
        family: the family of its images, or None for a text-only micro batch.
        policy: the family's forward policy, or None for a text-only micro batch.
        model_kwargs: ``input_ids``, the family's vision kwargs (``pixel_values`` and
            its grid kwarg), ``mm_token_type_ids`` when the policy requires them and
            ``position_ids`` unless the policy says the model computes its own; the
            per-token ones shaped ``(1, T)``, ready for ``model(**model_kwargs)``.
        loss_mask: per token, after the missing-image policy (shape ``(T,)``).
        advantages: per token, after the missing-image policy.
        weights: the weight streams present (``rl_weights``, ``ce_weights``,
            ``ref_kl_weights``), after the missing-image policy.
        missing_uris: the absent images that got zero placeholder pixels, in token order.
    """

    family: str | None
    policy: ForwardPolicy | None
    model_kwargs: dict[str, Any]
    loss_mask: Any
    advantages: Any
    weights: dict[str, Any]
    missing_uris: tuple[str, ...] = ()

    def tensors(self) -> dict[str, Any]:
        """Return every array by name: model kwargs, loss mask, advantages, weight streams."""
        return {
            **self.model_kwargs,
            "loss_mask": self.loss_mask,
            "advantages": self.advantages,
            **self.weights,
        }


class Materializer:
    """Turn micro batches into model kwargs, reusing processed images across calls.

    Example:
        >>> materializer = Materializer(Families(resolve_model_dir("qwen3_vl")))
        >>> batch = materializer.materialize(micro_batch, Where(file="rank_0.bin", index=3))
        >>> model(**batch.model_kwargs)
    """

    def __init__(
        self,
        families: Families,
        *,
        missing_image_policy: MissingImagePolicy = MissingImagePolicy.PLACEHOLDER_ZERO_LOSS,
        cache: PixelCache | None = None,
        as_torch: bool = False,
        remap: Remap | None = None,
        allowed_roots: Sequence[Path] | None = None,
    ) -> None:
        """Configure a materializer.

        Args:
            families: the run's families (a model directory configures its own).
            missing_image_policy: what an absent image file does.
            cache: processed-image cache; a fresh one of the default size when None.
            as_torch: return torch tensors instead of numpy arrays (the ``torch`` extra).
            remap: URI prefix rewrites applied before each image is read (``--remap``).
            allowed_roots: directories image refs may point into; None allows any regular file.

        Raises:
            UsageError: ``as_torch`` without torch installed.
        """
        self.families = families
        self.missing_image_policy = MissingImagePolicy(missing_image_policy)
        self.cache = cache if cache is not None else PixelCache()
        self.remap = remap or Remap()
        self.stats = MaterializeStats()
        self._prepared: set[str] = set()
        self._to_torch = _torch_converter() if as_torch else None
        self.allowed_roots = allowed_roots

    def materialize(self, micro_batch: MicroBatch, where: Where | None = None) -> MaterializedMicroBatch:
        """Materialize one micro batch.

        Args:
            micro_batch: a decoded micro batch with raw image refs.
            where: names the micro batch in errors (rank file and index).

        Raises:
            BadInputError: legacy ``mm_kwargs``, mixed families, a malformed descriptor,
                refs out of order, a wrong placeholder length or span, an undecodable image.
            IntegrityError: a hash or grid mismatch, or missing files under policy ``error``.
        """
        where = where or Where()
        if micro_batch.mm_kwargs is not None:
            raise BadInputError(
                "Expected raw image refs (`mm_refs`), got legacy processed `mm_kwargs` "
                f"({', '.join(sorted(micro_batch.mm_kwargs))})",
                where,
            )
        refs = micro_batch.mm_refs.images if micro_batch.mm_refs else []
        # The refs' own checks first: they name the family, descriptor or length at fault.
        family, grids = self._validate_refs(micro_batch, where) if refs else (None, [])
        check_micro_batch(micro_batch, where, DEFAULT_TOKEN_NAMES)
        self.stats.micro_batches += 1
        input_ids = np.asarray(micro_batch.input_ids, dtype=np.int64)
        position_ids = np.asarray(micro_batch.position_ids, dtype=np.int64)
        loss_mask = np.asarray(micro_batch.loss_mask, dtype=bool)
        advantages = np.asarray(micro_batch.advantages, dtype=np.float32)
        weights = {
            name: np.asarray(values, dtype=np.float32)
            for name in WEIGHT_STREAMS
            if (values := getattr(micro_batch, name)) is not None
        }
        if family is None:
            kwargs = {"input_ids": input_ids, "position_ids": position_ids}
            return self._finish(MaterializedMicroBatch(None, None, kwargs, loss_mask, advantages, weights))

        self.stats.micro_batches_multimodal += 1
        prepared: list[dict[str, np.ndarray] | None] = []
        for index, (ref, grid) in enumerate(zip(refs, grids, strict=True)):
            at = where.at(image=index)
            image = self._image(family, ref.uri, ref.hash, at)
            if image is not None and (made := prepared_grid(family, image)) != grid:
                raise IntegrityError(
                    f"Grid mismatch for `{ref.uri}`: expected {list(grid)} (descriptor), "
                    f"got {list(made)} (processor)",
                    at,
                )
            prepared.append(image)

        # An image used twice in the micro batch is named once.
        missing = tuple(
            dict.fromkeys(r.uri for r, image in zip(refs, prepared, strict=True) if image is None)
        )
        if missing and self.missing_image_policy is MissingImagePolicy.ERROR:
            raise IntegrityError(
                f"Expected every image file of the micro batch, got {len(missing)} missing: "
                + ", ".join(f"`{uri}`" for uri in missing),
                where,
            )
        if missing:
            # A micro batch with a placeholder image must train nothing: every stream goes to zero,
            # and absent weight streams are written as zeros since a trainer's default may be 1.0.
            self.stats.micro_batches_zero_loss += 1
            self.stats.images_placeholdered += sum(image is None for image in prepared)
            loss_mask = np.zeros_like(loss_mask)
            advantages = np.zeros_like(advantages)
            weights = {name: np.zeros(len(input_ids), dtype=np.float32) for name in WEIGHT_STREAMS}
        started = time.perf_counter()
        pixels = family.pixel_rows(grids)
        offset = 0
        for image, grid in zip(prepared, grids, strict=True):
            rows = pixels[offset : offset + family.pixel_shape(grid)[0]]
            if image is None:
                rows.fill(0)
            else:
                family.write_pixels(image, rows)
            offset += len(rows)
        self.stats.process_seconds += time.perf_counter() - started
        kwargs = {
            "input_ids": input_ids,
            family.pixel_kwarg: pixels,
            family.grid_kwarg: np.array(grids, dtype=np.int64),
        }
        if family.policy.image_type_ids_required:
            kwargs["mm_token_type_ids"] = np.asarray(micro_batch.mm_token_type_ids, dtype=np.int64)
        if family.policy.position_ids_with_images:
            kwargs["position_ids"] = position_ids
        self.stats.pixel_bytes += pixels.nbytes + kwargs[family.grid_kwarg].nbytes
        return self._finish(
            MaterializedMicroBatch(
                family.name, family.policy, kwargs, loss_mask, advantages, weights, missing
            )
        )

    def _validate_refs(self, micro_batch: MicroBatch, where: Where) -> tuple[Family, list[Grid]]:
        """Check the refs against each other, their family and the tokens; return family and grids."""
        assert micro_batch.mm_refs is not None
        refs = micro_batch.mm_refs.images
        descriptors = [validate_descriptor(ref.item, where.at(image=i)) for i, ref in enumerate(refs)]
        names = [descriptor["family"] for descriptor in descriptors]
        for index, name in enumerate(names):
            if name != names[0]:
                raise BadInputError(
                    f"Expected one family per micro batch, got `{names[0]}` (image 0) and "
                    f"`{name}` (image {index})",
                    where.at(image=index),
                )
        family = self.families.get(names[0], where)
        if family.name not in self._prepared:
            started = time.perf_counter()
            family.prepare_pixels()
            self.stats.setup_seconds += time.perf_counter() - started
            self._prepared.add(family.name)
        grids: list[Grid] = []
        previous_end = 0
        for index, (ref, descriptor) in enumerate(zip(refs, descriptors, strict=True)):
            at = where.at(image=index)
            if descriptor_uri(descriptor) != ref.uri:
                raise BadInputError(
                    f"Expected the ref's URI to be its descriptor's `{descriptor_uri(descriptor)}`, "
                    f"got `{ref.uri}`",
                    at,
                )
            if ref.offset < previous_end:
                raise BadInputError(
                    f"Expected refs in token order without overlap, got offset {ref.offset} before "
                    f"the previous end {previous_end}",
                    at,
                )
            previous_end = ref.offset + ref.length
            grid = family.grid(descriptor["payload"], at)
            expected_length = family.placeholder_length(grid)
            if ref.length != expected_length:
                raise BadInputError(
                    f"Expected placeholder length {expected_length} for grid {list(grid)} of family "
                    f"`{family.name}`, got {ref.length}",
                    at,
                )
            grids.append(grid)
        return family, grids

    def _image(self, family: Family, uri: str, digest: str, at: Where) -> dict[str, np.ndarray] | None:
        """Return an image prepared by its family, from the cache or its file; None if the file is absent."""
        self.stats.images += 1
        key = (family.pixel_key(), digest)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats.cache_hits += 1
            return cached
        uri = self.remap(uri)
        path = asset_location(uri, at)
        started = time.perf_counter()
        try:
            data = read_verified(path, None, at, allowed_roots=self.allowed_roots)
        except MissingImageError:
            return None
        hashed = time.perf_counter()
        verify_hash(data, digest, path, at, show_actual=self.allowed_roots is not None)
        decoding = time.perf_counter()
        image = decode_rgb(data, uri, at)
        processing = time.perf_counter()
        prepared = family.prepare_image(image)
        done = time.perf_counter()
        self.stats.read_seconds += hashed - started
        self.stats.hash_seconds += decoding - hashed
        self.stats.decode_seconds += processing - decoding
        self.stats.process_seconds += done - processing
        self.stats.images_processed += 1
        self.cache.put(key, prepared)
        return prepared

    def _finish(self, batch: MaterializedMicroBatch) -> MaterializedMicroBatch:
        # A Hugging Face model takes per-token kwargs with a batch dimension: one packed row, (1, T).
        per_token = {
            name: array[None] for name, array in batch.model_kwargs.items() if name in BATCHED_KWARGS
        }
        batch = dataclasses.replace(batch, model_kwargs={**batch.model_kwargs, **per_token})
        if self._to_torch is None:
            return batch
        convert = self._to_torch
        return dataclasses.replace(
            batch,
            model_kwargs={name: convert(array) for name, array in batch.model_kwargs.items()},
            loss_mask=convert(batch.loss_mask),
            advantages=convert(batch.advantages),
            weights={name: convert(array) for name, array in batch.weights.items()},
        )


def _torch_converter() -> Any:
    """Return ``torch.from_numpy``.

    Raises:
        UsageError: torch is not installed.
    """
    return require("torch", "Torch tensors (as_torch)").from_numpy


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


def _saved_bytes(micro_batch: MicroBatch, families: Families, save_dummies: bool) -> int:
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


def _check_free_space(save_dir: Path, needed: int) -> None:
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
    on_estimate: Callable[[int, int], None] | None = None,
    allowed_roots: Sequence[Path] | None = None,
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
            "Expected rank files `rollouts/step_<N>/rank_<R>.bin`, found none", Where(file=str(run_dir))
        )
    decoded = [(step, path, read_rank_file(path)) for step, path in rank_files]
    if save_dir is not None:
        estimate = sum(
            _saved_bytes(micro_batch, families, save_dummies)
            for _, _, batches in decoded
            for micro_batch in batches
        )
        if on_estimate is not None:
            on_estimate(estimate, sum(len(batches) for _, _, batches in decoded))
        _check_free_space(Path(save_dir), estimate)
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

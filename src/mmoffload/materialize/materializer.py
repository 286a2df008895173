"""The trainer side: a micro batch's raw refs to model kwargs with the family's own processor."""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmoffload.contract.addresses import asset_location, verify_hash
from mmoffload.contract.checks import check_micro_batch, ref_problems
from mmoffload.contract.descriptors import validate_descriptor
from mmoffload.contract.wire import WEIGHT_STREAMS, MicroBatch, MMImageRef
from mmoffload.errors import BadInputError, IntegrityError, MissingImageError, Where
from mmoffload.extras import require
from mmoffload.families import DEFAULT_TOKEN_NAMES, Families, Family, ForwardPolicy, Grid
from mmoffload.families.base import prepared_grid
from mmoffload.families.pixel_cache import PixelCache
from mmoffload.store.images import decode_rgb
from mmoffload.store.read import AllowedRoots, read_verified
from mmoffload.store.remap import Remap


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
        allowed_roots: AllowedRoots = None,
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
        prepared = self._prepared_images(family, refs, grids, where)
        missing = self._missing(refs, prepared, where)
        if missing:
            # A micro batch with a placeholder image must train nothing: every stream goes to zero,
            # and absent weight streams are written as zeros since a trainer's default may be 1.0.
            self.stats.micro_batches_zero_loss += 1
            self.stats.images_placeholdered += sum(image is None for image in prepared)
            loss_mask = np.zeros_like(loss_mask)
            advantages = np.zeros_like(advantages)
            weights = {name: np.zeros(len(input_ids), dtype=np.float32) for name in WEIGHT_STREAMS}
        pixels = self._pixels(family, prepared, grids)
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

    def _prepared_images(
        self, family: Family, refs: Sequence[MMImageRef], grids: list[Grid], where: Where
    ) -> list[dict[str, np.ndarray] | None]:
        """Return each ref's image prepared by its family (None when its file is absent), grids checked."""
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
        return prepared

    def _missing(
        self, refs: Sequence[MMImageRef], prepared: list[dict[str, np.ndarray] | None], where: Where
    ) -> tuple[str, ...]:
        """Return the missing images' URIs (each once), or fail under policy ``error``."""
        missing = tuple(
            dict.fromkeys(r.uri for r, image in zip(refs, prepared, strict=True) if image is None)
        )
        if missing and self.missing_image_policy is MissingImagePolicy.ERROR:
            raise IntegrityError(
                f"Expected every image file of the micro batch, got {len(missing)} missing: "
                + ", ".join(f"`{uri}`" for uri in missing),
                where,
            )
        return missing

    def _pixels(
        self, family: Family, prepared: list[dict[str, np.ndarray] | None], grids: list[Grid]
    ) -> np.ndarray:
        """Write every image's pixel rows into one array; a missing image's rows are zeros."""
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
        return pixels

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
            if problems := ref_problems(descriptor, ref.hash, ref.uri, ref.offset, previous_end):
                raise BadInputError(problems[0], at)
            previous_end = ref.offset + ref.length
            grid = family.grid(descriptor["payload"], at)
            if problem := family.placeholder_problem(grid, ref.length):
                raise BadInputError(problem, at)
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

"""The engine side: raw image refs to vLLM engine inputs (inference.md sections 3, check 7, and 4).

For each image of a request the checks of ``mmoffload.inference.refs`` run in order,
then the family makes the engine's inputs with the model's own processor,
matching the engine's preprocessing settings: with vLLM's
``mm_device_do_normalize`` the engine rescales and normalizes on the device,
so the pixels it gets must be unnormalized (normalizing them here too would
change every logit, silently). The arrays become vLLM ``MultiModalKwargsItem``s
through the model's own vLLM field config, so the engine sees exactly what its
own processing path would give it.

Materialized inputs are cached (section 4) in the project's byte-bounded
``PixelCache``, keyed by ``(mm_hash, family, placeholder length, model)``;
concurrent requests for one key share one materialization; failures are never
cached. Only ``mmoffload serve`` imports this module (it imports vLLM and torch).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalKwargsItem, MultiModalKwargsItems

from mmoffload.families import Families, Family
from mmoffload.families.pixel_cache import DEFAULT_CACHE_BYTES, PixelCache
from mmoffload.inference.checks import check_grid, check_request, materialize_bytes, materialize_ref
from mmoffload.inference.content_parts import GridIndex, resolve_parts
from mmoffload.inference.decode_budget import DEFAULT_DECODE_BYTES, DecodeBudget
from mmoffload.inference.refs import MODALITY, EngineArrays, ImageRef, InvalidImageRefError, PromptLimits
from mmoffload.store.read import AllowedRoots

# The cached arrays are read-only and their tensors share that memory: vLLM only sends them to the
# engine process, never writes them, so torch's warning about it (raised here, nowhere else) is noise.
warnings.filterwarnings(
    "ignore", "The given NumPy array is not writable", UserWarning, r"mmoffload\.inference\.engine"
)
_logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineStats:
    """What the engine side did: images seen, made, served from the cache, and time making them."""

    images: int = 0
    images_materialized: int = 0
    cache_hits: int = 0
    materialize_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Deferred:
    """An engine item not made yet: the engine process probably holds it (made by ``make`` if not)."""

    make: Callable[[], MultiModalKwargsItem]


class RawRefEngineInputs:
    """Turns a request's raw-ref ``features`` into vLLM multimodal kwargs items, checked and cached.

    Args:
        model_dir: the served model's directory (configures its family and names the cache's model).
        mm_processor: the engine's vLLM multimodal processor (its field config builds the items).
        device_normalizes: the engine's ``mm_device_do_normalize``.
        cache_bytes: bound of the materialized-input cache.
        roots: allowed directories for image files, and object-store prefixes (None: anywhere).
        limits: the engine's prompt length and per-prompt image limit, checked before any read.
        decode_bytes: bound of the images being decoded at once (``DecodeBudget``).
    """

    def __init__(
        self,
        model_dir: Path,
        mm_processor: Any,
        *,
        device_normalizes: bool,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        roots: AllowedRoots = None,
        limits: PromptLimits | None = None,
        decode_bytes: int = DEFAULT_DECODE_BYTES,
    ) -> None:
        self.families = Families(model_dir)
        self.model = str(model_dir)
        self.mm_processor = mm_processor
        self.device_normalizes = device_normalizes
        self.cache = PixelCache(cache_bytes)
        self.roots = roots
        self.limits = limits or PromptLimits()
        self.decode_budget = DecodeBudget(decode_bytes)
        # The grids of verified images by content hash: how a uuid-only part finds its cache entry.
        self.grids = GridIndex()
        # vLLM's sender cache (what the engine process holds, by hash), set by the server; None: no IPC cache.
        self.sender_cache: Any = None
        # The pixels' name and dtype in vLLM's own engine items (set by ``prepare``; None: as cached).
        self.pixel_dtype: tuple[str, torch.dtype] | None = None
        self.stats = EngineStats()

    def prepare(self) -> None:
        """Load the model family's processor and learn vLLM's pixel dtype now, not on the first request."""
        if self.families.model_family is not None:
            family = self.families.get(self.families.model_family)
            family.prepare_pixels()
            self.pixel_dtype = family.pixel_kwarg, vllm_pixel_dtype(self.mm_processor, family.pixel_kwarg)

    def items(self, features: object, token_ids: Sequence[int]) -> list[MultiModalKwargsItem | Deferred]:
        """Run every check of section 3 and return one engine item per image, in order.

        Everything that reads no image runs first, for every image (``check_request``).
        Blocking (reads, decodes and processes images): call it from a worker thread.

        Raises:
            PromptRefusedError: the prompt is too long for the engine.
            InvalidImageRefError: the first failed check, naming the image index.
        """
        refs = check_request(features, token_ids, self.families, self.limits, self.roots)
        return [self._item(ref) for ref in refs]

    def content_items(
        self, parts: object, token_ids: Sequence[int]
    ) -> tuple[list[int], dict[str, Any], list[MultiModalKwargsItem | Deferred]]:
        """Check a ``content_parts`` request (section 6); return its expanded ids, features and items.

        Blocking: call it from a worker thread.

        Raises:
            PromptRefusedError: the prompt is too long for the engine.
            CacheMissError: a uuid-only part the server holds no verified image for.
            InvalidImageRefError: the first failed check, naming the part index.
        """
        family_name = self.families.model_family
        if family_name is None:
            raise InvalidImageRefError(1, f"The served model `{self.model}` has no known image family")
        family = self.families.get(family_name)
        resolved = resolve_parts(
            parts,
            token_ids,
            family,
            self._materialize_bytes,
            cache=self.cache,
            grids=self.grids,
            model=self.model,
            limits=self.limits,
            roots=self.roots,
        )
        self.stats.images += len(resolved.refs)
        self.stats.cache_hits += resolved.cache_hits
        items = [
            self._item_for(arrays, ref.mm_hash)
            for arrays, ref in zip(resolved.arrays, resolved.refs, strict=True)
        ]
        return resolved.token_ids, resolved.features(), items

    def _item(self, ref: ImageRef) -> MultiModalKwargsItem | Deferred:
        self.stats.images += 1
        key = ref.cache_key(self.model)
        arrays, made = self.cache.get_or_make(key, lambda: self._materialize(ref))
        if not made:
            self.stats.cache_hits += 1
            # A hit skips reading the file (the hash names its content; the URI was checked before)
            # but not the grid check.
            check_grid(ref, tuple(int(v) for v in arrays[ref.family.grid_kwarg][0]))  # type: ignore[arg-type]
        self.grids.put(ref.mm_hash, ref.family.name, ref.grid)
        return self._item_for(arrays, ref.mm_hash)

    def _item_for(self, arrays: EngineArrays, mm_hash: str) -> MultiModalKwargsItem | Deferred:
        # The engine process likely holds it already: leave the copy to be made only if it turns out not to.
        if self.sender_cache is not None and self.sender_cache.is_cached_item(mm_hash):
            return Deferred(lambda: self._to_item(arrays))
        return self._to_item(arrays)

    def _materialize(self, ref: ImageRef) -> EngineArrays:
        return materialize_ref(ref, self._engine_arrays, self.roots, self.decode_budget)

    def _materialize_bytes(self, ref: ImageRef, data: bytes) -> EngineArrays:
        return materialize_bytes(ref, data, self._engine_arrays, self.decode_budget)

    def _engine_arrays(self, family: Family, image: Image.Image) -> EngineArrays:
        # Check 7, timed and counted here: both request paths make every image through this.
        started = time.perf_counter()
        try:
            arrays = family.engine_pixels([image], device_normalizes=self.device_normalizes)
        except Exception as exc:  # the processor's own failure is check 7's
            message = f"The model's processor failed on this image: {exc}"[:300]
            raise InvalidImageRefError(7, message) from exc
        self.stats.materialize_seconds += time.perf_counter() - started
        self.stats.images_materialized += 1
        return arrays

    def _to_item(self, arrays: EngineArrays) -> MultiModalKwargsItem:
        hf_inputs = BatchFeature({name: self._engine_tensor(name, array) for name, array in arrays.items()})
        config = self.mm_processor._get_mm_fields_config(hf_inputs, {})
        return MultiModalKwargsItems.from_hf_inputs(hf_inputs, config)[MODALITY][0]

    def _engine_tensor(self, name: str, array: np.ndarray) -> torch.Tensor:
        """Return a cached array as the engine's tensor: pixels in vLLM's own dtype, the rest as they are.

        The cache keeps unnormalized pixels as uint8 (a quarter of float32's bytes); the engine gets
        them as vLLM's own processing would give them (``vllm_pixel_dtype``).
        """
        tensor = torch.from_numpy(array)
        if self.pixel_dtype is None or name != self.pixel_dtype[0]:
            return tensor
        return tensor.to(self.pixel_dtype[1])


def vllm_pixel_dtype(mm_processor: Any, pixel_kwarg: str) -> torch.dtype:
    """Return the dtype of the pixels vLLM's own processing gives the engine, from one blank image.

    vLLM casts a processor's floating output to the model's dtype (bfloat16 pixels for a bfloat16
    model: half of float32's bytes to send and to hold in the engine's cache) and keeps integer
    output (uint8 when the engine normalizes on the device and the processor leaves raw levels).
    Engine items must match it: vLLM concatenates a batch's pixels into the first item's dtype, so
    a float item after a uint8 one fails the batch and kills the engine. 0-255 levels are exact in
    every float dtype, so the cast changes no value the engine sees.

    A processor that cannot take one image this way gets the model's dtype (vLLM's cast of float
    pixels), with a warning: the server still starts.
    """
    info = mm_processor.info
    try:
        hf_processor = info.get_hf_processor()
        image_processor = getattr(hf_processor, "image_processor", hf_processor)
        out = info.ctx.call_hf_processor(image_processor, {"images": [Image.new("RGB", (224, 224))]})
        return out[pixel_kwarg].dtype
    except Exception as exc:  # processors raise anything; this only picks a dtype
        dtype = info.ctx.model_config.dtype
        _logger.warning(
            "Could not learn vLLM's pixel dtype (%s: %.200s); sending %s pixels",
            type(exc).__name__,
            exc,
            dtype,
        )
        return dtype

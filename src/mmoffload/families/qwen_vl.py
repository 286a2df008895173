"""Qwen-VL: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 (families.md).

Pixels come from the project's own path when the model's processor settings
are ones it reproduces (``own_pixels``): Pillow resizes exactly as the Hugging
Face PIL processor does, then one table lookup per pixel gives the rescaled,
normalized float32 value the processor computes, written straight into the
patch layout. The output is the PIL processor's bit for bit, several times
faster. Other settings use the processor itself.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mmoffload.contract.spans import IMAGE_TYPE, VIDEO_TYPE
from mmoffload.errors import BadInputError, UsageError
from mmoffload.extras import require
from mmoffload.families.base import (
    Family,
    ForwardPolicy,
    Grid,
    pair_table,
    read_json,
    value_table,
    write_levels,
)
from mmoffload.store.images import to_rgb

if TYPE_CHECKING:
    from PIL import Image

MAX_ASPECT_RATIO = 200
# PIL.Image.Resampling's values (NEAREST 0 ... HAMMING 5) and BICUBIC, known without importing Pillow.
PIL_RESAMPLE_FILTERS = frozenset(range(6))
PIL_BICUBIC = 3
# The processor config used when no model directory is given: Qwen3-VL, as the Family defaults.
DEFAULT_PROCESSOR_DIR = Path(__file__).parent / "configs" / "qwen3_vl"
CHANNELS = 3
# The Hugging Face Qwen2-VL image processor's defaults, for settings a config leaves out.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_RESCALE = 1 / 255
# preprocessor_config.json keys the own pixel path reproduces; any other key means the processor.
OWN_PIXEL_KEYS = frozenset(
    {
        "size",
        "min_pixels",
        "max_pixels",
        "patch_size",
        "temporal_patch_size",
        "merge_size",
        "image_mean",
        "image_std",
        "rescale_factor",
        "resample",
        "do_resize",
        "do_rescale",
        "do_normalize",
        "do_convert_rgb",
        "image_processor_type",
        "processor_class",
    }
)
OWN_PIXEL_PROCESSORS = frozenset({"Qwen2VLImageProcessor", "Qwen2VLImageProcessorPil"})


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Return the (height, width) the Qwen-VL processor resizes an image to.

    Raises:
        BadInputError: a side is not positive or the aspect ratio is over 200.
    """
    if height <= 0 or width <= 0:
        raise BadInputError(f"Expected image sides > 0, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise BadInputError(f"Expected aspect ratio <= {MAX_ASPECT_RATIO}, got {width}x{height}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def own_pixel_settings(config: dict[str, Any]) -> bool:
    """True when a ``preprocessor_config.json`` asks for nothing the own pixel path does not reproduce."""
    mean, std = config.get("image_mean", OPENAI_CLIP_MEAN), config.get("image_std", OPENAI_CLIP_STD)
    return (
        set(config) <= OWN_PIXEL_KEYS
        and config.get("image_processor_type", "Qwen2VLImageProcessor") in OWN_PIXEL_PROCESSORS
        and all(config.get(flag, True) is True for flag in ("do_resize", "do_rescale", "do_normalize"))
        and config.get("do_convert_rgb", True) is True
        and config.get("resample", PIL_BICUBIC) in PIL_RESAMPLE_FILTERS
        and len(mean) == CHANNELS
        and len(std) == CHANNELS
    )


class QwenVL(Family):
    name: ClassVar[str] = "qwen_vl"
    policy: ClassVar[ForwardPolicy] = ForwardPolicy(
        position_ids_with_images=False, image_type_ids_required=True
    )
    payload_key: ClassVar[str] = "image_grid_thw"
    grid_kwarg: ClassVar[str] = "image_grid_thw"
    # Image processor backend when the processor makes the pixels: None lets transformers choose
    # (torchvision when installed, else PIL). Setting one always uses the processor.
    processor_backend: str | None = None
    typed_tokens: ClassVar[dict[str, int]] = {"<|image_pad|>": IMAGE_TYPE, "<|video_pad|>": VIDEO_TYPE}
    default_token_ids: ClassVar[dict[str, int]] = {
        "<|vision_start|>": 151652,
        "<|vision_end|>": 151653,
        "<|image_pad|>": 151655,
        "<|video_pad|>": 151656,
    }

    def configure(self, config: dict[str, Any]) -> None:
        # Defaults are Qwen3-VL's (patch 16), the contract's worked example: its bundled config.
        if self.model_dir is None:
            config = read_json(DEFAULT_PROCESSOR_DIR / "preprocessor_config.json")
        size = config.get("size") or {}
        if not isinstance(size, dict):
            size = {}
        self.patch_size = self.setting(config, "patch_size", 16)
        self.merge_size = self.setting(config, "merge_size", 2)
        self.temporal_patch_size = self.setting(config, "temporal_patch_size", 2)
        self.min_pixels = config.get("min_pixels") or self.setting(size, "shortest_edge", 65536)
        self.max_pixels = config.get("max_pixels") or self.setting(size, "longest_edge", 16777216)
        self.min_pixels = self.setting({"min_pixels": self.min_pixels}, "min_pixels", 65536)
        self.max_pixels = self.setting({"max_pixels": self.max_pixels}, "max_pixels", 16777216)
        self.resample: int = config.get("resample", PIL_BICUBIC)
        self.table = pair_table(
            value_table(
                config.get("rescale_factor", DEFAULT_RESCALE),
                tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),
                tuple(config.get("image_std", OPENAI_CLIP_STD)),
            )
        )
        self.own_pixel_settings = own_pixel_settings(config)

    @property
    def own_pixels(self) -> bool:
        """True when the project's own path makes this family's pixels (else the HF processor)."""
        return self.own_pixel_settings and self.processor_backend is None

    @classmethod
    def owns_model_dir(cls, config: dict[str, Any]) -> bool:
        return "Qwen" in str(config.get("image_processor_type", "")) + str(config.get("processor_class", ""))

    def layout(self, width: int, height: int) -> Grid:
        factor = self.patch_size * self.merge_size
        h, w = smart_resize(height, width, factor, self.min_pixels, self.max_pixels)
        return (1, h // self.patch_size, w // self.patch_size)

    def placeholder_length(self, grid: Grid) -> int:
        t, h, w = grid
        if h % self.merge_size or w % self.merge_size:
            raise BadInputError(
                f"Expected grid h and w divisible by merge size {self.merge_size}, got {list(grid)}"
            )
        return t * h * w // self.merge_size**2

    @functools.cached_property
    def image_processor(self) -> Any:
        """The model's Hugging Face image processor, loaded offline on first use.

        The layout settings the family computes grids with are passed explicitly, so
        the processor lays images out exactly as the descriptors say.

        Raises:
            UsageError: the processor cannot be loaded from the model directory.
        """
        # Imported here: transformers takes seconds to import and only the trainer side needs it.
        auto_image_processor = require("transformers", "The Qwen-VL image processor").AutoImageProcessor

        directory = self.model_dir or DEFAULT_PROCESSOR_DIR
        try:
            return auto_image_processor.from_pretrained(
                str(directory),
                local_files_only=True,
                backend=self.processor_backend,
                patch_size=self.patch_size,
                merge_size=self.merge_size,
                temporal_patch_size=self.temporal_patch_size,
                min_pixels=self.min_pixels,
                max_pixels=self.max_pixels,
            )
        except (OSError, ValueError, ImportError) as exc:
            raise UsageError(f"Cannot load the image processor of `{directory}`: {exc}") from exc

    def prepare_pixels(self) -> None:
        if not self.own_pixels:
            self.image_processor  # noqa: B018 - loading the cached property is the point

    def prepare_image(self, image: Image.Image) -> dict[str, np.ndarray]:
        if not self.own_pixels:
            out = self.image_processor(images=[image], return_tensors="np")
            return {
                self.pixel_kwarg: np.asarray(out["pixel_values"], dtype=np.float32),
                self.grid_kwarg: np.asarray(out["image_grid_thw"], dtype=np.int64),
            }
        image = to_rgb(image)
        factor = self.patch_size * self.merge_size
        height, width = smart_resize(image.height, image.width, factor, self.min_pixels, self.max_pixels)
        levels = np.asarray(image.resize((width, height), resample=self.resample))  # (H, W, C) uint8
        ps, merge = self.patch_size, self.merge_size
        grid_h, grid_w = height // ps, width // ps
        # Rows in merge-window order, each row channel-major then the patch's pixels: the processor's order.
        blocks = levels.reshape(grid_h // merge, merge, ps, grid_w // merge, merge, ps, CHANNELS)
        patches = blocks.transpose(0, 3, 1, 4, 6, 2, 5).reshape(grid_h * grid_w, CHANNELS, ps * ps)
        return {"levels": patches, self.grid_kwarg: np.array([[1, grid_h, grid_w]], dtype=np.int64)}

    def engine_pixels(self, images: list[Image.Image], *, device_normalizes: bool) -> dict[str, np.ndarray]:
        if device_normalizes and self.own_pixels:
            # The trainer's own path (2-6x faster than the processor): the processor's unnormalized rows are
            # exactly its resized levels, each patch repeated over the temporal axis. Kept as uint8 (the
            # same numbers, a quarter of the bytes to make and to cache); the server's engine items are
            # float32 (inference/engine.py says why).
            prepared = [self.prepare_image(image) for image in images]
            levels = np.concatenate([item["levels"] for item in prepared])
            rows = np.empty((len(levels), CHANNELS, self.temporal_patch_size, self.patch_size**2), np.uint8)
            rows[...] = levels[:, :, None, :]
            return {
                self.pixel_kwarg: rows.reshape(len(levels), -1),
                self.grid_kwarg: np.concatenate([item[self.grid_kwarg] for item in prepared]),
            }
        # The processor's own switches: on-device normalization wants pixels in [0, 255] as they are.
        out = self.image_processor(
            images=images,
            do_rescale=not device_normalizes,
            do_normalize=not device_normalizes,
            return_tensors="np",
        )
        return {
            self.pixel_kwarg: np.asarray(out["pixel_values"], dtype=np.float32),
            self.grid_kwarg: np.asarray(out["image_grid_thw"], dtype=np.int64),
        }

    def write_pixels(self, prepared: dict[str, np.ndarray], out: np.ndarray) -> None:
        if "levels" not in prepared:
            out[...] = prepared[self.pixel_kwarg]
            return
        patches = prepared["levels"]
        copies = out.reshape(len(patches), CHANNELS, self.temporal_patch_size, self.patch_size**2)
        write_levels(self.table, patches, copies)

    def pixel_shape(self, grid: Grid) -> tuple[int, ...]:
        t, h, w = grid
        return (t * h * w, CHANNELS * self.temporal_patch_size * self.patch_size**2)

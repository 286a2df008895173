"""Qwen-VL: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 (families.md)."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mmoffload.errors import BadInputError, UsageError
from mmoffload.extras import require
from mmoffload.families.base import IMAGE_TYPE, VIDEO_TYPE, Family, ForwardPolicy, Grid

if TYPE_CHECKING:
    from PIL import Image

MAX_ASPECT_RATIO = 200
# The processor config used when no model directory is given: Qwen3-VL, as the Family defaults.
DEFAULT_PROCESSOR_DIR = Path(__file__).parent / "configs" / "qwen3_vl"
CHANNELS = 3


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


class QwenVL(Family):
    name: ClassVar[str] = "qwen_vl"
    policy: ClassVar[ForwardPolicy] = ForwardPolicy(
        position_ids_with_images=False, image_type_ids_required=True
    )
    payload_key: ClassVar[str] = "image_grid_thw"
    grid_kwarg: ClassVar[str] = "image_grid_thw"
    # Image processor backend: None lets transformers choose (torchvision when installed, else PIL).
    processor_backend: str | None = None
    typed_tokens: ClassVar[dict[str, int]] = {"<|image_pad|>": IMAGE_TYPE, "<|video_pad|>": VIDEO_TYPE}
    default_token_ids: ClassVar[dict[str, int]] = {
        "<|vision_start|>": 151652,
        "<|vision_end|>": 151653,
        "<|image_pad|>": 151655,
        "<|video_pad|>": 151656,
    }

    def configure(self, config: dict[str, Any]) -> None:
        # Defaults are Qwen3-VL's (patch 16), the contract's worked example.
        size = config.get("size") or {}
        self.patch_size: int = config.get("patch_size", 16)
        self.merge_size: int = config.get("merge_size", 2)
        self.temporal_patch_size: int = config.get("temporal_patch_size", 2)
        self.min_pixels: int = config.get("min_pixels") or size.get("shortest_edge") or 65536
        self.max_pixels: int = config.get("max_pixels") or size.get("longest_edge") or 16777216

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
        self.image_processor  # noqa: B018 - loading the cached property is the point

    def pixels(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        out = self.image_processor(images=images, return_tensors="np")
        return {
            self.pixel_kwarg: np.asarray(out["pixel_values"], dtype=np.float32),
            self.grid_kwarg: np.asarray(out["image_grid_thw"], dtype=np.int64),
        }

    def zero_pixels(self, grid: Grid) -> np.ndarray:
        t, h, w = grid
        row = CHANNELS * self.temporal_patch_size * self.patch_size**2
        return np.zeros((t * h * w, row), dtype=np.float32)

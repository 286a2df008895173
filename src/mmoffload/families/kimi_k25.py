"""Kimi K2.5 (families.md). Implemented here: the published processor is remote code.

Pixels: Pillow resizes, the image is padded right and bottom with black, and
one table lookup per pixel gives the normalized float32 value (the same float32
operations on each of the 256 levels as on the whole image, so bit for bit the
same), written straight into the patch layout.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mmoffload.contract.spans import IMAGE_TYPE
from mmoffload.errors import BadInputError
from mmoffload.extras import require
from mmoffload.families.base import Family, ForwardPolicy, Grid, pair_table, write_levels
from mmoffload.store.images import to_rgb

if TYPE_CHECKING:
    from PIL import Image

CHANNELS = 3


class KimiK25(Family):
    name: ClassVar[str] = "kimi_k25"
    policy: ClassVar[ForwardPolicy] = ForwardPolicy(
        position_ids_with_images=True, image_type_ids_required=False
    )
    payload_key: ClassVar[str] = "grid_thws"
    grid_kwarg: ClassVar[str] = "grid_thws"
    typed_tokens: ClassVar[dict[str, int]] = {"<|media_pad|>": IMAGE_TYPE}
    default_token_ids: ClassVar[dict[str, int]] = {
        "<|media_begin|>": 163602,
        "<|media_content|>": 163603,
        "<|media_end|>": 163604,
        "<|media_pad|>": 163605,
    }

    def configure(self, config: dict[str, Any]) -> None:
        media = config.get("media_proc_cfg", config)
        if not isinstance(media, dict):
            media = {"media_proc_cfg": media, "patch_size": "not an object"}
        self.patch_size = self.setting(media, "patch_size", 14)
        kernel = media.get("merge_kernel_size", [2, 2])
        if not (isinstance(kernel, list | tuple) and len(kernel) == 2):
            kernel = ["not a pair", kernel]
        self.merge_kernel_size = (
            self.setting({"merge_kernel_size": kernel[0]}, "merge_kernel_size", 2),
            self.setting({"merge_kernel_size": kernel[1]}, "merge_kernel_size", 2),
        )
        budget = media.get("in_patch_limit") or media.get("in_token_limit")
        self.patch_budget = self.setting({"in_patch_limit": budget}, "in_patch_limit", 16384)
        self.patch_limit_on_one_side = self.setting(media, "patch_limit_on_one_side", 512)
        self.image_mean: tuple[float, ...] = tuple(media.get("image_mean", (0.5, 0.5, 0.5)))
        self.image_std: tuple[float, ...] = tuple(media.get("image_std", (0.5, 0.5, 0.5)))
        # Each level's value, per channel: (level / 255 - mean) / std in float32, as families.md says.
        levels = np.arange(256, dtype=np.float32)[:, None]
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        self.table = pair_table(np.ascontiguousarray(((levels / np.float32(255) - mean) / std).T))

    @classmethod
    def owns_model_dir(cls, config: dict[str, Any]) -> bool:
        return "media_proc_cfg" in config or "Kimi" in str(config.get("processor_class", ""))

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """Return the (width, height) the image is resized to, before padding."""
        if width <= 0 or height <= 0:
            raise BadInputError(f"Expected image sides > 0, got {width}x{height}")
        ps, side_limit = self.patch_size, self.patch_limit_on_one_side * self.patch_size
        fit_budget = math.sqrt(self.patch_budget / (max(1, width // ps) * max(1, height // ps)))
        scale = min(1.0, fit_budget, side_limit / width, side_limit / height)
        return (
            min(max(1, int(width * scale)), side_limit),
            min(max(1, int(height * scale)), side_limit),
        )

    def padded_size(self, width: int, height: int) -> tuple[int, int]:
        """Return the (width, height) after padding right and bottom to the merge unit."""
        unit_w = self.merge_kernel_size[1] * self.patch_size
        unit_h = self.merge_kernel_size[0] * self.patch_size
        new_w, new_h = self.resized_size(width, height)
        return math.ceil(new_w / unit_w) * unit_w, math.ceil(new_h / unit_h) * unit_h

    def layout(self, width: int, height: int) -> Grid:
        padded_w, padded_h = self.padded_size(width, height)
        return (1, padded_h // self.patch_size, padded_w // self.patch_size)

    def placeholder_length(self, grid: Grid) -> int:
        # One media pad per image; the model expands it to (h/2)*(w/2) features itself.
        return 1

    def prepare_image(self, image: Image.Image) -> dict[str, np.ndarray]:
        """Resize, pad and cut one image into (h*w, 3, ps*ps) uint8 patches, row-major."""
        image = to_rgb(image)
        pil = require("PIL.Image", "Kimi K2.5 pixels")
        padded = pil.new("RGB", self.padded_size(*image.size), (0, 0, 0))
        padded.paste(image.resize(self.resized_size(*image.size), pil.Resampling.BICUBIC), (0, 0))
        ps = self.patch_size
        grid_h, grid_w = padded.height // ps, padded.width // ps
        levels = np.asarray(padded).reshape(grid_h, ps, grid_w, ps, CHANNELS)  # (H, W, C) uint8
        patches = levels.transpose(0, 2, 4, 1, 3).reshape(grid_h * grid_w, CHANNELS, ps * ps)
        return {"levels": patches, self.grid_kwarg: np.array([[1, grid_h, grid_w]], dtype=np.int64)}

    def write_pixels(self, prepared: dict[str, np.ndarray], out: np.ndarray) -> None:
        patches = prepared["levels"]
        write_levels(self.table, patches, out.reshape(len(patches), CHANNELS, 1, self.patch_size**2))

    def pixel_shape(self, grid: Grid) -> tuple[int, ...]:
        t, h, w = grid
        return (t * h * w, CHANNELS, self.patch_size, self.patch_size)

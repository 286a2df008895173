"""Trainer-side pixels of each family: the HF processor for Qwen-VL, families.md's recipe for Kimi K2.5."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor

from mmoffload.families import Families, Family, resolve_model_dir
from mmoffload.store.images import to_rgb

PAD = -1.0  # a black pixel after (0 - 0.5) / 0.5


def qwen(bundled: str | None) -> Family:
    return Families(resolve_model_dir(bundled) if bundled else None).get("qwen_vl")


def gradient(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Return an image whose every pixel differs, so any reordering or resampling shows."""
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([xs * 7 % 256, ys * 11 % 256, (xs + ys) * 5 % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode)


IMAGES = [gradient(300, 200), gradient(64, 480), gradient(1280, 720), gradient(33, 33)]


@pytest.mark.parametrize(("bundled", "patch"), [("qwen2_5_vl", 14), ("qwen3_vl", 16), (None, 16)])
def test_qwen_pixels_equal_the_hf_processors_own_output(bundled: str | None, patch: int) -> None:
    processor = AutoImageProcessor.from_pretrained(
        str(resolve_model_dir(bundled or "qwen3_vl")), local_files_only=True, backend="pil"
    )
    expected = processor(images=IMAGES, return_tensors="np")
    family = qwen(bundled)
    pixels = family.pixels(IMAGES)
    assert family.patch_size == patch
    assert set(pixels) == {"pixel_values", "image_grid_thw"}
    assert pixels["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(pixels["pixel_values"], expected["pixel_values"])
    np.testing.assert_array_equal(pixels["image_grid_thw"], expected["image_grid_thw"])
    assert [tuple(row) for row in pixels["image_grid_thw"]] == [family.layout(*i.size) for i in IMAGES]
    assert pixels["pixel_values"].shape[1] == 3 * 2 * patch * patch


def test_qwen_pixels_one_image_at_a_time_concatenate_to_the_batch_output() -> None:
    family = qwen("qwen2_5_vl")
    one_by_one = [family.pixels([image]) for image in IMAGES]
    batch = family.pixels(IMAGES)
    for name in ("pixel_values", "image_grid_thw"):
        np.testing.assert_array_equal(np.concatenate([p[name] for p in one_by_one]), batch[name])


def test_qwen_honours_a_model_directorys_max_pixels(tmp_path: Path) -> None:
    config = json.loads((resolve_model_dir("qwen3_vl") / "preprocessor_config.json").read_text())
    config["size"] = {"shortest_edge": 1024, "longest_edge": 128 * 128}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    family = Families(tmp_path).get("qwen_vl")
    pixels = family.pixels([gradient(640, 480)])
    # 640x480 over 16384 pixels: scaled by sqrt(307200 / 16384) and floored to 32 -> 128x96.
    assert pixels["image_grid_thw"].tolist() == [[1, 6, 8]]
    assert pixels["pixel_values"].shape == (48, 1536)
    assert qwen(None).pixels([gradient(640, 480)])["image_grid_thw"].tolist() == [[1, 30, 40]]


def test_qwen_composites_transparency_on_white_like_the_processor() -> None:
    image = gradient(64, 64, "RGBA")
    image.putalpha(Image.new("L", image.size, 0))  # fully transparent: white once composited
    family = qwen(None)
    direct = family.pixels([image])["pixel_values"]
    via_rgb = family.pixels([to_rgb(image)])["pixel_values"]
    white = family.pixels([Image.new("RGB", image.size, (255, 255, 255))])["pixel_values"]
    np.testing.assert_array_equal(via_rgb, direct)
    np.testing.assert_array_equal(via_rgb, white)


def test_qwen_zero_pixels_have_the_descriptor_grids_rows() -> None:
    zeros = qwen("qwen2_5_vl").zero_pixels((1, 4, 6))
    assert zeros.shape == (24, 3 * 2 * 14 * 14)
    assert zeros.dtype == np.float32 and not zeros.any()


def test_qwen_torchvision_backend_lays_images_out_like_the_pil_backend() -> None:
    pytest.importorskip("torchvision")
    family = qwen(None)
    family.processor_backend = "torchvision"
    pixels = family.pixels(IMAGES)
    reference = qwen(None).pixels(IMAGES)
    assert type(family.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert isinstance(pixels["pixel_values"], np.ndarray)
    np.testing.assert_array_equal(pixels["image_grid_thw"], reference["image_grid_thw"])
    np.testing.assert_allclose(pixels["pixel_values"], reference["pixel_values"], atol=0.1)


def kimi(tmp_path: Path | None = None, **settings: object) -> Family:
    if not settings:
        return Families().get("kimi_k25")
    assert tmp_path is not None
    config = {"media_proc_cfg": {"patch_size": 14, "merge_kernel_size": [2, 2], **settings}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    return Families(tmp_path).get("kimi_k25")


def test_kimi_cuts_a_28x28_image_into_four_patches_row_major() -> None:
    image = Image.new("RGB", (28, 28))
    image.paste((255, 0, 0), (0, 0, 14, 14))  # top left
    image.paste((0, 255, 0), (14, 0, 28, 14))  # top right
    image.paste((0, 0, 255), (0, 14, 14, 28))  # bottom left
    image.paste((255, 255, 255), (14, 14, 28, 28))  # bottom right
    pixels = kimi().pixels([image])
    assert pixels["grid_thws"].tolist() == [[1, 2, 2]]
    assert pixels["pixel_values"].shape == (4, 3, 14, 14)
    # 255 -> 1.0 -> (1.0 - 0.5) / 0.5 = 1.0; 0 -> -1.0; each patch is one color per channel.
    expected_channels = [[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, 1]]
    for patch, channels in zip(pixels["pixel_values"], expected_channels, strict=True):
        for plane, value in zip(patch, channels, strict=True):
            np.testing.assert_array_equal(plane, np.full((14, 14), value, dtype=np.float32))


def test_kimi_pads_a_30x20_image_right_and_bottom_with_black() -> None:
    image = Image.new("RGB", (30, 20), (51, 102, 204))  # -> 0.2, 0.4, 0.8 -> -0.6, -0.2, 0.6
    pixels = kimi().pixels([image])
    # Padded to 56x28: two patch rows of four patches; the image covers x < 30, y < 20.
    assert pixels["grid_thws"].tolist() == [[1, 2, 4]]
    canvas = np.full((3, 28, 56), PAD, dtype=np.float32)
    for channel, value in enumerate((-0.6, -0.2, 0.6)):
        canvas[channel, :20, :30] = value
    expected = [canvas[:, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14] for r in range(2) for c in range(4)]
    np.testing.assert_allclose(pixels["pixel_values"], np.stack(expected), atol=1e-6)
    assert (pixels["pixel_values"][3] == PAD).all()  # top right patch: all padding
    assert (pixels["pixel_values"][2, :, :, 2:] == PAD).all()  # x 30..41 is padding
    assert (pixels["pixel_values"][2, :, :, :2] != PAD).all()  # x 28, 29 is image


def test_kimi_downscales_bicubic_before_padding(tmp_path: Path) -> None:
    image = gradient(56, 56)
    # Budget 4 patches: scale = sqrt(4 / (4 * 4)) = 0.5 -> 28x28, nothing to pad.
    pixels = kimi(tmp_path, in_patch_limit=4).pixels([image])
    resized = np.asarray(image.resize((28, 28), Image.Resampling.BICUBIC), dtype=np.float32)
    normalized = (resized / 255 - 0.5) / 0.5  # (28, 28, 3)
    assert pixels["grid_thws"].tolist() == [[1, 2, 2]]
    np.testing.assert_allclose(pixels["pixel_values"][1], normalized[:14, 14:].transpose(2, 0, 1), atol=1e-6)
    np.testing.assert_allclose(pixels["pixel_values"][2], normalized[14:, :14].transpose(2, 0, 1), atol=1e-6)


@pytest.mark.parametrize(
    ("width", "height"),
    [(1, 1), (13, 500), (500, 13), (300, 200), (28, 28), (29, 29), (1000, 30), (57, 111), (224, 224)],
)
def test_kimi_grids_follow_the_resize_formula(tmp_path: Path, width: int, height: int) -> None:
    family = kimi(tmp_path, in_patch_limit=64, patch_limit_on_one_side=16)
    ps, side_limit = 14, 16 * 14
    scale = min(
        1.0,
        math.sqrt(64 / (max(1, width // ps) * max(1, height // ps))),
        side_limit / width,
        side_limit / height,
    )
    new_w = min(max(1, int(width * scale)), side_limit)
    new_h = min(max(1, int(height * scale)), side_limit)
    grid = [1, math.ceil(new_h / 28) * 2, math.ceil(new_w / 28) * 2]
    pixels = family.pixels([gradient(width, height)])
    assert pixels["grid_thws"].tolist() == [grid]
    assert pixels["pixel_values"].shape == (grid[1] * grid[2], 3, 14, 14)
    assert list(family.layout(width, height)) == grid


def test_kimi_batch_output_is_the_concatenation_of_single_images() -> None:
    family = kimi()
    images = [gradient(30, 20), gradient(100, 60)]
    batch = family.pixels(images)
    singles = [family.pixels([image]) for image in images]
    np.testing.assert_array_equal(batch["pixel_values"], np.concatenate([s["pixel_values"] for s in singles]))
    assert batch["grid_thws"].tolist() == [[1, 2, 4], [1, 6, 8]]


def test_kimi_zero_pixels_are_zero_patches_of_the_grid() -> None:
    zeros = kimi().zero_pixels((1, 2, 4))
    assert zeros.shape == (8, 3, 14, 14)
    assert zeros.dtype == np.float32 and not zeros.any()

"""The families' own pixel paths give exactly what the reference computation gives.

Qwen-VL's reference is the Hugging Face PIL processor; Kimi K2.5's is families.md's
recipe computed plainly on the whole float image. Checked on every fixture image
and on random sizes and aspect ratios (and random pixels, so any misplaced value shows).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor

from mmoffload.families import Families, Family, resolve_model_dir
from mmoffload.store.images import to_rgb

FIXTURE_IMAGES = sorted((Path(__file__).parent.parent / "fixtures" / "images").iterdir())


def random_images(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        width, height = (int(v) for v in rng.integers(8, 1600, 2))
        if rng.random() < 0.3:  # thin strips, up to the 200:1 the processor allows
            height = max(8, width // int(rng.integers(20, 150)))
        images.append(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))
    return images


def fixture_images() -> list[Image.Image]:
    return [to_rgb(Image.open(path)) for path in FIXTURE_IMAGES]


@pytest.mark.parametrize("bundled", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("images", ["fixtures", "random"])
def test_qwen_own_pixels_equal_the_hf_pil_processor_bit_for_bit(bundled: str, images: str) -> None:
    family = Families(resolve_model_dir(bundled)).get("qwen_vl")
    assert family.own_pixels
    processor = AutoImageProcessor.from_pretrained(
        str(resolve_model_dir(bundled)), local_files_only=True, backend="pil"
    )
    for image in fixture_images() if images == "fixtures" else random_images(12, seed=len(bundled)):
        expected = processor(images=[image], return_tensors="np")
        pixels = family.pixels([image])
        np.testing.assert_array_equal(pixels["image_grid_thw"], expected["image_grid_thw"])
        assert pixels["pixel_values"].dtype == np.float32
        np.testing.assert_array_equal(pixels["pixel_values"], expected["pixel_values"])


@pytest.mark.parametrize(
    "change",
    [{"do_normalize": False}, {"resample": 2, "image_mean": [0.1, 0.2, 0.3]}, {"crop_size": 224}],
)
def test_qwen_settings_the_own_path_does_not_know_use_the_processor(tmp_path: Path, change: dict) -> None:
    config = json.loads((resolve_model_dir("qwen3_vl") / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config | change))
    family = Families(tmp_path).get("qwen_vl")
    known = set(change) <= {"resample", "image_mean"}
    assert family.own_pixels is known
    processor = AutoImageProcessor.from_pretrained(str(tmp_path), local_files_only=True, backend="pil")
    images = random_images(2, seed=3)
    np.testing.assert_array_equal(
        family.pixels(images)["pixel_values"], processor(images=images, return_tensors="np")["pixel_values"]
    )


def kimi_reference(family: Family, image: Image.Image) -> np.ndarray:
    """families.md's recipe on the whole image in float32: resize, pad, normalize, cut into patches."""
    padded = Image.new("RGB", family.padded_size(*image.size), (0, 0, 0))
    padded.paste(image.resize(family.resized_size(*image.size), Image.Resampling.BICUBIC), (0, 0))
    mean = np.asarray(family.image_mean, dtype=np.float32)
    std = np.asarray(family.image_std, dtype=np.float32)
    values = (np.asarray(padded, dtype=np.float32) / np.float32(255) - mean) / std
    ps = family.patch_size
    grid_h, grid_w = padded.height // ps, padded.width // ps
    rows = values.reshape(grid_h, ps, grid_w, ps, 3).transpose(0, 2, 4, 1, 3)
    return rows.reshape(grid_h * grid_w, 3, ps, ps)


@pytest.mark.parametrize("images", ["fixtures", "random"])
def test_kimi_own_pixels_equal_the_plain_recipe_bit_for_bit(tmp_path: Path, images: str) -> None:
    config = {
        "media_proc_cfg": {"patch_size": 14, "image_mean": [0.48, 0.45, 0.4], "image_std": [0.26, 0.26, 0.27]}
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    for family in (Families().get("kimi_k25"), Families(tmp_path).get("kimi_k25")):
        for image in fixture_images() if images == "fixtures" else random_images(12, seed=5):
            pixels = family.pixels([image])
            np.testing.assert_array_equal(pixels["pixel_values"], kimi_reference(family, image))

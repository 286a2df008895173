"""The server's engine pixels from the family's own path equal the model processor's (no vLLM needed)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmoffload.families import Families


@pytest.mark.parametrize("sizes", [[(200, 120)], [(37, 91)], [(1280, 720), (640, 360)]])
def test_own_engine_pixels_equal_the_processors_unnormalized_pixels(sizes: list[tuple[int, int]]) -> None:
    family = Families().get("qwen_vl")
    assert family.own_pixels
    rng = np.random.default_rng(len(sizes))
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    ours = family.engine_pixels(images, device_normalizes=True)
    theirs = family.image_processor(images=images, do_rescale=False, do_normalize=False, return_tensors="np")
    assert np.array_equal(ours["pixel_values"], np.asarray(theirs["pixel_values"], dtype=np.float32))
    assert ours["image_grid_thw"].tolist() == np.asarray(theirs["image_grid_thw"]).tolist()
    # uint8: the same values, a quarter of the bytes to make and to cache.
    assert ours["pixel_values"].dtype == np.uint8

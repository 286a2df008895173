"""The one place an image's size is checked before it is decoded (decompression bombs).

A small PNG can declare 13,000 x 13,000 pixels and take gigabytes to decode;
its header says so first. Every command that decodes image bytes opens them
here, which refuses more pixels than the limit before any pixel is decoded.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

from mmoffload.errors import BadInputError, Where
from mmoffload.extras import require
from mmoffload.limits import env_limit

if TYPE_CHECKING:
    from PIL import Image

MAX_IMAGE_PIXELS_ENV_VAR = "MMOFFLOAD_MAX_IMAGE_PIXELS"
# 8192 x 8192: above any screenshot or processor's max_pixels, far below a bomb.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192


def max_image_pixels() -> int:
    """Return the most pixels an image may declare: ``$MMOFFLOAD_MAX_IMAGE_PIXELS``, else 8192 x 8192.

    Raises:
        UsageError: the variable is not a whole number > 0.
    """
    return env_limit(MAX_IMAGE_PIXELS_ENV_VAR, DEFAULT_MAX_IMAGE_PIXELS)


def open_image(
    data: bytes, name: str, where: Where | None = None, *, max_pixels: int | None = None
) -> Image.Image:
    """Open image bytes lazily, refusing a header that declares too many pixels.

    Only the header is read here; the caller decodes (``load()``) what passed.

    Args:
        data: the image file's bytes.
        name: what to call the image in errors (its URI).
        where: the image's location, for errors.
        max_pixels: the most pixels allowed (default ``max_image_pixels()``).

    Raises:
        BadInputError: the bytes are no image, or declare more pixels than allowed.
    """
    limit = max_image_pixels() if max_pixels is None else max_pixels
    pil = require("PIL.Image", "Decoding images")  # The `materialize` extra: the light core has no Pillow.
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning: the limit here is ours, checked just below.
            warnings.simplefilter("ignore", pil.DecompressionBombWarning)
            image = pil.open(io.BytesIO(data))
    except (OSError, ValueError, pil.DecompressionBombError) as exc:
        raise BadInputError(f"Expected a decodable image at `{name}`, got: {exc}", where) from exc
    width, height = image.size
    if width * height > limit:
        image.close()
        raise BadInputError(
            f"Image `{name}` declares {width:,} x {height:,} pixels, over the {limit:,}-pixel limit "
            f"(${MAX_IMAGE_PIXELS_ENV_VAR})",
            where,
        )
    return image


def decode_rgb(data: bytes, name: str, where: Where | None = None) -> Image.Image:
    """Decode image bytes to RGB (transparency on white), after the header's pixel check.

    Raises:
        BadInputError: the bytes do not decode as an image, or declare too many pixels.
    """
    with open_image(data, name, where) as image:
        return load_rgb(image, name, where)


def load_rgb(image: Image.Image, name: str, where: Where | None = None) -> Image.Image:
    """Decode an image opened by ``open_image`` (its size already checked) to RGB, transparency on white.

    Raises:
        BadInputError: the pixels do not decode.
    """
    pil = require("PIL.Image", "Decoding images")
    try:
        image.load()
        return to_rgb(image)
    except (OSError, ValueError, pil.DecompressionBombError) as exc:
        raise BadInputError(f"Expected a decodable image at `{name}`, got: {exc}", where) from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image to RGB, compositing transparency onto white as HF processors and vLLM do."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        pil = require("PIL.Image", "Converting images")
        background = pil.new("RGBA", image.size, (255, 255, 255, 255))
        return pil.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")

"""What every model family provides (families.md).

Shared code routes by the descriptor's ``family`` and never reads payload keys
itself: layout, placeholder length, token types and trainer pixels belong to
the family module.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mmoffload.errors import BadInputError, UsageError, Where
from mmoffload.extras import require

if TYPE_CHECKING:  # Pillow is the materialize extra's: the core never decodes pixels.
    from PIL import Image

Grid = tuple[int, int, int]

TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2


@dataclass(frozen=True, slots=True)
class ForwardPolicy:
    """How a trainer calls the model with this family's vision inputs."""

    position_ids_with_images: bool
    image_type_ids_required: bool


class Family(ABC):
    """One model family, configured from a model directory or from its defaults."""

    name: ClassVar[str]
    policy: ClassVar[ForwardPolicy]
    payload_key: ClassVar[str]
    # Special-token name -> token type, and the published ids used when no tokenizer is given.
    typed_tokens: ClassVar[dict[str, int]]
    default_token_ids: ClassVar[dict[str, int]]
    # Model kwarg names of the trainer pixels: pixel rows, and one grid row per image.
    pixel_kwarg: ClassVar[str] = "pixel_values"
    grid_kwarg: ClassVar[str]

    def __init__(self, model_dir: Path | None = None) -> None:
        self.model_dir = model_dir
        config = read_json(model_dir / "preprocessor_config.json") if model_dir else {}
        self.configure(config)
        tokens = read_added_tokens(model_dir) if model_dir else {}
        known = {name: tokens[name] for name in self.typed_tokens if name in tokens}
        # A tokenizer is the authority when it names the tokens; else the published ids hold.
        self.token_types_from_tokenizer = bool(known)
        ids = known or self.default_token_ids
        self.token_types: dict[int, int] = {
            ids[name]: kind for name, kind in self.typed_tokens.items() if name in ids
        }

    @abstractmethod
    def configure(self, config: dict[str, Any]) -> None:
        """Read the family's layout settings from ``preprocessor_config.json`` (or defaults)."""

    @classmethod
    @abstractmethod
    def owns_model_dir(cls, config: dict[str, Any]) -> bool:
        """True when a model directory's ``preprocessor_config.json`` belongs to this family."""

    @abstractmethod
    def layout(self, width: int, height: int) -> Grid:
        """Return the grid of an image of this size, as the model's processor lays it out."""

    @abstractmethod
    def placeholder_length(self, grid: Grid) -> int:
        """Return the number of placeholder tokens an image of this grid takes."""

    def payload(self, grid: Grid) -> dict[str, Any]:
        """Return the descriptor payload for ``grid``."""
        return {self.payload_key: [list(grid)]}

    def grid(self, payload: object, where: Where | None = None) -> Grid:
        """Validate a descriptor payload and return its grid.

        Accepts ``{key: [[t, h, w]]}`` and ``{key: [t, h, w]}``.

        Raises:
            BadInputError: the payload lacks the key or the grid is malformed.
        """
        if not isinstance(payload, dict) or self.payload_key not in payload:
            raise BadInputError(f"Expected payload with `{self.payload_key}` for family `{self.name}`", where)
        value = payload[self.payload_key]
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
            value = value[0]
        if not (isinstance(value, list) and len(value) == 3 and all(type(v) is int and v > 0 for v in value)):
            raise BadInputError(
                f"Expected `{self.payload_key}` as [t, h, w] of ints > 0, got `{value!r}`", where
            )
        return (value[0], value[1], value[2])

    def payload_placeholder_length(self, payload: object, where: Where | None = None) -> int:
        """Return the placeholder length a descriptor payload implies."""
        return self.placeholder_length(self.grid(payload, where))

    @abstractmethod
    def pixels(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        """Return the model's vision kwargs for ``images`` (RGB), in order.

        Returns:
            ``{pixel_kwarg: rows, grid_kwarg: (n, 3) int64}``; processing the
            images one at a time and concatenating gives the same arrays.
        """

    @abstractmethod
    def zero_pixels(self, grid: Grid) -> np.ndarray:
        """Return the zero-loss placeholder pixel rows of a missing image of ``grid``."""

    def prepare_pixels(self) -> None:
        """Load what ``pixels`` needs (a processor, say) now rather than on the first image."""
        return  # Nothing to load by default: a family that computes pixels itself is ready.

    def pixel_key(self) -> str:
        """Return what identifies this family's pixel output, for caching processed images."""
        return f"{self.name}:{self.model_dir or 'defaults'}"


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image to RGB, compositing transparency onto white as HF processors and vLLM do."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        pil = require("PIL.Image", "Converting images")
        background = pil.new("RGBA", image.size, (255, 255, 255, 255))
        return pil.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from a model directory file.

    Raises:
        UsageError: the file is missing or not a JSON object.
    """
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise UsageError(f"Model directory has no `{path.name}`", Where(file=str(path))) from exc
    except (OSError, ValueError) as exc:
        raise UsageError(f"Cannot read model file: {exc}", Where(file=str(path))) from exc
    if not isinstance(value, dict):
        raise UsageError("Expected a JSON object", Where(file=str(path)))
    return value


def read_added_tokens(model_dir: Path) -> dict[str, int]:
    """Return a tokenizer's special tokens, name -> id, read offline from its files.

    Reads ``tokenizer_config.json`` (``added_tokens_decoder``) and ``tokenizer.json``
    (``added_tokens``) when present; works for tokenizers shipped as remote code too.
    """
    tokens: dict[str, int] = {}
    config_path = model_dir / "tokenizer_config.json"
    if config_path.exists():
        for token_id, entry in read_json(config_path).get("added_tokens_decoder", {}).items():
            tokens[entry["content"]] = int(token_id)
    tokenizer_path = model_dir / "tokenizer.json"
    if tokenizer_path.exists():
        for entry in read_json(tokenizer_path).get("added_tokens", []):
            tokens.setdefault(entry["content"], int(entry["id"]))
    return tokens

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
    patch_size: int  # Pixels per patch side, set by ``configure``.
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
        # Names of the family's special tokens, for token windows in messages and pages.
        self.token_names: dict[int, str] = {
            tokens.get(name, token_id): name for name, token_id in self.default_token_ids.items()
        }

    def setting(self, config: dict[str, Any], name: str, default: int) -> int:
        """Return a layout setting of ``preprocessor_config.json``: a whole number > 0, else ``default``.

        A missing, null or 0-valued ``min_pixels``-style entry falls back to the default;
        anything else that is not a whole number > 0 is refused.

        Raises:
            UsageError: naming the file and the setting.
        """
        value = config.get(name)
        if value is None:
            return default
        if type(value) is not int or value < 1:
            where = Where(file=str(self.model_dir / "preprocessor_config.json")) if self.model_dir else None
            raise UsageError(f"Expected `{name}` as a whole number > 0, got `{value!r:.80}`", where)
        return value

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

    def input_size(self, grid: Grid) -> tuple[int, int]:
        """Return the (width, height) in pixels that the model sees for ``grid``: one patch per cell."""
        return grid[2] * self.patch_size, grid[1] * self.patch_size

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

    def placeholder_problem(self, grid: Grid, length: int) -> str | None:
        """Return why ``length`` is not ``grid``'s placeholder length, if it is not: one wording for every stage."""
        expected = self.placeholder_length(grid)
        if length == expected:
            return None
        return (
            f"Expected placeholder length {expected} for grid {list(grid)} of family `{self.name}`, got {length} "
            "(image features and image tokens would not match)"
        )

    def pixels(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        """Return the model's vision kwargs for ``images`` (RGB), in order.

        Returns:
            ``{pixel_kwarg: rows, grid_kwarg: (n, 3) int64}``; processing the
            images one at a time and concatenating gives the same arrays.
        """
        prepared = [self.prepare_image(image) for image in images]
        grids = [prepared_grid(self, one) for one in prepared]
        rows = self.pixel_rows(grids)
        offset = 0
        for one, grid in zip(prepared, grids, strict=True):
            size = self.pixel_shape(grid)[0]
            self.write_pixels(one, rows[offset : offset + size])
            offset += size
        return {self.pixel_kwarg: rows, self.grid_kwarg: np.array(grids, dtype=np.int64).reshape(-1, 3)}

    def engine_pixels(self, images: list[Image.Image], *, device_normalizes: bool) -> dict[str, np.ndarray]:
        """Return an inference engine's vision inputs for ``images`` (RGB), in order.

        Unnormalized rows may come as uint8 (their values are whole levels, 0 to 255).

        Args:
            images: the request's images.
            device_normalizes: the engine rescales and normalizes pixels itself, on the
                device (vLLM's ``mm_device_do_normalize``); inputs must then stay unnormalized,
                or they are normalized twice, silently.

        Raises:
            UsageError: the family cannot make inputs for such an engine.
        """
        if device_normalizes:
            raise UsageError(
                f"Family `{self.name}` has no unnormalized engine inputs for device normalization"
            )
        return self.pixels(images)

    @abstractmethod
    def prepare_image(self, image: Image.Image) -> dict[str, np.ndarray]:
        """Return what one image's pixels are made from: compact, cacheable, never handed out.

        Returns:
            The family's arrays, with ``grid_kwarg`` as a (1, 3) int64 row; ``write_pixels``
            turns them into the image's pixel rows.
        """

    @abstractmethod
    def write_pixels(self, prepared: dict[str, np.ndarray], out: np.ndarray) -> None:
        """Write the pixel rows of a prepared image into ``out`` (of ``pixel_shape(grid)``)."""

    @abstractmethod
    def pixel_shape(self, grid: Grid) -> tuple[int, ...]:
        """Return the shape of the pixel rows of an image of ``grid``."""

    def pixel_rows(self, grids: list[Grid]) -> np.ndarray:
        """Return an uninitialised float32 array for the pixel rows of images of ``grids``, in order."""
        shapes = [self.pixel_shape(grid) for grid in grids]
        row = shapes[0][1:] if shapes else self.pixel_shape((1, 1, 1))[1:]
        return np.empty((sum(shape[0] for shape in shapes), *row), dtype=np.float32)

    def zero_pixels(self, grid: Grid) -> np.ndarray:
        """Return the zero-loss placeholder pixel rows of a missing image of ``grid``."""
        return np.zeros(self.pixel_shape(grid), dtype=np.float32)

    def prepare_pixels(self) -> None:
        """Load what ``pixels`` needs (a processor, say) now rather than on the first image."""
        return  # Nothing to load by default: a family that computes pixels itself is ready.

    def pixel_key(self) -> str:
        """Return what identifies this family's pixel output, for caching processed images."""
        return f"{self.name}:{self.model_dir or 'defaults'}"


def prepared_grid(family: Family, prepared: dict[str, np.ndarray]) -> Grid:
    """Return the grid of a prepared image."""
    t, h, w = (int(v) for v in prepared[family.grid_kwarg][0])
    return (t, h, w)


def value_table(scale: float, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Return each channel's normalized value of every uint8 level, (channels, 256) float32.

    Computed with the operations Hugging Face image processors apply to whole
    images (``rescale`` in float64 then cast to float32, ``normalize`` in float32),
    so looking a pixel up gives the processor's value bit for bit.
    """
    levels = np.arange(256, dtype=np.uint8)
    rescaled = (levels.astype(np.float64) * scale).astype(np.float32)
    mean32, std32 = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(((rescaled[:, None] - mean32) / std32).T)


def pair_table(table: np.ndarray) -> np.ndarray:
    """Return the values of every pair of adjacent levels, for ``write_levels``.

    Entry ``c * 65536 + k`` holds, as one 8-byte word, the two float32 values of
    channel ``c`` for the two bytes of the uint16 ``k`` (in memory order), so one
    lookup writes two pixels: half the lookups and half the index array.
    """
    pairs = np.arange(65536, dtype=np.uint16).view(np.uint8).reshape(65536, 2)
    return np.ascontiguousarray(table[:, pairs]).view(np.uint64).reshape(-1)


def write_levels(pairs: np.ndarray, patches: np.ndarray, out: np.ndarray) -> None:
    """Write ``table[c][patches[n, c, k]]`` into ``out[n, c, t, k]`` for every copy ``t``.

    Args:
        pairs: a channel table as ``pair_table`` returns it.
        patches: (n, channels, k) uint8 levels, ``k`` even.
        out: (n, channels, copies, k) float32, contiguous in ``k``; each copy gets
            the same values (Qwen-VL's temporal patch repeats a still image).
    """
    words = out.view(np.uint64)
    # One pass makes each pair of levels an index into the flattened tables (channel c at 65536 c).
    index = np.add(patches.view(np.uint16), (np.arange(patches.shape[1], dtype=np.intp) << 16)[None, :, None])
    if words.shape[2] == 1:
        np.take(pairs, index, out=words.reshape(index.shape), mode="wrap")
        return
    words[...] = np.take(pairs, index)[:, :, None, :]


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

    ``tokenizer_config.json``'s ``added_tokens_decoder`` is read here as JSON: transformers
    writes every added token there (4.34 and later), and it is the only list a tokenizer
    shipped as remote code (Kimi's tiktoken) has, which no library reads without running
    that code. A directory without one (an older save) has its ``tokenizer.json`` read by
    the ``tokenizers`` package (the ``materialize`` extra).

    Raises:
        UsageError: a file is malformed, or ``tokenizer.json`` must be read without ``tokenizers``.
    """
    config_path = model_dir / "tokenizer_config.json"
    decoder = read_json(config_path).get("added_tokens_decoder") if config_path.exists() else None
    if decoder:
        try:
            return {str(entry["content"]): int(token_id) for token_id, entry in decoder.items()}
        except (AttributeError, KeyError, TypeError, ValueError):
            raise UsageError(
                'Expected `added_tokens_decoder` as {id: {"content": token}}', Where(file=str(config_path))
            ) from None
    tokenizer_path = model_dir / "tokenizer.json"
    if not tokenizer_path.exists():
        return {}
    tokenizers = require("tokenizers", f"Reading the special tokens of `{tokenizer_path}`")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_path))
    except Exception as exc:  # tokenizers raises a plain Exception for a file it cannot parse.
        raise UsageError(f"Cannot read the tokenizer: {exc}", Where(file=str(tokenizer_path))) from exc
    return {token.content: token_id for token_id, token in tokenizer.get_added_tokens_decoder().items()}

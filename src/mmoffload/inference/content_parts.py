"""Stock vLLM's raw-media requests (``content_parts``, inference.md section 6), checked as raw refs are.

A ``GenerateRequest`` may carry ``token_ids`` with ONE image pad per image and,
in ``content_parts``, one image part per pad: ``{"type": "image_url", "url":
..., "uuid": ...}`` (vLLM's flat form) or ``{"type": "image_url", "image_url":
{"url": ...}}`` (OpenAI's nested form). Stock vLLM trusts the ``uuid`` as the
identity of cached pixels and checks no content; here a ``uuid`` is the image's
content hash, verified against the bytes on first read, and a part with a
``uuid`` alone is served only from the server's verified cache (else HTTP 400
``mm_cache_miss``, never stale pixels).

Each part becomes an ``ImageRef`` once its grid is known (from the image
header, or from the verified cache), so both request paths run the same checks
(``mmoffload.inference.refs``) and share one cache. No vLLM import here.
"""

from __future__ import annotations

import base64
import binascii
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mmoffload.contract.addresses import content_hash
from mmoffload.contract.descriptors import HASH_PATTERN
from mmoffload.errors import BadInputError
from mmoffload.families import Family, Grid
from mmoffload.families.pixel_cache import PixelCache
from mmoffload.inference.checks import (
    check_location,
    check_placeholders,
    check_prompt_length,
    image_size,
    read_image,
)
from mmoffload.inference.refs import (
    MODALITY,
    EngineArrays,
    ImageRef,
    InvalidImageRefError,
    PromptLimits,
    check_image_count,
)
from mmoffload.limits import max_image_bytes
from mmoffload.store.read import AllowedRoots

CACHE_MISS_TYPE = "mm_cache_miss"
IMAGE_PART = "image_url"
# Verified grids remembered per content hash (about 150 bytes each), so a uuid-only part finds its entry.
GRID_INDEX_ENTRIES = 1 << 16


class CacheMissError(InvalidImageRefError):
    """A part names a ``uuid`` alone and the server holds no verified image of that hash; HTTP 400."""


@dataclass(frozen=True, slots=True)
class ImagePart:
    """One image part of a request: its index, URL (None: from the cache) and ``uuid`` (None: not given)."""

    index: int
    url: str | None
    uuid: str | None


@dataclass(frozen=True, slots=True)
class ResolvedParts:
    """A ``content_parts`` request made into the engine's terms: expanded ids, checked images, their arrays."""

    token_ids: list[int]
    refs: list[ImageRef]
    arrays: list[EngineArrays]
    cache_hits: int = 0

    def features(self) -> dict[str, Any]:
        """Return vLLM's ``features`` for these images (``kwargs_data`` entries left to the engine side)."""
        return {
            "mm_hashes": {MODALITY: [ref.mm_hash for ref in self.refs]},
            "mm_placeholders": {
                MODALITY: [{"offset": ref.offset, "length": ref.length} for ref in self.refs]
            },
            "kwargs_data": {MODALITY: [None] * len(self.refs)},
        }


class GridIndex:
    """The grid of every verified image still likely cached, by content hash (bounded, least recent out)."""

    def __init__(self, max_entries: int = GRID_INDEX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._grids: OrderedDict[tuple[str, str], Grid] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, mm_hash: str, family: str) -> Grid | None:
        """Return the verified grid of ``mm_hash`` for ``family``, or None."""
        with self._lock:
            grid = self._grids.get((mm_hash, family))
            if grid is not None:
                self._grids.move_to_end((mm_hash, family))
            return grid

    def put(self, mm_hash: str, family: str, grid: Grid) -> None:
        """Remember the grid of an image whose bytes were verified against ``mm_hash``."""
        with self._lock:
            self._grids[(mm_hash, family)] = tuple(grid)  # type: ignore[assignment]
            self._grids.move_to_end((mm_hash, family))
            while len(self._grids) > self.max_entries:
                self._grids.popitem(last=False)


def parse_parts(parts: object, max_images: int | None = None) -> list[ImagePart]:
    """Run checks 1 and 2 on ``content_parts``: image parts only, a URL or a content-hash ``uuid`` each.

    Raises:
        InvalidImageRefError: the first malformed part, naming its index.
    """
    if not isinstance(parts, list):
        raise InvalidImageRefError(1, f"Expected `content_parts` as a list, got `{type(parts).__name__}`")
    check_image_count(len(parts), max_images)
    out = []
    for index, part in enumerate(parts):
        if not isinstance(part, dict):
            raise InvalidImageRefError(
                1, f"Expected a content part object, got `{type(part).__name__}`", index
            )
        if part.get("type") != IMAGE_PART:
            raise InvalidImageRefError(
                1,
                f"Expected an `image_url` part (images only), got type `{str(part.get('type'))[:40]}`",
                index,
            )
        url = part.get("url")
        nested = part.get("image_url")
        if url is None and nested is not None:  # OpenAI's form: {"image_url": {"url": ...}} (or a string)
            url = nested.get("url") if isinstance(nested, dict) else nested
        uuid = part.get("uuid")
        if uuid is None and isinstance(nested, dict):
            uuid = nested.get("uuid")
        if url is not None and not isinstance(url, str):
            raise InvalidImageRefError(
                2, f"Expected the part's `url` as a string, got `{type(url).__name__}`", index
            )
        if uuid is not None and not (isinstance(uuid, str) and HASH_PATTERN.fullmatch(uuid)):
            raise InvalidImageRefError(
                2,
                f"Expected `uuid` as the image's content hash (32 lowercase hex digits), got `{str(uuid)[:80]}`",
                index,
            )
        if url is None and uuid is None:
            raise InvalidImageRefError(
                2, "Expected a part with a `url`, a `uuid`, or both, got neither", index
            )
        out.append(ImagePart(index, url, uuid))
    return out


def image_pad(family: Family) -> int:
    """Return the family's image pad token (the one token of type image)."""
    pads = sorted(token for token, kind in family.token_types.items() if kind == 1)
    return pads[0]


def pad_positions(token_ids: Sequence[int], pad: int, parts: int) -> list[int]:
    """Return where the image pads are: exactly one per image part (check 1).

    Raises:
        InvalidImageRefError: more or fewer pads than image parts.
    """
    positions = [position for position, token in enumerate(token_ids) if token == pad]
    if len(positions) != parts:
        raise InvalidImageRefError(
            1,
            f"Expected one image pad ({pad}) in `token_ids` per image part ({parts}), got {len(positions)} pads "
            "(the server expands each pad to the image's placeholder)",
        )
    return positions


def expand(
    token_ids: Sequence[int], positions: Sequence[int], lengths: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Return the prompt with each pad repeated to its image's placeholder length, and each image's offset."""
    out: list[int] = []
    offsets = []
    start = 0
    for position, length in zip(positions, lengths, strict=True):
        out.extend(token_ids[start:position])
        offsets.append(len(out))
        out.extend([token_ids[position]] * length)
        start = position + 1
    out.extend(token_ids[start:])
    return out, offsets


def read_data_url(url: str, index: int) -> bytes:
    """Return the bytes of a base64 ``data:`` URL, bounded as a file is.

    Raises:
        InvalidImageRefError: (check 3) not base64, or over the byte limit.
    """
    header, _, payload = url.partition(",")
    limit = max_image_bytes()
    if not header.endswith(";base64") or len(payload) > (limit + 2) // 3 * 4:
        raise InvalidImageRefError(
            3, f"Expected a base64 `data:` URL of at most {limit:,} bytes, got `{url[:60]}...`", index
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise InvalidImageRefError(3, f"Expected a base64 `data:` URL, got: {exc}", index) from exc


def resolve_parts(
    parts: object,
    token_ids: Sequence[int],
    family: Family,
    materialize: Callable[[ImageRef, bytes], EngineArrays],
    *,
    cache: PixelCache,
    grids: GridIndex,
    model: str,
    limits: PromptLimits | None = None,
    roots: AllowedRoots = None,
) -> ResolvedParts:
    """Check a ``content_parts`` request and return its expanded prompt and every image's engine arrays.

    In order: the image count and the unexpanded prompt's length (what the engine
    refuses), the parts (checks 1-2) and one pad per part, every URL's location
    (check 3, without reading); then per part its grid, from the verified cache (a
    ``uuid`` seen before: no read) or from the header of its bytes, read and
    verified against the ``uuid`` (check 3-4); then the expanded prompt's length and
    the placeholders (check 6); then the images are made by ``materialize`` (checks
    4-5, 7: ``materialize_bytes`` with the engine's processing and decode budget), once
    per content hash (the cache's single flight), and remembered for uuid-only parts.

    Raises:
        PromptRefusedError: the prompt is too long for the engine.
        CacheMissError: a uuid-only part the server holds no verified image for.
        InvalidImageRefError: the first failed check, naming the part index.
    """
    limits = limits or PromptLimits()
    check_prompt_length(len(token_ids), limits)
    images = parse_parts(parts, limits.max_images)
    positions = pad_positions(token_ids, image_pad(family), len(images))
    for part in images:
        if part.url is not None and not part.url.startswith("data:"):
            check_location(_ref(part, family, (1, 1, 1), part.uuid or ""), roots, objects=True)
    found: list[tuple[ImageRef, EngineArrays | None, bytes | None]] = []
    for part in images:
        grid = grids.get(part.uuid, family.name) if part.uuid is not None else None
        if grid is not None:
            ref = _ref(part, family, grid, part.uuid, family.placeholder_length(grid))  # type: ignore[arg-type]
            arrays = cache.get(ref.cache_key(model))
            if arrays is not None:
                found.append((ref, arrays, None))
                continue
        if part.url is None:
            raise CacheMissError(
                2,
                f"Expected image `{part.uuid}` in the server's verified cache, got none: send the part with its "
                "`url` (a uuid alone names only an image this server has read and verified)",
                part.index,
            )
        data, mm_hash = _read_part(part, family, roots)
        width, height = image_size(_ref(part, family, (1, 1, 1), mm_hash), data)
        try:
            grid = family.layout(width, height)
        except BadInputError as exc:  # a size the family cannot lay out is check 5's
            raise InvalidImageRefError(5, exc.message, part.index) from exc
        found.append((_ref(part, family, grid, mm_hash), None, data))
    lengths = [family.placeholder_length(ref.grid) for ref, _, _ in found]
    expanded, offsets = expand(token_ids, positions, lengths)
    check_prompt_length(len(expanded), limits)
    refs = [
        ImageRef(ref.index, ref.mm_hash, ref.uri, family, ref.grid, offset, length)
        for (ref, _, _), offset, length in zip(found, offsets, lengths, strict=True)
    ]
    check_placeholders(refs, expanded)
    arrays_out = []
    hits = 0
    for ref, (_, arrays, data) in zip(refs, found, strict=True):
        if arrays is None:
            arrays, made = cache.get_or_make(
                ref.cache_key(model),
                lambda ref=ref, data=data: materialize(ref, data),
            )
            hits += not made
            grids.put(ref.mm_hash, family.name, ref.grid)
        else:
            hits += 1
        arrays_out.append(arrays)
    return ResolvedParts(expanded, refs, arrays_out, hits)


def _ref(part: ImagePart, family: Family, grid: Grid, mm_hash: str, length: int = 1) -> ImageRef:
    """Return a part as an image ref (offset 0 until expanded); a ``data:`` URL is named by its start."""
    uri = part.url if part.url is not None else f"uuid:{part.uuid}"
    return ImageRef(
        part.index, mm_hash, uri[:200] if uri.startswith("data:") else uri, family, grid, 0, length
    )


def _read_part(part: ImagePart, family: Family, roots: AllowedRoots) -> tuple[bytes, str]:
    """Read a part's bytes (check 3) and return them with their content hash, checked against its uuid."""
    assert part.url is not None
    ref = _ref(part, family, (1, 1, 1), part.uuid or "")
    if part.url.startswith("data:"):
        data = read_data_url(part.url, part.index)
    else:
        data = read_image(ref, roots, objects=True, verify=part.uuid is not None)
        if part.uuid is not None:
            return data, part.uuid  # verified against it by the reader
    mm_hash = content_hash(data)
    if part.uuid is not None and mm_hash != part.uuid:
        # A data: URL's bytes are the client's own, so their hash leaks nothing.
        raise InvalidImageRefError(
            3,
            f"Content hash mismatch for the part's data: expected `{part.uuid}`, got `{mm_hash}`",
            part.index,
        )
    return data, mm_hash

"""The server-side checks of inference.md section 3, in order, and the materialization of a checked image.

Every check that reads nothing runs first, for every image, so a request vLLM would refuse costs no read."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mmoffload.contract.addresses import is_object_uri, uri_to_path
from mmoffload.contract.spans import IMAGE_TYPE
from mmoffload.errors import BadInputError, MMOffloadError, Where
from mmoffload.families import Families, Family, Grid
from mmoffload.inference.decode_budget import DecodeBudget, decode_cost
from mmoffload.inference.refs import (
    EngineArrays,
    ImageRef,
    InvalidImageRefError,
    PromptLimits,
    PromptRefusedError,
    parse_features,
)
from mmoffload.limits import max_image_bytes
from mmoffload.store.images import load_rgb, open_image
from mmoffload.store.read import AllowedRoots, check_allowed, check_object_allowed, read_verified

if TYPE_CHECKING:
    from PIL import Image


def check_prompt_length(num_tokens: int, limits: PromptLimits) -> None:
    """Refuse a prompt the engine would refuse for its length, before any image is read.

    vLLM refuses a prompt of ``max_model_len`` tokens or more (no room for one sampled token).

    Raises:
        PromptRefusedError: the prompt is too long.
    """
    if limits.max_model_len is not None and num_tokens >= limits.max_model_len:
        raise PromptRefusedError(
            f"Expected a prompt shorter than the maximum model length of {limits.max_model_len} tokens "
            f"(room for one sampled token), got {num_tokens} tokens with images expanded"
        )


def check_request(
    features: object,
    token_ids: Sequence[int],
    families: Families,
    limits: PromptLimits | None = None,
    roots: AllowedRoots = None,
) -> list[ImageRef]:
    """Run every check that reads no image, over the whole request; return its images in order.

    What the engine would refuse (the prompt's length, then the image count), checks 1
    and 2, check 6 for every image (the descriptors' grids against the placeholders,
    which must not overlap), then the URI part of check 3 for every image. A request
    failing any of these costs no file read, however many refs it carries.

    Raises:
        PromptRefusedError: the prompt is too long for the engine.
        InvalidImageRefError: the first failed check, naming the image index.
    """
    limits = limits or PromptLimits()
    check_prompt_length(len(token_ids), limits)
    refs = parse_features(features, families, limits.max_images)
    check_placeholders(refs, token_ids)
    for ref in refs:
        check_location(ref, roots)
    return refs


def check_location(ref: ImageRef, roots: AllowedRoots = None, *, objects: bool = False) -> Path | str:
    """Run check 3's URI part without reading: a local ``file://`` URI under the allowed roots.

    Runs on a cache hit too, so the answer to a ref never depends on what is cached.

    Args:
        ref: the parsed image.
        roots: allowed directories, and object-store prefixes as URL strings (None: anywhere).
        objects: also take an object-store URL (``s3://bucket/key``) under an allowed prefix.

    Raises:
        InvalidImageRefError: not a local file URI (or object URL), or outside the roots.
    """
    at = Where(image=ref.index)
    try:
        if objects and is_object_uri(ref.uri):
            return check_object_allowed(ref.uri, roots, at)
        path = uri_to_path(ref.uri, at)
        check_allowed(path, roots, at)
    except BadInputError as exc:
        raise InvalidImageRefError(3, exc.message, ref.index) from exc
    return path


def read_image(
    ref: ImageRef, roots: AllowedRoots = None, *, objects: bool = False, verify: bool = True
) -> bytes:
    """Run check 3: read the file (or object) a ref names and verify its hash.

    Without allowed roots a file may lie anywhere, so every way it can fail
    (missing, not a regular file, too large, unreadable, other content) is refused
    with one wording and no size: else the answers would map the server's files.

    Args:
        ref: the parsed image.
        roots: allowed directories (None: anywhere).
        objects: also read object-store URLs.
        verify: check the bytes against ``ref.mm_hash`` (False: the caller hashes them).

    Raises:
        InvalidImageRefError: not a local file URI, outside the roots, unreadable, wrong hash.
    """
    location = check_location(ref, roots, objects=objects)
    at = Where(image=ref.index)
    try:
        # The guarded reader: allowed roots, regular files only, a bounded size, no hash leak.
        return read_verified(location, ref.mm_hash if verify else None, at, allowed_roots=roots)
    except MMOffloadError as exc:
        if roots is not None or isinstance(location, str):
            raise InvalidImageRefError(3, exc.message, ref.index) from exc
        expected = f" with content hash `{ref.mm_hash}`" if verify else ""
        message = (
            f"Expected a readable regular file of at most {max_image_bytes():,} bytes{expected} at "
            f"`{ref.uri[:200]}` (the server names the failure only for files under its allowed roots)"
        )
        raise InvalidImageRefError(3, message, ref.index) from None


def load_image(ref: ImageRef, roots: AllowedRoots = None) -> Image.Image:
    """Run checks 3 and 4: read the file a ref names, verify its hash, decode it to RGB.

    Args:
        ref: the parsed image.
        roots: allowed directories; the file must lie under one of them (None: anywhere).

    Raises:
        InvalidImageRefError: not a local file URI, outside the roots, unreadable, wrong hash, no image.
    """
    data = read_image(ref, roots)
    at = Where(image=ref.index)
    try:
        with open_image(data, ref.uri, at) as image:
            return load_rgb(image, ref.uri, at)
    except BadInputError as exc:
        raise InvalidImageRefError(4, exc.message, ref.index) from exc


def check_grid(ref: ImageRef, grid: Grid) -> None:
    """Run check 5: the family's grid from the image size equals the descriptor's.

    Raises:
        InvalidImageRefError: the grids differ.
    """
    if tuple(grid) != ref.grid:
        raise InvalidImageRefError(
            5, f"Expected the descriptor's grid {list(ref.grid)} for this image, got {list(grid)}", ref.index
        )


def check_placeholder(ref: ImageRef, token_ids: Sequence[int]) -> None:
    """Run check 6: the placeholder length is the grid's and those prompt tokens are image tokens.

    Raises:
        InvalidImageRefError: a wrong length, a span past the prompt, or a non-image token in it.
    """
    try:
        problem = ref.family.placeholder_problem(ref.grid, ref.length)
    except BadInputError as exc:
        raise InvalidImageRefError(6, exc.message, ref.index) from exc
    if problem:
        raise InvalidImageRefError(6, problem, ref.index)
    end = ref.offset + ref.length
    if end > len(token_ids):
        raise InvalidImageRefError(
            6,
            f"Expected placeholder within the {len(token_ids)} prompt tokens, got [{ref.offset}, {end})",
            ref.index,
        )
    image_tokens = {token for token, kind in ref.family.token_types.items() if kind == IMAGE_TYPE}
    for position in range(ref.offset, end):
        if token_ids[position] not in image_tokens:
            raise InvalidImageRefError(
                6,
                f"Expected image tokens {sorted(image_tokens)} in the placeholder, got {token_ids[position]} "
                f"at position {position}",
                ref.index,
            )


def check_placeholders(refs: Sequence[ImageRef], token_ids: Sequence[int]) -> None:
    """Run check 6 on every image, and check that the placeholders follow one another without overlap.

    Raises:
        InvalidImageRefError: the first image whose placeholder is wrong.
    """
    end = 0
    for ref in refs:
        if ref.offset < end:
            raise InvalidImageRefError(
                6,
                f"Expected the placeholder to start at or after {end}, where image {ref.index - 1}'s ends "
                f"(placeholders in image order, without overlap), got offset {ref.offset}",
                ref.index,
            )
        check_placeholder(ref, token_ids)
        end = ref.offset + ref.length


def materialize_ref(
    ref: ImageRef,
    make_inputs: Callable[[Family, Image.Image], EngineArrays],
    roots: AllowedRoots = None,
    budget: DecodeBudget | None = None,
) -> EngineArrays:
    """Run checks 3 to 5 and 7 on one image: read, verify, decode, check the grid, make engine inputs.

    Args:
        ref: the parsed image.
        make_inputs: the engine side's processing (check 7), given the family and the RGB image.
        roots: allowed directories for image files (None: anywhere).
        budget: bytes of images decoded at once (None: unbounded).

    Raises:
        InvalidImageRefError: the first failed check.
    """
    return materialize_bytes(ref, read_image(ref, roots), make_inputs, budget)


def image_size(ref: ImageRef, data: bytes) -> tuple[int, int]:
    """Return the (width, height) an image's header declares (check 4's pixel limit applies).

    Raises:
        InvalidImageRefError: (check 4) no image, or too many pixels.
    """
    try:
        with open_image(data, ref.uri, Where(image=ref.index)) as header:
            return header.size
    except BadInputError as exc:
        raise InvalidImageRefError(4, exc.message, ref.index) from exc


def materialize_bytes(
    ref: ImageRef,
    data: bytes,
    make_inputs: Callable[[Family, Image.Image], EngineArrays],
    budget: DecodeBudget | None = None,
) -> EngineArrays:
    """Run checks 4, 5 and 7 on an image's verified bytes: decode, check the grid, make engine inputs.

    The grid is checked from the image header, before any pixel is decoded; the
    decode and ``make_inputs`` then run holding the image's cost from ``budget``.

    Raises:
        InvalidImageRefError: the first failed check.
    """
    at = Where(image=ref.index)
    try:
        header = open_image(data, ref.uri, at)
    except BadInputError as exc:
        raise InvalidImageRefError(4, exc.message, ref.index) from exc
    with header:
        try:
            grid = ref.family.layout(*header.size)
        except BadInputError as exc:
            raise InvalidImageRefError(5, exc.message, ref.index) from exc
        check_grid(ref, grid)
        with budget.hold(decode_cost(*header.size)) if budget is not None else contextlib.nullcontext():
            try:
                image = load_rgb(header, ref.uri, at)
            except BadInputError as exc:
                raise InvalidImageRefError(4, exc.message, ref.index) from exc
            if image is not header:
                header.close()  # frees the decoded original while the processor runs on its RGB copy
            try:
                return make_inputs(ref.family, image)
            except InvalidImageRefError as exc:
                if exc.image is not None:
                    raise
                raise InvalidImageRefError(exc.check, exc.message, ref.index) from exc  # names the image
            finally:
                image.close()  # the pixels are freed before the budget is given back, not after

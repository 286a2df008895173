"""A sample's images: sidecars checked against family rules, files and hashes, and the token stream."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmoffload.contract.addresses import asset_location
from mmoffload.contract.descriptors import validate_sidecar
from mmoffload.contract.spans import IMAGE_TYPE
from mmoffload.contract.wire import MMImageRef
from mmoffload.errors import BadInputError, IntegrityError, Where
from mmoffload.refs.report import Context
from mmoffload.store.backend import asset_size
from mmoffload.store.read import check_allowed_location, read_verified


@dataclass(slots=True)
class Image:
    """One image of a node's sidecar, validated, with where it came from."""

    ref: MMImageRef
    family: str
    where: Where


def sidecar_images(sidecar: object, num_tokens: int, where: Where, context: Context) -> list[Image]:
    """Validate a sidecar against family rules and the image files; return its images."""
    if sidecar is None:
        return []
    images: list[Image] = []
    for index, image in enumerate(validate_sidecar(sidecar, num_tokens, where)):
        at = where.at(image=index)
        family_name = image.descriptor["family"]
        family = context.families.get(family_name, at)
        grid = family.grid(image.descriptor["payload"], at)
        if problem := family.placeholder_problem(grid, image.placeholder.length):
            raise BadInputError(problem, at)
        descriptor = image.descriptor
        uri = context.options.remap(descriptor["raw_image_uri"])
        if uri != descriptor["raw_image_uri"]:
            descriptor = {**descriptor, "raw_image_uri": uri}
        _check_file(asset_location(uri, at), image.hash, at, context)
        ref = MMImageRef(descriptor, image.hash, uri, image.placeholder.offset, image.placeholder.length)
        images.append(Image(ref, family_name, at))
    return images


def _check_file(path: Path | str, digest: str, where: Where, context: Context) -> None:
    """Check an image file (or object) once per run: it exists, and hashes to ``digest`` when verifying."""
    key = (path, digest if context.options.verify_hashes else None)
    if key not in context.checked_files:
        try:
            roots = context.options.allowed_roots
            if context.options.verify_hashes:
                read_verified(path, digest, allowed_roots=roots)
            elif isinstance(location := check_allowed_location(path, roots), str):
                _object_exists(location)
            elif not location.is_file():
                raise IntegrityError(f"Missing image file `{path}`")
            context.checked_files[key] = None
        except (BadInputError, IntegrityError) as exc:
            context.checked_files[key] = exc
    problem = context.checked_files[key]
    if problem is not None:
        raise type(problem)(problem.message, where)


def _object_exists(uri: str) -> None:
    """Check that an object-store image exists (its size is one HEAD request).

    Raises:
        IntegrityError: it does not, or cannot be reached.
    """
    try:
        asset_size(uri)
    except FileNotFoundError as exc:
        raise IntegrityError(f"Missing image file `{uri}`") from exc
    except OSError as exc:
        raise IntegrityError(f"Cannot read image file `{uri}`: {exc}") from exc


def image_end(images: list[Image], previous_end: int) -> int:
    return images[-1].ref.offset + images[-1].ref.length if images else previous_end


def check_no_image_tokens(tokens: list[int], where: Where, context: Context) -> None:
    """With a model given, a sample without images must hold none of its image tokens."""
    model = context.families.model()
    if model is None:
        return
    token_types = model.token_types
    image_tokens = [token for token, kind in token_types.items() if kind == IMAGE_TYPE]
    stray = np.flatnonzero(np.isin(np.asarray(tokens, dtype=np.int64), image_tokens))
    if len(stray):
        raise BadInputError(
            f"Expected no image tokens in a sample without images, got one at position {int(stray[0])}",
            where,
        )


def mm_kwargs_error(where: Where) -> BadInputError:
    return BadInputError(
        "Expected no `mm_kwargs` (processed tensors never enter trainer-bound files), got some", where
    )

"""The raw descriptor and the sidecar (contract.md sections 4 and 5).

``descriptor_problems`` lists what keeps a descriptor from being strict (audit
counts them); ``validate_descriptor`` and ``validate_sidecar`` raise on the
first (the refs stage stops or rejects the record).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mmoffload.contract.addresses import is_local_file_uri, is_object_uri
from mmoffload.contract.spans import order_problem
from mmoffload.errors import BadInputError, PathPart, Where, json_path

DESCRIPTOR_KIND = "prime_raw_mm_item"
FAMILY_NAME = re.compile(r"[A-Za-z0-9_.-]+")
PROCESSED_KEYS = frozenset({"pixel_values", "image_embeds", "image_features"})
OPTIONAL_KEYS = frozenset({"modality", "version", "layout_fingerprint", "vllm_modality"})
HASH_PATTERN = re.compile(r"[0-9a-f]{32}")


def processed_payloads(value: object, path: tuple[PathPart, ...] = ()) -> Iterator[str]:
    """Yield a description of each processed payload inside ``value``, with its JSON path.

    Processed means a ``pixel_values``/``image_embeds``/``image_features`` key, binary
    data, or a numpy-style ``{"__nd__": ...}`` array, at any depth.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        yield f"binary value at `{json_path(path)}`"
    elif isinstance(value, dict):
        for key, child in value.items():
            if key in PROCESSED_KEYS:
                yield f"processed key `{key}` at `{json_path((*path, key))}`"
            elif key == "__nd__":
                yield f"array value at `{json_path(path)}`"
            else:
                yield from processed_payloads(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from processed_payloads(child, (*path, index))
    elif hasattr(value, "__array__"):
        yield f"array value at `{json_path(path)}`"


def descriptor_uri(descriptor: dict[str, Any]) -> object:
    """Return the descriptor's image URI, accepting the older ``raw_uri`` synonym."""
    return descriptor.get("raw_image_uri", descriptor.get("raw_uri"))


def descriptor_problems(descriptor: object) -> list[str]:
    """Return every reason ``descriptor`` is not a strict ``prime_raw_mm_item`` (empty: strict)."""
    if not isinstance(descriptor, dict):
        return [f"Expected a descriptor object, got `{type(descriptor).__name__}`"]
    problems: list[str] = []
    if descriptor.get("kind") != DESCRIPTOR_KIND:
        problems.append(f"Expected `kind` == `{DESCRIPTOR_KIND}`, got `{descriptor.get('kind')!r}`")
    family = descriptor.get("family")
    if not isinstance(family, str) or not FAMILY_NAME.fullmatch(family):
        problems.append(f"Expected `family` as a name of [A-Za-z0-9_.-], got `{family!r}`")
    uri = descriptor_uri(descriptor)
    # Object-store URLs are this project's extension for runs without a shared FS (docs/scale.md).
    if not isinstance(uri, str) or not (is_local_file_uri(uri) or is_object_uri(uri)):
        shown = uri[:60] + "..." if isinstance(uri, str) and len(uri) > 60 else uri
        problems.append(f"Expected `raw_image_uri` as a local `file://` URI, got `{shown!r}`")
    if "raw_image_data" in descriptor:
        problems.append("Expected no inline `raw_image_data` (offload the image first)")
    if not isinstance(descriptor.get("payload"), dict):
        problems.append(f"Expected `payload` as an object, got `{descriptor.get('payload')!r}`")
    problems.extend(
        f"Expected no processed payload, found {found}" for found in processed_payloads(descriptor)
    )
    return problems


def validate_descriptor(descriptor: object, where: Where | None = None) -> dict[str, Any]:
    """Return ``descriptor`` normalised to ``raw_image_uri``, if it is strict.

    Raises:
        BadInputError: the first reason it is not strict.
    """
    problems = descriptor_problems(descriptor)
    if problems:
        raise BadInputError(problems[0], where)
    assert isinstance(descriptor, dict)
    if "raw_image_uri" not in descriptor:
        descriptor = {**descriptor, "raw_image_uri": descriptor["raw_uri"]}
        del descriptor["raw_uri"]
    return descriptor


@dataclass(frozen=True, slots=True)
class Placeholder:
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class SidecarImage:
    """One image of a sidecar: item i, hash i and placeholder i."""

    descriptor: dict[str, Any]
    hash: str
    placeholder: Placeholder


def sidecar_lists(sidecar: object, where: Where | None = None) -> tuple[list[Any], list[Any], list[Any]]:
    """Return the image item, hash and placeholder lists of a ``multi_modal_data`` sidecar.

    Raises:
        BadInputError: not an object, a list that is not a list, or another modality with items.
    """
    if not isinstance(sidecar, dict):
        raise BadInputError(
            f"Expected `multi_modal_data` as an object, got `{type(sidecar).__name__}`", where
        )
    lists: list[list[Any]] = []
    for key in ("mm_items", "mm_hashes", "mm_placeholders"):
        by_modality = sidecar.get(key) or {}
        if not isinstance(by_modality, dict):
            raise BadInputError(f"Expected `{key}` as an object keyed by modality", where)
        for modality, items in by_modality.items():
            if modality != "image" and items:
                raise BadInputError(f"Unsupported modality `{modality}` in `{key}` (only `image`)", where)
        images = by_modality.get("image") or []
        if not isinstance(images, list):
            raise BadInputError(f"Expected `{key}.image` as a list", where)
        lists.append(images)
    return lists[0], lists[1], lists[2]


def validate_sidecar(sidecar: object, num_tokens: int, where: Where | None = None) -> list[SidecarImage]:
    """Validate a sample's merged sidecar and return its images in token order.

    Checks equal list lengths, strict descriptors, hash syntax, and placeholders
    that are integers in order, non-overlapping and within ``num_tokens``.
    Family rules (placeholder length) are the caller's: see ``mmoffload.refs``.

    Raises:
        BadInputError: the first problem, naming the image index.
    """
    items, hashes, placeholders = sidecar_lists(sidecar, where)
    if not len(items) == len(hashes) == len(placeholders):
        raise BadInputError(
            f"Expected equal image list lengths, got {len(items)} items, {len(hashes)} hashes, "
            f"{len(placeholders)} placeholders",
            where,
        )
    images: list[SidecarImage] = []
    previous_end = 0
    for index, (item, digest, raw) in enumerate(zip(items, hashes, placeholders, strict=True)):
        at = where.at(image=index) if where else Where(image=index)
        descriptor = validate_descriptor(item, at)
        if not isinstance(digest, str) or not HASH_PATTERN.fullmatch(digest):
            raise BadInputError(
                f"Expected `mm_hashes` entry as 32 lowercase hex digits, got `{digest!r}`", at
            )
        placeholder = _placeholder(raw, at)
        if problem := order_problem(placeholder.offset, previous_end):
            raise BadInputError(problem, at)
        if placeholder.end > num_tokens:
            raise BadInputError(
                f"Expected placeholder within the {num_tokens} tokens, got "
                f"[{placeholder.offset}, {placeholder.end})",
                at,
            )
        previous_end = placeholder.end
        images.append(SidecarImage(descriptor, digest, placeholder))
    return images


def _placeholder(raw: object, where: Where) -> Placeholder:
    if not isinstance(raw, dict):
        raise BadInputError(f"Expected placeholder as {{offset, length}}, got `{raw!r}`", where)
    offset, length = raw.get("offset"), raw.get("length")
    if type(offset) is not int or offset < 0:
        raise BadInputError(f"Expected placeholder `offset` as an int >= 0, got `{offset!r}`", where)
    if type(length) is not int or length <= 0:
        raise BadInputError(f"Expected placeholder `length` as an int > 0, got `{length!r}`", where)
    return Placeholder(offset, length)

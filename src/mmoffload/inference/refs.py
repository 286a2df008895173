"""Raw image refs for the inference server (inference.md sections 1 to 3).

A rollout worker sends vLLM's ``/inference/v1/generate`` request with every
image as an ``mmraw:`` ref string in ``features.kwargs_data``; the server
checks each ref here, in the spec's order, before the engine sees anything.
vLLM checks none of this itself: a wrong placeholder length is accepted
silently or kills the engine, and it trusts ``mm_hash`` as the identity of
cached pixels. No vLLM import here: rollout workers use this module too.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmoffload.contract.descriptors import (
    DESCRIPTOR_KIND,
    HASH_PATTERN,
    validate_descriptor,
    validate_sidecar,
)
from mmoffload.errors import BadInputError, Where
from mmoffload.families import Families, Family, Grid

# The route both the server and the client speak (vLLM's scale-out endpoint).
GENERATE_ROUTE = "/inference/v1/generate"


REF_PREFIX = "mmraw:"


MODALITY = "image"


# The fields every ref carries (section 1); any other key (fingerprint, run_id...) is carried through.
# A full ref (the spec's, for other readers) also writes `family`, `modality` and `mm_hash`; a compact
# one leaves them to the server: its model's family, the key of `features`, the outer `mm_hashes` entry.
REF_FIELDS = ("payload", "raw_image_uri")


FEATURE_KEYS = ("mm_hashes", "mm_placeholders", "kwargs_data")


ERROR_TYPE = "invalid_mm_image_ref"


# vLLM's error type for a request it refuses as a whole (the prompt is too long).
PROMPT_ERROR_TYPE = "BadRequestError"


EngineArrays = dict[str, np.ndarray]


class InvalidImageRefError(BadInputError):
    """A request's image ref fails a check of inference.md section 3.

    ``check`` is the number of the failed check (1 to 7), ``image`` the image
    index where one is known; the server answers HTTP 400 ``invalid_mm_image_ref``.
    """

    def __init__(self, check: int, message: str, image: int | None = None) -> None:
        self.check = check
        self.image = image
        super().__init__(message, Where(image=image) if image is not None else None)


class PromptRefusedError(BadInputError):
    """The request as a whole is one the engine refuses (its prompt is too long); HTTP 400."""


@dataclass(frozen=True, slots=True)
class PromptLimits:
    """The engine's own limits, checked before any image is read (vLLM checks them only after).

    Attributes:
        max_model_len: vLLM's ``--max-model-len``: a prompt of this many tokens or more is refused.
        max_images: vLLM's ``--limit-mm-per-prompt`` for images.
    """

    max_model_len: int | None = None
    max_images: int | None = None


def encode_ref(descriptor: dict[str, Any], mm_hash: str, *, compact: bool = False) -> str:
    """Return the ``mmraw:`` ref of a strict descriptor and its content hash.

    Args:
        descriptor: the image's strict descriptor.
        mm_hash: its content hash.
        compact: write only what the server cannot derive (the grid and the URI), as readable
            JSON (``mmraw:{...}``, the spec's unwrapped form); ``mmoffload serve`` reads it.
            Otherwise the spec's full ref (every field, base64), which any reader takes.

    Raises:
        BadInputError: the descriptor is not strict or the hash is not 32 hex digits.
    """
    descriptor = validate_descriptor(descriptor)
    if not HASH_PATTERN.fullmatch(mm_hash):
        raise BadInputError(f"Expected `mm_hash` as 32 lowercase hex digits, got `{mm_hash!r}`")
    if compact:
        fields = {key: descriptor[key] for key in REF_FIELDS}
        return REF_PREFIX + json.dumps(fields, separators=(",", ":"), sort_keys=True)
    fields = {key: value for key, value in descriptor.items() if key != "kind"}
    fields.setdefault("modality", MODALITY)
    fields["mm_hash"] = mm_hash
    text = json.dumps(fields, separators=(",", ":"), sort_keys=True)
    return REF_PREFIX + base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_ref(ref: str, image: int | None = None) -> dict[str, Any]:
    """Return the fields of an ``mmraw:`` ref, base64 or unwrapped JSON.

    Raises:
        InvalidImageRefError: (check 2) the ref does not parse or lacks a field.
    """
    body = ref.removeprefix(REF_PREFIX)
    try:
        if body.startswith("{"):
            fields = json.loads(body)
        else:
            fields = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, binascii.Error) as exc:
        raise InvalidImageRefError(2, f"Expected an `mmraw:` ref of base64 JSON, got: {exc}", image) from exc
    except RecursionError as exc:
        raise InvalidImageRefError(
            2, "Expected an `mmraw:` ref of a flat JSON object, got JSON nested too deeply to parse", image
        ) from exc
    if not isinstance(fields, dict):
        raise InvalidImageRefError(
            2, f"Expected an `mmraw:` ref of a JSON object, got `{fields!r}`"[:200], image
        )
    missing = [key for key in REF_FIELDS if key not in fields]
    if missing:
        raise InvalidImageRefError(2, f"Expected ref fields {', '.join(missing)}, got none", image)
    return fields


def ref_descriptor(fields: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Return the raw descriptor and the ``mm_hash`` a full ref's fields carry (the inverse of ``encode_ref``)."""
    descriptor = {"kind": DESCRIPTOR_KIND, **{k: v for k, v in fields.items() if k != "mm_hash"}}
    return descriptor, fields["mm_hash"]


def features_from_sidecars(
    sidecars: Sequence[object], num_tokens: int, where: Where | None = None, *, compact: bool = False
) -> dict[str, Any]:
    """Return a request's ``features`` from the sidecars of a prompt's nodes, in prompt order.

    Offsets are absolute in the prompt (as trace nodes carry them); one ref per image,
    compact or full (``encode_ref``).

    Raises:
        BadInputError: a sidecar is invalid (names the image index).
    """
    merged: dict[str, dict[str, list[Any]]] = {
        key: {MODALITY: []} for key in ("mm_items", "mm_hashes", "mm_placeholders")
    }
    for sidecar in sidecars:
        if sidecar is None:
            continue
        if not isinstance(sidecar, dict):
            raise BadInputError(
                f"Expected `multi_modal_data` as an object, got `{type(sidecar).__name__}`", where
            )
        for key, by_modality in merged.items():
            by_modality[MODALITY].extend(((sidecar.get(key) or {}).get(MODALITY)) or [])
    images = validate_sidecar(merged, num_tokens, where)
    return {
        "mm_hashes": {MODALITY: [image.hash for image in images]},
        "mm_placeholders": {
            MODALITY: [
                {"offset": image.placeholder.offset, "length": image.placeholder.length} for image in images
            ]
        },
        "kwargs_data": {
            MODALITY: [encode_ref(image.descriptor, image.hash, compact=compact) for image in images]
        },
    }


def features_from_node(node: dict[str, Any], num_tokens: int, where: Where | None = None) -> dict[str, Any]:
    """Return a request's ``features`` from one trace node's sidecar."""
    return features_from_sidecars([node.get("multi_modal_data")], num_tokens, where)


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One parsed image of a request: its ref fields, family, grid and placeholder span."""

    index: int
    mm_hash: str
    uri: str
    family: Family
    grid: Grid
    offset: int
    length: int

    def cache_key(self, model: str) -> tuple[str, str, int, str]:
        """The section-4 cache key: ``(mm_hash, family, placeholder length, model)``."""
        return (self.mm_hash, self.family.name, self.length, model)


def parse_features(features: object, families: Families, max_images: int | None = None) -> list[ImageRef]:
    """Run checks 1 and 2 on a request's ``features``; return its images in order.

    ``None`` features (a text-only request) give no images. ``max_images`` is the
    engine's per-prompt image limit (check 1).

    Raises:
        InvalidImageRefError: the first failed check, naming the image index.
    """
    if features is None:
        return []
    if not isinstance(features, dict):
        raise InvalidImageRefError(1, f"Expected `features` as an object, got `{type(features).__name__}`")
    lists: dict[str, list[Any]] = {}
    for key in FEATURE_KEYS:
        by_modality = features.get(key) or {}
        if not isinstance(by_modality, dict):
            raise InvalidImageRefError(1, f"Expected `features.{key}` as an object keyed by modality")
        others = sorted(modality for modality, items in by_modality.items() if modality != MODALITY and items)
        if others:
            raise InvalidImageRefError(
                1, f"Unsupported modality `{others[0]}` in `features.{key}` (only `image`)"
            )
        items = by_modality.get(MODALITY) or []
        if not isinstance(items, list):
            raise InvalidImageRefError(1, f"Expected `features.{key}.image` as a list")
        lists[key] = items
    hashes, placeholders, refs = lists["mm_hashes"], lists["mm_placeholders"], lists["kwargs_data"]
    if not len(refs) == len(placeholders) == len(hashes):
        raise InvalidImageRefError(
            1,
            f"Expected as many refs and placeholders as hashes ({len(hashes)}), got {len(refs)} refs and "
            f"{len(placeholders)} placeholders",
        )
    check_image_count(len(hashes), max_images)
    for index, ref in enumerate(refs):
        if not (isinstance(ref, str) and ref.startswith(REF_PREFIX)):
            found = "null" if ref is None else f"a processed item ({type(ref).__name__})"
            if isinstance(ref, str):
                found = f"`{ref[:40]}...`" if len(ref) > 40 else f"`{ref}`"
            raise InvalidImageRefError(
                1, f"Expected an `mmraw:` ref (raw refs only, every image of every turn), got {found}", index
            )
    return [
        _parse_image(index, ref, hashes[index], placeholders[index], families)
        for index, ref in enumerate(refs)
    ]


def check_image_count(count: int, max_images: int | None) -> None:
    """Check 1's per-prompt limit: at most ``max_images`` images (vLLM's ``--limit-mm-per-prompt``).

    Raises:
        InvalidImageRefError: more images than the limit.
    """
    if max_images is not None and count > max_images:
        raise InvalidImageRefError(
            1,
            f"At most {max_images} image(s) may be provided in one prompt (the server's "
            f"`--limit-mm-per-prompt`), got {count}",
        )


def _parse_image(
    index: int, ref: str, outer_hash: object, placeholder: object, families: Families
) -> ImageRef:
    fields = decode_ref(ref, index)
    # A compact ref leaves these to the server: the features' modality, the outer hash, the model's family.
    fields.setdefault("modality", MODALITY)
    fields.setdefault("mm_hash", outer_hash)
    if fields.setdefault("family", families.model_family) is None:
        raise InvalidImageRefError(
            2, "Expected the ref's `family`: the served model has no known image family to take", index
        )
    if fields["modality"] != MODALITY:
        raise InvalidImageRefError(2, f"Expected ref modality `image`, got `{fields['modality']!r}`", index)
    if fields["mm_hash"] != outer_hash:
        raise InvalidImageRefError(
            2,
            f"Expected the ref's `mm_hash` `{fields['mm_hash']}` to equal `mm_hashes[{index}]` `{outer_hash}`",
            index,
        )
    if not isinstance(outer_hash, str) or not HASH_PATTERN.fullmatch(outer_hash):
        raise InvalidImageRefError(
            2, f"Expected `mm_hash` as 32 lowercase hex digits, got `{outer_hash!r}`", index
        )
    at = Where(image=index)
    try:
        family = families.get(str(fields["family"]), at)
        grid = family.grid(fields["payload"], at)
    except BadInputError as exc:
        raise InvalidImageRefError(2, exc.message, index) from exc
    if not isinstance(placeholder, dict):
        raise InvalidImageRefError(
            2, f"Expected placeholder as {{offset, length}}, got `{placeholder!r}`", index
        )
    offset, length = placeholder.get("offset"), placeholder.get("length")
    if type(offset) is not int or offset < 0 or type(length) is not int or length <= 0:
        raise InvalidImageRefError(
            2, f"Expected placeholder offset >= 0 and length > 0 as ints, got {offset!r}, {length!r}", index
        )
    uri = fields["raw_image_uri"]
    if not isinstance(uri, str):
        raise InvalidImageRefError(
            3, f"Expected `raw_image_uri` as a local `file://` URI, got `{uri!r}`", index
        )
    return ImageRef(index, outer_hash, uri, family, grid, offset, length)

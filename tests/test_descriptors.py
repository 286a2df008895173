"""Descriptor strictness and sidecar rules (contract.md sections 4 and 5)."""

from __future__ import annotations

import pytest

from mmoffload.contract.descriptors import descriptor_problems, validate_descriptor, validate_sidecar
from mmoffload.errors import BadInputError, Where
from tests.builders import descriptor, sidecar

URI = "file:///run/assets/images/" + "b" * 32 + ".png"
HASH = "b" * 32


def test_a_strict_descriptor_has_no_problems() -> None:
    assert descriptor_problems(descriptor(URI, [1, 4, 4])) == []


def test_older_raw_uri_is_accepted_and_normalised() -> None:
    item = descriptor(URI, [1, 4, 4])
    item["raw_uri"] = item.pop("raw_image_uri")
    assert validate_descriptor(item)["raw_image_uri"] == URI
    assert "raw_uri" not in validate_descriptor(item)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"kind": "mm_item"}, "Expected `kind` == `prime_raw_mm_item`, got `'mm_item'`"),
        ({"family": "qwen vl"}, "Expected `family` as a name of [A-Za-z0-9_.-], got `'qwen vl'`"),
        (
            {"raw_image_uri": "data:image/png;base64,AAAA"},
            "Expected `raw_image_uri` as a local `file://` URI",
        ),
        ({"raw_image_uri": "file://host/x.png"}, "Expected `raw_image_uri` as a local `file://` URI"),
        ({"raw_image_uri": "https://x/y.png"}, "Expected `raw_image_uri` as a local `file://` URI"),
        ({"payload": [1, 2]}, "Expected `payload` as an object"),
        ({"raw_image_data": "data:image/png;base64,AAAA"}, "Expected no inline `raw_image_data`"),
    ],
)
def test_each_broken_field_is_named(change: dict, reason: str) -> None:
    problems = descriptor_problems({**descriptor(URI, [1, 4, 4]), **change})
    assert len(problems) == 1 and problems[0].startswith(reason)


@pytest.mark.parametrize(
    ("payload", "found"),
    [
        (
            {"image_grid_thw": [[1, 4, 4]], "pixel_values": [[0.1]]},
            "processed key `pixel_values` at `$.payload.pixel_values`",
        ),
        ({"deep": {"image_embeds": 1}}, "processed key `image_embeds` at `$.payload.deep.image_embeds`"),
        ({"x": [{"__nd__": True, "data": "..."}]}, "array value at `$.payload.x[0]`"),
        ({"x": b"\x00\x01"}, "binary value at `$.payload.x`"),
    ],
)
def test_processed_payloads_are_rejected_with_their_path(payload: dict, found: str) -> None:
    item = {**descriptor(URI, [1, 4, 4]), "payload": payload}
    with pytest.raises(BadInputError, match="processed payload") as error:
        validate_descriptor(item, Where(file="t.jsonl", line=3))
    assert found in str(error.value) and "`t.jsonl:3`" in str(error.value)


def test_sidecar_images_come_back_in_token_order() -> None:
    images = validate_sidecar(
        sidecar([(descriptor(URI, [1, 4, 4]), HASH, 2, 4), (descriptor(URI, [1, 4, 4]), HASH, 6, 4)]), 12
    )
    assert [(i.placeholder.offset, i.placeholder.end) for i in images] == [(2, 6), (6, 10)]


@pytest.mark.parametrize(
    ("images", "num_tokens", "message"),
    [
        (
            [(HASH, 4, 4), (HASH, 2, 4)],
            20,
            "Expected placeholders in token order without overlap, got offset 2 before the previous end 8",
        ),
        ([(HASH, 4, 4)], 6, r"Expected placeholder within the 6 tokens, got \[4, 8\)"),
        ([("B" * 32, 0, 4)], 6, "Expected `mm_hashes` entry as 32 lowercase hex digits"),
    ],
)
def test_sidecar_problems_name_the_image(images: list, num_tokens: int, message: str) -> None:
    data = sidecar([(descriptor(URI, [1, 4, 4]), h, o, n) for h, o, n in images])
    with pytest.raises(BadInputError, match=message) as error:
        validate_sidecar(data, num_tokens, Where(file="t.jsonl", line=1, trace="t0"))
    assert f"image {len(images) - 1}" in str(error.value) and "trace `t0`" in str(error.value)


def test_sidecar_list_length_mismatch_is_reported_with_all_three_counts() -> None:
    data = sidecar([(descriptor(URI, [1, 4, 4]), HASH, 0, 4)])
    data["mm_hashes"]["image"].append(HASH)
    with pytest.raises(BadInputError, match="got 1 items, 2 hashes, 1 placeholders"):
        validate_sidecar(data, 10)


def test_other_modalities_with_items_are_refused_by_name() -> None:
    data = sidecar([])
    data["mm_items"]["video"] = [{"kind": "prime_raw_mm_item"}]
    with pytest.raises(BadInputError, match="Unsupported modality `video` in `mm_items`"):
        validate_sidecar(data, 10)


@pytest.mark.parametrize(
    "placeholder", [{"offset": -1, "length": 4}, {"offset": 0, "length": 0}, {"offset": 1.0, "length": 4}]
)
def test_placeholder_fields_must_be_valid_ints(placeholder: dict) -> None:
    data = sidecar([(descriptor(URI, [1, 4, 4]), HASH, 0, 4)])
    data["mm_placeholders"]["image"] = [placeholder]
    with pytest.raises(BadInputError, match=r"Expected placeholder `(offset|length)`"):
        validate_sidecar(data, 10)

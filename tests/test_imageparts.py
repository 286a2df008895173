import base64

import pytest

from mmoffload.contract.imageparts import (
    ImageSource,
    decode_data_url,
    find_parts,
    iter_image_sources,
    rewrite_part,
    source_kind,
)
from mmoffload.errors import BadInputError, Where
from tests.builders import data_url, image_bytes

PNG = image_bytes()
URI = "file:///runs/r1/assets/images/0123456789abcdef0123456789abcdef.png"


def test_every_shape_is_found_anywhere_with_its_path():
    record = {
        "prompt": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}],
            }
        ],
        "completion": [{"role": "tool", "content": [{"type": "image_url", "image_url": URI}]}],
        "trace": {"nodes": [{"message": {"content": [{"type": "image", "image": "https://x.org/a.png"}]}}]},
        "responses": [{"type": "input_image", "image_url": URI}],
        "multi_modal_data": {
            "mm_items": {"image": [{"kind": "prime_raw_mm_item", "raw_image_data": "data:,"}]}
        },
        "older": {"kind": "prime_raw_mm_item", "raw_uri": URI},
    }
    assert list(iter_image_sources(record)) == [
        ImageSource(("prompt", 0, "content", 0, "image_url", "url"), "data:image/png;base64,AA", "data"),
        ImageSource(("completion", 0, "content", 0, "image_url"), URI, "file"),
        ImageSource(("trace", "nodes", 0, "message", "content", 0, "image"), "https://x.org/a.png", "remote"),
        ImageSource(("responses", 0, "image_url"), URI, "file"),
        ImageSource(("multi_modal_data", "mm_items", "image", 0, "raw_image_data"), "data:,", "data"),
        ImageSource(("older", "raw_uri"), URI, "file"),
    ]


def test_text_mentioning_images_is_no_image_part():
    record = {"content": [{"type": "text", "text": "data:image/png;base64,AA"}], "image": "cat.png"}
    assert list(iter_image_sources(record)) == []


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url"},
        {"type": "image_url", "image_url": {"uri": URI}},
        {"type": "image_url", "image_url": 7},
        {"type": "image"},
        {"type": "image", "image": {"url": URI}},
        {"type": "input_image", "file_id": "file-1"},
        {"kind": "prime_raw_mm_item", "raw_image_data": [1, 2]},
    ],
)
def test_an_image_part_of_unknown_shape_names_its_json_path(part):
    with pytest.raises(BadInputError, match="unknown shape") as caught:
        find_parts({"messages": [{"content": [part]}]}, Where(file="r.jsonl", line=3))
    assert "`r.jsonl:3` `$.messages[0].content[0]`" in str(caught.value)


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("data:image/png;base64,AA", "data"),
        ("DATA:image/png;base64,AA", "data"),
        ("file:///a.png", "file"),
        ("file://localhost/a.png", "file"),
        ("file://server/a.png", "remote"),
        ("https://x.org/a.png", "remote"),
        ("a.png", "remote"),
    ],
)
def test_sources_are_classified_by_scheme(source, kind):
    assert source_kind(source) == kind


def test_rewriting_the_openai_shape_keeps_sibling_keys_and_order():
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA", "detail": "high"}, "x": 1}
    (found,) = find_parts(part)
    assert rewrite_part(found, URI)
    assert list(part.items()) == [
        ("type", "image_url"),
        ("image_url", {"url": URI, "detail": "high"}),
        ("x", 1),
    ]
    assert list(part["image_url"]) == ["url", "detail"]


def test_rewriting_a_string_image_url_gives_the_canonical_dict():
    part = {"type": "image_url", "image_url": URI}
    (found,) = find_parts(part)
    assert rewrite_part(found, URI)
    assert part == {"type": "image_url", "image_url": {"url": URI}}


def test_rewriting_the_hf_shape_gives_the_openai_shape_in_place():
    part = {"cache": 1, "type": "image", "image": "data:image/png;base64,AA", "note": "n"}
    (found,) = find_parts(part)
    rewrite_part(found, URI)
    assert list(part.items()) == [
        ("cache", 1),
        ("type", "image_url"),
        ("image_url", {"url": URI}),
        ("note", "n"),
    ]


def test_rewriting_the_responses_shape_keeps_it():
    part = {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "auto"}
    (found,) = find_parts(part)
    rewrite_part(found, URI)
    assert part == {"type": "input_image", "image_url": URI, "detail": "auto"}


def test_rewriting_a_descriptor_replaces_raw_image_data_with_raw_image_uri_in_place():
    item = {"kind": "prime_raw_mm_item", "family": "qwen_vl", "raw_image_data": "data:,", "payload": {}}
    (found,) = find_parts(item)
    rewrite_part(found, URI)
    assert list(item.items()) == [
        ("kind", "prime_raw_mm_item"),
        ("family", "qwen_vl"),
        ("raw_image_uri", URI),
        ("payload", {}),
    ]


def test_a_part_already_pointing_at_its_uri_is_unchanged():
    part = {"type": "image_url", "image_url": {"url": URI}}
    (found,) = find_parts(part)
    assert not rewrite_part(found, URI)


def test_data_urls_decode_in_every_accepted_spelling():
    standard = base64.b64encode(PNG).decode()
    spellings = [
        f"data:image/png;base64,{standard}",
        f"data:IMAGE/PNG;BASE64,{standard}",
        f"data:image/png;name=a.png;base64,{standard}",
        f"data:image/png;base64,{base64.urlsafe_b64encode(PNG).decode()}",
        f"data:image/png;base64,{standard.rstrip('=')}",
        "data:image/png;base64," + "\n".join(standard[i : i + 76] for i in range(0, len(standard), 76)),
        f"data:image/png;base64, {standard[:10]} \r\n\t{standard[10:]}",
    ]
    for url in spellings:
        assert decode_data_url(url) == PNG, url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:image/png;base64,AAA*AAA=", "undecodable payload"),
        ("data:image/png;base64,A", "undecodable payload"),
        ("data:image/png;base64,AAAAé", "undecodable payload"),
        ("data:text/plain;base64,AAAA", "image media type"),
        ("data:image/svg+xml,<svg/>", "base64 data URL"),
        ("data:image/png", "Expected a data URL"),
    ],
)
def test_bad_data_urls_are_errors(url, message):
    with pytest.raises(BadInputError, match=message):
        decode_data_url(url, Where(file="r.jsonl", line=1))


def test_data_url_media_type_may_lie_about_the_format():
    jpeg = image_bytes(fmt="JPEG")
    assert decode_data_url(data_url(jpeg, "image/png")) == jpeg

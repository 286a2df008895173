"""Stock vLLM's ``content_parts`` requests, checked as raw refs are (inference.md section 6; no vLLM needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mmoffload.families import Families, Family
from mmoffload.families.pixel_cache import PixelCache
from mmoffload.inference.checks import materialize_bytes
from mmoffload.inference.content_parts import (
    CacheMissError,
    GridIndex,
    ImagePart,
    ResolvedParts,
    expand,
    parse_parts,
    resolve_parts,
)
from mmoffload.inference.refs import InvalidImageRefError, PromptLimits, PromptRefusedError
from tests.builders import (
    QWEN_IMAGE_PAD,
    QWEN_VISION_END,
    QWEN_VISION_START,
    data_url,
    image_bytes,
    store_image,
)

HASH = "0123456789abcdef0123456789abcdef"


def unnormalized(family: Family, image: Image.Image) -> dict[str, np.ndarray]:
    return family.engine_pixels([image], device_normalizes=True)


class Server:
    """The engine side's state for these requests: one cache, one grid index, counting reads."""

    def __init__(self, roots: list[Path | str] | None = None) -> None:
        self.family = Families().get("qwen_vl")
        self.cache = PixelCache()
        self.grids = GridIndex()
        self.roots = roots
        self.made = 0

    def make(self, family: Family, image: Image.Image) -> dict[str, np.ndarray]:
        self.made += 1
        return unnormalized(family, image)

    def resolve(self, parts: Any, token_ids: list[int], limits: PromptLimits | None = None) -> ResolvedParts:
        return resolve_parts(
            parts, token_ids, self.family, lambda ref, data: materialize_bytes(ref, data, self.make),
            cache=self.cache, grids=self.grids, model="m", limits=limits, roots=self.roots,
        )  # fmt: skip


def one_pad_prompt(images: int) -> list[int]:
    tokens = [1, 2]
    for _ in range(images):
        tokens += [QWEN_VISION_START, QWEN_IMAGE_PAD, QWEN_VISION_END, 3]
    return tokens


def refused(server: Server, parts: Any, tokens: list[int], kind: type = InvalidImageRefError) -> Any:
    with pytest.raises(kind) as info:
        server.resolve(parts, tokens)
    return info.value


def test_flat_and_nested_parts_parse_alike() -> None:
    parts = [
        {"type": "image_url", "url": "file:///a.png", "uuid": HASH},
        {"type": "image_url", "image_url": {"url": "file:///b.png"}},
        {"type": "image_url", "uuid": HASH},
    ]
    assert parse_parts(parts) == [
        ImagePart(0, "file:///a.png", HASH),
        ImagePart(1, "file:///b.png", None),
        ImagePart(2, None, HASH),
    ]


@pytest.mark.parametrize(
    ("part", "words"),
    [
        ({"type": "image_url", "url": "file:///a.png", "uuid": "my-image"}, "content hash (32 lowercase hex"),
        ({"type": "image_url"}, "got neither"),
        ({"type": "audio_url", "url": "file:///a.wav"}, "images only"),
        ("file:///a.png", "content part object"),
    ],
)
def test_malformed_parts_are_refused_naming_the_part(part: object, words: str) -> None:
    with pytest.raises(InvalidImageRefError) as info:
        parse_parts([{"type": "image_url", "uuid": HASH}, part])
    assert info.value.image == 1 and words in info.value.message


def test_expansion_repeats_each_pad_to_its_length_and_returns_offsets() -> None:
    tokens = [1, 9, 2, 9, 3]
    assert expand(tokens, [1, 3], [2, 3]) == ([1, 9, 9, 2, 9, 9, 9, 3], [1, 4])


def test_a_part_is_verified_expanded_and_then_served_by_uuid_alone(tmp_path: Path) -> None:
    server = Server([tmp_path])
    stored = store_image(tmp_path, image_bytes(seed=1))
    tokens = one_pad_prompt(1)
    first = server.resolve([{"type": "image_url", "url": stored.uri, "uuid": stored.hash}], tokens)
    grid = server.family.layout(64, 48)
    length = server.family.placeholder_length(grid)
    assert first.token_ids == [1, 2, QWEN_VISION_START] + [QWEN_IMAGE_PAD] * length + [QWEN_VISION_END, 3]
    assert first.features()["mm_placeholders"] == {"image": [{"offset": 3, "length": length}]}
    assert first.features()["mm_hashes"] == {"image": [stored.hash]}
    assert (server.made, first.cache_hits) == (1, 0)
    stored.path.unlink()  # a uuid alone is served from the verified cache, never read
    second = server.resolve([{"type": "image_url", "uuid": stored.hash}], tokens)
    assert second.token_ids == first.token_ids and second.arrays[0] is first.arrays[0]
    assert (server.made, second.cache_hits) == (1, 1)


def test_a_uuid_alone_never_seen_is_a_cache_miss(tmp_path: Path) -> None:
    error = refused(Server(), [{"type": "image_url", "uuid": HASH}], one_pad_prompt(1), CacheMissError)
    assert error.image == 0 and f"`{HASH}` in the server's verified cache" in error.message


def test_a_uuid_naming_other_content_is_refused(tmp_path: Path) -> None:
    stored = store_image(tmp_path, image_bytes(seed=2))
    parts = [{"type": "image_url", "url": stored.uri, "uuid": HASH}]
    error = refused(Server([tmp_path]), parts, one_pad_prompt(1))
    assert (error.check, error.image) == (3, 0) and "Content hash mismatch" in error.message


def test_a_data_url_is_hashed_and_checked_against_its_uuid() -> None:
    data = image_bytes(seed=3)
    server = Server()
    resolved = server.resolve([{"type": "image_url", "url": data_url(data)}], one_pad_prompt(1))
    assert len(resolved.refs) == 1 and server.made == 1
    error = refused(server, [{"type": "image_url", "url": data_url(data), "uuid": HASH}], one_pad_prompt(1))
    assert (error.check, error.image) == (3, 0) and f"expected `{HASH}`" in error.message


def test_pads_must_match_the_parts_one_to_one(tmp_path: Path) -> None:
    stored = store_image(tmp_path, image_bytes(seed=4))
    part = {"type": "image_url", "url": stored.uri, "uuid": stored.hash}
    error = refused(Server(), [part, part], one_pad_prompt(1))
    assert error.check == 1 and "per image part (2), got 1 pads" in error.message


def test_a_file_outside_the_roots_is_refused_before_any_read(tmp_path: Path) -> None:
    stored = store_image(tmp_path / "elsewhere", image_bytes(seed=5))
    server = Server([tmp_path / "assets"])
    error = refused(
        server, [{"type": "image_url", "url": stored.uri, "uuid": stored.hash}], one_pad_prompt(1)
    )
    assert (error.check, error.image) == (3, 0) and "outside the allowed roots" in error.message
    assert server.made == 0


def test_the_prompt_length_is_checked_before_and_after_expansion(tmp_path: Path) -> None:
    stored = store_image(tmp_path, image_bytes(seed=6))
    parts = [{"type": "image_url", "url": stored.uri, "uuid": stored.hash}]
    tokens = one_pad_prompt(1)
    server = Server()
    with pytest.raises(PromptRefusedError):
        server.resolve(parts, tokens, PromptLimits(max_model_len=len(tokens)))
    with pytest.raises(PromptRefusedError, match="with images expanded"):
        server.resolve(parts, tokens, PromptLimits(max_model_len=len(tokens) + 1))
    assert server.made == 0


def test_more_parts_than_the_per_prompt_limit_are_refused() -> None:
    parts = [{"type": "image_url", "uuid": HASH}] * 3
    with pytest.raises(InvalidImageRefError, match="At most 2 image"):
        Server().resolve(parts, one_pad_prompt(3), PromptLimits(max_images=2))


def test_a_uuid_alone_after_eviction_is_a_cache_miss_not_stale(tmp_path: Path) -> None:
    server = Server()
    server.cache = PixelCache(max_bytes=0)  # nothing is kept
    stored = store_image(tmp_path, image_bytes(seed=7))
    server.resolve([{"type": "image_url", "url": stored.uri, "uuid": stored.hash}], one_pad_prompt(1))
    refused(server, [{"type": "image_url", "uuid": stored.hash}], one_pad_prompt(1), CacheMissError)


@pytest.mark.parametrize(
    "url",
    [
        "s3://other-bucket/images/a.png",
        "s3://bucket/images-other/a.png",
        "s3://bucket/images/../secret/a.png",
        "s3://bucket/images//a.png",
        "gs://bucket/images/a.png",
    ],
)
def test_an_object_url_outside_the_allowed_prefixes_is_refused_before_any_read(url: str) -> None:
    # No S3 endpoint exists here: a read would fail otherwise, and no message would say "outside".
    server = Server([Path("/assets"), "s3://bucket/images"])
    error = refused(server, [{"type": "image_url", "url": url, "uuid": HASH}], one_pad_prompt(1))
    assert (error.check, error.image) == (3, 0) and "outside the allowed roots" in error.message
    assert server.made == 0


def test_an_object_prefix_allows_no_file(tmp_path: Path) -> None:
    stored = store_image(tmp_path, image_bytes(seed=8))
    server = Server([f"s3://bucket{tmp_path}"])
    error = refused(
        server, [{"type": "image_url", "url": stored.uri, "uuid": stored.hash}], one_pad_prompt(1)
    )
    assert (error.check, error.image) == (3, 0) and "outside the allowed roots" in error.message

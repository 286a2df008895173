"""The mmraw: ref codec, request features and the checks of inference.md section 3 (no vLLM needed)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mmoffload.contract.addresses import content_hash
from mmoffload.errors import BadInputError
from mmoffload.families import Families, Family, resolve_model_dir
from mmoffload.inference.checks import check_location, check_request, materialize_ref
from mmoffload.inference.decode_budget import DecodeBudget, decode_cost
from mmoffload.inference.refs import (
    InvalidImageRefError,
    PromptLimits,
    PromptRefusedError,
    decode_ref,
    encode_ref,
    features_from_node,
    features_from_sidecars,
    parse_features,
    ref_descriptor,
)
from tests.builders import (
    QWEN_IMAGE_PAD,
    QWEN_VISION_END,
    QWEN_VISION_START,
    descriptor,
    image_bytes,
    sidecar,
    store_image,
)

HASH = "0123456789abcdef0123456789abcdef"
URI = "file:///runs/r1/assets/images/0123456789abcdef0123456789abcdef.png"


def prompt(
    assets: Path, seeds: tuple[int, ...] = (0, 1), families: Families | None = None, compact: bool = False
) -> tuple[list[int], dict[str, Any]]:
    """Return a Qwen-VL prompt with one stored image per seed, and its request features."""
    family = (families or Families()).get("qwen_vl")
    tokens, images = [1, 2], []
    for seed in seeds:
        data = image_bytes(seed=seed)
        stored = store_image(assets, data)
        with Image.open(stored.path) as image:
            grid = family.layout(*image.size)
        length = family.placeholder_length(grid)
        tokens.append(QWEN_VISION_START)
        images.append((descriptor(stored.uri, list(grid)), stored.hash, len(tokens), length))
        tokens += [QWEN_IMAGE_PAD] * length + [QWEN_VISION_END, 3]
    return tokens, features_from_sidecars([sidecar(images)], len(tokens), compact=compact)


def unnormalized(family: Family, image: Image.Image) -> dict[str, np.ndarray]:
    return family.engine_pixels([image], device_normalizes=True)


def check(
    features: dict[str, Any],
    tokens: list[int],
    roots: list[Path] | None = None,
    limits: PromptLimits | None = None,
    reads: list[int] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Run every check on every image, as the server does, and return the engine arrays.

    ``reads`` collects the index of every image whose file is read.
    """
    refs = check_request(features, tokens, Families(), limits, roots)
    out = []
    for ref in refs:
        if reads is not None:
            reads.append(ref.index)
        out.append(materialize_ref(ref, unnormalized, roots))
    return out


def refused(
    features: dict[str, Any], tokens: list[int], roots: list[Path] | None = None
) -> InvalidImageRefError:
    with pytest.raises(InvalidImageRefError) as info:
        check(features, tokens, roots)
    return info.value


def test_ref_is_unpadded_urlsafe_base64_of_sorted_compact_json() -> None:
    ref = encode_ref(descriptor(URI, [1, 44, 80]), HASH)
    body = ref.removeprefix("mmraw:")
    assert ref.startswith("mmraw:") and "=" not in body
    expected = {
        "family": "qwen_vl",
        "mm_hash": HASH,
        "modality": "image",
        "payload": {"image_grid_thw": [[1, 44, 80]]},
        "raw_image_uri": URI,
    }
    assert base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode() == json.dumps(
        expected, separators=(",", ":"), sort_keys=True
    )


def test_descriptor_and_ref_convert_both_ways_with_extra_keys() -> None:
    item = {**descriptor(URI, [1, 44, 80]), "layout_fingerprint": "abc", "run_id": "r1", "fingerprint": "f"}
    back, digest = ref_descriptor(decode_ref(encode_ref(item, HASH)))
    assert (back, digest) == (item, HASH)


def test_unwrapped_json_ref_is_accepted() -> None:
    body = {"family": "qwen_vl", "modality": "image", "mm_hash": HASH, "payload": {}, "raw_image_uri": URI}
    fields = decode_ref("mmraw:" + json.dumps(body, separators=(",", ":")))
    assert fields["mm_hash"] == HASH and fields["raw_image_uri"] == URI


def test_a_compact_ref_is_readable_json_of_the_grid_and_uri_only() -> None:
    compact = encode_ref(descriptor(URI, [1, 44, 80]), HASH, compact=True)
    assert compact == 'mmraw:{"payload":{"image_grid_thw":[[1,44,80]]},"raw_image_uri":"' + URI + '"}'
    # Less than half the spec's full ref, also once escaped inside the request's JSON.
    full = encode_ref(descriptor(URI, [1, 44, 80]), HASH)
    assert len(json.dumps(compact)) < 0.5 * len(json.dumps(full))


def test_a_compact_ref_takes_family_modality_and_hash_from_the_server(tmp_path: Path) -> None:
    model = Families(resolve_model_dir("qwen3_vl"))  # a served Qwen-VL model
    tokens, compact = prompt(tmp_path, families=model, compact=True)
    _, full = prompt(tmp_path, families=model)
    assert check_request(compact, tokens, model) == check_request(full, tokens, model)
    # Without a served model there is no family to take: the ref must name it.
    error = refused(compact, tokens)
    assert (error.check, error.image) == (2, 0) and "family" in error.message


def test_encode_ref_refuses_a_processed_descriptor() -> None:
    with pytest.raises(BadInputError, match="pixel_values"):
        encode_ref({**descriptor(URI, [1, 4, 4]), "pixel_values": [1.0]}, HASH)


def test_features_from_a_trace_node_carry_one_ref_per_image_in_order(tmp_path: Path) -> None:
    tokens, features = prompt(tmp_path)
    node = {"token_ids": tokens, "multi_modal_data": None}
    images = [ref_descriptor(decode_ref(ref)) for ref in features["kwargs_data"]["image"]]
    node["multi_modal_data"] = {
        "mm_items": {"image": [d for d, _ in images]},
        "mm_hashes": {"image": [h for _, h in images]},
        "mm_placeholders": features["mm_placeholders"],
    }
    assert features_from_node(node, len(tokens)) == features
    assert features["mm_hashes"]["image"] == [h for _, h in images]


def test_good_request_passes_every_check(tmp_path: Path) -> None:
    tokens, features = prompt(tmp_path)
    arrays = check(features, tokens)
    family = Families().get("qwen_vl")
    assert [list(a["image_grid_thw"][0]) for a in arrays] == [
        d["payload"]["image_grid_thw"][0]
        for d, _ in (ref_descriptor(decode_ref(r)) for r in features["kwargs_data"]["image"])
    ]
    # Unnormalized pixels for a device-normalizing engine: the image's own 0-255 values.
    assert arrays[0]["pixel_values"].max() > 1.5 and arrays[0]["pixel_values"].min() >= 0.0
    assert family.pixels([Image.new("RGB", (64, 48))])["pixel_values"].min() < 0.0


def test_check_1_counts_must_equal_the_hashes(tmp_path: Path) -> None:
    tokens, features = prompt(tmp_path)
    features["kwargs_data"]["image"].pop()
    error = refused(features, tokens)
    assert error.check == 1 and "1 refs and 2 placeholders" in error.message


def test_check_1_only_image_modality(tmp_path: Path) -> None:
    tokens, features = prompt(tmp_path)
    features["mm_hashes"]["video"] = [HASH]
    assert "Unsupported modality `video`" in refused(features, tokens).message


@pytest.mark.parametrize(("item", "found"), [(None, "null"), ("AAAA", "`AAAA`")])
def test_check_1_every_item_a_raw_ref(tmp_path: Path, item: object, found: str) -> None:
    tokens, features = prompt(tmp_path)
    features["kwargs_data"]["image"][1] = item
    error = refused(features, tokens)
    assert (error.check, error.image) == (1, 1)
    assert f"got {found}" in error.message and "image 1" in str(error)


def test_check_2_ref_must_parse(tmp_path: Path) -> None:
    tokens, features = prompt(tmp_path)
    features["kwargs_data"]["image"][0] = "mmraw:!!not-base64!!"
    error = refused(features, tokens)
    assert (error.check, error.image) == (2, 0)


def test_check_2_ref_hash_must_equal_outer_hash(tmp_path: Path) -> None:
    tokens, features = prompt(tmp_path)
    features["mm_hashes"]["image"][0] = HASH
    error = refused(features, tokens)
    assert (error.check, error.image) == (2, 0) and "to equal `mm_hashes[0]`" in error.message


def test_check_2_ref_modality_must_match(tmp_path: Path) -> None:
    tokens, features = prompt(tmp_path)
    fields = decode_ref(features["kwargs_data"]["image"][1])
    features["kwargs_data"]["image"][1] = "mmraw:" + json.dumps({**fields, "modality": "video"})
    error = refused(features, tokens)
    assert (error.check, error.image) == (2, 1) and "modality" in error.message


def rewrite_ref(features: dict[str, Any], index: int, **changes: Any) -> None:
    descriptor_, digest = ref_descriptor(decode_ref(features["kwargs_data"]["image"][index]))
    digest = changes.pop("mm_hash", digest)
    descriptor_.update(changes)
    features["kwargs_data"]["image"][index] = encode_ref(descriptor_, digest)


def test_check_3_remote_uri_refused(tmp_path: Path) -> None:
    tokens, features = prompt(tmp_path)
    fields = decode_ref(features["kwargs_data"]["image"][0])
    features["kwargs_data"]["image"][0] = "mmraw:" + json.dumps(
        {**fields, "raw_image_uri": "https://x/a.png"}
    )
    error = refused(features, tokens)
    assert (error.check, error.image) == (3, 0) and "local `file://`" in error.message


def test_check_3_missing_file(tmp_path: Path) -> None:
    tokens, features = prompt(tmp_path)
    fields = decode_ref(features["kwargs_data"]["image"][1])
    Path(fields["raw_image_uri"].removeprefix("file://")).unlink()
    error = refused(features, tokens, roots=[tmp_path])
    assert (error.check, error.image) == (3, 1) and "Missing image file" in error.message


def test_check_3_tampered_file(tmp_path: Path) -> None:
    tokens, features = prompt(tmp_path)
    path = Path(decode_ref(features["kwargs_data"]["image"][0])["raw_image_uri"].removeprefix("file://"))
    path.write_bytes(image_bytes(seed=9))
    error = refused(features, tokens, roots=[tmp_path])
    assert (error.check, error.image) == (3, 0) and "Content hash mismatch" in error.message


def test_without_allowed_roots_every_read_failure_reads_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Else the answers tell a client which paths exist on the server, and how large they are.
    tokens, features = prompt(tmp_path, seeds=(0,))
    fields = decode_ref(features["kwargs_data"]["image"][0])
    data = Path(fields["raw_image_uri"].removeprefix("file://")).read_bytes()
    monkeypatch.setenv("MMOFFLOAD_MAX_IMAGE_BYTES", str(len(data) + 10))
    other = tmp_path / "other.png"
    other.write_bytes(image_bytes(seed=5))
    big = tmp_path / "big.png"
    big.write_bytes(image_bytes(300, 300, seed=6))
    messages = set()
    for target in (tmp_path / "gone.png", other, big, tmp_path, Path("/dev/zero")):
        rewrite_ref(features, 0, raw_image_uri=target.as_uri())
        error = refused(features, tokens)
        assert (error.check, error.image) == (3, 0)
        messages.add(error.message.replace(target.as_uri(), "URI"))
    assert messages == {
        f"Expected a readable regular file of at most {len(data) + 10:,} bytes with content hash "
        f"`{fields['mm_hash']}` at `URI` (the server names the failure only for files under its allowed roots)"
    }


def test_a_directory_inside_the_roots_is_refused_by_name(tmp_path: Path) -> None:
    tokens, features = prompt(tmp_path, seeds=(0,))
    rewrite_ref(features, 0, raw_image_uri=tmp_path.as_uri())
    error = refused(features, tokens, roots=[tmp_path])
    assert (error.check, error.image) == (3, 0) and "got a directory" in error.message


def test_check_3_file_outside_the_allowed_roots(tmp_path: Path) -> None:
    _, features = prompt(tmp_path / "assets")
    ref = parse_features(features, Families())[0]
    with pytest.raises(InvalidImageRefError, match="allowed roots"):
        materialize_ref(ref, unnormalized, roots=[tmp_path / "elsewhere"])
    assert materialize_ref(ref, unnormalized, roots=[tmp_path])["image_grid_thw"].shape == (1, 3)


def test_check_4_bytes_that_do_not_decode(tmp_path: Path) -> None:
    tokens, features = prompt(tmp_path)
    path = tmp_path / "broken.png"
    data = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    path.write_bytes(data)
    rewrite_ref(features, 0, raw_image_uri=path.as_uri(), mm_hash=content_hash(data))
    features["mm_hashes"]["image"][0] = content_hash(data)
    error = refused(features, tokens)
    assert (error.check, error.image) == (4, 0) and "decodable image" in error.message


def test_check_5_grid_mismatch(tmp_path: Path) -> None:
    tokens, features = prompt(tmp_path)
    # Height and width swapped: the placeholder length agrees (check 6), the image does not (check 5).
    grid = decode_ref(features["kwargs_data"]["image"][1])["payload"]["image_grid_thw"][0]
    swapped = [grid[0], grid[2], grid[1]]
    rewrite_ref(features, 1, payload={"image_grid_thw": [swapped]})
    error = refused(features, tokens)
    assert (error.check, error.image) == (5, 1) and f"descriptor's grid {swapped}" in error.message


def test_check_6_wrong_placeholder_length(tmp_path: Path) -> None:
    tokens, features = prompt(tmp_path)
    features["mm_placeholders"]["image"][0]["length"] -= 4
    error = refused(features, tokens)
    assert (error.check, error.image) == (6, 0) and "Expected placeholder length" in error.message


def test_check_6_placeholder_tokens_must_be_image_tokens(tmp_path: Path) -> None:
    tokens, features = prompt(tmp_path)
    offset = features["mm_placeholders"]["image"][1]["offset"]
    tokens[offset + 3] = 7
    error = refused(features, tokens)
    assert (error.check, error.image) == (6, 1) and f"got 7 at position {offset + 3}" in error.message


def test_checks_run_in_order_first_failure_wins(tmp_path: Path) -> None:
    tokens, features = prompt(tmp_path)
    features["mm_placeholders"]["image"][0]["length"] -= 4  # check 6
    features["kwargs_data"]["image"][1] = None  # check 1, reported first
    assert refused(features, tokens).check == 1


def test_checks_that_read_nothing_run_for_every_image_before_any_read(tmp_path: Path) -> None:
    tokens, features = prompt(tmp_path)
    Path(decode_ref(features["kwargs_data"]["image"][0])["raw_image_uri"].removeprefix("file://")).unlink()
    features["mm_placeholders"]["image"][1]["length"] -= 4
    reads: list[int] = []
    with pytest.raises(InvalidImageRefError) as info:
        check(features, tokens, reads=reads)
    assert (info.value.check, info.value.image, reads) == (6, 1, [])


def test_a_prompt_the_engine_refuses_for_length_reads_no_image(tmp_path: Path) -> None:
    tokens, features = prompt(tmp_path)
    reads: list[int] = []
    with pytest.raises(PromptRefusedError, match=f"maximum model length of {len(tokens)} tokens"):
        check(features, tokens, limits=PromptLimits(max_model_len=len(tokens)), reads=reads)
    assert reads == []
    assert len(check(features, tokens, limits=PromptLimits(max_model_len=len(tokens) + 1))) == 2


def test_more_images_than_the_per_prompt_limit_are_refused(tmp_path: Path) -> None:
    tokens, features = prompt(tmp_path, seeds=(0, 1, 2))
    with pytest.raises(InvalidImageRefError) as info:
        check(features, tokens, limits=PromptLimits(max_images=2))
    assert info.value.check == 1 and info.value.image is None
    assert "At most 2 image(s) may be provided in one prompt" in info.value.message
    assert "`--limit-mm-per-prompt`), got 3" in info.value.message


@pytest.mark.parametrize("shift", [0, 1])
def test_overlapping_or_identical_placeholders_name_the_later_image(tmp_path: Path, shift: int) -> None:
    tokens, features = prompt(tmp_path, seeds=(0, 0))
    first, second = features["mm_placeholders"]["image"]
    second["offset"] = first["offset"] + shift
    error = refused(features, tokens)
    end = first["offset"] + first["length"]
    assert (error.check, error.image) == (6, 1)
    assert f"start at or after {end}, where image 0's ends" in error.message
    assert f"got offset {first['offset'] + shift}" in error.message


def test_deeply_nested_json_in_an_unwrapped_ref_is_a_check_2_refusal(tmp_path: Path) -> None:
    tokens, features = prompt(tmp_path, seeds=(0,))
    features["kwargs_data"]["image"][0] = 'mmraw:{"payload":' + "[" * 100_000 + "]" * 100_000 + "}"
    error = refused(features, tokens)
    assert (error.check, error.image) == (2, 0) and "nested too deeply" in error.message


def test_an_outside_root_uri_is_refused_before_any_read(tmp_path: Path) -> None:
    # The same check runs on a cache hit, so the answer never depends on the cache.
    _, features = prompt(tmp_path / "assets", seeds=(0,))
    ref = parse_features(features, Families())[0]
    with pytest.raises(InvalidImageRefError, match="outside the allowed roots"):
        check_location(ref, [tmp_path / "elsewhere"])
    assert check_location(ref, [tmp_path]) == Path(ref.uri.removeprefix("file://"))
    fields = decode_ref(features["kwargs_data"]["image"][0])
    features["kwargs_data"]["image"][0] = "mmraw:" + json.dumps({**fields, "raw_image_uri": "http://x/a.png"})
    with pytest.raises(InvalidImageRefError, match="local `file://` URI"):
        check_location(parse_features(features, Families())[0], None)


def test_a_large_decode_holds_its_cost_from_the_budget(tmp_path: Path) -> None:
    _, features = prompt(tmp_path, seeds=(0,))
    ref = parse_features(features, Families())[0]
    budget = DecodeBudget(0)
    seen: list[int] = []

    def make(family: Family, image: Image.Image) -> dict[str, np.ndarray]:
        seen.append(budget.in_flight)
        return unnormalized(family, image)

    materialize_ref(ref, make, None, budget)
    width, height = Image.open(Path(ref.uri.removeprefix("file://"))).size
    assert seen == [decode_cost(width, height)] and budget.in_flight == 0 and budget.peak == seen[0]


def test_text_only_request_has_no_images() -> None:
    assert parse_features(None, Families()) == []


def test_an_object_url_is_allowed_under_an_object_prefix_only(tmp_path: Path) -> None:
    _, features = prompt(tmp_path, seeds=(0,))
    fields = decode_ref(features["kwargs_data"]["image"][0])
    features["kwargs_data"]["image"][0] = "mmraw:" + json.dumps({**fields, "raw_image_uri": "s3://b/p/a.png"})
    ref = parse_features(features, Families())[0]
    assert check_location(ref, ["s3://b/p"], objects=True) == "s3://b/p/a.png"
    assert check_location(ref, None, objects=True) == "s3://b/p/a.png"
    with pytest.raises(InvalidImageRefError, match="outside the allowed roots"):
        check_location(ref, [tmp_path], objects=True)
    with pytest.raises(InvalidImageRefError, match="local `file://` URI"):
        check_location(ref, ["s3://b/p"])  # raw refs name files only

"""Family layout, placeholder length, token types and model directories (families.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmoffload.errors import BadInputError, UsageError
from mmoffload.families import FAMILIES, Families, resolve_model_dir
from mmoffload.families.qwen_vl import smart_resize


def test_qwen3_vl_defaults_lay_out_a_1280x720_screenshot_as_880_tokens() -> None:
    qwen = Families().get("qwen_vl")
    assert qwen.layout(1280, 720) == (1, 44, 80)
    assert qwen.placeholder_length((1, 44, 80)) == 880


def test_bundled_qwen2_5_vl_config_uses_patch_14() -> None:
    qwen = Families(resolve_model_dir("qwen2_5_vl")).get("qwen_vl")
    assert qwen.layout(1280, 720) == (1, 52, 92)
    assert qwen.placeholder_length((1, 52, 92)) == 1196


def test_smart_resize_rounds_halves_to_even_and_respects_pixel_bounds() -> None:
    assert smart_resize(720, 1280, 32, 65536, 16777216) == (704, 1280)  # 22.5 -> 22
    assert smart_resize(10, 10, 28, 56 * 56, 10**7) == (56, 56)  # scaled up to min_pixels
    height, width = smart_resize(4000, 4000, 28, 3136, 1003520)
    assert height * width <= 1003520 and height % 28 == 0 and width % 28 == 0


def test_smart_resize_rejects_extreme_aspect_ratios() -> None:
    with pytest.raises(BadInputError, match="aspect ratio"):
        smart_resize(10, 2100, 28, 3136, 10**7)


def test_kimi_pads_to_the_merge_unit_and_keeps_one_placeholder_token() -> None:
    kimi = Families().get("kimi_k25")
    assert kimi.layout(1280, 720) == (1, 52, 92)  # 1280x720 -> padded 1288x728
    assert kimi.placeholder_length((1, 52, 92)) == 1


def test_kimi_scales_large_images_under_the_patch_budget() -> None:
    kimi = Families().get("kimi_k25")
    # scale = sqrt(16384 / (285 * 214)) = 0.5183 -> 2073x1554, padded to 2100x1568.
    assert kimi.resized_size(4000, 3000) == (2073, 1554)
    assert kimi.layout(4000, 3000) == (1, 112, 150)


def test_kimi_caps_each_side_at_the_side_limit() -> None:
    kimi = Families().get("kimi_k25")
    assert kimi.resized_size(20000, 100) == (7168, 35)


@pytest.mark.parametrize(
    ("family", "payload"),
    [
        ("qwen_vl", {"image_grid_thw": [[1, 44, 80]]}),
        ("qwen_vl", {"image_grid_thw": [1, 44, 80]}),
        ("kimi_k25", {"grid_thws": [[1, 52, 92]]}),
    ],
)
def test_payload_grids_are_read_in_both_accepted_shapes(family: str, payload: dict) -> None:
    assert Families().get(family).grid(payload) in {(1, 44, 80), (1, 52, 92)}


@pytest.mark.parametrize(
    "payload",
    [{}, {"image_grid_thw": [[1, 0, 4]]}, {"image_grid_thw": [1, 2]}, {"image_grid_thw": [[1, 2.0, 4]]}],
)
def test_malformed_qwen_payloads_are_rejected(payload: dict) -> None:
    with pytest.raises(BadInputError, match="image_grid_thw"):
        Families().get("qwen_vl").grid(payload)


def test_unknown_family_lists_the_known_ones() -> None:
    with pytest.raises(BadInputError, match="Unknown family `llava` \\(known: qwen_vl, kimi_k25\\)"):
        Families().get("llava")


def test_a_model_directory_configures_its_own_family_and_tokens(tmp_path: Path) -> None:
    config = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "patch_size": 14,
        "merge_size": 2,
        "max_pixels": 200_000,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    decoder = {"151655": {"content": "<|image_pad|>"}, "151656": {"content": "<|video_pad|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    families = Families(tmp_path)
    qwen = families.get("qwen_vl")
    _, h, w = qwen.layout(1280, 720)
    assert h * w * 14 * 14 <= 200_000
    assert qwen.token_types == {151655: 1, 151656: 2} and qwen.token_types_from_tokenizer
    assert not families.get("kimi_k25").token_types_from_tokenizer


def test_a_tokenizer_json_alone_names_the_tokens_through_the_tokenizers_package(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers", reason="the materialize extra")
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "Qwen2VLImageProcessor"})
    )
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0}, merges=[]))
    tokenizer.add_special_tokens(["<|image_pad|>", "<|video_pad|>"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))

    qwen = Families(tmp_path).get("qwen_vl")

    assert qwen.token_types == {1: 1, 2: 2} and qwen.token_types_from_tokenizer


def test_a_tokenizer_config_listing_the_tokens_is_read_without_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "Qwen2VLImageProcessor"})
    )
    decoder = {"7": {"content": "<|image_pad|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    (tmp_path / "tokenizer.json").write_text("{not read")

    assert Families(tmp_path).get("qwen_vl").token_types == {7: 1}


def test_a_model_directory_no_family_owns_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "CLIPImageProcessor"})
    )
    with pytest.raises(UsageError, match="No known family owns"):
        Families(tmp_path)


def test_unknown_bundled_config_lists_the_bundled_names() -> None:
    with pytest.raises(UsageError, match="kimi_k25, qwen2_5_vl, qwen3_vl"):
        resolve_model_dir("llava")


def test_every_registered_family_is_named_as_registered() -> None:
    assert all(cls.name == name for name, cls in FAMILIES.items())

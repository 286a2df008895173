"""The committed fixtures: reproducible, and true to the contract they exercise."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mmoffload.contract.addresses import content_hash, sniff_extension
from mmoffload.contract.spans import span_problems, type_ids_from_tokens
from mmoffload.families import Families

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
TRACE_FILES = {
    "qwen_vl": FIXTURES / "traces" / "qwen_vl.jsonl",
    "kimi_k25": FIXTURES / "traces" / "kimi_k25.jsonl",
}
SPECIAL_ID_FLOOR = {"qwen_vl": 151643, "kimi_k25": 163584}
SMOKE_SEQ_LEN = 4096


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def decode_data_url(url: str) -> bytes:
    header, _, payload = url.partition(",")
    assert header.startswith("data:image/") and header.endswith(";base64")
    return base64.b64decode(payload, validate=True)


def image_nodes(trace: dict[str, Any]) -> Iterator[dict[str, Any]]:
    return (node for node in trace["nodes"] if "multi_modal_data" in node)


def branch_tokens(trace: dict[str, Any]) -> list[int]:
    return [token for node in trace["nodes"] for token in node["token_ids"]]


def sidecar_images(trace: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str, dict[str, int]]]:
    """Yield (descriptor, hash, placeholder) for every image of a trace, in path order."""
    for node in image_nodes(trace):
        sidecar = node["multi_modal_data"]
        yield from zip(
            sidecar["mm_items"]["image"],
            sidecar["mm_hashes"]["image"],
            sidecar["mm_placeholders"]["image"],
            strict=True,
        )


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fixtures")
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_fixtures.py"), str(out)], check=True)
    return out


def test_the_generator_reproduces_the_committed_fixtures_byte_for_byte(regenerated: Path) -> None:
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    regenerated_manifest = json.loads((regenerated / "manifest.json").read_text())
    if regenerated_manifest["libraries"] != manifest["libraries"]:
        pytest.skip(f"image encoders differ from the committing ones: {manifest['libraries']}")
    committed = sorted(p.relative_to(FIXTURES) for p in FIXTURES.rglob("*") if p.is_file())
    produced = sorted(p.relative_to(regenerated) for p in regenerated.rglob("*") if p.is_file())
    assert produced == committed
    for path in committed:
        assert (regenerated / path).read_bytes() == (FIXTURES / path).read_bytes(), path


def test_the_manifest_lists_every_fixture_file_with_its_digest() -> None:
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    files = {str(p.relative_to(FIXTURES)) for p in FIXTURES.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    assert sum(entry["bytes"] for entry in manifest["files"].values()) < 3_200_000


def test_every_image_decodes_and_sniffs_to_its_extension() -> None:
    images = sorted((FIXTURES / "images").iterdir())
    assert len(images) >= 10
    for path in images:
        data = path.read_bytes()
        assert sniff_extension(data) == path.suffix, path.name
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert image.format == {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP"}[path.suffix]


def test_images_come_in_png_jpeg_and_webp_and_in_screen_sizes() -> None:
    sizes: dict[str, set[tuple[int, int]]] = {}
    for path in (FIXTURES / "images").iterdir():
        with Image.open(path) as image:
            sizes.setdefault(path.suffix, set()).add(image.size)
    assert set(sizes) == {".png", ".jpg", ".webp"}
    every = set().union(*sizes.values())
    assert {(1280, 720), (1024, 768), (800, 600), (390, 844)} <= every


def test_rollouts_carry_every_image_part_shape_of_the_contract() -> None:
    def shapes(value: Any) -> Iterator[str]:
        if isinstance(value, dict):
            if value.get("type") == "image_url":
                yield "image_url dict" if isinstance(value["image_url"], dict) else "image_url string"
            elif value.get("type") in ("image", "input_image"):
                yield value["type"]
            for child in value.values():
                yield from shapes(child)
        elif isinstance(value, list):
            for child in value:
                yield from shapes(child)

    records = read_jsonl(FIXTURES / "rollouts" / "mini_browse.jsonl")
    found = {shape for record in records for shape in shapes(record)}
    assert found == {"image_url dict", "image_url string", "image", "input_image"}
    tool_images = [
        shape
        for record in records
        for message in record["completion"]
        if message["role"] == "tool"
        for shape in shapes(message)
    ]
    assert len(tool_images) == 8
    assert all(len(list(shapes(record))) == 3 for record in records)


def test_traces_carry_raw_descriptors_with_inline_image_data() -> None:
    for family, path in TRACE_FILES.items():
        for episode in read_jsonl(path):
            for descriptor, _, _ in sidecar_images(episode["traces"][0]):
                assert descriptor["kind"] == "prime_raw_mm_item"
                assert descriptor["family"] == family
                assert descriptor["raw_image_data"].startswith("data:image/")


def test_there_are_four_single_branch_episodes_of_three_images_each() -> None:
    for path in TRACE_FILES.values():
        episodes = read_jsonl(path)
        assert len(episodes) == 4
        for episode in episodes:
            assert episode["env"] == {"id": "mini-browse"}
            [trace] = episode["traces"]
            parents = [node["parent"] for node in trace["nodes"]]
            assert parents == [None, *range(len(parents) - 1)]
            assert trace["agent"]["trainable"] is True
            assert len(list(sidecar_images(trace))) == 3


def test_rollouts_and_traces_share_the_start_page_so_dedup_has_work() -> None:
    for path in TRACE_FILES.values():
        hashes = [h for episode in read_jsonl(path) for _, h, _ in sidecar_images(episode["traces"][0])]
        assert len(hashes) == 12
        assert len(set(hashes)) == 9
        assert len({hashes[0], hashes[3], hashes[6], hashes[9]}) == 1


def test_each_sidecar_hash_is_the_content_hash_of_its_inline_image() -> None:
    committed = {content_hash(p.read_bytes()) for p in (FIXTURES / "images").iterdir()}
    for path in TRACE_FILES.values():
        for episode in read_jsonl(path):
            for descriptor, image_hash, _ in sidecar_images(episode["traces"][0]):
                assert content_hash(decode_data_url(descriptor["raw_image_data"])) == image_hash
                assert image_hash in committed


def test_each_image_node_message_shows_the_images_of_its_sidecar() -> None:
    for path in TRACE_FILES.values():
        for episode in read_jsonl(path):
            for node in image_nodes(episode["traces"][0]):
                urls = [
                    source
                    for part in node["message"]["content"]
                    if part["type"] != "text"
                    for source in [part.get("image_url") or part["image"]]
                ]
                urls = [url["url"] if isinstance(url, dict) else url for url in urls]
                items = node["multi_modal_data"]["mm_items"]["image"]
                assert urls == [item["raw_image_data"] for item in items]


def test_placeholder_lengths_follow_the_family_formula_for_the_image_size() -> None:
    families = Families()
    for name, path in TRACE_FILES.items():
        family = families.get(name)
        for episode in read_jsonl(path):
            for descriptor, _, placeholder in sidecar_images(episode["traces"][0]):
                with Image.open(io.BytesIO(decode_data_url(descriptor["raw_image_data"]))) as image:
                    grid = family.layout(*image.size)
                assert descriptor["payload"] == family.payload(grid)
                assert placeholder["length"] == family.placeholder_length(grid)


def test_a_1280x720_screenshot_takes_880_qwen3_vl_tokens() -> None:
    [episode, *_] = read_jsonl(TRACE_FILES["qwen_vl"])
    descriptor, _, placeholder = next(sidecar_images(episode["traces"][0]))
    assert descriptor["payload"] == {"image_grid_thw": [[1, 44, 80]]}
    assert placeholder["length"] == 880


def test_every_placeholder_span_is_image_pad_tokens_and_no_pad_lies_outside() -> None:
    families = Families()
    for name, path in TRACE_FILES.items():
        family = families.get(name)
        for episode in read_jsonl(path):
            trace = episode["traces"][0]
            spans = [(p["offset"], p["length"]) for _, _, p in sidecar_images(trace)]
            type_ids = type_ids_from_tokens(branch_tokens(trace), family.token_types)
            assert span_problems(type_ids, spans) == []


def test_kimi_images_are_wrapped_in_media_tokens_around_one_pad() -> None:
    image = [*b"image"]
    for episode in read_jsonl(TRACE_FILES["kimi_k25"]):
        trace = episode["traces"][0]
        tokens = branch_tokens(trace)
        for descriptor, _, placeholder in sidecar_images(trace):
            start = placeholder["offset"]
            assert tokens[start - 7 : start + 2] == [163602, *image, 163603, 163605, 163604]
            assert descriptor["vllm_modality"] == "vision_chunk"


def test_qwen_images_are_wrapped_in_vision_tokens() -> None:
    for episode in read_jsonl(TRACE_FILES["qwen_vl"]):
        trace = episode["traces"][0]
        tokens = branch_tokens(trace)
        for _, _, placeholder in sidecar_images(trace):
            start, end = placeholder["offset"], placeholder["offset"] + placeholder["length"]
            assert tokens[start - 1] == 151652
            assert set(tokens[start:end]) == {151655}
            assert tokens[end] == 151653


def test_text_tokens_stay_below_the_special_token_ids() -> None:
    for name, path in TRACE_FILES.items():
        for episode in read_jsonl(path):
            tokens = branch_tokens(episode["traces"][0])
            text = [token for token in tokens if token < SPECIAL_ID_FLOOR[name]]
            assert max(text) < 256
            assert bytes(text).decode("utf-8")


def test_logprobs_are_negative_and_one_per_sampled_token() -> None:
    for path in TRACE_FILES.values():
        for episode in read_jsonl(path):
            for node in episode["traces"][0]["nodes"]:
                assert len(node["mask"]) == len(node["token_ids"])
                assert len(node["logprobs"]) == sum(node["mask"])
                assert all(value < 0 for value in node["logprobs"])
                assert any(node["mask"]) == (node["message"]["role"] == "assistant")


def test_every_sample_fits_one_smoke_run_micro_batch() -> None:
    for path in TRACE_FILES.values():
        for episode in read_jsonl(path):
            assert len(branch_tokens(episode["traces"][0])) < SMOKE_SEQ_LEN - 500


def test_traces_form_two_grpo_groups_with_rewards_that_differ() -> None:
    def reward(value: Any) -> float:
        if isinstance(value, dict):
            return sum(entry["score"] * entry["weight"] for entry in value.values())
        return float(value)

    for path in TRACE_FILES.values():
        groups: dict[str, list[float]] = {}
        for episode in read_jsonl(path):
            trace = episode["traces"][0]
            groups.setdefault(trace["task"], []).append(reward(trace["rewards"]))
        assert [len(set(rewards)) for rewards in groups.values()] == [2, 2]
    qwen = [reward(e["traces"][0]["rewards"]) for e in read_jsonl(TRACE_FILES["qwen_vl"])]
    kimi = [reward(e["traces"][0]["rewards"]) for e in read_jsonl(TRACE_FILES["kimi_k25"])]
    rollouts = [r["reward"] for r in read_jsonl(FIXTURES / "rollouts" / "mini_browse.jsonl")]
    assert qwen == kimi == rollouts


@pytest.mark.parametrize(
    ("directory", "family", "token_types"),
    [("qwen3_vl", "qwen_vl", {151655: 1, 151656: 2}), ("kimi_k25", "kimi_k25", {163605: 1})],
)
def test_model_dirs_give_the_tokenizer_special_ids_offline(
    directory: str, family: str, token_types: dict[int, int]
) -> None:
    families = Families(FIXTURES / "models" / directory)
    assert families.model_family == family
    loaded = families.get(family)
    assert loaded.token_types_from_tokenizer
    assert loaded.token_types == token_types


def test_the_qwen_model_dir_loads_a_real_image_processor_that_agrees_on_the_grid() -> None:
    family = Families(FIXTURES / "models" / "qwen3_vl").get("qwen_vl")
    with Image.open(FIXTURES / "images" / "start_page.png") as image:
        pixels = family.pixels([image.convert("RGB")])
    assert pixels["image_grid_thw"].tolist() == [[1, 44, 80]]
    assert pixels["pixel_values"].shape == (1 * 44 * 80, 3 * 2 * 16 * 16)

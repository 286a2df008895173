"""``content_parts`` (inference.md section 6) on ``mmoffload serve`` beside stock vLLM (skipped without vLLM).

Two engines for the module, started together on the same tiny Qwen2-VL and the
same vLLM arguments: ``mmoffload serve`` and stock vLLM's own API server
(``--enable-scale-out --allowed-local-media-path``), both reading one asset directory.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mmoffload.families import Families
from mmoffload.inference.client import parse_completion
from mmoffload_cli.app import app
from tests.builders import QWEN_IMAGE_PAD, QWEN_VISION_END, QWEN_VISION_START, image_bytes, store_image
from tests.vllm_helpers import Server, running_servers

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

GREEDY = {"max_tokens": 4, "temperature": 0.0, "logprobs": 0}
VLLM_ARGS = ["--limit-mm-per-prompt", json.dumps({"image": 6, "video": 0})]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    ours, stock = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("stock")
    # Ours may also read stock's directory: one asset directory for both.
    # Images under this directory get pixels normalized twice on ours (the shims explain it).
    env = {"MMOFFLOAD_TEST_NORMALIZE_TWICE_DIR": str(stock / "normalized-twice")}
    specs = [(ours, ("--allow-root", str(stock)), VLLM_ARGS, env, False), (stock, (), VLLM_ARGS, None, True)]
    with running_servers(specs) as started:
        yield started[0], started[1]


@pytest.fixture(scope="module")
def assets(servers: tuple[Server, Server]) -> Path:
    # One directory both servers may read: under stock's allowed media path, and ours' allowed root.
    path = servers[1].assets
    path.mkdir(parents=True, exist_ok=True)
    return path


def parts_request(assets: Path, seeds: tuple[int, ...], uuid_only: tuple[int, ...] = ()) -> dict[str, Any]:
    """Return a content_parts request, one pad per image; images at ``uuid_only`` positions send no URL."""
    tokens, parts = [72, 105], []
    for position, seed in enumerate(seeds):
        stored = store_image(assets, image_bytes(200, 120, seed=seed))
        tokens += [QWEN_VISION_START, QWEN_IMAGE_PAD, QWEN_VISION_END, 32]
        part = {"type": "image_url", "uuid": stored.hash}
        if position not in uuid_only:
            part["url"] = stored.uri
        parts.append(part)
    return {"token_ids": tokens, "sampling_params": GREEDY, "content_parts": parts, "return_token_ids": True}


def answer(body: dict[str, Any]) -> tuple[list[int], list[float], list[int], Any]:
    completion = parse_completion(body)
    return completion.token_ids, completion.logprobs, body["prompt_token_ids"], body["mm_placeholders"]


@pytest.mark.parametrize("seeds", [(1,), (2, 3), (4, 5, 6)])
def test_content_parts_equal_stock_vllms_own_processing(
    servers: tuple[Server, Server], assets: Path, seeds: tuple[int, ...]
) -> None:
    ours, stock = servers
    body = parts_request(assets, seeds)
    status, mine = ours.post(body)
    assert status == 200, mine
    status, theirs = stock.post(body)
    assert status == 200, theirs
    assert answer(mine) == answer(theirs)


@pytest.mark.parametrize("seeds", [(30,), (31, 32)])
def test_raw_refs_equal_stock_vllms_own_processing(
    servers: tuple[Server, Server], assets: Path, seeds: tuple[int, ...]
) -> None:
    from tests.test_vllm_server import image_prompt

    ours, stock = servers
    status, mine = ours.post({**image_prompt(ours, seeds, assets=assets), "sampling_params": GREEDY})
    assert status == 200, mine
    status, theirs = stock.post(parts_request(assets, seeds))
    assert status == 200, theirs
    assert answer(mine)[:2] == answer(theirs)[:2]


def test_pixels_normalized_twice_would_change_the_logprobs(
    servers: tuple[Server, Server], assets: Path
) -> None:
    # The mismatch check 7 prevents: normalized pixels into an engine that normalizes on the device.
    # vLLM accepts them without an error; only the numbers change.
    from tests.test_vllm_server import image_prompt

    ours, stock = servers
    body = image_prompt(ours, (33,), assets=assets.parent / "normalized-twice")
    status, wrong = ours.post({**body, "sampling_params": GREEDY})
    assert status == 200, wrong
    status, right = stock.post(parts_request(assets, (33,)))
    assert status == 200, right
    wrong_logprobs, right_logprobs = answer(wrong)[1], answer(right)[1]
    assert max(abs(a - b) for a, b in zip(wrong_logprobs, right_logprobs, strict=True)) > 1e-3


def test_the_openai_nested_form_is_accepted(servers: tuple[Server, Server], assets: Path) -> None:
    ours, stock = servers
    body = parts_request(assets, (7,))
    nested = {
        **body,
        "content_parts": [{"type": "image_url", "image_url": {"url": body["content_parts"][0]["url"]}}],
    }
    status, mine = ours.post(nested)
    assert status == 200, mine
    assert answer(mine) == answer(stock.post(body)[1])


def test_a_uuid_alone_after_a_verified_read_is_served_from_the_cache(
    servers: tuple[Server, Server], assets: Path
) -> None:
    ours, stock = servers
    assert ours.post(parts_request(assets, (8,)))[0] == 200
    before = ours.get("/mmoffload/v1/stats")[1]
    status, mine = ours.post(parts_request(assets, (8, 9), uuid_only=(0,)))
    assert status == 200, mine
    after = ours.get("/mmoffload/v1/stats")[1]
    assert after["images_materialized"] - before["images_materialized"] == 1
    assert answer(mine) == answer(stock.post(parts_request(assets, (8, 9)))[1])


def test_a_uuid_with_other_content_is_refused(servers: tuple[Server, Server], assets: Path) -> None:
    ours, _ = servers
    body = parts_request(assets, (10, 11))
    body["content_parts"][1]["uuid"] = body["content_parts"][0]["uuid"]
    status, refusal = ours.post(body)
    assert status == 400 and refusal["error"]["type"] == "invalid_mm_image_ref", refusal
    assert (
        refusal["error"]["param"] == "content_parts[1]"
        and "Content hash mismatch" in refusal["error"]["message"]
    )


def test_a_uuid_alone_never_seen_is_a_cache_miss(servers: tuple[Server, Server], assets: Path) -> None:
    ours, _ = servers
    status, refusal = ours.post(parts_request(assets, (12,), uuid_only=(0,)))
    assert status == 400 and refusal["error"]["type"] == "mm_cache_miss", refusal
    assert refusal["error"]["param"] == "content_parts[0]"
    assert ours.post(parts_request(assets, (12,)))[0] == 200


def test_a_raw_ref_read_serves_a_later_uuid_alone(servers: tuple[Server, Server], assets: Path) -> None:
    # Both request paths share one verified cache.
    from tests.test_vllm_server import image_prompt

    ours, _ = servers
    assert ours.post(image_prompt(ours, (13,), assets=assets))[0] == 200
    status, mine = ours.post(parts_request(assets, (13,), uuid_only=(0,)))
    assert status == 200, mine


def test_more_parts_than_pads_is_a_400_naming_the_counts(
    servers: tuple[Server, Server], assets: Path
) -> None:
    ours, _ = servers
    body = parts_request(assets, (14, 15))
    body["token_ids"] = [72, QWEN_VISION_START, QWEN_IMAGE_PAD, QWEN_VISION_END]
    status, refusal = ours.post(body)
    assert status == 400 and "per image part (2), got 1 pads" in refusal["error"]["message"], refusal


def test_a_missing_file_is_a_400_not_a_500(
    servers: tuple[Server, Server], assets: Path, tmp_path: Path
) -> None:
    ours, _ = servers
    body = parts_request(assets, (16,))
    Path(body["content_parts"][0]["url"].removeprefix("file://")).unlink()
    status, refusal = ours.post(body)
    assert status == 400 and refusal["error"]["type"] == "invalid_mm_image_ref", refusal
    assert "Missing image file" in refusal["error"]["message"]


def episode_file(assets: Path, path: Path, family: Any) -> Path:
    """Write 6 traces as one agent would make them: trace k shows images 0..k of one episode."""
    from tests.test_generate_protocols import trace_prompt

    lines = []
    for turn in range(6):
        tokens, sidecar = trace_prompt(assets, tuple(range(40, 41 + turn)), family)
        node = {
            "parent": None,
            "token_ids": tokens,
            "mask": [False] * len(tokens),
            "multi_modal_data": sidecar,
        }
        lines.append(json.dumps({"id": f"turn{turn}", "nodes": [node]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def generated(server: Server, source: Path, out: Path, protocol: str) -> list[Any]:
    arguments = ["generate", str(source), "--server", server.url, "-o", str(out), "--protocol", protocol]
    result = CliRunner().invoke(
        app, [*arguments, "--concurrency", "4", "--max-tokens", "3", "--temperature", "0", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["traces_completed"], report["images_sent"], report["protocol"]) == (6, 21, protocol)
    return [trace["nodes"][1] for trace in map(json.loads, out.read_text().splitlines())]


def test_generate_gives_equal_outputs_on_both_servers_and_protocols(
    servers: tuple[Server, Server], assets: Path, tmp_path: Path
) -> None:
    ours, stock = servers
    source = episode_file(assets, tmp_path / "traces.jsonl", Families(ours.model_dir).get("qwen_vl"))
    runs = {
        "stock, content-parts": generated(stock, source, tmp_path / "a.jsonl", "content-parts"),
        "ours, content-parts": generated(ours, source, tmp_path / "b.jsonl", "content-parts"),
        "ours, mmraw": generate_mmraw(ours, source, tmp_path / "c.jsonl"),
    }
    first = runs["stock, content-parts"]
    for name, nodes in runs.items():
        assert [node["token_ids"] for node in nodes] == [node["token_ids"] for node in first], name
        for node, reference in zip(nodes, first, strict=True):
            assert (
                max(abs(a - b) for a, b in zip(node["logprobs"], reference["logprobs"], strict=True)) < 1e-4
            ), name


def generate_mmraw(server: Server, source: Path, out: Path) -> list[Any]:
    return generated(server, source, out, "mmraw")

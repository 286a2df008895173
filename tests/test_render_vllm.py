"""``render`` agrees with vLLM: every turn's prompt is the very token sequence vLLM renders
from the same messages (skipped without vLLM).

Reuses ``test_vllm_server``'s server fixture (a tiny Qwen2-VL behind ``mmoffload serve``,
whose byte-level tokenizer and Qwen-VL chat template come from ``mmoffload.render.tiny``).
"""

from __future__ import annotations

import importlib.util
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mmoffload.families import Families
from mmoffload.render import Renderer, load_tokenizer
from tests.builders import data_url, image_bytes
from tests.test_vllm_server import Server, server  # noqa: F401 - the module's vLLM server, reused

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

SIZES = [(200, 120), (96, 300), (320, 240)]


def post(server: Server, route: str, body: dict[str, Any]) -> dict[str, Any]:  # noqa: F811 - the fixture's type
    request = urllib.request.Request(
        server.url + route, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def vllm_prompt(server: Server, messages: list[dict[str, Any]]) -> list[int]:  # noqa: F811
    """The prompt tokens vLLM builds from chat messages: its render route, else a 1-token completion."""
    body = {"model": str(server.model_dir), "messages": messages, "max_tokens": 1}
    try:
        return post(server, "/v1/chat/completions/render", body)["token_ids"]
    except urllib.error.HTTPError as exc:
        if exc.code not in (404, 405):
            raise
    return post(server, "/v1/chat/completions", {**body, "return_token_ids": True})["prompt_token_ids"]


def rollout(count: int) -> dict[str, Any]:
    """``count`` turns, one screenshot each (user, then tool results), tool calls in OpenAI shape."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You browse."}]
    for turn, size in enumerate(SIZES[:count]):
        image = {"type": "image_url", "image_url": {"url": data_url(image_bytes(*size, seed=turn))}}
        if turn == 0:
            messages.append({"role": "user", "content": [{"type": "text", "text": "Find it."}, image]})
        else:
            messages.append({"role": "tool", "tool_call_id": f"c{turn}", "content": [image]})
        call = {
            "id": f"c{turn + 1}",
            "type": "function",
            "function": {"name": "click", "arguments": '{"x": 3}'},
        }
        messages.append({"role": "assistant", "content": f"Step {turn}.", "tool_calls": [call]})
    return {"messages": messages}


@pytest.mark.parametrize("count", [1, 2, 3])
def test_every_turns_rendered_prompt_is_vllms_own(server: Server, tmp_path: Path, count: int) -> None:  # noqa: F811
    record = rollout(count)
    messages = json.loads(json.dumps(record["messages"]))
    renderer = Renderer(load_tokenizer(server.model_dir), Families(server.model_dir), assets=tmp_path)
    nodes = renderer.rollout(record)[0]["traces"][0]["nodes"]
    turns = 0
    for index, node in enumerate(nodes):
        if not node["sampled"]:
            continue
        ours = [t for earlier in nodes[:index] for t in earlier["token_ids"]] + node["token_ids"][
            : node["mask"].index(True)
        ]
        assert ours == vllm_prompt(server, messages[:index])
        turns += 1
    assert turns == count

"""The client's content_parts protocol, retries and concurrent generate, against a fake server (no vLLM)."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from mmoffload.errors import BadInputError, UsageError
from mmoffload.families import Families, Family
from mmoffload.inference.client import (
    InferenceClient,
    InferenceServerError,
    build_parts_request,
    check_expansion,
)
from mmoffload.inference.generate import generate_traces
from mmoffload.inference.refs import InvalidImageRefError
from tests.builders import (
    QWEN_IMAGE_PAD,
    QWEN_VISION_END,
    QWEN_VISION_START,
    descriptor,
    image_bytes,
    sidecar,
    store_image,
)

Answer = Callable[[dict[str, Any]], tuple[int, dict[str, Any]]]


def trace_prompt(
    assets: Path, seeds: tuple[int, ...], family: Family | None = None
) -> tuple[list[int], dict[str, Any]]:
    """Return an expanded Qwen prompt with one stored image per seed, and its sidecar."""
    family = family or Families().get("qwen_vl")
    tokens, images = [1, 2], []
    for seed in seeds:
        stored = store_image(assets, image_bytes(seed=seed))
        grid = family.layout(64, 48)
        length = family.placeholder_length(grid)
        tokens.append(QWEN_VISION_START)
        images.append((descriptor(stored.uri, list(grid)), stored.hash, len(tokens), length))
        tokens += [QWEN_IMAGE_PAD] * length + [QWEN_VISION_END, 3]
    return tokens, sidecar(images)


def expanding(body: dict[str, Any], sidecar: dict[str, Any], tokens: list[int]) -> dict[str, Any]:
    """A server's answer that expanded the prompt as the trace did."""
    return {
        "choices": [{"token_ids": [7, 8], "logprobs": {"content": [{"logprob": -0.5}, {"logprob": -0.25}]}}],
        "prompt_token_ids": tokens,
        "mm_placeholders": {"image": sidecar["mm_placeholders"]["image"]},
    }


@pytest.fixture
def fake_server() -> Iterator[tuple[str, list[dict[str, Any]], list[Answer]]]:
    """A loopback HTTP server answering each POST with the next function of ``answers`` (the last repeats)."""
    seen: list[dict[str, Any]] = []
    answers: list[Answer] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                seen.append(body)
                answer = answers.pop(0) if len(answers) > 1 else answers[0]
            status, reply = answer(body)
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen, answers
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_parts_request_has_one_pad_per_image_and_uuids_for_held_images(tmp_path: Path) -> None:
    tokens, sidecar = trace_prompt(tmp_path, (1, 2))
    hashes = sidecar["mm_hashes"]["image"]
    request = build_parts_request(tokens, [sidecar], {"max_tokens": 2}, held={hashes[0]})
    pad_run = [QWEN_VISION_START, QWEN_IMAGE_PAD, QWEN_VISION_END, 3]
    assert request.body["token_ids"] == [1, 2, *pad_run, *pad_run]
    uri = sidecar["mm_items"]["image"][1]["raw_image_uri"]
    assert request.body["content_parts"] == [
        {"type": "image_url", "uuid": hashes[0]},
        {"type": "image_url", "url": uri, "uuid": hashes[1]},
    ]
    assert request.body["return_token_ids"] is True
    assert all("url" in part for part in request.with_urls()["content_parts"])


def test_the_servers_expansion_is_checked_against_the_familys(tmp_path: Path) -> None:
    tokens, sidecar = trace_prompt(tmp_path, (1, 2))
    request = build_parts_request(tokens, [sidecar], {})
    check_expansion(request, expanding(request.body, sidecar, tokens))
    short = json.loads(json.dumps(expanding(request.body, sidecar, tokens)))
    short["mm_placeholders"]["image"][1]["length"] -= 4
    with pytest.raises(InvalidImageRefError) as info:
        check_expansion(request, short)
    assert (info.value.check, info.value.image) == (
        6,
        1,
    ) and "Expected placeholder length" in info.value.message
    other_text = expanding(request.body, sidecar, [*tokens[:-1], 5])
    with pytest.raises(InvalidImageRefError, match=f"differing from position {len(tokens) - 1}"):
        check_expansion(request, other_text)


def test_a_cache_miss_is_resent_once_with_every_url(
    tmp_path: Path, fake_server: tuple[str, list[dict[str, Any]], list[Answer]]
) -> None:
    url, seen, answers = fake_server
    tokens, sidecar = trace_prompt(tmp_path, (1,))
    miss = {"error": {"type": "mm_cache_miss", "message": "not cached", "code": 400}}
    answers += [lambda body: (400, miss), lambda body: (200, expanding(body, sidecar, tokens))]
    client = InferenceClient(url)
    client.held.add(sidecar["mm_hashes"]["image"][0])
    completion = client.generate_parts(tokens, [sidecar], {})
    assert completion.token_ids == [7, 8] and client.resent == 1
    assert ["url" in part for body in seen for part in body["content_parts"]] == [False, True]
    assert client.held == set(sidecar["mm_hashes"]["image"])


def test_another_refusal_is_not_resent(
    tmp_path: Path, fake_server: tuple[str, list[dict[str, Any]], list[Answer]]
) -> None:
    url, seen, answers = fake_server
    tokens, sidecar = trace_prompt(tmp_path, (1,))
    refusal = {"error": {"type": "invalid_mm_image_ref", "message": "bad", "code": 400}}
    answers.append(lambda body: (400, refusal))
    with pytest.raises(InferenceServerError):
        InferenceClient(url).generate_parts(tokens, [sidecar], {})
    assert len(seen) == 1


def test_5xx_is_retried_a_bounded_number_of_times(
    fake_server: tuple[str, list[dict[str, Any]], list[Answer]],
) -> None:
    url, seen, answers = fake_server
    ok = {"choices": [{"token_ids": [1], "logprobs": None}]}
    answers += [lambda body: (503, {"error": "busy"}), lambda body: (200, ok)]
    assert InferenceClient(url, retries=1).post({"token_ids": [1]}) == ok and len(seen) == 2
    answers[:] = [lambda body: (500, {"error": "down"})]
    with pytest.raises(InferenceServerError) as info:
        InferenceClient(url, retries=1).post({"token_ids": [1]})
    assert info.value.status == 500 and len(seen) == 4


def test_an_unreachable_server_is_a_usage_error_after_the_retries() -> None:
    with pytest.raises(UsageError, match="Cannot reach the inference server"):
        InferenceClient("http://127.0.0.1:9", retries=0).post({})


def test_a_server_given_without_http_is_a_usage_error_at_once() -> None:
    with pytest.raises(
        UsageError, match=r"as an http:// or https:// URL \(http://HOST:PORT\), got `127.0.0.1:8000"
    ):
        InferenceClient("127.0.0.1:8000").post({})


def test_without_the_client_extra_the_client_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "httpx", None)  # imported as if not installed
    monkeypatch.delitem(sys.modules, "mmoffload.inference.transport", raising=False)
    with pytest.raises(
        UsageError, match=r"needs `httpx`, from the `client` extra: pip install 'mmoffload\[client\]'"
    ):
        InferenceClient("http://127.0.0.1:9")


@pytest.mark.parametrize("protocol", ["content-parts", "mmraw"])
def test_concurrent_generate_keeps_the_input_order(
    tmp_path: Path, fake_server: tuple[str, list[dict[str, Any]], list[Answer]], protocol: str
) -> None:
    url, _, answers = fake_server
    lines, prompts = [], {}
    for index in range(8):
        tokens, sidecar = trace_prompt(tmp_path, (index,))
        tokens[0] = 100 + index  # the answer's token says which prompt it completes
        prompts[100 + index] = (tokens, sidecar)
        node = {
            "parent": None,
            "token_ids": tokens,
            "mask": [False] * len(tokens),
            "multi_modal_data": sidecar,
        }
        lines.append(json.dumps({"id": f"t{index}", "nodes": [node]}))

    def answer(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        tokens, sidecar = prompts[body["token_ids"][0]]
        reply = expanding(body, sidecar, tokens)
        reply["choices"][0]["token_ids"] = [tokens[0], 0]
        return 200, reply

    answers.append(answer)
    source, out = tmp_path / "traces.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(lines) + "\n")
    report = generate_traces(source, out, url, {"max_tokens": 2}, protocol=protocol, concurrency=4)
    assert (report.traces_completed, report.images_sent, report.protocol) == (8, 8, protocol)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [trace["id"] for trace in written] == [f"t{index}" for index in range(8)]
    assert [trace["nodes"][1]["token_ids"][0] for trace in written] == [100 + index for index in range(8)]


def test_an_expansion_that_disagrees_names_the_trace_and_image(
    tmp_path: Path, fake_server: tuple[str, list[dict[str, Any]], list[Answer]]
) -> None:
    url, _, answers = fake_server
    tokens, sidecar = trace_prompt(tmp_path, (1, 2))
    node = {"parent": None, "token_ids": tokens, "mask": [False] * len(tokens), "multi_modal_data": sidecar}

    def answer(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        reply = expanding(body, sidecar, tokens)
        reply["mm_placeholders"] = {"image": [dict(span) for span in reply["mm_placeholders"]["image"]]}
        reply["mm_placeholders"]["image"][1]["length"] += 4
        return 200, reply

    answers.append(answer)
    source, out = tmp_path / "traces.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({"id": "t0", "nodes": [node]}) + "\n")
    with pytest.raises(BadInputError) as info:
        generate_traces(source, out, url, {})
    assert "trace `t0`" in str(info.value) and "image 1" in str(info.value)
    assert not out.exists()

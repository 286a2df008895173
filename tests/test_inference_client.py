"""The rollout-side client pieces and the cache's single flight (no vLLM needed)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmoffload.errors import BadInputError
from mmoffload.families.pixel_cache import PixelCache
from mmoffload.inference.client import (
    InferenceServerError,
    build_request,
    is_cache_miss,
    parse_completion,
    send_with_cache_retry,
)
from mmoffload.inference.refs import decode_ref
from tests.builders import QWEN_IMAGE_PAD, descriptor, image_bytes, sidecar, store_image

REFS = ["mmraw:a", "mmraw:b"]


def request_with(items: list[str | None]) -> dict[str, Any]:
    return {
        "token_ids": [1],
        "features": {"mm_hashes": {"image": ["h0", "h1"]}, "kwargs_data": {"image": items}},
    }


class Recorder:
    """A ``send`` that answers from a list of outcomes and records each body it was given."""

    def __init__(self, *outcomes: object) -> None:
        self.outcomes = list(outcomes)
        self.sent: list[dict[str, Any]] = []

    def __call__(self, body: dict[str, Any]) -> object:
        self.sent.append(body)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


MISS_FORMS = [
    {"error": {"type": "missing_mm_cache_item", "message": "miss"}},
    {"error": {"type": "BadRequestError", "message": json.dumps({"type": "missing_mm_cache_item"})}},
    {"error_type": "missing_mm_cache_item", "message": "miss"},
]


@pytest.mark.parametrize("body", MISS_FORMS)
def test_cache_miss_is_recognised_in_every_form(body: dict[str, Any]) -> None:
    assert is_cache_miss(body)


def test_other_errors_are_no_cache_miss() -> None:
    assert not is_cache_miss({"error": {"type": "invalid_mm_image_ref", "message": "image 0"}})
    assert not is_cache_miss({"error": {"type": "x", "message": "missing_mm_cache_item, not JSON"}})
    assert not is_cache_miss("Internal Server Error")


@pytest.mark.parametrize("body", MISS_FORMS)
def test_cache_miss_is_retried_once_with_every_image_as_a_ref(body: dict[str, Any]) -> None:
    send = Recorder(InferenceServerError(400, body), {"choices": []})
    assert send_with_cache_retry(send, request_with(["mmraw:a", None]), REFS) == {"choices": []}
    assert [b["features"]["kwargs_data"]["image"] for b in send.sent] == [["mmraw:a", None], REFS]


def test_second_cache_miss_propagates() -> None:
    miss = InferenceServerError(400, MISS_FORMS[0])
    send = Recorder(miss, InferenceServerError(400, MISS_FORMS[0]))
    with pytest.raises(InferenceServerError):
        send_with_cache_retry(send, request_with([None, None]), REFS)
    assert len(send.sent) == 2


def test_no_retry_when_every_image_was_already_a_ref() -> None:
    send = Recorder(InferenceServerError(400, MISS_FORMS[0]))
    with pytest.raises(InferenceServerError):
        send_with_cache_retry(send, request_with(REFS), REFS)
    assert len(send.sent) == 1


def test_other_errors_are_not_retried() -> None:
    send = Recorder(InferenceServerError(400, {"error": {"type": "invalid_mm_image_ref", "message": "m"}}))
    with pytest.raises(InferenceServerError, match="invalid_mm_image_ref"):
        send_with_cache_retry(send, request_with([None, None]), REFS)
    assert len(send.sent) == 1


def test_request_from_sidecars_sends_every_image_as_a_ref(tmp_path: Path) -> None:
    stored = store_image(tmp_path, image_bytes())
    tokens = [1, *[QWEN_IMAGE_PAD] * 4, 2]
    body = build_request(
        tokens, [None, sidecar([(descriptor(stored.uri, [1, 4, 4]), stored.hash, 1, 4)])], {"n": 1}
    )
    assert body["token_ids"] == tokens and body["sampling_params"] == {"n": 1}
    assert body["features"]["mm_hashes"] == {"image": [stored.hash]}
    assert body["features"]["mm_placeholders"] == {"image": [{"offset": 1, "length": 4}]}
    assert decode_ref(body["features"]["kwargs_data"]["image"][0])["raw_image_uri"] == stored.uri


def test_text_only_request_has_no_features() -> None:
    assert "features" not in build_request([1, 2], [None], {})


def test_request_with_placeholder_past_the_prompt_names_the_image(tmp_path: Path) -> None:
    stored = store_image(tmp_path, image_bytes())
    with pytest.raises(BadInputError, match="image 0"):
        build_request([1, 2], [sidecar([(descriptor(stored.uri, [1, 4, 4]), stored.hash, 1, 4)])], {})


def test_completion_has_one_logprob_per_token() -> None:
    body = {
        "choices": [
            {
                "token_ids": [5, 6],
                "finish_reason": "length",
                "logprobs": {"content": [{"token_id": 5, "logprob": -0.5}, {"token_id": 6, "logprob": -1.5}]},
            }
        ]
    }
    completion = parse_completion(body)
    assert (completion.token_ids, completion.logprobs, completion.finish_reason) == (
        [5, 6],
        [-0.5, -1.5],
        "length",
    )


def test_concurrent_callers_share_one_materialization() -> None:
    cache = PixelCache()
    calls, gate = [], threading.Event()

    def make() -> dict[str, np.ndarray]:
        calls.append(1)
        gate.wait(5)
        return {"pixel_values": np.ones((2, 2), dtype=np.float32)}

    results: list[tuple[dict[str, np.ndarray], bool]] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get_or_make("k", make))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    while not calls:
        threading.Event().wait(0.01)
    gate.set()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert sorted(made for _, made in results) == [False, False, False, True]
    assert all(arrays is results[0][0] for arrays, _ in results)


def test_a_failed_materialization_answers_only_its_own_caller() -> None:
    # Two requests name one hash: the first sent the wrong file. The second waits on the
    # first's read, and on its failure reads its own file instead of taking the error.
    cache = PixelCache()
    gate = threading.Event()

    def wrong_file() -> dict[str, np.ndarray]:
        gate.wait(5)
        raise BadInputError("Content hash mismatch for `file:///other.png`")

    errors: list[BaseException] = []
    results: list[tuple[dict[str, np.ndarray], bool]] = []

    def bad() -> None:
        try:
            cache.get_or_make("k", wrong_file)
        except BadInputError as exc:
            errors.append(exc)

    first = threading.Thread(target=bad)
    first.start()
    while "k" not in cache._in_flight:
        threading.Event().wait(0.01)
    second = threading.Thread(
        target=lambda: results.append(cache.get_or_make("k", lambda: {"x": np.ones(1)}))
    )
    second.start()
    while cache.waiting("k") != 1:
        threading.Event().wait(0.01)
    gate.set()
    first.join()
    second.join()
    assert [str(error) for error in errors] == ["Content hash mismatch for `file:///other.png`"]
    assert len(results) == 1 and results[0][1] is True and results[0][0]["x"].tolist() == [1.0]
    assert len(cache) == 1


def test_failed_materialization_is_not_cached() -> None:
    cache = PixelCache()
    with pytest.raises(BadInputError):
        cache.get_or_make("k", lambda: (_ for _ in ()).throw(BadInputError("bad image")))
    assert len(cache) == 0
    arrays, made = cache.get_or_make("k", lambda: {"x": np.zeros(1)})
    assert made and arrays["x"].shape == (1,)


def test_entry_larger_than_the_budget_is_made_but_not_cached() -> None:
    cache = PixelCache(max_bytes=8)
    _, made = cache.get_or_make("k", lambda: {"x": np.zeros(4)})
    assert made and len(cache) == 0


def test_library_and_cli_import_no_vllm_and_no_http_or_hub_client() -> None:
    # httpx (the client extra) is loaded when an InferenceClient is made, huggingface_hub for a hub id.
    optional = ("vllm", "torch", "fastapi", "httpx", "huggingface_hub")
    code = (
        "import sys, mmoffload, mmoffload.inference.refs, mmoffload.inference.client, mmoffload.inference.generate, "
        f"mmoffload_cli.app; print(sorted(m for m in {optional!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

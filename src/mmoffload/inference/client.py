"""A client for rollout workers: raw-ref requests to ``/inference/v1/generate`` (inference.md).

Builds vLLM's ``GenerateRequest`` from a prompt's token ids and its sidecars
(every image as an ``mmraw:`` ref), sends it with the standard library's HTTP
client and returns the completion's tokens and logprobs. Also the section-5
helper for older servers that answer a vLLM cache miss with an error.
No vLLM import: rollout workers need none.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mmoffload.errors import MMOffloadError, UsageError
from mmoffload.inference.refs import GENERATE_ROUTE, MODALITY, features_from_sidecars

CACHE_MISS_TYPE = "missing_mm_cache_item"
DEFAULT_TIMEOUT_S = 600.0


class InferenceServerError(MMOffloadError):
    """The server answered with an error; ``status`` and ``body`` are its HTTP status and JSON body."""

    def __init__(self, status: int, body: object) -> None:
        self.status = status
        self.body = body
        super().__init__(f"Inference server answered {status}: {_error_message(body)[:300]}")


@dataclass(frozen=True, slots=True)
class Completion:
    """The sampled tokens of one request, one logprob per token."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None


def build_request(
    token_ids: Sequence[int], sidecars: Sequence[object], sampling_params: dict[str, Any]
) -> dict[str, Any]:
    """Return a ``GenerateRequest`` body: the prompt ids and every image of its sidecars as a ref.

    Raises:
        BadInputError: a sidecar is invalid (names the image index).
    """
    request: dict[str, Any] = {"token_ids": list(token_ids), "sampling_params": dict(sampling_params)}
    features = features_from_sidecars(sidecars, len(token_ids))
    if features["mm_hashes"][MODALITY]:
        request["features"] = features
    return request


def parse_completion(body: object) -> Completion:
    """Return the first choice of a ``GenerateTokensResponse``.

    Raises:
        UsageError: the body is not such a response.
    """
    try:
        choice = body["choices"][0]  # type: ignore[index]
        tokens = [int(token) for token in choice["token_ids"]]
        content = (choice.get("logprobs") or {}).get("content") or []
        logprobs = [float(entry["logprob"]) for entry in content]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise UsageError(
            f"Expected a GenerateTokensResponse from the server, got: {str(body)[:200]}"
        ) from exc
    if logprobs and len(logprobs) != len(tokens):
        raise UsageError(f"Expected one logprob per token, got {len(logprobs)} for {len(tokens)} tokens")
    return Completion(tokens, logprobs, choice.get("finish_reason"))


def is_cache_miss(body: object) -> bool:
    """True when an error body reports a vLLM cache miss, in any of the forms older servers used.

    ``error.type``, that type inside a JSON string in ``error.message``, or a top-level ``error_type``.
    """
    if not isinstance(body, dict):
        return False
    if body.get("error_type") == CACHE_MISS_TYPE:
        return True
    error = body.get("error")
    if not isinstance(error, dict):
        return False
    if error.get("type") == CACHE_MISS_TYPE:
        return True
    message = error.get("message")
    if isinstance(message, str) and CACHE_MISS_TYPE in message:
        try:
            inner = json.loads(message)
        except ValueError:
            return False
        return is_cache_miss(inner) or (isinstance(inner, dict) and inner.get("type") == CACHE_MISS_TYPE)
    return False


def send_with_cache_retry(
    send: Callable[[dict[str, Any]], Any], request: dict[str, Any], refs: Sequence[str]
) -> Any:
    """Send a request; on a cache miss, resend it once with every image as a ref (section 5).

    Only a request that sent some image without a ref (``None``, "take it from the
    engine's cache") is retried; any other error, or a second failure, propagates.

    Args:
        send: sends a request body and returns the response, raising ``InferenceServerError``.
        request: the body as sent first, ``features.kwargs_data.image`` possibly holding ``None``.
        refs: the ``mmraw:`` ref of every image of the request, in order.
    """
    try:
        return send(request)
    except InferenceServerError as exc:
        sent = ((request.get("features") or {}).get("kwargs_data") or {}).get(MODALITY) or []
        if not (is_cache_miss(exc.body) and any(item is None for item in sent)):
            raise
    features = dict(request["features"])
    features["kwargs_data"] = {**features["kwargs_data"], MODALITY: list(refs)}
    return send({**request, "features": features})


class InferenceClient:
    """Sends raw-ref requests to one ``mmoffload serve`` (or compatible) server."""

    def __init__(self, base_url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def post(self, request: dict[str, Any]) -> object:
        """POST a ``GenerateRequest`` body and return the decoded JSON response.

        Raises:
            InferenceServerError: the server answered an error status.
            UsageError: the server cannot be reached or answered no JSON.
        """
        data = json.dumps(request).encode()
        http_request = urllib.request.Request(
            self.base_url + GENERATE_ROUTE, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(http_request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                body: object = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
            raise InferenceServerError(exc.code, body) from None
        except (urllib.error.URLError, OSError) as exc:
            raise UsageError(f"Cannot reach the inference server `{self.base_url}`: {exc}") from exc
        except ValueError as exc:
            raise UsageError(f"Expected JSON from the inference server `{self.base_url}`: {exc}") from exc

    def generate(
        self, token_ids: Sequence[int], sidecars: Sequence[object], sampling_params: dict[str, Any]
    ) -> Completion:
        """Complete a prompt whose images are described by ``sidecars`` (absolute offsets).

        Raises:
            BadInputError: a sidecar is invalid.
            InferenceServerError: the server refused the request.
        """
        return parse_completion(self.post(build_request(token_ids, sidecars, sampling_params)))


def _error_message(body: object) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return f"{error.get('type')}: {error.get('message')}"
        if "detail" in body:
            return str(body["detail"])
    return str(body)

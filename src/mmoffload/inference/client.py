"""A client for rollout workers: requests to ``/inference/v1/generate`` (inference.md).

Builds vLLM's ``GenerateRequest`` from a prompt's token ids and its sidecars,
in either protocol: every image as an ``mmraw:`` ref (sections 1-2), or stock
vLLM's ``content_parts`` (section 6: one pad per image, the server expands
them; an image the server already verified sent as its ``uuid`` alone, resent
once with its URL on ``mm_cache_miss``). Sends it over one pooled httpx client
(``transport``, the ``client`` extra), retrying connection errors and 5xx a
bounded number of times, and returns the completion's tokens and logprobs. Also
the section-5 helper for older servers. No vLLM import: rollout workers need none.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from mmoffload.errors import MMOffloadError, UsageError
from mmoffload.extras import require
from mmoffload.families import Families
from mmoffload.inference.checks import check_placeholders
from mmoffload.inference.refs import (
    GENERATE_ROUTE,
    MODALITY,
    InvalidImageRefError,
    decode_ref,
    features_from_sidecars,
    parse_features,
)

CACHE_MISS_TYPE = "missing_mm_cache_item"
# The content_parts protocol's miss (inference.md section 6); stock vLLM answers a 400 saying "cache miss".
PARTS_CACHE_MISS_TYPE = "mm_cache_miss"
PROTOCOLS = ("content-parts", "mmraw")
DEFAULT_TIMEOUT_S = 600.0
# Connection errors and 5xx are retried this many times, after 0.5 s, 1 s, 2 s.
DEFAULT_RETRIES = 3


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
    token_ids: Sequence[int],
    sidecars: Sequence[object],
    sampling_params: dict[str, Any],
    *,
    compact_refs: bool = True,
) -> dict[str, Any]:
    """Return a ``GenerateRequest`` body: the prompt ids and every image of its sidecars as a ref.

    Refs are compact (what ``mmoffload serve`` reads) unless ``compact_refs`` is False: then
    the spec's full refs, for other raw-ref servers.

    Raises:
        BadInputError: a sidecar is invalid (names the image index).
    """
    request: dict[str, Any] = {"token_ids": list(token_ids), "sampling_params": dict(sampling_params)}
    features = features_from_sidecars(sidecars, len(token_ids), compact=compact_refs)
    if features["mm_hashes"][MODALITY]:
        request["features"] = features
    return request


@dataclass(frozen=True, slots=True)
class PartsRequest:
    """A ``content_parts`` request and what its answer is checked against.

    Attributes:
        body: the request as sent first (images the server holds as ``uuid`` alone).
        urls: each image's ``file://`` URI, in order (the resend carries them all).
        token_ids: the prompt with every image expanded, as the trace holds it.
        features: the trace's raw-ref features (hashes, placeholders, refs).
    """

    body: dict[str, Any]
    urls: list[str]
    token_ids: list[int]
    features: dict[str, Any]

    @property
    def hashes(self) -> list[str]:
        return list(self.features["mm_hashes"][MODALITY])

    def with_urls(self) -> dict[str, Any]:
        """Return the request with every part carrying its URL (the resend after a cache miss)."""
        parts = [
            {"type": "image_url", "url": url, "uuid": mm_hash}
            for url, mm_hash in zip(self.urls, self.hashes, strict=True)
        ]
        return {**self.body, "content_parts": parts}


def build_parts_request(
    token_ids: Sequence[int],
    sidecars: Sequence[object],
    sampling_params: dict[str, Any],
    held: Collection[str] = (),
) -> PartsRequest:
    """Return stock vLLM's ``content_parts`` request for a prompt whose sidecars describe its images.

    Each image's placeholder span becomes one pad; each image one part with its
    ``file://`` URL and its content hash as ``uuid``, or the ``uuid`` alone when
    it is in ``held`` (images the server is known to hold). Asks for
    ``return_token_ids`` so the server's expansion can be checked.

    Raises:
        BadInputError: a sidecar is invalid (names the image index).
    """
    features = features_from_sidecars(sidecars, len(token_ids))  # full refs: the check reads their family
    placeholders = features["mm_placeholders"][MODALITY]
    hashes = features["mm_hashes"][MODALITY]
    urls = [decode_ref(ref)["raw_image_uri"] for ref in features["kwargs_data"][MODALITY]]
    collapsed: list[int] = []
    start = 0
    for span in sorted(placeholders, key=lambda span: span["offset"]):
        collapsed.extend(token_ids[start : span["offset"] + 1])  # the text, then one pad
        start = span["offset"] + span["length"]
    collapsed.extend(token_ids[start:])
    parts = [
        {"type": "image_url", "uuid": mm_hash}
        if mm_hash in held
        else {"type": "image_url", "url": url, "uuid": mm_hash}
        for url, mm_hash in zip(urls, hashes, strict=True)
    ]
    body: dict[str, Any] = {
        "token_ids": collapsed,
        "sampling_params": dict(sampling_params),
        "return_token_ids": True,
    }
    if parts:
        body["content_parts"] = parts
    return PartsRequest(body, urls, list(token_ids), features)


def check_expansion(request: PartsRequest, body: object, families: Families | None = None) -> None:
    """Check the server's expansion of a ``content_parts`` prompt against the family's and the trace's.

    The answer's ``mm_placeholders`` go through the raw-ref checks (check 6: each
    length is the family's for the image's grid, over image tokens, in order), and
    its ``prompt_token_ids`` must equal the trace's expanded prompt.

    Raises:
        InvalidImageRefError: an image whose expansion disagrees (names the image index).
        UsageError: the answer carries no ``prompt_token_ids`` / ``mm_placeholders``.
    """
    if not isinstance(body, dict) or not isinstance(body.get("prompt_token_ids"), list):
        raise UsageError(
            "Expected `prompt_token_ids` in the server's answer (the request asked `return_token_ids`)"
        )
    prompt = [int(token) for token in body["prompt_token_ids"]]
    spans = ((body.get("mm_placeholders") or {}).get(MODALITY)) or []
    features = request.features
    if len(spans) != len(request.hashes):
        raise InvalidImageRefError(
            6, f"Expected {len(request.hashes)} image placeholders from the server, got {len(spans)}"
        )
    answered = {
        **features,
        "mm_placeholders": {
            MODALITY: [{"offset": span.get("offset"), "length": span.get("length")} for span in spans]
        },
    }
    refs = parse_features(answered, families or Families())
    check_placeholders(refs, prompt)
    if prompt != request.token_ids:
        position = next(
            (i for i, (a, b) in enumerate(zip(prompt, request.token_ids, strict=False)) if a != b),
            min(len(prompt), len(request.token_ids)),
        )
        image = next((ref.index for ref in refs if ref.offset <= position < ref.offset + ref.length), None)
        mine = next(
            (i for i, span in enumerate(features["mm_placeholders"][MODALITY]) if span["offset"] > position),
            None,
        )
        raise InvalidImageRefError(
            6,
            f"Expected the server's expanded prompt to equal the trace's ({len(request.token_ids)} tokens), "
            f"got {len(prompt)} tokens differing from position {position}",
            image if image is not None else (mine - 1 if mine else None),
        )


def is_parts_cache_miss(error: InferenceServerError) -> bool:
    """True when a ``content_parts`` request was refused for a uuid the server does not hold.

    ``mm_cache_miss`` from ``mmoffload serve``; stock vLLM's 400 whose message says "cache miss".
    """
    body = error.body
    inner = body.get("error") if isinstance(body, dict) else None
    if not isinstance(inner, dict) or error.status != 400:
        return False
    return inner.get("type") == PARTS_CACHE_MISS_TYPE or "cache miss" in str(inner.get("message", "")).lower()


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
    """Sends requests to one ``mmoffload serve`` (or stock vLLM) server; safe to share between threads.

    Holds one pool of connections (httpx, the ``client`` extra: without it making a client is a
    ``UsageError`` naming it); ``close`` it, or use the client as a context manager.

    Attributes:
        held: content hashes of the images this server has read and verified for this
            client (sent with a URL and answered): later prompts send them as ``uuid`` alone.
        resent: requests resent with URLs after a cache miss.
    """

    def __init__(
        self, base_url: str, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.held: set[str] = set()
        self.resent = 0
        self._lock = threading.Lock()
        self._families: Families | None = None
        # Loaded here, not at import: importing this module (build_request...) needs no extra.
        transport = require("mmoffload.inference.transport", "Sending requests to an inference server")
        self._http = transport.HttpTransport(timeout_s)

    def close(self) -> None:
        """Close the client's connections."""
        self._http.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def post(self, request: dict[str, Any]) -> object:
        """POST a ``GenerateRequest`` body and return the decoded JSON response.

        Connection errors and 5xx answers are retried ``retries`` times, waiting longer each time.

        Raises:
            InferenceServerError: the server answered an error status (a 5xx after the retries).
            UsageError: the server cannot be reached (after the retries) or answered no JSON.
        """
        for attempt in range(self.retries + 1):
            try:
                return self._post_once(request)
            except InferenceServerError as exc:
                if exc.status < 500 or attempt == self.retries:
                    raise
            except ConnectionError as exc:  # the transport's ServerUnreachable: no answer at all
                if attempt == self.retries:
                    raise UsageError(f"Cannot reach the inference server `{self.base_url}`: {exc}") from None
            time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def _post_once(self, request: dict[str, Any]) -> object:
        status, content = self._http.post(self.base_url + GENERATE_ROUTE, json.dumps(request).encode())
        ok = 200 <= status < 300
        try:
            body: object = json.loads(content)
        except ValueError as exc:
            if ok:
                raise UsageError(f"Expected JSON from the inference server `{self.base_url}`: {exc}") from exc
            body = content.decode(errors="replace")
        if not ok:
            raise InferenceServerError(status, body)
        return body

    def generate(
        self,
        token_ids: Sequence[int],
        sidecars: Sequence[object],
        sampling_params: dict[str, Any],
        *,
        compact_refs: bool = True,
    ) -> Completion:
        """Complete a prompt whose images are described by ``sidecars`` (absolute offsets), as raw refs.

        Refs are compact for ``mmoffload serve``; ``compact_refs=False`` sends the spec's full refs.

        Raises:
            BadInputError: a sidecar is invalid.
            InferenceServerError: the server refused the request.
        """
        request = build_request(token_ids, sidecars, sampling_params, compact_refs=compact_refs)
        return parse_completion(self.post(request))

    def generate_parts(
        self, token_ids: Sequence[int], sidecars: Sequence[object], sampling_params: dict[str, Any]
    ) -> Completion:
        """Complete a prompt through stock vLLM's ``content_parts`` (section 6), checking the expansion.

        Images this server already holds go as ``uuid`` alone; on a cache miss the
        request is resent once with every URL. The answer's expanded prompt and
        placeholders must agree with the family's expansion and the trace's.

        Raises:
            BadInputError: a sidecar is invalid, or the server's expansion disagrees (names the image).
            InferenceServerError: the server refused the request.
        """
        with self._lock:
            held = set(self.held)
        request = build_parts_request(token_ids, sidecars, sampling_params, held)
        try:
            body = self.post(request.body)
        except InferenceServerError as exc:
            uuid_only = any("url" not in part for part in request.body.get("content_parts", []))
            if not (uuid_only and is_parts_cache_miss(exc)):
                raise
            with self._lock:
                self.resent += 1
                self.held.difference_update(request.hashes)
            body = self.post(request.with_urls())
        if self._families is None:
            self._families = Families()  # the families' default settings: the expansion needs only the grids
        check_expansion(request, body, self._families)
        with self._lock:
            self.held.update(request.hashes)
        return parse_completion(body)


def _error_message(body: object) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return f"{error.get('type')}: {error.get('message')}"
        if "detail" in body:
            return str(body["detail"])
    return str(body)

"""``mmoffload serve``: vLLM's own API server, with raw image refs on ``/inference/v1/generate``.

The app is vLLM's (every vLLM route stays: ``/health``, ``/v1/models``, the
OpenAI endpoints, metrics), started the way vLLM starts it, with the
scale-out endpoints switched on. One route changes: ``POST
/inference/v1/generate`` takes ``features.kwargs_data`` entries as ``mmraw:``
refs (inference.md section 2). Each request's images are checked and
materialized here (``mmoffload.inference.engine``) before the engine sees the
request; a failed check is answered with HTTP 400 ``invalid_mm_image_ref``
and the engine keeps serving. Everything else is vLLM's request handling.

The listening socket is bound before the engine starts (as vLLM does), so a
request sent while the engine is starting waits in the socket's backlog and
is answered once the engine is ready.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import uvloop
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from vllm.entrypoints.launchers.api_server.app_state import init_app_state
from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
from vllm.entrypoints.launchers.app import build_app
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.entrypoints.launchers.launcher import serve_http, setup_server
from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateRequest, GenerateResponseBase
from vllm.entrypoints.scale_out.token_in_token_out.serving import ServingTokens
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
from vllm.multimodal.inputs import MultiModalKwargsItem
from vllm.utils.argparse_utils import FlexibleArgumentParser

from mmoffload.families.pixel_cache import DEFAULT_CACHE_BYTES
from mmoffload.inference.content_parts import CACHE_MISS_TYPE, CacheMissError
from mmoffload.inference.decode_budget import DEFAULT_DECODE_BYTES
from mmoffload.inference.engine import Deferred, RawRefEngineInputs
from mmoffload.inference.refs import (
    ERROR_TYPE,
    GENERATE_ROUTE,
    MODALITY,
    PROMPT_ERROR_TYPE,
    InvalidImageRefError,
    PromptLimits,
    PromptRefusedError,
)
from mmoffload.store.read import AllowedRoots

STATS_ROUTE = "/mmoffload/v1/stats"
# vLLM arguments every mmoffload server needs: the scale-out routes carry /inference/v1/generate.
REQUIRED_VLLM_ARGS = ("--enable-scale-out",)

# The engine items of the request being served: set by the route, read inside vLLM's handler.
_REQUEST_ITEMS: contextvars.ContextVar[list[MultiModalKwargsItem | Deferred]] = contextvars.ContextVar(
    "mmoffload_items"
)


class ServerStats(msgspec.Struct):
    """The raw-ref side of a running server (``GET /mmoffload/v1/stats``)."""

    requests: int
    requests_refused: int
    images: int
    images_materialized: int
    cache_hits: int
    cache_entries: int
    cache_bytes: int
    materialize_seconds: float
    decode_bytes_peak: int = 0
    decode_waits: int = 0


class RawRefServingTokens(ServingTokens):
    """vLLM's token-in, token-out handler, fed the engine items mmoffload materialized.

    vLLM reads ``None`` kwargs entries as "take it from the engine's cache"; the route
    sends every entry as ``None`` to vLLM's parser and this hands vLLM the checked
    items instead, before vLLM's own cache-handle validation runs on them. Then, as
    vLLM's own processing does, each item goes through vLLM's sender cache: one the
    engine process already holds (by its content hash, checked here) travels as
    ``None``, so its pixels are not copied to the engine again.
    """

    def _validate_mm_cache_handles(
        self, mm_kwargs: dict[str, list[MultiModalKwargsItem | None]], mm_hashes: dict[str, list[str]]
    ) -> ErrorResponse | None:
        items = _REQUEST_ITEMS.get(None)
        if items is None:
            return super()._validate_mm_cache_handles(mm_kwargs, mm_hashes)
        cache = self.online_renderer.renderer.mm_processor_cache
        hashes = mm_hashes[MODALITY]
        # On the event loop, with no await until the updates below: what the cache holds cannot change meanwhile.
        held = [cache is not None and cache.is_cached_item(mm_hash) for mm_hash in hashes]
        mm_kwargs[MODALITY][:] = [
            None if is_held else item.make() if isinstance(item, Deferred) else item
            for item, is_held in zip(items, held, strict=True)
        ]
        error = super()._validate_mm_cache_handles(mm_kwargs, mm_hashes)
        if error is None and cache is not None:
            for index, mm_hash in enumerate(hashes):
                item = mm_kwargs[MODALITY][index]
                mm_kwargs[MODALITY][index], _ = cache.get_and_update_item(
                    None if item is None else (item, []), mm_hash
                )
        return error


def serve(
    model_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    vllm_args: Sequence[str] = (),
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    roots: AllowedRoots = None,
    decode_bytes: int = DEFAULT_DECODE_BYTES,
) -> None:
    """Run the server until interrupted.

    Args:
        model_dir: the model directory vLLM serves and the family reads offline.
        host: address to listen on.
        port: port to listen on.
        vllm_args: further ``vllm serve`` arguments, passed through unchanged.
        cache_bytes: bound of the materialized-input cache.
        roots: allowed directories for image files, and object-store prefixes (None: anywhere).
        decode_bytes: bound of the images being decoded at once.
    """
    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog="mmoffload serve"))
    args = parser.parse_args(
        ["--model", str(model_dir), "--host", host, "--port", str(port), *REQUIRED_VLLM_ARGS, *vllm_args]
    )
    validate_parsed_serve_args(args)
    uvloop.run(_run(args, model_dir, cache_bytes, roots, decode_bytes))


async def _run(args: Any, model_dir: Path, cache_bytes: int, roots: AllowedRoots, decode_bytes: int) -> None:
    # vLLM's own start-up sequence (run_server), with the route installed between app state and serving.
    _, sock = setup_server(args, reuse_port=False)
    try:
        async with build_async_engine_client(args) as engine_client:
            supported_tasks = await engine_client.get_supported_tasks()
            app = build_app(args, supported_tasks, engine_client.model_config)
            await init_app_state(engine_client, app.state, args, supported_tasks)
            install_raw_refs(app, model_dir, cache_bytes=cache_bytes, roots=roots, decode_bytes=decode_bytes)
            shutdown = await serve_http(
                app,
                sock=sock,
                host=args.host,
                port=args.port,
                log_level=args.uvicorn_log_level,
                access_log=not args.disable_uvicorn_access_log,
            )
        await shutdown
    finally:
        sock.close()


def install_raw_refs(
    app: FastAPI,
    model_dir: Path,
    *,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    roots: AllowedRoots = None,
    decode_bytes: int = DEFAULT_DECODE_BYTES,
) -> RawRefEngineInputs:
    """Make a vLLM API app take raw refs on ``/inference/v1/generate``; return its engine side."""
    serving: ServingTokens = app.state.serving_tokens
    serving.__class__ = RawRefServingTokens  # the same handler object, with the one hook above
    model_config = serving.model_config
    engine_inputs = RawRefEngineInputs(
        model_dir,
        serving.online_renderer.renderer.get_mm_processor(),
        device_normalizes=bool(
            model_config.multimodal_config and model_config.multimodal_config.mm_device_do_normalize
        ),
        cache_bytes=cache_bytes,
        roots=roots,
        limits=_engine_limits(model_config),
        decode_bytes=decode_bytes,
    )
    engine_inputs.sender_cache = serving.online_renderer.renderer.mm_processor_cache
    engine_inputs.prepare()
    routes = RawRefRoutes(serving, engine_inputs)
    # vLLM's own route for the path is dropped so this one answers it; every other route stays.
    app.router.routes[:] = [
        route for route in app.router.routes if getattr(route, "path", None) != GENERATE_ROUTE
    ]
    app.add_api_route(GENERATE_ROUTE, routes.generate, methods=["POST"])
    app.add_api_route(STATS_ROUTE, routes.stats, methods=["GET"])
    return engine_inputs


class RawRefRoutes:
    """The routes mmoffload puts on vLLM's app: generate (raw refs and ``content_parts``) and stats."""

    def __init__(self, serving: ServingTokens, engine_inputs: RawRefEngineInputs) -> None:
        self.serving = serving
        self.engine_inputs = engine_inputs
        self.requests = 0
        self.refused = 0

    async def generate(self, raw_request: Request) -> Response:
        """Check a request's images (reading nothing vLLM would refuse first), then hand it to vLLM."""
        self.requests += 1
        try:
            return await self._generate(raw_request)
        except RecursionError:
            # JSON nested past the interpreter's limit, in the body or anywhere vLLM's parser walks it.
            self.refused += 1
            return _error(400, "Expected a JSON request body nested less deeply", "BadRequestError")

    async def _generate(self, raw_request: Request) -> Response:
        try:
            body = await raw_request.json()
        except ValueError as exc:
            return _error(400, f"Expected a JSON request body: {exc}", "BadRequestError")
        if not isinstance(body, dict):
            return _error(400, "Expected a JSON object as the request body", "BadRequestError")
        checked = await self._checked_images(body)
        if isinstance(checked, Response):
            return checked
        body, items = checked
        try:
            request = GenerateRequest.model_validate(body)
        except ValidationError as exc:
            return _error(400, str(exc)[:1000], "BadRequestError")
        token = _REQUEST_ITEMS.set(items)
        try:
            generator = await self.serving.serve_tokens(request, raw_request)
        finally:
            _REQUEST_ITEMS.reset(token)
        if isinstance(generator, ErrorResponse):
            return JSONResponse(content=generator.model_dump(), status_code=generator.error.code)
        if isinstance(generator, GenerateResponseBase):
            return JSONResponse(content=generator.model_dump())
        return StreamingResponse(content=generator, media_type="text/event-stream")

    async def _checked_images(
        self, body: dict[str, Any]
    ) -> tuple[dict[str, Any], list[MultiModalKwargsItem | Deferred]] | Response:
        """Return the body vLLM parses and the checked engine items, or the refusal."""
        features = body.get("features")
        parts = body.get("content_parts")
        token_ids = body.get("token_ids")
        if features is None and parts is None:
            return body, []
        if not (isinstance(token_ids, list) and all(type(t) is int for t in token_ids)):
            return _error(400, "Expected `token_ids` as a list of ints", "BadRequestError")
        if features is not None and parts is not None:
            return _error(400, "Expected `features` or `content_parts`, got both", "BadRequestError")
        where = "features.kwargs_data.image" if parts is None else "content_parts"
        try:
            if parts is None:
                items = await asyncio.to_thread(self.engine_inputs.items, features, token_ids)
                features = {**features, "kwargs_data": {MODALITY: [None] * len(items)}}
            else:
                # The parts become features: expanded ids, checked items, vLLM's own handler.
                token_ids, features, items = await asyncio.to_thread(
                    self.engine_inputs.content_items, parts, token_ids
                )
        except InvalidImageRefError as exc:
            self.refused += 1
            param = f"{where}[{exc.image}]" if exc.image is not None else where.split(".")[0]
            error_type = CACHE_MISS_TYPE if isinstance(exc, CacheMissError) else ERROR_TYPE
            return _error(400, str(exc), error_type, param)
        except PromptRefusedError as exc:
            self.refused += 1
            return _error(400, str(exc), PROMPT_ERROR_TYPE, "token_ids")
        # vLLM parses the rest; the checked items reach it through RawRefServingTokens.
        body = {**body, "token_ids": token_ids, "features": features}
        body.pop("content_parts", None)
        return body, items

    async def stats(self) -> JSONResponse:
        """Return the server's counters: requests, refusals, images, cache and decode budget."""
        engine = self.engine_inputs.stats
        report = ServerStats(
            requests=self.requests,
            requests_refused=self.refused,
            images=engine.images,
            images_materialized=engine.images_materialized,
            cache_hits=engine.cache_hits,
            cache_entries=len(self.engine_inputs.cache),
            cache_bytes=self.engine_inputs.cache.bytes,
            materialize_seconds=engine.materialize_seconds,
            decode_bytes_peak=self.engine_inputs.decode_budget.peak,
            decode_waits=self.engine_inputs.decode_budget.waits,
        )
        return JSONResponse(content=msgspec.to_builtins(report))


def _engine_limits(model_config: Any) -> PromptLimits:
    """Return the engine's limits the route checks before reading any image."""
    multimodal = model_config.multimodal_config
    return PromptLimits(
        max_model_len=model_config.max_model_len,
        max_images=multimodal.get_limit_per_prompt(MODALITY) if multimodal is not None else None,
    )


def _error(status: int, message: str, error_type: str, param: str | None = None) -> JSONResponse:
    error = {"message": message, "type": error_type, "param": param, "code": status}
    return JSONResponse(content={"error": error}, status_code=status)

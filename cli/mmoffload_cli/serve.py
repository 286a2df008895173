"""``mmoffload serve``: vLLM's API server taking raw image refs on ``/inference/v1/generate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmoffload.errors import UsageError
from mmoffload.families.pixel_cache import DEFAULT_CACHE_BYTES
from mmoffload.inference.decode_budget import DEFAULT_DECODE_BYTES
from mmoffload.store.local import ASSETS_ENV_VAR, default_allowed_roots
from mmoffload_cli import sink
from mmoffload_cli.options import allowed_root


def serve(
    ctx: typer.Context,
    model: Annotated[
        Path,
        typer.Option(
            "--model",
            metavar="DIR",
            help="Model directory vLLM serves (its processor and tokenizer are read offline).",
        ),
    ],
    host: Annotated[str, typer.Option("--host", metavar="HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=1, max=65535, metavar="PORT", help="Port to listen on.")
    ] = 8000,
    cache_bytes: Annotated[
        int,
        typer.Option(
            "--cache-bytes", min=0, metavar="BYTES", help="Bound of the materialized-image cache, in bytes."
        ),
    ] = DEFAULT_CACHE_BYTES,
    decode_bytes: Annotated[
        int,
        typer.Option(
            "--decode-bytes",
            min=0,
            metavar="BYTES",
            help="Bound of the images being decoded at once, in bytes (16 per pixel); more wait in line.",
        ),
    ] = DEFAULT_DECODE_BYTES,
    allow_root: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-root",
            metavar="DIR|URL",
            parser=allowed_root,
            help="Serve only images under this directory or object-store prefix (s3://bucket/prefix; "
            "repeatable; default: $VF_RENDERER_IMAGE_OFFLOAD_DIR; with neither, serve refuses to start).",
        ),
    ] = None,
) -> None:
    """Serve a model with vLLM, reading image refs here.

    Image refs in requests are read, checked and processed here. Every vLLM route is kept (/health, /v1/models, the OpenAI endpoints);
    POST /inference/v1/generate takes features.kwargs_data entries as mmraw: refs.
    A bad ref gets HTTP 400 invalid_mm_image_ref and the engine keeps serving.
    Images (files, content_parts' s3:// URLs) are read only under --allow-root (or $VF_RENDERER_IMAGE_OFFLOAD_DIR):
    with neither, serve refuses to start rather than read any file a client names.
    Arguments after `--` go to vLLM unchanged. Needs the `vllm` extra.

    Examples:

    \b
        mmoffload serve --model /models/Qwen3-VL-8B --allow-root /runs/r1/assets
        mmoffload serve --model tiny/ --allow-root A -- --max-model-len 4096
        mmoffload serve --model tiny/ --allow-root s3://bucket/r1/images
    """
    with sink.errors_to_exit():
        if not (model / "config.json").is_file():
            raise UsageError(f"Expected a model directory with `config.json`, got `{model}`")
        roots = allow_root or default_allowed_roots(None)
        if not roots:
            raise UsageError(
                "Expected the directories image refs may point into: pass --allow-root DIR (where the "
                f"rollouts' images are stored) or set ${ASSETS_ENV_VAR}; serve never reads just any file"
            )
        try:
            from mmoffload.inference.server import serve as run_server
        except ImportError as exc:
            raise UsageError(f"`mmoffload serve` needs vLLM: pip install 'mmoffload[vllm]' ({exc})") from exc
        run_server(
            model.absolute(),
            host=host,
            port=port,
            vllm_args=list(ctx.args),
            cache_bytes=cache_bytes,
            roots=roots,
            decode_bytes=decode_bytes,
        )

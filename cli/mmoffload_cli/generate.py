"""``mmoffload generate``: complete each offloaded trace's last prompt through an inference server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mmoffload.errors import UsageError
from mmoffload.generate import generate_traces
from mmoffload_cli import options, render


def generate(
    traces: Annotated[
        Path, typer.Argument(help="JSONL of offloaded episodes or traces.", show_default=False)
    ],
    server: Annotated[
        str, typer.Option("--server", help="Base URL of the inference server (mmoffload serve).")
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Write the traces with their completions here.")
    ],
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Tokens to sample per prompt.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="Sampling temperature.")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling seed, for reproducible runs.")] = None,
    sampling_json: Annotated[
        str | None,
        typer.Option("--sampling-json", help="Further vLLM sampling parameters as a JSON object."),
    ] = None,
    as_json: options.Json = False,
    quiet: options.Quiet = False,
) -> None:
    """Complete the last prompt of each offloaded trace; write the completion back as a sampled node.

    Every image of the prompt is sent as an mmraw: ref (no pixels, no base64);
    the new node carries the sampled tokens, mask true and one logprob per token,
    so refs, pack and audit take the output as they take any trace file.

    Examples:

        mmoffload generate traces.offloaded.jsonl --server http://127.0.0.1:8000 -o traces.generated.jsonl

        mmoffload generate t.jsonl --server http://host:8000 -o out.jsonl --temperature 0 --max-tokens 16 --json
    """
    with render.errors_to_exit():
        sampling: dict[str, object] = {}
        if sampling_json is not None:
            try:
                sampling = json.loads(sampling_json)
            except ValueError as exc:
                raise UsageError(f"Expected --sampling-json as a JSON object: {exc}") from exc
            if not isinstance(sampling, dict):
                raise UsageError("Expected --sampling-json as a JSON object")
        sampling.update(max_tokens=max_tokens, temperature=temperature)
        if seed is not None:
            sampling["seed"] = seed
        total = traces.stat().st_size if traces.is_file() else None
        with render.progress_bar("generate", total, enabled=not quiet) as advance:
            report = generate_traces(traces, output, server, sampling, advance=advance)
    render.emit_report(report, "generate", as_json=as_json, quiet=quiet)

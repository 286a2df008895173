"""``mmoffload generate``: complete each offloaded trace's last prompt through an inference server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mmoffload.errors import UsageError
from mmoffload.inference.generate import generate_traces
from mmoffload_cli import options, sink


def generate(
    traces: Annotated[
        Path,
        typer.Argument(
            metavar="PATH",
            help="JSONL of offloaded episodes or traces (.gz/.zst too, - for stdin).",
            show_default=False,
        ),
    ],
    server: Annotated[
        str,
        typer.Option("--server", metavar="URL", help="Base URL of the inference server (mmoffload serve)."),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "-o",
            "--output",
            metavar="PATH",
            help="Write the traces with their completions here (- for stdout; .gz/.zst compress).",
        ),
    ],
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, metavar="N", help="Tokens to sample per prompt.")
    ] = 64,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.0, metavar="T", help="Sampling temperature.")
    ] = 1.0,
    seed: Annotated[
        int | None, typer.Option("--seed", metavar="N", help="Sampling seed, for reproducible runs.")
    ] = None,
    sampling_json: Annotated[
        str | None,
        typer.Option(
            "--sampling-json", metavar="JSON", help="Further vLLM sampling parameters as a JSON object."
        ),
    ] = None,
    protocol: Annotated[
        str,
        typer.Option(
            "--protocol",
            metavar="NAME",
            help="content-parts (stock vLLM's: one pad per image, images by URL or uuid) or mmraw (raw refs).",
        ),
    ] = "content-parts",
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency", min=1, metavar="N", help="Records in flight at once (output order kept)."
        ),
    ] = 1,
    as_json: options.Json = False,
    quiet: options.Quiet = False,
    verbose: options.Verbose = False,
) -> None:
    """Complete the last prompt of each offloaded trace.

    The completion is written back as a sampled node. Every image of the prompt is sent by reference (no pixels, no base64):
    by default as stock vLLM's content_parts (file:// URL and content hash as uuid; an image the server already verified
    as its uuid alone, resent with its URL on a cache miss), the server's expansion checked against the family's;
    with --protocol mmraw as mmraw: refs. Connection errors and 5xx are retried 3 times.
    the new node carries the sampled tokens, mask true and one logprob per token,
    so refs, pack and audit take the output as they take any trace file.

    Examples:

    \b
        mmoffload generate t.jsonl --server http://127.0.0.1:8000 -o out.jsonl
        mmoffload generate t.jsonl --server URL -o out.jsonl --temperature 0
        mmoffload generate t.jsonl --server URL -o o.jsonl --protocol mmraw
        mmoffload generate t.jsonl.gz --server URL -o - | gzip > out.jsonl.gz
    """
    with sink.errors_to_exit(as_json):
        to_stdout = sink.results_on_stdout(output, as_json)
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
        with sink.progress_bar("generate", total, enabled=not quiet) as advance:
            report = generate_traces(
                traces, output, server, sampling, protocol=protocol, concurrency=concurrency, advance=advance
            )
    sink.emit_report(report, "generate", as_json=as_json, quiet=quiet, stdout_taken=to_stdout)

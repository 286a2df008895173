"""Options shared by every command, defined once so the vocabulary stays the same."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmoffload_cli import verbosity

Output = Annotated[
    Path | None, typer.Option("-o", "--output", metavar="PATH", help="Write the result here (- for stdout).")
]
Assets = Annotated[
    Path | None,
    typer.Option(
        "--assets", metavar="DIR", help="Image asset directory (default: $VF_RENDERER_IMAGE_OFFLOAD_DIR)."
    ),
]
RunDir = Annotated[
    Path, typer.Option("--run-dir", metavar="DIR", help="Run directory (RUN/rollouts/step_<N>/...).")
]
Json = Annotated[bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")]
Quiet = Annotated[
    bool,
    typer.Option(
        "-q",
        "--quiet",
        callback=verbosity.set_quiet,
        help="Print nothing but errors (and --json output); silences library warnings too.",
    ),
]
Verbose = Annotated[
    bool,
    typer.Option("-v", "--verbose", callback=verbosity.set_verbose, help="Print more detail."),
]
Workers = Annotated[
    int,
    typer.Option(
        "--workers", min=1, metavar="N", help="Processes for decode, hash and write; output order is kept."
    ),
]
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        metavar="MODEL",
        help="Model directory, hub id ORG/NAME from the local Hugging Face cache (read offline), "
        "or a bundled config: qwen2_5_vl, qwen3_vl, kimi_k25.",
    ),
]
Expect = Annotated[
    list[str] | None,
    typer.Option(
        "--expect",
        metavar="NAME<OP>VALUE",
        help="Assert a figure, e.g. data_uris=0, examples>=1, fill_ratio<0.99 (ops: = == != < <= > >=; "
        "repeatable); a failed one exits 1.",
    ),
]

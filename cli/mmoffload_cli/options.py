"""Options shared by every command, defined once so the vocabulary stays the same."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmoffload_cli import verbosity

Output = Annotated[
    Path | None, typer.Option("-o", "--output", metavar="PATH", help="Write the result here (- for stdout).")
]
# A string, not a Path: a Path would fold `s3://bucket` into `s3:/bucket`.
Assets = Annotated[
    str | None,
    typer.Option(
        "--assets",
        metavar="DIR|URL",
        help="Image asset directory, or an object-store URL such as s3://bucket/prefix "
        "(default: $VF_RENDERER_IMAGE_OFFLOAD_DIR, else RUN/assets/images).",
    ),
]
Remap = Annotated[
    list[str] | None,
    typer.Option(
        "--remap",
        metavar="FROM=TO",
        help="Read image URIs under prefix FROM from TO instead (paths or URLs; repeatable), "
        "e.g. --remap /mnt/rollout/assets=/data/assets.",
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
Ray = Annotated[
    bool,
    typer.Option(
        "--ray",
        help="Run the per-line work as tasks on a Ray cluster: --ray-address, else $RAY_ADDRESS, "
        "else a local cluster for the run (needs the `ray` extra; same output bytes, input order kept).",
    ),
]
RayAddress = Annotated[
    str | None,
    typer.Option(
        "--ray-address", metavar="ADDRESS", help="Ray cluster for --ray (host:port, ray://host:port)."
    ),
]

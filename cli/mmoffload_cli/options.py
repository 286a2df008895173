"""Options shared by every command, defined once so the vocabulary stays the same."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from mmoffload.errors import BadInputError
from mmoffload.io.inputs import InputFormat
from mmoffload.io.remote import is_url
from mmoffload.store.local import directory_or_prefix
from mmoffload_cli import verbosity


def output_path(value: str) -> Path | str:
    """Parse an output path, keeping what a trailing ``/`` means: a directory, created when absent.

    An fsspec URL (``s3://bucket/out.jsonl``, ``s3://bucket/out/``) stays a string: a Path
    would fold its ``//``.

    Raises:
        typer.BadParameter: ``DIR/`` names a file, or cannot be created.
    """
    if is_url(value):
        return value
    path = Path(value)
    if value.endswith(("/", os.sep)) and not path.is_dir():
        # pathlib drops the `/`: without the directory, a file named like it would be written.
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise typer.BadParameter(
                f"`{value}` ends with `/` but cannot be a directory: {exc.strerror}"
            ) from exc
    return path


# Typed `str` so Typer adds no Path conversion of its own after the parser (a URL keeps its `//`).
Output = Annotated[
    str | None,
    typer.Option(
        "-o",
        "--output",
        metavar="PATH",
        parser=output_path,
        help="Write the result here (a file, DIR/ (created when absent), an fsspec URL, or - for stdout).",
    ),
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
Format = Annotated[
    InputFormat,
    typer.Option(
        "--format",
        help="Input format: auto (Parquet by its .parquet name or magic bytes, else JSONL), jsonl, "
        "parquet (needs the `parquet` extra; written as Parquet).",
    ),
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
        help="Assert a figure, e.g. data_uris=0, examples>=1, placeholder_mismatches==0 (ops: = == != < <= > >=; "
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


def allowed_root(value: str) -> Path | str:
    """Parse an ``--allow-root``: a directory, or an object-store prefix kept as a string.

    Raises:
        typer.BadParameter: a ``file://`` URL that names no local path.
    """
    try:
        return directory_or_prefix(value)
    except BadInputError as exc:
        raise typer.BadParameter(exc.message) from exc


# Typed `list[str]`: Typer takes no `list[Path | str]`; the parser makes each value a Path or keeps a URL.
AllowRoot = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-root",
        metavar="DIR|URL",
        parser=allowed_root,
        help="Directory or object-store prefix (s3://bucket/prefix) image refs may point into "
        "(repeatable; default: the run's assets/images and $VF_RENDERER_IMAGE_OFFLOAD_DIR when they "
        "exist, else any regular file).",
    ),
]
SkipInvalid = Annotated[
    bool,
    typer.Option(
        "--skip-invalid",
        help="Keep going past invalid records; write each, whole, with its reason to a rejects file (exit 1).",
    ),
]
# The old name of --skip-invalid in `offload`, still accepted.
SkipBadLines = Annotated[bool, typer.Option("--skip-bad-lines", hidden=True)]

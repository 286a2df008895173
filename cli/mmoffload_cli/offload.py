"""``mmoffload offload``: move inline images out of JSONL into the asset store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmoffload.assets import resolve_assets_dir
from mmoffload.offload import OffloadOptions, offload_files, plan_outputs
from mmoffload.ray_backend import RayOptions
from mmoffload_cli import render
from mmoffload_cli.options import Assets, Json, Output, Quiet, Ray, RayAddress, Workers


def offload(
    inputs: Annotated[list[Path], typer.Argument(help="JSONL files (rollouts, traces, chat requests).")],
    output: Output = None,
    in_place: Annotated[
        bool, typer.Option("--in-place", help="Replace each input with its output, atomically.")
    ] = False,
    assets: Assets = None,
    allow_remote: Annotated[
        bool, typer.Option("--allow-remote", help="Keep http(s) and other remote sources as they are.")
    ] = False,
    check_files: Annotated[
        bool, typer.Option("--check-files", help="Fail on a file:// source that names no existing file.")
    ] = False,
    adopt_files: Annotated[
        bool,
        typer.Option(
            "--adopt-files", help="Copy file:// sources outside the asset dir into it (content addressed)."
        ),
    ] = False,
    skip_bad_lines: Annotated[
        bool,
        typer.Option(
            "--skip-bad-lines",
            help="Keep going past bad lines; write each, whole, with its reason to a rejects file (exit 1).",
        ),
    ] = False,
    rejects: Annotated[
        Path | None,
        typer.Option("--rejects", help="Rejects file for the whole run (default: <output>.rejects.jsonl)."),
    ] = None,
    workers: Workers = 1,
    ray: Ray = False,
    ray_address: RayAddress = None,
    json_output: Json = False,
    quiet: Quiet = False,
) -> None:
    """Store every inline image once and point its part at the file:// URI.

    Finds image parts anywhere in each record (OpenAI chat, HF, Responses, raw
    descriptors), stores each data: URL's bytes as assets/<sha256[:32]>.<ext>,
    and rewrites the part in canonical shape. Everything else is kept. Outputs
    appear only when the whole run succeeded.

    Examples:

        mmoffload offload rollouts.jsonl -o offloaded.jsonl --assets run/assets/images

        mmoffload offload a.jsonl b.jsonl -o out/ --workers 8 --skip-bad-lines --json

        mmoffload offload rollouts.jsonl --in-place

        mmoffload offload dumps/*.jsonl -o out/ --assets s3://bucket/run1/images --ray
    """
    with render.errors_to_exit(
        "no output or rejects file was written; images already stored stay in the asset directory, "
        "each whole (content addressed)"
    ):
        outputs = plan_outputs(inputs, output, in_place)
        total = sum(path.stat().st_size for path in inputs if path.is_file())
        with render.progress_bar("offload", total, enabled=not quiet) as advance:
            report = offload_files(
                inputs,
                outputs,
                resolve_assets_dir(assets, None),
                options=OffloadOptions(allow_remote, check_files, adopt_files),
                skip_bad_lines=skip_bad_lines,
                rejects=rejects,
                workers=workers,
                ray=RayOptions(address=ray_address) if ray or ray_address else None,
                advance=advance,
            )
    render.emit_report(report, "offload", as_json=json_output, quiet=quiet)
    if report.rejected_lines:
        render.stderr.print(
            render.shorten(f"{report.rejected_lines} line(s) rejected, see {', '.join(report.rejects)}")
        )
        raise typer.Exit(render.EXIT_PROBLEMS)

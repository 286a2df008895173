"""``mmoffload offload``: move inline images out of JSONL into the asset store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmoffload.offload import OffloadOptions, offload_files
from mmoffload.offload.report import default_rejects
from mmoffload.runners.ray import RayOptions
from mmoffload.store.local import resolve_assets_dir
from mmoffload_cli import options, sink
from mmoffload_cli.files import plan_files
from mmoffload_cli.options import Assets, Format, Json, Output, Quiet, Ray, RayAddress, Verbose, Workers


def offload(
    inputs: Annotated[
        list[str],  # Strings: a Path would fold `s3://bucket` into `s3:/bucket`.
        typer.Argument(
            metavar="PATH",
            help="JSONL files (rollouts, traces, chat requests; .gz/.zst read too), Parquet files, "
            "directories, quoted globs, fsspec URLs (s3://, gs://, hf://), or - for stdin.",
            show_default=False,
        ),
    ],
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
    skip_invalid: options.SkipInvalid = False,
    skip_bad_lines: options.SkipBadLines = False,
    rejects: Annotated[
        Path | None,
        typer.Option(
            "--rejects",
            metavar="PATH",
            help="Rejects file for the whole run (default: <output>.rejects.jsonl).",
        ),
    ] = None,
    input_format: Format = "auto",
    workers: Workers = 1,
    ray: Ray = False,
    ray_address: RayAddress = None,
    json_output: Json = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Store each inline image once and point its part at its file.

    Finds image parts anywhere in each record (OpenAI chat, HF, Responses, raw
    descriptors), stores each data: URL's bytes as assets/<sha256[:32]>.<ext>,
    and rewrites the part in canonical shape. Everything else is kept. Parquet
    (datasets, verl) goes out as Parquet: image columns ({bytes, path} structs,
    lists of them, binary, data: URLs, chat columns) point at the stored files'
    paths, every other column and the schema's metadata unchanged. Outputs
    appear only when the whole run succeeded. Inputs from a directory or a glob
    are mirrored under -o DIR by relative path; an output named .gz or .zst is
    written compressed.

    Examples:

    \b
        mmoffload offload rollouts.jsonl -o out.jsonl --assets RUN/assets/images
        mmoffload offload a.jsonl b.jsonl -o out/ --workers 8 --skip-invalid
        mmoffload offload rollouts.jsonl --in-place
        mmoffload offload train.parquet -o out.parquet --assets DIR
        mmoffload offload 'runs/*/results.jsonl.gz' -o out/ --assets DIR
        cat rollouts.jsonl | mmoffload offload - -o - --assets DIR | head
        mmoffload offload dumps/*.jsonl -o out/ --assets s3://bkt/run1 --ray
    """
    with sink.errors_to_exit(
        json_output,
        on_interrupt="no output or rejects file was written; images already stored stay in the asset "
        "directory, each whole (content addressed)",
    ):
        to_stdout = sink.results_on_stdout(output, json_output)
        own = [default_rejects(output)] if isinstance(output, Path) else []
        paths, outputs = plan_files(inputs, output, in_place, own=[*own, *([rejects] if rejects else [])])
        # Progress counts decompressed bytes: for a compressed input the size is only a guess.
        with sink.progress_bar("offload", sink.local_bytes(paths), enabled=not quiet) as advance:
            report = offload_files(
                paths,
                outputs,
                resolve_assets_dir(assets, None),
                options=OffloadOptions(allow_remote, check_files, adopt_files),
                skip_invalid=skip_invalid or skip_bad_lines,
                rejects=rejects,
                workers=workers,
                ray=RayOptions(address=ray_address) if ray or ray_address else None,
                advance=advance,
                input_format=input_format,
            )
    sink.emit_report(report, "offload", as_json=json_output, quiet=quiet, stdout_taken=to_stdout)
    if report.rejected_lines:
        sink.stderr.print(f"{report.rejected_lines} line(s) rejected, see {', '.join(report.rejects)}")
        raise typer.Exit(sink.EXIT_PROBLEMS)

"""``mmoffload inline``: every stored image ref back to a ``data:`` URL (the reverse of offload)."""

from __future__ import annotations

from typing import Annotated

import typer

from mmoffload.errors import UsageError
from mmoffload.inline import inline_files
from mmoffload_cli import sink
from mmoffload_cli.files import plan_files
from mmoffload_cli.options import AllowRoot, Format, Json, Output, Quiet, Verbose


def inline(
    inputs: Annotated[
        list[str],  # Strings: a Path would fold `s3://bucket` into `s3:/bucket`.
        typer.Argument(
            metavar="PATH",
            help="Offloaded JSONL files (.gz/.zst read too), Parquet files, directories, quoted globs, "
            "or - for stdin.",
            show_default=False,
        ),
    ],
    output: Output = None,
    allow_root: AllowRoot = None,
    input_format: Format = "auto",
    json_output: Json = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Put each stored image back inline, as a data: URL.

    For trainers and tools that take only inline images. Each file:// (or
    object-store) ref is read, checked against its content-addressed name and
    written as a data: URL whose media type is sniffed from the bytes. Parquet
    image columns get their bytes back ({bytes, path: null}). offload then
    inline gives back the original records. Outputs appear only when the whole
    run succeeded.

    Examples:

    \b
        mmoffload inline rollouts.offloaded.jsonl -o rollouts.inline.jsonl
        mmoffload inline out.parquet -o inline.parquet --allow-root DIR
        mmoffload inline 'runs/*/rollouts.offloaded.jsonl' -o inline/
    """
    with sink.errors_to_exit(json_output):
        to_stdout = sink.results_on_stdout(output, json_output)
        if output is None:
            raise UsageError("Expected an output (`-o PATH`, `-o DIR/` or `-o -`)")
        paths, outputs = plan_files(inputs, output)
        with sink.progress_bar("inline", sink.local_bytes(paths), enabled=not quiet) as advance:
            report = inline_files(
                paths,
                outputs,
                allowed_roots=allow_root,
                input_format=input_format,
                advance=advance,
            )
    sink.emit_report(report, "inline", as_json=json_output, quiet=quiet, stdout_taken=to_stdout)

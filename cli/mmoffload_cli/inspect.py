"""``mmoffload inspect``: one sample or micro batch as an HTML page, images on their token spans."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmoffload.families import Families, resolve_model_dir
from mmoffload.io.outputs import open_output
from mmoffload.views.inspect_html import inspect_page
from mmoffload.views.show import select
from mmoffload.views.token_stream import TokenText
from mmoffload_cli import options, sink
from mmoffload_cli.show import MicroBatchIndex, Rank, SampleIndex, Step, Target

HtmlOut = Annotated[
    Path, typer.Option("--html", metavar="OUT.html", help="Write the page here (- for stdout).")
]


def inspect(
    target: Target,
    html_out: HtmlOut,
    step: Step = None,
    rank: Rank = None,
    micro_batch: MicroBatchIndex = None,
    sample: SampleIndex = None,
    model: options.Model = None,
    as_json: options.Json = False,
    quiet: options.Quiet = False,
    verbose: options.Verbose = False,
) -> None:
    """Write one sample or micro batch as an HTML page.

    The page is self-contained. It shows the token stream (decoded with --model's tokenizer, offline,
    else ids) with bands for the loss mask, sequences, padding and image tokens;
    each image as a thumbnail at its span with its file, hash, sizes, grid and
    expected placeholder length; and every problem audit reports, marked where
    it is. Exit 0 when there is no problem, 1 when the page marks some, 2 when
    the selection cannot be read.

    Examples:

    \b
        mmoffload inspect RUN --html sample.html
        mmoffload inspect RUN --rank 0 --micro-batch 1 --model DIR --html mb.html
        mmoffload inspect RUN --sample 0 --html - > sample.html
    """
    with sink.errors_to_exit(as_json):
        to_stdout = sink.results_on_stdout(html_out, as_json, "--html")
        families = Families(resolve_model_dir(model) if model is not None else None)
        selected = select(target, step=step, rank=rank, micro_batch=micro_batch, sample=sample)
        document, report = inspect_page(selected, families, TokenText.for_model(families))
        with open_output(html_out) as out:
            out.write(document.encode())
    title = "inspect: wrote the page to stdout" if to_stdout else f"inspect: wrote {html_out}"
    sink.emit_report(report, title, as_json=as_json, quiet=quiet, stdout_taken=to_stdout)
    if not report.ok:
        raise typer.Exit(sink.EXIT_PROBLEMS)

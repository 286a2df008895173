"""``mmoffload parity``: does the trainer compute the distribution the sampler did?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from mmoffload.errors import UsageError
from mmoffload.io.outputs import open_output
from mmoffload.parity import DEFAULT_THRESHOLD, ParityReport, parity_run
from mmoffload.store.local import default_allowed_roots
from mmoffload.store.remap import Remap
from mmoffload_cli import options, sink

SHOWN_SAMPLES = 10

ModelRequired = Annotated[
    str,
    typer.Option(
        "--model",
        metavar="MODEL",
        help="The model the inference server served: a directory or a hub id ORG/NAME in the local "
        "Hugging Face cache (read offline).",
    ),
]
Steps = Annotated[
    str | None,
    typer.Option("--steps", metavar="S", help="Steps to check: N, N,M or N-M (default: all)."),
]
MaxMicroBatches = Annotated[
    int | None,
    typer.Option(
        "--max-micro-batches", min=1, metavar="N", help="Check at most N trained micro batches, in order."
    ),
]
Device = Annotated[str, typer.Option("--device", metavar="cpu|cuda", help="Where the model runs.")]
Dtype = Annotated[
    str, typer.Option("--dtype", metavar="float32|bfloat16", help="The model's dtype (the server's).")
]
Threshold = Annotated[
    float,
    typer.Option("--threshold", min=0.0, metavar="KL", help="Flag a sample whose mismatch KL is above this."),
]
HtmlOut = Annotated[
    Path | None,
    typer.Option(
        "--html",
        metavar="PAGE",
        help="Also write a page: per-sample KL plotted, the worst samples with their images.",
    ),
]


def parity(
    run: Annotated[
        Path,
        typer.Argument(metavar="RUN", help="Run directory holding rollouts/step_<N>/rank_<R>.bin."),
    ],
    model: ModelRequired,
    steps: Steps = None,
    max_micro_batches: MaxMicroBatches = None,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    threshold: Threshold = DEFAULT_THRESHOLD,
    html_out: HtmlOut = None,
    remap: options.Remap = None,
    allow_root: options.AllowRoot = None,
    as_json: options.Json = False,
    quiet: options.Quiet = False,
    verbose: options.Verbose = False,
) -> None:
    """Compare the trainer's log-probs with the sampler's, per sample.

    Each micro batch is materialized as the trainer does it (the model's own
    processor), each packed sample runs through the Hugging Face model alone,
    and its log-prob of every trained token, at the recorded temperature, is
    compared with the recorded inference log-prob: the mismatch KL (mean of
    exp(d) - 1 - d), the mean and max |d|. Samples are listed worst first
    with their images. Exit 1 when a sample is over the threshold, has a
    missing image or cannot be built; 0 otherwise; 2 when it cannot run.

    Examples:

    \b
        mmoffload parity RUN --model /models/Qwen3-VL-8B-Instruct --device cuda
        mmoffload parity RUN --model DIR --steps 3 --max-micro-batches 8 --json
        mmoffload parity RUN --model DIR --dtype bfloat16 --html parity.html
    """
    with sink.errors_to_exit(as_json, "nothing was written"):
        chosen = parse_steps(steps)

        with sink.counting_bar("parity", None, enabled=not quiet) as advance:

            def announce(checked: int, total: int) -> None:
                advance.add_total(checked)  # the bar's total: what is checked, known once the run is read
                if not quiet:
                    sink.stderr.print(
                        f"parity: checking {checked:,} of {total:,} micro batches", markup=False
                    )

            report = parity_run(
                run,
                model=model,
                steps=chosen,
                max_micro_batches=max_micro_batches,
                device=device,
                dtype=dtype,
                threshold=threshold,
                remap=Remap.parse(remap or []),
                allowed_roots=allow_root or default_allowed_roots(run),
                on_total=announce,
                advance=advance,
            )
        if html_out is not None:
            from mmoffload.parity.html import parity_page

            document = parity_page(report)
            with open_output(html_out) as out:
                out.write(document.encode())
    title = f"parity: {report.micro_batches_checked:,} of {report.micro_batches:,} micro batches checked"
    sink.emit_report(report, title, as_json=as_json, quiet=quiet)
    if not as_json and not quiet:
        sink.stdout.print(_kl_line(report), markup=False)
        sink.stdout.print(_worst_table(report))
    if not report.ok:
        if not quiet:
            sink.stderr.print(
                f"{report.samples_flagged} sample(s) flagged: {report.samples_over_threshold} over KL "
                f"{report.threshold:g}, {report.samples_missing_image} with a missing image, "
                f"{report.samples_not_materialized} the trainer cannot build",
                markup=False,
            )
        raise typer.Exit(sink.EXIT_PROBLEMS)


def parse_steps(text: str | None) -> list[int] | None:
    """Parse ``--steps``: ``N``, ``N,M`` or ``N-M`` (inclusive), combined with commas.

    Raises:
        UsageError: anything else.
    """
    if text is None:
        return None
    chosen: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            low, high = int(first), int(last or first)
            if low < 0 or high < low:
                raise ValueError(part)
            chosen.extend(range(low, high + 1))
    except ValueError:
        raise UsageError(f"Expected --steps as N, N,M or N-M, got `{text}`") from None
    return sorted(set(chosen))


def _worst_table(report: ParityReport) -> Table:
    """Return the worst samples as a table: where, status, KL, |d|, tokens, image files and spans."""
    table = Table(title="worst samples", title_justify="left", box=box.SIMPLE, padding=(0, 1))
    for column in ("step", "rank", "mb", "sample", "status", "kl", "mean |d|", "max |d|", "tokens", "images"):
        table.add_column(column, justify="left" if column in ("status", "images") else "right")
    for sample in report.per_sample[:SHOWN_SAMPLES]:
        images = " ".join(f"{i.file[:10]}{'(missing)' * i.missing}@{i.offset}" for i in sample.images)
        table.add_row(
            _number(sample.step),
            _number(sample.rank),
            str(sample.micro_batch),
            str(sample.index),
            sink.cell(str(sample.status)),
            _number(sample.kl),
            _number(sample.mean_abs_diff),
            _number(sample.max_abs_diff),
            f"{sample.tokens:,}",
            sink.cell(images or "-"),  # File names: user text.
        )
    return table


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _kl_line(report: ParityReport) -> str:
    """The KL figures with significant digits (the report table shows three decimals)."""
    return (
        f"mismatch KL: mean {_number(report.kl_mean)}, max {_number(report.kl_max)} over "
        f"{report.tokens:,} tokens of {report.samples_compared:,} samples; threshold {report.threshold:g}"
    )

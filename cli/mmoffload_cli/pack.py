"""``mmoffload pack``: each step's TrainingBatch to per-rank micro batch files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from mmoffload.contract import rundir
from mmoffload.pack import DEFAULT_PAD_TOKEN_ID, Balance, PackOptions, PackReport, pack_run
from mmoffload_cli import options, sink

Run = Annotated[Path, typer.Argument(metavar="RUN", help="Run directory to pack.", show_default=False)]
SeqLen = Annotated[
    int, typer.Option("--seq-len", min=1, metavar="N", help="Tokens per micro batch (before padding).")
]
PadMultiple = Annotated[
    int,
    typer.Option(
        "--pad-multiple", min=1, metavar="N", help="Pad each micro batch to a multiple of this (CP degree)."
    ),
]
WorldSize = Annotated[int, typer.Option("--world-size", min=1, metavar="N", help="Number of data ranks.")]
AttentionWeight = Annotated[
    float,
    typer.Option(
        "--attention-weight",
        min=0.0,
        metavar="W",
        help="Balance ranks by tokens + this x sum of squared sequence lengths.",
    ),
]
PadTokenId = Annotated[
    int, typer.Option("--pad-token-id", min=0, metavar="ID", help="Token id written on padding.")
]
BalanceOption = Annotated[
    Balance,
    typer.Option(
        "--balance",
        help="Rank partition: prime-rl (byte-identical to prime-rl's) or best (never a heavier busiest rank).",
    ),
]
MaxTruncatedFraction = Annotated[
    float | None,
    typer.Option(
        "--max-truncated-fraction",
        min=0.0,
        max=1.0,
        metavar="F",
        help="Exit 1 without writing when truncation would drop more than this fraction of trainable tokens.",
        show_default="no limit",
    ),
]


def pack(
    run: Run,
    seq_len: SeqLen,
    pad_multiple: PadMultiple = 1,
    world_size: WorldSize = 1,
    attention_weight: AttentionWeight = 0.0,
    pad_token_id: PadTokenId = DEFAULT_PAD_TOKEN_ID,
    balance: BalanceOption = "prime-rl",
    max_truncated_fraction: MaxTruncatedFraction = None,
    as_json: options.Json = False,
    quiet: options.Quiet = False,
    verbose: options.Verbose = False,
) -> None:
    """Pack each step's samples into per-rank micro batch files.

    Reads RUN/rollouts/step_<N>/train_rollouts.bin, writes rank_<R>.bin beside it.
    Images are never split, families never share a micro batch, and every rank
    gets the same number of micro batches with the same modality at each index;
    by default the rank files are byte-identical to prime-rl's prepare_batch (pad
    token id aside). Truncation to --seq-len is reported and warned about on
    stderr; -v adds a table of each step: micro batches per rank, their fill,
    what truncation cut. Exit 0 when written, 1 when --max-truncated-fraction refused the run
    (nothing written), 2 on bad input.

    Examples:

    \b
        mmoffload pack RUN --seq-len 8192
        mmoffload pack RUN --seq-len 16384 --pad-multiple 2 --world-size 8
        mmoffload pack RUN --seq-len 8192 --world-size 8 --balance best
        mmoffload pack RUN --seq-len 8192 --world-size 8 -v
        mmoffload pack RUN --seq-len 8192 --max-truncated-fraction 0.01
    """
    with sink.errors_to_exit(as_json, "no rank file was written (a run's rank files appear all at once)"):
        # Progress by the bytes of each step's TrainingBatch packed.
        batches = [rundir.training_batch_path(run, step) for step in rundir.steps(run)]
        with sink.progress_bar("pack", sink.local_bytes(batches), enabled=not quiet) as advance:
            report = pack_run(
                run,
                PackOptions(
                    seq_len=seq_len,
                    pad_multiple=pad_multiple,
                    world_size=world_size,
                    attention_weight=attention_weight,
                    pad_token_id=pad_token_id,
                    balance=balance,
                    max_truncated_fraction=max_truncated_fraction,
                ),
                advance,
            )
    sink.emit_report(report, "pack", as_json=as_json, quiet=quiet)
    if verbose and report.steps and not (as_json or quiet):
        sink.stdout.print(steps_table(report))
    if report.any_dropped and not quiet:
        sink.stderr.print(f"warning: {truncation_summary(report)}", markup=False)
    if not report.written:
        sink.stderr.print(
            f"error: nothing written: truncation would drop {report.trainable_fraction_dropped:.1%} of the "
            f"trainable tokens, more than --max-truncated-fraction {max_truncated_fraction} "
            "(raise --seq-len)",
            markup=False,
        )
        raise typer.Exit(sink.EXIT_PROBLEMS)


def truncation_summary(report: PackReport) -> str:
    """Say in one line what truncation to ``seq_len`` dropped."""
    return (
        f"truncation to --seq-len {report.seq_len:,} cut {report.samples_truncated:,} of "
        f"{report.samples:,} samples: {report.tokens_dropped:,} tokens dropped, "
        f"{report.trainable_tokens_dropped:,} of them trainable "
        f"({report.trainable_fraction_dropped:.1%} of all trainable tokens), "
        f"{report.images_dropped:,} images dropped"
    )


def steps_table(report: PackReport) -> Table:
    """Render each step's packing: micro batches per rank, their fill, and what truncation cut."""
    title = "pack: each step (micro batches per rank)"
    table = Table(title=title, title_justify="left", box=box.SIMPLE, pad_edge=False, collapse_padding=True)
    by_rank = report.world_size > 1  # One rank's fill is the step's.
    headers = ["step", "samples", "micro\nbatches", "fill", *(["rank fill\nmin-max"] * by_rank)]
    headers += ["samples\ncut", "tokens\ndropped", "trainable\ndropped", "images\ndropped"]
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True)
    for step in report.steps:
        fills = step.rank_fill_ratios or [step.fill_ratio]
        table.add_row(
            *map(sink.format_value, (step.step, step.samples, step.micro_batches_per_rank)),
            f"{step.fill_ratio:.1%}",
            *([f"{min(fills):.0%}-{max(fills):.0%}".replace("%-", "-")] * by_rank),
            *map(sink.format_value, (step.samples_truncated, step.tokens_dropped)),
            *map(sink.format_value, (step.trainable_tokens_dropped, step.images_dropped)),
        )
    return table

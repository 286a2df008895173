"""``mmoffload pack``: each step's TrainingBatch to per-rank micro batch files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmoffload.packing import DEFAULT_PAD_TOKEN_ID, PackOptions, pack_run
from mmoffload_cli import options, render

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


def pack(
    run: Run,
    seq_len: SeqLen,
    pad_multiple: PadMultiple = 1,
    world_size: WorldSize = 1,
    attention_weight: AttentionWeight = 0.0,
    pad_token_id: PadTokenId = DEFAULT_PAD_TOKEN_ID,
    as_json: options.Json = False,
    quiet: options.Quiet = False,
    verbose: options.Verbose = False,
) -> None:
    """Pack each step's samples into per-rank micro batch files.

    Reads RUN/rollouts/step_<N>/train_rollouts.bin, writes rank_<R>.bin beside it.
    Images are never split, families never share a micro batch, and every rank
    gets the same number of micro batches with the same modality at each index.

    Examples:

    \b
        mmoffload pack RUN --seq-len 8192
        mmoffload pack RUN --seq-len 16384 --pad-multiple 2 --world-size 8
    """
    with render.errors_to_exit(as_json):
        report = pack_run(
            run,
            PackOptions(
                seq_len=seq_len,
                pad_multiple=pad_multiple,
                world_size=world_size,
                attention_weight=attention_weight,
                pad_token_id=pad_token_id,
            ),
        )
    render.emit_report(report, "pack", as_json=as_json, quiet=quiet)

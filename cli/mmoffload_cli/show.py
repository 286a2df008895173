"""``mmoffload show``: one TrainingSample or MicroBatch as JSON with field names."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mmoffload.views.show import named, select
from mmoffload_cli import sink

Target = Annotated[
    Path,
    typer.Argument(metavar="RUN|PATH", help="A run directory, a rank_<R>.bin or a TrainingBatch .bin file."),
]
Step = Annotated[
    int | None, typer.Option("--step", min=0, metavar="N", help="Step of a run (default: its first).")
]
Rank = Annotated[
    int | None, typer.Option("--rank", min=0, metavar="R", help="Rank file of the step (default: 0).")
]
MicroBatchIndex = Annotated[
    int | None,
    typer.Option("--micro-batch", min=0, metavar="K", help="Micro batch in the rank file (default: 0)."),
]
SampleIndex = Annotated[
    int | None,
    typer.Option(
        "--sample",
        min=0,
        metavar="I",
        help="Sample in the step's train_rollouts.bin instead of a micro batch.",
    ),
]
Full = Annotated[bool, typer.Option("--full", help="Print per-token arrays and tensor bytes whole.")]


def show(
    target: Target,
    step: Step = None,
    rank: Rank = None,
    micro_batch: MicroBatchIndex = None,
    sample: SampleIndex = None,
    full: Full = False,
) -> None:
    """Print one TrainingSample or MicroBatch as JSON.

    Decoded, fields by name. Per-token arrays longer than 16 entries print as their length, first and last
    8 entries unless --full. Exit 2 when the selection does not exist.

    Examples:

    \b
        mmoffload show RUN
        mmoffload show RUN --rank 0 --micro-batch 1 | jq .record.mm_refs
        mmoffload show RUN --sample 3 --full
        mmoffload show RUN/rollouts/step_0/rank_0.bin --micro-batch 1
    """
    with sink.errors_to_exit():
        selected = select(target, step=step, rank=rank, micro_batch=micro_batch, sample=sample)
        document = named(selected, full=full)
    sys.stdout.write(pretty_json(document) + "\n")


def pretty_json(value: Any, indent: str = "") -> str:
    """Indent objects and lists of objects, but keep a list of numbers or strings on one line."""
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = (f"{inner}{sink.json_text(key)}: {pretty_json(item, inner)}" for key, item in value.items())
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
        return "[\n" + ",\n".join(inner + pretty_json(item, inner) for item in value) + "\n" + indent + "]"
    return sink.json_text(value)

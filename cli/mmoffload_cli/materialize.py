"""``mmoffload materialize``: make the trainer's model kwargs from a run's rank files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmoffload.io.outputs import check_writable_dir
from mmoffload.materialize import MissingImagePolicy, materialize_run
from mmoffload.store.local import default_allowed_roots
from mmoffload.store.remap import Remap
from mmoffload_cli import options, sink
from mmoffload_cli.options import AllowRoot, Json, Model, Quiet, Verbose


def materialize(
    run: Annotated[
        Path,
        typer.Argument(metavar="RUN", help="Run directory holding rollouts/step_<N>/rank_<R>.bin."),
    ],
    model: Model = None,
    missing_image_policy: Annotated[
        MissingImagePolicy,
        typer.Option(
            "--missing-image-policy",
            help="An absent image file: zero pixels and a micro batch that trains nothing, or an error.",
        ),
    ] = MissingImagePolicy.PLACEHOLDER_ZERO_LOSS,
    save: Annotated[
        Path | None,
        typer.Option(
            "--save",
            metavar="DIR",
            help="Write each micro batch's tensors to DIR/step_<N>/rank_<R>_mb_<K>.safetensors.",
        ),
    ] = None,
    save_dummies: Annotated[
        bool,
        typer.Option(
            "--save-dummies", help="Also save the pixels of dummy micro batches (they train nothing)."
        ),
    ] = False,
    remap: options.Remap = None,
    allow_root: AllowRoot = None,
    json_output: Json = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Materialize every micro batch exactly as the trainer would.

    Reads each image its refs name, checks its content hash, decodes it, runs
    the family's processor and checks each grid against its descriptor.
    Reports images, cache hits, placeholders, pixel bytes and time spent per
    phase. Exits 1 when an image was missing and got zero-loss placeholder
    pixels, 2 on any error.

    Examples:

    \b
        mmoffload materialize RUN --model /models/Qwen3-VL-8B-Instruct
        mmoffload materialize RUN --model Qwen/Qwen3-VL-8B-Instruct --json
        mmoffload materialize RUN --missing-image-policy error
        mmoffload materialize RUN --model qwen3_vl --save RUN/pixels
        mmoffload materialize RUN --remap s3://rollouts/assets=/data/assets
    """

    def print_estimate(size: int, micro_batches: int) -> None:
        if not quiet:
            sink.stderr.print(
                f"materialize: saving about {size / 1e6:,.1f} MB for {micro_batches:,} micro batches to {save}",
                markup=False,
            )

    with (
        sink.errors_to_exit(
            json_output, "safetensors files already saved stay, each whole; no other file was written"
        ),
        sink.counting_bar("materialize", None, enabled=not quiet) as advance,
    ):
        if save is not None:
            check_writable_dir(save, "--save directory")
        report = materialize_run(
            run,
            model=model,
            missing_image_policy=missing_image_policy,
            save_dir=save,
            save_dummies=save_dummies,
            remap=Remap.parse(remap or []),
            advance=advance,
            add_total=advance.add_total,
            on_estimate=print_estimate,
            allowed_roots=allow_root or default_allowed_roots(run),
        )
    sink.emit_report(report, "materialize", as_json=json_output, quiet=quiet)
    if report.images_placeholdered:
        sink.stderr.print(
            f"{report.images_placeholdered} missing image(s) placeholdered: "
            f"{report.micro_batches_zero_loss} micro batch(es) train nothing"
        )
        raise typer.Exit(sink.EXIT_PROBLEMS)

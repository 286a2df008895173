"""``mmoffload materialize``: make the trainer's model kwargs from a run's rank files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmoffload.assets import default_allowed_roots
from mmoffload.io import check_writable_dir
from mmoffload.materialize import MissingImagePolicy, iter_rank_files, materialize_run
from mmoffload.remap import Remap
from mmoffload_cli import options, render
from mmoffload_cli.options import AllowRoot, Json, Model, Quiet


def materialize(
    run: Annotated[Path, typer.Argument(help="Run directory holding rollouts/step_<N>/rank_<R>.bin.")],
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
            help="Write each micro batch's tensors to DIR/step_<N>/rank_<R>_mb_<K>.safetensors.",
        ),
    ] = None,
    remap: options.Remap = None,
    allow_root: AllowRoot = None,
    json_output: Json = False,
    quiet: Quiet = False,
) -> None:
    """Materialize every micro batch of a run exactly as the trainer would.

    Reads each image its refs name, checks its content hash, decodes it, runs
    the family's processor and checks each grid against its descriptor.
    Reports images, cache hits, placeholders, pixel bytes and time spent per
    phase. Exits 1 when an image was missing and got zero-loss placeholder
    pixels, 2 on any error.

    Examples:

        mmoffload materialize run/ --model /models/Qwen3-VL-8B-Instruct

        mmoffload materialize run/ --missing-image-policy error --json

        mmoffload materialize run/ --model qwen2_5_vl --save run/materialized

        mmoffload materialize run/ --remap s3://rollouts/assets=/data/assets
    """
    with render.errors_to_exit("safetensors files already saved stay, each whole; no other file was written"):
        if save is not None:
            check_writable_dir(save, "--save directory")
        total = sum(path.stat().st_size for _, path in iter_rank_files(run))
        with render.progress_bar("materialize", total, enabled=not quiet) as advance:
            report = materialize_run(
                run,
                model=model,
                missing_image_policy=missing_image_policy,
                save_dir=save,
                remap=Remap.parse(remap or []),
                advance=advance,
                allowed_roots=allow_root or default_allowed_roots(run),
            )
    render.emit_report(report, "materialize", as_json=json_output, quiet=quiet)
    if report.images_placeholdered:
        render.stderr.print(
            f"{report.images_placeholdered} missing image(s) placeholdered: "
            f"{report.micro_batches_zero_loss} micro batch(es) train nothing"
        )
        raise typer.Exit(render.EXIT_PROBLEMS)

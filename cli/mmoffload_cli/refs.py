"""``mmoffload refs``: offloaded rollout traces to per-step TrainingBatch files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmoffload.families import resolve_model_dir
from mmoffload.io.inputs import expand_inputs
from mmoffload.refs import RefsOptions, build_refs
from mmoffload.store.local import default_allowed_roots
from mmoffload.store.remap import Remap
from mmoffload_cli import options, sink

Traces = Annotated[
    list[Path],
    typer.Argument(
        metavar="PATH",
        help="JSONL files of v1 episodes, bare traces or flat samples (detected per line; "
        ".gz/.zst too), directories, quoted globs, or - for stdin.",
        show_default=False,
    ),
]
StepSize = Annotated[
    int | None,
    typer.Option(
        "--step-size", min=1, metavar="N", help="Samples per step (default: all samples in one step)."
    ),
]
FirstStep = Annotated[
    int, typer.Option("--first-step", min=0, metavar="N", help="Number of the first step written.")
]
Temperature = Annotated[
    float,
    typer.Option("--temperature", metavar="T", help="Sampling temperature for traces that record none."),
]
EnvName = Annotated[
    str, typer.Option("--env-name", metavar="NAME", help="Env name for records without `env.id`.")
]
VerifyHashes = Annotated[
    bool,
    typer.Option(
        "--verify-hashes/--no-verify-hashes",
        help="Check each image file's content hash (existence is always checked).",
    ),
]
Rejects = Annotated[
    Path | None,
    typer.Option(
        "--rejects",
        metavar="PATH",
        help="Rejects file for --skip-invalid (default RUN/rollouts/rejects.jsonl).",
    ),
]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace an earlier run's steps without a warning and remove those this run does not write.",
    ),
]


def refs(
    traces: Traces,
    run_dir: options.RunDir,
    model: options.Model = None,
    step_size: StepSize = None,
    first_step: FirstStep = 0,
    temperature: Temperature = 1.0,
    env_name: EnvName = "",
    verify_hashes: VerifyHashes = True,
    skip_invalid: options.SkipInvalid = False,
    rejects: Rejects = None,
    remap: options.Remap = None,
    allow_root: options.AllowRoot = None,
    overwrite: Overwrite = False,
    as_json: options.Json = False,
    quiet: options.Quiet = False,
    verbose: options.Verbose = False,
) -> None:
    """Turn offloaded traces into per-step TrainingBatch files.

    Writes RUN/rollouts/step_<N>/train_rollouts.bin with mm_refs.
    Every branch of a trace becomes one sample; every image is checked against its
    family's placeholder length, its file's content hash and the image tokens.
    Exit 0 on success, 1 when --skip-invalid rejected records, 2 on bad input.

    Examples:

    \b
        mmoffload refs offloaded.jsonl --run-dir RUN
        mmoffload refs a.jsonl b.jsonl --run-dir RUN --model qwen3_vl --json
        mmoffload refs 'runs/*/traces.jsonl' --run-dir RUN --step-size 256
        mmoffload refs traces.jsonl --run-dir RUN --skip-invalid
        mmoffload refs new.jsonl --run-dir RUN --overwrite
        mmoffload refs traces.jsonl --run-dir RUN --remap /mnt/a=/data/a
    """
    with sink.errors_to_exit(as_json, "no step was written (a run's steps appear all at once)"):
        model_dir = resolve_model_dir(model) if model is not None else None
        # The run's own files (its rejects.jsonl) are no input to it.
        inputs = [
            item.path for item in expand_inputs(traces, exclude=[run_dir, *([rejects] if rejects else [])])
        ]
        with sink.progress_bar("refs", sink.local_bytes(inputs), enabled=not quiet) as advance:
            report = build_refs(
                inputs,
                run_dir,
                RefsOptions(
                    model_dir=model_dir,
                    step_size=step_size,
                    first_step=first_step,
                    temperature=temperature,
                    env_name=env_name,
                    verify_hashes=verify_hashes,
                    skip_invalid=skip_invalid,
                    rejects_path=rejects,
                    remap=Remap.parse(remap or []),
                    allowed_roots=allow_root or default_allowed_roots(run_dir),
                    overwrite=overwrite,
                ),
                advance,
            )
    sink.emit_report(report, "refs", as_json=as_json, quiet=quiet)
    if not report.type_ids_cross_checked and not quiet:
        sink.stderr.print(
            "warning: no token-type map for some family: image type ids were derived from the "
            "placeholders and not cross-checked against the tokens"
        )
    if report.rejected_records:
        if not quiet:
            sink.stderr.print(f"{report.rejected_records:,} record(s) rejected, see {report.rejects_path}")
        raise typer.Exit(sink.EXIT_PROBLEMS)

"""Rollout traces to trainer-bound ``TrainingBatch`` files: the refs stage (traces.md).

Each JSONL line is an episode (``traces``), a bare trace (``nodes``) or a flat
sample (``token_ids`` + ``mask``), detected per line. Every root-to-leaf branch
of a trace with a trainable token becomes one ``TrainingSample`` whose images
are ``mm_refs`` to files already offloaded, checked against their family's
placeholder length, their content hash and the token stream's image tokens.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import msgspec

from mmoffload.contract import rundir
from mmoffload.contract.wire import TrainingBatch, TrainingSample, encode
from mmoffload.errors import BadInputError, IntegrityError, UsageError, Where
from mmoffload.families import Families
from mmoffload.io.inputs import iter_lines, too_deep
from mmoffload.io.outputs import (
    atomic_write,
    atomic_writer,
    check_distinct,
    check_output_path,
    check_writable_dir,
)
from mmoffload.io.rejects import rejected_line
from mmoffload.io.staging import staged_run
from mmoffload.refs.report import Context, RefsOptions, RefsReport
from mmoffload.refs.samples import Pending, fill_group_advantages
from mmoffload.refs.walk import line_samples


def build_refs(
    trace_files: Sequence[str | os.PathLike[str]],
    run_dir: str | os.PathLike[str],
    options: RefsOptions | None = None,
) -> RefsReport:
    """Turn offloaded rollout traces into ``RUN/rollouts/step_<N>/train_rollouts.bin`` files.

    Every record is read and checked before any step is written, so bad input
    leaves the run directory as it was (unless ``skip_invalid`` sets it aside).

    Args:
        trace_files: JSONL files of episodes, traces or flat samples.
        run_dir: the run directory to write steps into.
        options: user choices; defaults when None.

    Returns:
        The report of what was read, checked and written.

    Raises:
        BadInputError: a record breaks traces.md (first one, unless ``skip_invalid``).
        IntegrityError: an image file is missing or its content has another hash.
        UsageError: unreadable input, bad options, a rejects file that is an input, or a
            run directory or step that cannot be written.
    """
    options = options or RefsOptions()
    run_dir = Path(run_dir)
    if options.step_size is not None and options.step_size < 1:
        raise UsageError(f"Expected a step size >= 1, got {options.step_size}")
    families = Families(options.model_dir)
    report = RefsReport(run_dir=str(run_dir), hashes_verified=options.verify_hashes)
    context = Context(options, families, report)
    rejects_path = options.rejects_path or run_dir / rundir.ROLLOUTS / "rejects.jsonl"
    # Refuse, before reading anything, outputs that would overwrite an input or cannot be written.
    check_writable_dir(run_dir, "run directory")
    if options.skip_invalid:
        check_distinct(trace_files, [("rejects file", rejects_path)])
        check_output_path(rejects_path, "rejects file")

    pending: list[Pending] = []
    with contextlib.ExitStack() as stack:
        rejects = stack.enter_context(atomic_writer(rejects_path)) if options.skip_invalid else None
        for path in trace_files:
            report.files += 1
            for where, line in iter_lines(path):
                report.lines += 1
                counted = msgspec.structs.asdict(report)
                try:
                    pending.extend(line_samples(line, where, context))
                except (BadInputError, IntegrityError, RecursionError) as caught:
                    exc = too_deep(where) if isinstance(caught, RecursionError) else caught
                    if rejects is None:
                        raise exc from caught
                    rejects.write(rejected_line(where, line, exc))
                    # A rejected line counts in no figure but its own.
                    for name, value in counted.items():
                        setattr(report, name, value)
                    report.rejected_records += 1
    if options.skip_invalid:
        report.rejects_path = str(rejects_path)

    samples = fill_group_advantages(pending, report)
    report.distinct_images = len(
        {ref.hash for sample in samples if sample.mm_refs for ref in sample.mm_refs.images}
    )
    report.image_files_checked = len(context.checked_files)
    earlier = [step for step in rundir.steps(run_dir) if _step_files(run_dir, step)]
    _write_steps(samples, run_dir, options, report)
    report.steps_replaced = sorted(set(earlier) & set(report.steps))
    leftover = sorted(set(earlier) - set(report.steps))
    if options.overwrite:
        _remove_steps(run_dir, leftover)
        report.steps_removed = leftover
    else:
        report.steps_left = leftover
    report.families = families.configs()
    report.warnings = families.warnings() + _earlier_steps_warnings(report, options.overwrite)
    if report.sampled_nodes_without_logprobs:
        report.warnings.append(
            f"{report.sampled_nodes_without_logprobs} sampled node(s) recorded no logprobs: 0.0 placed on "
            "their trainable tokens (an importance ratio against them is not the sampler's)"
        )
    return report


def _step_files(run_dir: Path, step: int) -> list[Path]:
    """Return a step's TrainingBatch (when there is one) and rank files."""
    batch = rundir.training_batch_path(run_dir, step)
    return ([batch] if batch.is_file() else []) + rundir.rank_paths(run_dir, step)


def _remove_steps(run_dir: Path, steps: list[int]) -> None:
    """Remove the TrainingBatch and rank files of ``steps`` (and each step directory left empty).

    Raises:
        UsageError: a file cannot be removed.
    """
    for step in steps:
        try:
            for path in _step_files(run_dir, step):
                path.unlink()
            with contextlib.suppress(OSError):
                rundir.step_dir(run_dir, step).rmdir()  # Kept when it holds anything else.
        except OSError as exc:
            raise UsageError(
                f"Cannot remove step {step} of an earlier run: {exc.strerror or exc}",
                Where(file=str(rundir.step_dir(run_dir, step))),
            ) from exc


def _earlier_steps_warnings(report: RefsReport, overwrite: bool) -> list[str]:
    """Say which steps of an earlier run were replaced or left (nothing with ``overwrite``)."""
    found = []
    if report.steps_left:
        found.append(
            f"{_step_list(report.steps_left)} of an earlier run left in the run directory, "
            "read by pack, audit and materialize too: --overwrite removes them"
        )
    if report.steps_replaced and not overwrite:
        found.append(
            f"{_step_list(report.steps_replaced)} of an earlier run replaced (--overwrite says that is meant)"
        )
    return found


def _step_list(steps: list[int]) -> str:
    """Name steps for a message: ``step 3``, ``steps 0, 1``, ``steps 0 to 9 (10 steps)``."""
    if len(steps) == 1:
        return f"step {steps[0]}"
    if len(steps) <= 6:
        return "steps " + ", ".join(map(str, steps))
    return f"steps {steps[0]} to {steps[-1]} ({len(steps)} steps)"


def _write_steps(
    samples: list[TrainingSample], run_dir: Path, options: RefsOptions, report: RefsReport
) -> None:
    """Write one ``TrainingBatch`` per step, all steps as a unit; stale rank files of a rewritten step go."""
    size = options.step_size or max(len(samples), 1)
    with staged_run(run_dir) as staged:
        for number, start in enumerate(range(0, len(samples), size)):
            step = options.first_step + number
            batch = TrainingBatch(examples=samples[start : start + size], step=step)
            atomic_write(rundir.training_batch_path(staged, step), encode(batch))
            for stale in rundir.rank_paths(staged, step):
                stale.unlink()
            report.steps.append(step)
    report.steps_written = len(report.steps)

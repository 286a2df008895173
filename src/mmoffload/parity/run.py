"""``mmoffload parity`` over a run: the chosen steps' micro batches, one at a time (docs/parity.md)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from mmoffload.contract import rundir
from mmoffload.contract.wire import read_rank_file
from mmoffload.errors import UsageError, Where
from mmoffload.families import Families, resolve_model_dir
from mmoffload.materialize import Materializer, iter_rank_files
from mmoffload.parity.check import CheckTimes, check_micro_batch
from mmoffload.parity.forward import load_model
from mmoffload.parity.report import (
    DEFAULT_THRESHOLD,
    FLAGGED,
    ParityReport,
    SampleParity,
    Status,
    StepParity,
    worst_first,
)
from mmoffload.store.read import AllowedRoots
from mmoffload.store.remap import Remap


def parity_run(
    run_dir: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str],
    steps: Sequence[int] | None = None,
    max_micro_batches: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    threshold: float = DEFAULT_THRESHOLD,
    remap: Remap | None = None,
    allowed_roots: AllowedRoots = None,
    on_total: Callable[[int, int], None] | None = None,
    advance: Callable[[int, int], None] | None = None,
) -> ParityReport:
    """Check that the trainer computes the sampler's distribution on a run's micro batches.

    Args:
        run_dir: the run directory (``RUN/rollouts/step_<N>/rank_<R>.bin``).
        model: the model directory (or cached hub id) whose weights the inference server served.
        steps: the step numbers to check; every step when None.
        max_micro_batches: check at most this many trained micro batches, in (step, rank, index) order.
        device: ``cpu`` or ``cuda``.
        dtype: ``float32`` or ``bfloat16``.
        threshold: mismatch KL above which a sample is flagged.
        remap: URI prefix rewrites applied before each image is read (``--remap``).
        allowed_roots: directories image refs may point into; None allows any regular file.
        on_total: called once with the trained micro batches to check and all of them.
        advance: called with ``(1, images)`` after each micro batch checked (progress).

    Raises:
        UsageError: no rank files, an unknown step, a model that cannot be loaded, CUDA absent.
        BadInputError: a rank file that does not decode.
    """
    started = time.perf_counter()
    rank_files = _chosen(run_dir, steps)
    model_dir = resolve_model_dir(model)
    families = Families(model_dir)
    loading = time.perf_counter()
    hf_model = load_model(model_dir, device, dtype)
    load_seconds = time.perf_counter() - loading
    materializer = Materializer(families, as_torch=True, remap=remap, allowed_roots=allowed_roots)
    queue = [
        (step, rank, index, micro_batch)
        for step, rank, path in rank_files
        for index, micro_batch in enumerate(read_rank_file(path))
    ]
    trained = [item for item in queue if any(item[3].loss_mask)]
    chosen = trained[:max_micro_batches] if max_micro_batches is not None else trained
    if on_total is not None:
        on_total(len(chosen), len(queue))
    times, samples = CheckTimes(), []
    paths = {(step, rank): path for step, rank, path in rank_files}
    for step, rank, index, micro_batch in chosen:
        where = Where(file=str(paths[step, rank]), index=index)
        for sample in check_micro_batch(
            hf_model, materializer, micro_batch, threshold=threshold, index=index, where=where, times=times
        ):
            samples.append(msgspec.structs.replace(sample, step=step, rank=rank))
        if advance is not None:
            advance(1, len(micro_batch.mm_refs.images) if micro_batch.mm_refs else 0)
    return _report(
        samples,
        run_dir=str(run_dir),
        model=str(model),
        device=device,
        dtype=dtype,
        threshold=threshold,
        micro_batches=len(queue),
        micro_batches_checked=len(chosen),
        micro_batches_untrained=len(queue) - len(trained),
        load_seconds=load_seconds,
        materialize_seconds=times.materialize,
        forward_seconds=times.forward,
        seconds=time.perf_counter() - started,
        families=families.configs(),
        warnings=families.warnings(),
    )


def _chosen(run_dir: str | os.PathLike[str], steps: Sequence[int] | None) -> list[tuple[int, int, Path]]:
    """Return ``(step, rank, rank file)`` of the chosen steps, in order."""
    found = [(step, rundir.rank_of(path) or 0, path) for step, path in iter_rank_files(run_dir)]
    if not found:
        raise UsageError(
            "Expected rank files `rollouts/step_<N>/rank_<R>.bin`, found none", Where(file=str(run_dir))
        )
    if steps is None:
        return found
    known = sorted({step for step, _, _ in found})
    unknown = sorted(set(steps) - set(known))
    if unknown:
        raise UsageError(
            f"Expected steps of the run ({', '.join(map(str, known))}), got {', '.join(map(str, unknown))}",
            Where(file=str(rundir.step_dir(run_dir, unknown[0]))),
        )
    return [item for item in found if item[0] in set(steps)]


def _report(samples: list[SampleParity], **figures: object) -> ParityReport:
    """Gather per-sample results into the run's report: totals, per step, every sample worst first."""
    compared = [s for s in samples if s.kl is not None]
    tokens = sum(s.tokens for s in compared)
    per_step = []
    for step in sorted({s.step for s in samples if s.step is not None}):
        of_step = [s for s in samples if s.step == step]
        step_compared = [s for s in of_step if s.kl is not None]
        step_tokens = sum(s.tokens for s in step_compared)
        per_step.append(
            StepParity(
                step=step,
                micro_batches=len({(s.rank, s.micro_batch) for s in of_step}),
                samples=len(of_step),
                samples_flagged=sum(s.flagged for s in of_step),
                tokens=step_tokens,
                kl_mean=_weighted_kl(step_compared, step_tokens),
                kl_max=max((s.kl for s in step_compared if s.kl is not None), default=None),
            )
        )
    flagged = sum(s.status in FLAGGED for s in samples)
    return ParityReport(
        samples=len(samples),
        samples_compared=len(compared),
        samples_flagged=flagged,
        samples_over_threshold=sum(s.status is Status.OVER_THRESHOLD for s in samples),
        samples_missing_image=sum(s.status is Status.MISSING_IMAGE for s in samples),
        samples_not_materialized=sum(s.status is Status.NOT_MATERIALIZED for s in samples),
        tokens=tokens,
        kl_mean=_weighted_kl(compared, tokens),
        kl_max=max((s.kl for s in compared if s.kl is not None), default=None),
        max_abs_diff=max((s.max_abs_diff for s in compared if s.max_abs_diff is not None), default=None),
        ok=flagged == 0,
        per_step=per_step,
        per_sample=worst_first(samples),
        **figures,  # type: ignore[arg-type]
    )


def _weighted_kl(samples: list[SampleParity], tokens: int) -> float | None:
    """Return the token-weighted mean KL of compared samples: the KL over all their tokens."""
    if not tokens:
        return None
    return sum((s.kl or 0.0) * s.tokens for s in samples) / tokens

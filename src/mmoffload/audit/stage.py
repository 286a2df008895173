"""Audit a run's artifacts: are they fit for the trainer? (audit.md)

``audit`` decodes ``train_rollouts.bin`` and ``rank_*.bin`` files with the typed
wire decoders, and rollout or trace JSONL, checks every record fully, and
returns an ``AuditReport``: the figures of audit.md under their exact names,
plus every problem as a ``Violation``. Each distinct referenced image file is
checked once, after all artifacts are read.

Counting rules (the spec is silent on some; docs/audit.md says the same):

- ``descriptors``, ``file_uris`` and ``object_uris`` count trainer-bound refs: those in
  rank files when the run has any, else those in TrainingBatch files; ``file_uris`` and
  ``object_uris`` also count each stored image source of JSONL records.
- Problem figures (``non_strict_descriptors``, ``data_uris``, ``remote_uris``,
  ``eager_mm_kwargs``, ``placeholder_mismatches``, ``stray_image_tokens``) count
  every occurrence in every audited artifact, so a bad ref that is in both the
  TrainingBatch and a rank file counts twice, once per file that carries it.
- ``missing_files``, ``hash_mismatches``, ``unique_images`` and ``image_bytes``
  count distinct files.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from mmoffload.audit.auditor import Auditor, JsonlTask
from mmoffload.audit.plan import Group, plan_inputs
from mmoffload.audit.records import Loc, micro_batch_record, sample_record, truncation
from mmoffload.audit.report import AuditReport, judge, parse_expectation, sum_reports
from mmoffload.families import Families
from mmoffload.io.inputs import iter_lines
from mmoffload.runners import line_runner
from mmoffload.store.read import AllowedRoots
from mmoffload.store.remap import Remap

if TYPE_CHECKING:
    from mmoffload.runners.ray import RayOptions

from mmoffload.contract.wire import (
    MicroBatch,
    TrainingSample,
)


def audit(
    paths: Sequence[str | os.PathLike[str]],
    *,
    verify_hashes: bool = False,
    model_dir: str | os.PathLike[str] | None = None,
    expect: Sequence[str] = (),
    remap: Remap | None = None,
    ray: RayOptions | None = None,
    allowed_roots: AllowedRoots = None,
    advance: Callable[[int], None] = lambda _n: None,
    add_total: Callable[[int], None] = lambda _n: None,
) -> AuditReport:
    """Audit run directories, ``.bin`` artifacts and JSONL files; return every figure and problem.

    Args:
        paths: Run directories (every step's ``train_rollouts.bin`` and ``rank_*.bin``),
            directories of runs (each audited on its own, then summed, ``runs`` holding
            each), loose ``.bin`` artifacts (``rank_<R>.bin`` is a rank file, any other a
            TrainingBatch) and rollout or trace JSONL files (``-`` for stdin, compressed or not).
        verify_hashes: Also re-hash every referenced file against its refs' hashes.
        model_dir: A model directory whose settings the families use (default: their defaults).
        expect: Expectations ``NAME<OP>VALUE`` (see ``parse_expectation``), parsed before
            anything is read and judged at the end.
        remap: URI prefix rewrites applied before each image file is checked (``--remap``).
        ray: audit the JSONL lines as tasks on a Ray cluster (``ray_backend``); same report.
        allowed_roots: Directories refs may point into; a file elsewhere is a violation and
            is never read. None allows any regular file.
        advance: with ``verify_hashes``, called with each image file's size once its hash is
            checked (progress).
        add_total: with ``verify_hashes``, called with the bytes of image files about to be
            hashed, once all artifacts are read (once per run when several are audited).

    Returns:
        The report; ``ok`` is true when there is no violation and every expectation holds.

    Raises:
        UsageError: a path is missing, unreadable or of an unknown kind, a run has no
            artifacts, or an expectation does not parse.
    """
    expectations = [parse_expectation(text) for text in expect]
    plan = plan_inputs(paths)
    families = Families(model_dir)
    runs = [group for group in plan.groups if group.run is not None]
    audit_groups = functools.partial(
        _audit_groups,
        auditor=Auditor(families, verify_hashes, remap, allowed_roots),
        ray=ray,
        advance=advance,
        add_total=add_total,
    )
    if len(runs) < 2:
        report = audit_groups(plan.groups, plan.jsonl)
        report.run = str(runs[0].run) if runs and len(plan.groups) == 1 and not plan.jsonl else None
    else:
        per_run = [audit_groups([group], []) for group in runs]
        for group, run_report in zip(runs, per_run, strict=True):
            run_report.run = str(group.run)
        rest = [group for group in plan.groups if group.run is None]
        others = [audit_groups(rest, plan.jsonl)] if rest or plan.jsonl else []
        report = sum_reports([*per_run, *others])
        report.runs = [msgspec.structs.replace(r, violations=[]) for r in per_run]
    report.families = families.configs()
    report.warnings = families.warnings()
    judge(report, expectations)
    return report


def _audit_groups(
    groups: Sequence[Group],
    jsonl: Sequence[Path],
    *,
    auditor: Auditor,
    ray: RayOptions | None,
    advance: Callable[[int], None],
    add_total: Callable[[int], None],
) -> AuditReport:
    """Audit artifacts together on a fresh copy of ``auditor`` (its settings, nothing found yet)."""
    auditor = auditor.fresh()
    for group in groups:
        for path in group.training_batches:
            auditor.training_batch(path, trainer_bound=not group.rank_files)
        for path in group.rank_files:
            auditor.rank_file(path)
    if ray is not None and jsonl:
        lines = (
            (where.at(index=index), line)
            for path in jsonl
            for index, (where, line) in enumerate(iter_lines(path))
        )
        with line_runner(JsonlTask(auditor), ray=ray) as results:
            for _where, _line, (report, files) in results(lines):
                auditor.merge(report, files)
    else:
        for path in jsonl:
            auditor.jsonl(path)
    for step_dir, samples in auditor.samples.items():
        if step_dir in auditor.micro_batches:
            truncation(auditor.report, samples, auditor.micro_batches[step_dir])
    auditor.check_files(advance, add_total)
    auditor.report.ok = not auditor.report.violations
    return auditor.report


def audit_record(
    file: str,
    index: int,
    record: TrainingSample | MicroBatch,
    *,
    families: Families,
    verify_hashes: bool = True,
) -> AuditReport:
    """Audit one sample or micro batch on its own, its image files included.

    Gives exactly the violations ``audit`` reports for that record (``inspect``
    marks them on its page), with ``file`` and ``index`` as their location.
    """
    auditor = Auditor(families, verify_hashes)
    fields = sample_record(record) if isinstance(record, TrainingSample) else micro_batch_record(record)
    auditor.record(Loc(file, index), fields, trainer_bound=True)
    auditor.check_files()
    auditor.report.ok = not auditor.report.violations
    return auditor.report

"""The audit report, its figures, and ``--expect`` comparisons over them."""

from __future__ import annotations

import contextlib
import difflib
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from mmoffload.errors import UsageError


class Violation(msgspec.Struct):
    """One problem: where it is and why it keeps the artifact from the trainer.

    ``kind`` names the figure it counts toward (``data_uri``, ``missing_file``, ...)
    or, for problems without a figure of their own: ``missing_type_ids``, ``misaligned``,
    ``undecodable``, ``bad_ref`` or ``bad_image_part``.
    ``index`` is the sample (TrainingBatch), micro batch (rank file) or record
    (JSONL, 0-based) in ``file``; ``image`` the ref or image index in it.
    """

    file: str
    index: int | None
    reason: str
    kind: str
    line: int | None = None
    path: str | None = None
    image: int | None = None
    position: int | None = None


class Expectation(msgspec.Struct):
    """One ``--expect``: the figure, the comparison, the value asked for, the value found."""

    name: str
    op: str
    expected: int | float | bool
    actual: int | float | bool
    holds: bool


class AuditReport(msgspec.Struct):
    """The figures of audit.md, in its order, then the violations and the verdict."""

    training_batches: int = 0
    examples: int = 0
    samples_with_mm_refs: int = 0
    rank_files: int = 0
    micro_batches: int = 0
    micro_batches_with_mm_refs: int = 0
    eager_mm_kwargs: int = 0
    descriptors: int = 0
    non_strict_descriptors: int = 0
    file_uris: int = 0
    data_uris: int = 0
    remote_uris: int = 0
    missing_files: int = 0
    hash_mismatches: int = 0
    placeholder_mismatches: int = 0
    stray_image_tokens: int = 0
    type_ids_present: bool = True
    unique_images: int = 0
    image_bytes: int = 0
    # Not in audit.md: JSONL records decoded, and whether file contents were hashed
    # (so that ``hash_mismatches = 0`` can be told apart from "not checked").
    jsonl_records: int = 0
    hashes_verified: bool = False
    # Object-store image URIs among trainer-bound refs (docs/scale.md), beside ``file_uris``.
    object_uris: int = 0
    # What truncation dropped (packing.md 1), counted in steps holding both a TrainingBatch
    # and rank files (``truncation_steps_compared``): samples against their packed sequences.
    truncation_steps_compared: int = 0
    samples_truncated: int = 0
    tokens_dropped: int = 0
    trainable_tokens_dropped: int = 0
    images_dropped: int = 0
    violations: list[Violation] = msgspec.field(default_factory=list)
    ok: bool = True
    # Each --expect with its verdict; a failed one makes ``ok`` false.
    expectations: list[Expectation] = msgspec.field(default_factory=list)
    # With several runs (a directory of runs), the figures above are their sums and
    # ``runs`` holds each run's own report (its violations are listed above only).
    run: str | None = None
    runs: list[AuditReport] = msgspec.field(default_factory=list)
    # Each family the refs used, with its config (a model directory or "defaults").
    families: dict[str, str] = msgspec.field(default_factory=dict)
    warnings: list[str] = msgspec.field(default_factory=list)


# Figures an ``--expect`` may name: every scalar field of the report.
FIGURES: dict[str, type] = {
    name: type(default)
    for name, default in zip(AuditReport.__struct_fields__, AuditReport.__struct_defaults__, strict=False)
    if isinstance(default, int | float)
}


def sum_reports(reports: Sequence[AuditReport]) -> AuditReport:
    """Add up counts, and yes/no figures with ``all``; violations are listed in order."""
    total = AuditReport()
    for name in FIGURES:
        values = [getattr(report, name) for report in reports]
        setattr(total, name, all(values) if FIGURES[name] is bool else sum(values))
    total.violations = [violation for report in reports for violation in report.violations]
    return total


# Longest first, so that `>=` is not read as `>` followed by `=5`.
OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "!=": operator.ne,
    "==": operator.eq,
    "=": operator.eq,
    ">": operator.gt,
    "<": operator.lt,
}


_EXPECTATION = re.compile(r"\s*(\w+)\s*(" + "|".join(map(re.escape, OPERATORS)) + r")\s*(.*?)\s*")


def parse_expectation(text: str) -> tuple[str, str, int | float | bool]:
    """Parse ``NAME<OP>VALUE``: a number for a count or ratio, ``true``/``false`` for a yes/no figure.

    ``OP`` is one of ``= == != < <= > >=``; a yes/no figure takes only ``=``, ``==`` or ``!=``.

    Raises:
        UsageError: no operator, an unknown figure (the error suggests the nearest name and
            lists the known ones), or a bad value.
    """
    match = _EXPECTATION.fullmatch(text)
    if match is None:
        raise UsageError(f"Expected --expect NAME<OP>VALUE (OP one of {' '.join(OPERATORS)}), got `{text}`")
    name, op, raw = match.groups()
    if name not in FIGURES:
        nearest = difflib.get_close_matches(name, FIGURES, n=1)
        hint = f"; did you mean `{nearest[0]}`?" if nearest else ""
        raise UsageError(f"Unknown figure `{name}` in --expect{hint} (known: {', '.join(FIGURES)})")
    if FIGURES[name] is bool:
        if raw.lower() not in ("true", "false"):
            raise UsageError(f"Expected true or false for `{name}`, got `{raw}`")
        if op not in ("=", "==", "!="):
            raise UsageError(f"Expected `=` or `!=` for the yes/no figure `{name}`, got `{op}`")
        return name, op, raw.lower() == "true"
    for number in (int, float):
        with contextlib.suppress(ValueError):
            return name, op, number(raw)
    raise UsageError(f"Expected a number for `{name}`, got `{raw}`")


def check_expectations(report: AuditReport, texts: Sequence[str]) -> list[Expectation]:
    """Judge each expectation against the report; record them in it and fold them into ``ok``.

    All are parsed before any is judged, so a typo in the last one stops the run early.

    Raises:
        UsageError: an expectation does not parse (see ``parse_expectation``).
    """
    return judge(report, [parse_expectation(text) for text in texts])


def judge(report: AuditReport, parsed: Sequence[tuple[str, str, int | float | bool]]) -> list[Expectation]:
    results = []
    for name, op, expected in parsed:
        actual = getattr(report, name)
        results.append(Expectation(name, op, expected, actual, OPERATORS[op](actual, expected)))
    report.expectations.extend(results)
    report.ok = report.ok and all(result.holds for result in results)
    return results

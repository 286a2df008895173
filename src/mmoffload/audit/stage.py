"""Audit a run's artifacts: are they fit for the trainer? (audit.md)

``audit`` decodes ``train_rollouts.bin`` and ``rank_*.bin`` files with the typed
wire decoders, and rollout or trace JSONL, checks every record fully, and
returns an ``AuditReport``: the figures of audit.md under their exact names,
plus every problem as a ``Violation``. Each distinct referenced image file is
checked once, after all artifacts are read.

Counting rules (the spec is silent on some; docs/audit.md says the same):

- ``descriptors`` and ``file_uris`` count trainer-bound refs: those in rank files
  when the run has any, else those in TrainingBatch files.
- Problem figures (``non_strict_descriptors``, ``data_uris``, ``remote_uris``,
  ``eager_mm_kwargs``, ``placeholder_mismatches``, ``stray_image_tokens``) count
  every occurrence in every audited artifact, so a bad ref that is in both the
  TrainingBatch and a rank file counts twice, once per file that carries it.
- ``missing_files``, ``hash_mismatches``, ``unique_images`` and ``image_bytes``
  count distinct files.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import operator
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from mmoffload.contract import rundir
from mmoffload.contract.addresses import asset_location, content_hash, is_local_file_uri, is_object_uri
from mmoffload.contract.descriptors import DESCRIPTOR_KIND, HASH_PATTERN, descriptor_problems, descriptor_uri
from mmoffload.contract.imageparts import ImageSource, iter_image_sources, source_kind
from mmoffload.contract.spans import span_problems
from mmoffload.errors import BadInputError, MMOffloadError, PathPart, UsageError, Where, json_path, shorten
from mmoffload.families import DEFAULT_TOKEN_NAMES, Families
from mmoffload.io.inputs import decode_json_line, is_jsonl_name, is_stdio, iter_lines, too_deep
from mmoffload.store.backend import asset_size
from mmoffload.store.read import check_allowed, read_verified
from mmoffload.store.remap import Remap

if TYPE_CHECKING:
    from mmoffload.runners.ray import RayOptions

from mmoffload.contract.wire import (
    MICRO_BATCH_PER_TOKEN_FIELDS,
    MICRO_BATCH_TOTAL_FIELDS,
    RANK_FILE_DECODER,
    SAMPLE_PER_TOKEN_FIELDS,
    TRAINING_BATCH_DECODER,
    MicroBatch,
    MMImageRef,
    MMRefs,
    TrainingSample,
)

_SHOWN_SOURCE_CHARS = 60


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


# --- what to audit -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Group:
    """Binary artifacts whose trainer-bound refs are decided together (one run, or loose files)."""

    training_batches: list[Path] = field(default_factory=list)
    rank_files: list[Path] = field(default_factory=list)
    run: Path | None = None


@dataclass(slots=True)
class _Plan:
    groups: list[_Group] = field(default_factory=list)
    jsonl: list[Path] = field(default_factory=list)


def _plan(paths: Sequence[str | os.PathLike[str]]) -> _Plan:
    """Sort inputs into runs, loose binary artifacts and JSONL files.

    Raises:
        UsageError: a path does not exist, has an unknown kind, or nothing is there to audit.
    """
    plan = _Plan()
    loose = _Group()
    for path in map(Path, paths):
        if path.is_dir():
            # A run, else a directory of runs (the demo's root is one): each run found under it.
            runs = [run for run in (_run_group(d) for d in _run_dirs(path)) if run is not None]
            if not runs:
                raise UsageError(
                    "Expected a run directory with rollouts/step_<N>/train_rollouts.bin or rank_<R>.bin, "
                    "or a directory of such runs, found none",
                    Where(file=str(path)),
                )
            plan.groups.extend(runs)
        elif is_stdio(path) or (path.exists() and is_jsonl_name(path)):
            plan.jsonl.append(path)
        elif not path.exists():
            raise UsageError("No such file or directory", Where(file=str(path)))
        elif path.suffix == ".bin":
            # The contract's names say what a file holds: rank_<R>.bin is a list of micro batches.
            (loose.rank_files if path.name.startswith("rank_") else loose.training_batches).append(path)
        else:
            raise UsageError(
                "Expected a run directory, a .bin artifact or a .jsonl file", Where(file=str(path))
            )
    if loose.training_batches or loose.rank_files:
        plan.groups.append(loose)
    return plan


def _run_dirs(path: Path) -> list[Path]:
    """Return ``path`` if it is a run, else every run directory below it, in path order."""
    if (path / rundir.ROLLOUTS).is_dir():
        return [path]
    return sorted(p.parent for p in path.rglob(rundir.ROLLOUTS) if p.is_dir())


def _run_group(path: Path) -> _Group | None:
    """Return a run's artifacts, or None when it has none."""
    run = _Group(run=path)
    for step in rundir.steps(path):
        batch = rundir.training_batch_path(path, step)
        if batch.is_file():
            run.training_batches.append(batch)
        run.rank_files.extend(rundir.rank_paths(path, step))
    return run if run.training_batches or run.rank_files else None


# --- the audit -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Loc:
    """Where a record is: file and index (sample, micro batch or JSONL record)."""

    file: str
    index: int | None
    line: int | None = None


@dataclass(slots=True)
class _FileUse:
    """A referenced image file: where it was first referenced, and the hashes refs claim for it."""

    first: _Loc
    image: int | None
    hashes: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class _Record:
    """The fields of a TrainingSample or MicroBatch that audit reads, named once."""

    num_tokens: int
    token_ids: Sequence[int]
    per_token: dict[str, Sequence[Any] | None]
    totals: dict[str, Sequence[int] | None]
    mm_kwargs: object
    mm_refs: MMRefs | None
    type_ids: Sequence[int] | None


def _sample_record(sample: TrainingSample) -> _Record:
    return _Record(
        num_tokens=len(sample.token_ids),
        token_ids=sample.token_ids,
        per_token={name: getattr(sample, name) for name in SAMPLE_PER_TOKEN_FIELDS},
        totals={},
        mm_kwargs=sample.mm_kwargs,
        mm_refs=sample.mm_refs,
        type_ids=sample.mm_token_type_ids,
    )


def _micro_batch_record(batch: MicroBatch) -> _Record:
    return _Record(
        num_tokens=len(batch.input_ids),
        token_ids=batch.input_ids,
        per_token={name: getattr(batch, name) for name in MICRO_BATCH_PER_TOKEN_FIELDS},
        totals={name: getattr(batch, name) for name in MICRO_BATCH_TOTAL_FIELDS},
        mm_kwargs=batch.mm_kwargs,
        mm_refs=batch.mm_refs,
        type_ids=batch.mm_token_type_ids,
    )


@dataclass(slots=True)
class _Sequences:
    """Tokens, trainable tokens and images of a step's samples, or of its packed sequences."""

    tokens: int = 0
    trainable: int = 0
    images: int = 0
    contents: Counter[int] = field(default_factory=Counter)  # hash of each sequence's token ids

    def add(self, ids: list[int], mask: list[bool], images: int) -> None:
        self.tokens += len(ids)
        self.trainable += mask.count(True)
        self.images += images
        self.contents[hash(tuple(ids))] += 1


def _packed_sequences(batch: MicroBatch) -> _Sequences:
    """Cut a micro batch back into its samples' sequences, padding left out.

    Padding extends the last sequence with positions restarting at 0, which is where it starts.
    """
    sequences = _Sequences()
    refs = batch.mm_refs.images if batch.mm_refs is not None else []
    start = 0
    for number, length in enumerate(batch.sequence_lengths):
        end = start + length
        if number == len(batch.sequence_lengths) - 1:
            end = next((i for i in range(start + 1, end) if batch.position_ids[i] == 0), end)
        images = sum(start <= ref.offset < end for ref in refs)
        sequences.add(batch.input_ids[start:end], batch.loss_mask[start:end], images)
        start += length
    return sequences


@dataclass(slots=True)
class _Packed:
    """What the truncation figures need of one micro batch."""

    content: int  # hash of its token ids: a dummy is an all-masked copy of another (packing.md 4)
    trained: bool
    sequences: _Sequences


def _truncation(report: AuditReport, samples: _Sequences, micro_batches: list[_Packed]) -> None:
    """Count what truncation dropped in one step: its samples against its real micro batches.

    Every sample is one packed sequence, so sequences beyond the number of samples are
    dummies: all-masked copies of another micro batch of the step (packing.md 4), dropped
    until the counts agree (never the last copy: a real micro batch may be all-masked too).
    """
    copies = Counter(batch.content for batch in micro_batches)
    excess = sum(batch.sequences.contents.total() for batch in micro_batches) - samples.contents.total()
    packed = _Sequences()
    for batch in micro_batches:
        if excess > 0 and not batch.trained and copies[batch.content] > 1:
            copies[batch.content] -= 1
            excess -= batch.sequences.contents.total()
            continue
        packed.tokens += batch.sequences.tokens
        packed.trainable += batch.sequences.trainable
        packed.images += batch.sequences.images
        packed.contents.update(batch.sequences.contents)
    report.truncation_steps_compared += 1
    report.samples_truncated += (samples.contents - packed.contents).total()
    report.tokens_dropped += samples.tokens - packed.tokens
    report.trainable_tokens_dropped += samples.trainable - packed.trainable
    report.images_dropped += samples.images - packed.images


class _Auditor:
    """Accumulates figures and violations over every artifact, then checks the files once."""

    def __init__(
        self,
        families: Families,
        verify_hashes: bool,
        remap: Remap | None = None,
        allowed_roots: Sequence[Path] | None = None,
    ) -> None:
        self.families = families
        self.report = AuditReport(hashes_verified=verify_hashes)
        self.remap = remap or Remap()
        self.allowed_roots = allowed_roots
        # Local image files by path, object-store images by URL.
        self.files: dict[Path | str, _FileUse] = {}
        # Per step directory: its samples and its micro batches, for the truncation figures.
        self.samples: dict[Path, _Sequences] = {}
        self.micro_batches: dict[Path, list[_Packed]] = {}

    def violation(self, loc: _Loc, kind: str, reason: str, **where: Any) -> None:
        # Reasons quote user text: cut as every message is, so a 5 MB string is no 5 MB report.
        self.report.violations.append(
            Violation(
                file=loc.file, index=loc.index, reason=shorten(reason), kind=kind, line=loc.line, **where
            )
        )

    # --- binary artifacts

    def training_batch(self, path: Path, trainer_bound: bool) -> None:
        try:
            with _gc_paused():
                batch = TRAINING_BATCH_DECODER.decode(_read(path))
        except msgspec.DecodeError as exc:
            self.violation(_Loc(str(path), None), "undecodable", f"Not a TrainingBatch: {exc}")
            return
        self.report.training_batches += 1
        self.report.examples += len(batch.examples)
        sequences = self.samples.setdefault(path.parent, _Sequences())
        for sample in batch.examples:
            sequences.add(sample.token_ids, sample.mask, len(sample.mm_refs.images) if sample.mm_refs else 0)
        for index, sample in enumerate(batch.examples):
            if self.record(_Loc(str(path), index), _sample_record(sample), trainer_bound):
                self.report.samples_with_mm_refs += 1

    def rank_file(self, path: Path) -> None:
        try:
            with _gc_paused():
                batches = RANK_FILE_DECODER.decode(_read(path))
        except msgspec.DecodeError as exc:
            self.violation(_Loc(str(path), None), "undecodable", f"Not a list of MicroBatch: {exc}")
            return
        self.report.rank_files += 1
        self.report.micro_batches += len(batches)
        self.micro_batches.setdefault(path.parent, []).extend(
            _Packed(hash(tuple(batch.input_ids)), any(batch.loss_mask), _packed_sequences(batch))
            for batch in batches
        )
        for index, batch in enumerate(batches):
            if self.record(_Loc(str(path), index), _micro_batch_record(batch), trainer_bound=True):
                self.report.micro_batches_with_mm_refs += 1

    def record(self, loc: _Loc, record: _Record, trainer_bound: bool) -> bool:
        """Check one sample or micro batch; return whether it has image refs."""
        if record.mm_kwargs is not None:
            self.report.eager_mm_kwargs += 1
            self.violation(loc, "eager_mm_kwargs", "Expected no eager `mm_kwargs` (processed tensors)")
        aligned = self.alignment(loc, record)
        images = record.mm_refs.images if record.mm_refs is not None else []
        if images and record.type_ids is None:
            self.report.type_ids_present = False
            self.violation(loc, "missing_type_ids", "Expected `mm_token_type_ids` where there are image refs")
        placeholder_reasons = self.refs(loc, images, trainer_bound)
        # Spans are checked even without refs: an image-typed token in a text sample is stray too.
        positions: dict[int, int] = {}
        if aligned and record.type_ids is not None:
            spans = [(ref.offset, ref.length) for ref in images]
            problems = span_problems(record.type_ids, spans, record.token_ids, DEFAULT_TOKEN_NAMES)
            stray = [problem for problem in problems if problem.kind == "stray"]
            for problem in problems:
                if problem.kind != "stray":
                    placeholder_reasons.setdefault(problem.image or 0, []).append(problem.message)
                    if problem.position is not None:
                        positions.setdefault(problem.image or 0, problem.position)
            if stray:
                self.report.stray_image_tokens += len(stray)
                self.violation(
                    loc,
                    "stray_image_token",
                    f"{len(stray)} image-typed token(s) outside every placeholder, first at position "
                    f"{stray[0].position}: {stray[0].window}",
                    position=stray[0].position,
                )
        for image, reasons in sorted(placeholder_reasons.items()):
            self.report.placeholder_mismatches += 1
            self.violation(
                loc, "placeholder_mismatch", "; ".join(reasons), image=image, position=positions.get(image)
            )
        return bool(images)

    def refs(self, loc: _Loc, images: Sequence[MMImageRef], trainer_bound: bool) -> dict[int, list[str]]:
        """Check each ref's sources, descriptor and fields; return placeholder-length problems by image."""
        placeholder_reasons: dict[int, list[str]] = {}
        previous_end = 0
        for image, ref in enumerate(images):
            self.ref_sources(loc, image, ref.uri, ref.item, ref.hash)
            problems = descriptor_problems(ref.item)
            if problems:
                self.report.non_strict_descriptors += 1
                self.violation(loc, "non_strict_descriptor", "; ".join(problems), image=image)
            elif trainer_bound:
                self.report.descriptors += 1
            if trainer_bound and is_local_file_uri(ref.uri):
                self.report.file_uris += 1
            elif trainer_bound and is_object_uri(ref.uri):
                self.report.object_uris += 1
            for reason in _ref_problems(ref.item, ref.hash, ref.uri, ref.offset, previous_end):
                self.violation(loc, "bad_ref", reason, image=image)
            previous_end = max(previous_end, ref.offset + ref.length)
            if reason := self.length_problem(ref.item, ref.length):
                placeholder_reasons.setdefault(image, []).append(reason)
        return placeholder_reasons

    def alignment(self, loc: _Loc, record: _Record) -> bool:
        """Report per-token arrays and totals that disagree with the token count; True if aligned."""
        n = record.num_tokens
        aligned = True
        for name, values in record.per_token.items():
            if values is not None and len(values) != n:
                aligned = False
                self.violation(
                    loc, "misaligned", f"Expected `{name}` with one entry per token ({n}), got {len(values)}"
                )
        for name, values in record.totals.items():
            if values is not None and sum(values) != n:
                aligned = False
                self.violation(loc, "misaligned", f"Expected sum(`{name}`) == {n} tokens, got {sum(values)}")
        return aligned

    def length_problem(self, item: dict[str, Any], length: int) -> str | None:
        """Return why a ref's length is not its family's placeholder length, if it is not."""
        family = item.get("family")
        if not isinstance(family, str):
            return None  # Not strict: reported as such, no family to ask.
        try:
            expected = self.families.get(family).payload_placeholder_length(item.get("payload"))
        except BadInputError as exc:
            return f"Cannot compute the placeholder length: {exc.message}"
        if expected != length:
            return f"Expected placeholder length {expected} for family `{family}`, got {length}"
        return None

    def ref_sources(
        self, loc: _Loc, image: int, uri: str, item: dict[str, Any], expected_hash: str | None
    ) -> None:
        """Count a ref's image sources (its uri and its descriptor's) by kind; register local files."""
        sources = {uri: ("uri",)}
        for source in self.image_sources(loc, item, ("item",), image):
            sources.setdefault(source.source, ("item", *source.path))
        for source, path in sources.items():
            self.source(loc, source, path, image=image, expected_hash=expected_hash)

    def image_sources(
        self, loc: _Loc, value: object, prefix: tuple[PathPart, ...], image: int | None = None
    ) -> list[ImageSource]:
        """Return the image sources in a JSON value; an image part of unknown shape is a violation."""
        try:
            return list(iter_image_sources(value))
        except BadInputError as exc:
            path = (*prefix, *exc.where.path) if exc.where and exc.where.path else prefix
            self.violation(loc, "bad_image_part", exc.message, path=json_path(path), image=image)
            return []

    def source(
        self,
        loc: _Loc,
        source: str,
        path: Sequence[PathPart],
        *,
        image: int | None = None,
        expected_hash: str | None = None,
    ) -> None:
        """Count one image source; a local file is registered for the file check."""
        kind = source_kind(source)
        if kind == "file":
            try:
                file = asset_location(self.remap(source))
            except BadInputError as exc:
                self.violation(loc, "bad_uri", exc.message, path=json_path(path), image=image)
                return
            use = self.files.setdefault(file, _FileUse(loc, image))
            if expected_hash is not None:
                use.hashes.add(expected_hash)
            return
        shown = source if len(source) <= _SHOWN_SOURCE_CHARS else source[:_SHOWN_SOURCE_CHARS] + "..."
        if kind == "data":
            self.report.data_uris += 1
            reason = f"Expected a local `file://` image source, got an inline `data:` URL `{shown}`"
        else:
            self.report.remote_uris += 1
            reason = f"Expected a local `file://` image source, got `{shown}`"
        self.violation(loc, f"{kind}_uri", reason, path=json_path(path), image=image)

    # --- JSONL

    def jsonl(self, path: Path) -> None:
        for index, (where, line) in enumerate(iter_lines(path)):
            self.jsonl_line(index, where, line)

    def jsonl_line(self, index: int, where: Where, line: bytes) -> None:
        """Audit one JSONL line, the ``index``-th record of its file."""
        loc = _Loc(str(where.file), index, where.line)
        try:
            value = decode_json_line(line, where)
        except BadInputError as exc:
            self.violation(loc, "undecodable", exc.message)
            return
        self.report.jsonl_records += 1
        try:
            self.jsonl_value(loc, value)
        except RecursionError:
            self.violation(loc, "undecodable", too_deep(where).message)

    def jsonl_value(self, loc: _Loc, value: object) -> None:
        """Audit one decoded JSONL record."""
        for source in self.image_sources(loc, value, ()):
            self.source(loc, source.source, source.path)
        for parts, obj in _descriptors_and_samples(value):
            if obj.get("mm_kwargs") is not None:
                self.report.eager_mm_kwargs += 1
                self.violation(loc, "eager_mm_kwargs", "Expected no eager `mm_kwargs`", path=json_path(parts))
            if obj.get("kind") == DESCRIPTOR_KIND and (problems := descriptor_problems(obj)):
                self.report.non_strict_descriptors += 1
                self.violation(loc, "non_strict_descriptor", "; ".join(problems), path=json_path(parts))

    def merge(self, report: AuditReport, files: dict[Path | str, _FileUse]) -> None:
        """Add the figures, violations and files of another auditor's later records (a Ray task's)."""
        for name, kind in FIGURES.items():
            if kind is int:
                setattr(self.report, name, getattr(self.report, name) + getattr(report, name))
        self.report.violations.extend(report.violations)
        for path, use in files.items():
            if (mine := self.files.setdefault(path, use)) is not use:
                mine.hashes |= use.hashes

    # --- files, once each

    def check_files(self) -> None:
        """Stat (and with hashes on, hash) each distinct referenced file once."""
        self.report.unique_images = len(self.files)
        present: list[tuple[Path | str, _FileUse]] = []
        for path, use in self.files.items():
            try:
                if isinstance(path, Path):
                    check_allowed(path, self.allowed_roots)
            except BadInputError as exc:
                self.violation(use.first, "disallowed_file", exc.message, image=use.image)
                continue
            try:
                self.report.image_bytes += asset_size(path)
            except OSError as exc:
                self.report.missing_files += 1
                reason = (
                    "Missing image file" if isinstance(exc, FileNotFoundError) else exc.strerror or str(exc)
                )
                self.violation(use.first, "missing_file", f"{reason}: `{path}`", image=use.image)
                continue
            if use.hashes:
                present.append((path, use))
        if not self.report.hashes_verified or not present:
            return
        # Hashing releases the GIL: threads overlap the reads and the SHA-256 work.
        with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
            actual_hashes = list(pool.map(_hash_file, (path for path, _ in present)))
        for (path, use), actual in zip(present, actual_hashes, strict=True):
            wrong = sorted(use.hashes - {actual})
            if wrong:
                self.report.hash_mismatches += 1
                self.violation(
                    use.first,
                    "hash_mismatch",
                    f"Content hash mismatch for `{path}`: ref says `{', '.join(wrong)}`, "
                    + (actual if actual.startswith("unreadable") else "the file holds other content"),
                    image=use.image,
                )


def binary_artifacts(paths: Sequence[Path]) -> list[tuple[list[Path], list[Path]]]:
    """Return the TrainingBatch and rank files ``audit`` reads, per run (loose files are one run).

    Raises:
        UsageError: as ``audit`` does for the same paths.
    """
    return [(group.training_batches, group.rank_files) for group in _plan(paths).groups]


def audit(
    paths: Sequence[str | os.PathLike[str]],
    *,
    verify_hashes: bool = False,
    model_dir: str | os.PathLike[str] | None = None,
    expect: Sequence[str] = (),
    remap: Remap | None = None,
    ray: RayOptions | None = None,
    allowed_roots: Sequence[Path] | None = None,
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

    Returns:
        The report; ``ok`` is true when there is no violation and every expectation holds.

    Raises:
        UsageError: a path is missing, unreadable or of an unknown kind, a run has no
            artifacts, or an expectation does not parse.
    """
    expectations = [parse_expectation(text) for text in expect]
    plan = _plan(paths)
    families = Families(model_dir)
    runs = [group for group in plan.groups if group.run is not None]
    if len(runs) < 2:
        report = _audit_groups(plan.groups, plan.jsonl, families, verify_hashes, remap, ray, allowed_roots)
        report.run = str(runs[0].run) if runs and len(plan.groups) == 1 and not plan.jsonl else None
    else:
        per_run = [
            _audit_groups([group], [], families, verify_hashes, remap, ray, allowed_roots) for group in runs
        ]
        for group, run_report in zip(runs, per_run, strict=True):
            run_report.run = str(group.run)
        rest = [group for group in plan.groups if group.run is None]
        others = (
            [_audit_groups(rest, plan.jsonl, families, verify_hashes, remap, ray, allowed_roots)]
            if rest or plan.jsonl
            else []
        )
        report = _sum_reports([*per_run, *others])
        report.runs = [msgspec.structs.replace(r, violations=[]) for r in per_run]
    report.families = families.configs()
    report.warnings = families.warnings()
    _judge(report, expectations)
    return report


def _audit_groups(
    groups: Sequence[_Group],
    jsonl: Sequence[Path],
    families: Families,
    verify_hashes: bool,
    remap: Remap | None,
    ray: RayOptions | None,
    allowed_roots: Sequence[Path] | None,
) -> AuditReport:
    auditor = _Auditor(families, verify_hashes, remap, allowed_roots)
    for group in groups:
        for path in group.training_batches:
            auditor.training_batch(path, trainer_bound=not group.rank_files)
        for path in group.rank_files:
            auditor.rank_file(path)
    if ray is not None and jsonl:
        from mmoffload.runners.ray import audit_jsonl_on_ray  # The optional `ray` extra.

        audit_jsonl_on_ray(auditor, jsonl, ray)
    else:
        for path in jsonl:
            auditor.jsonl(path)
    for step_dir, samples in auditor.samples.items():
        if step_dir in auditor.micro_batches:
            _truncation(auditor.report, samples, auditor.micro_batches[step_dir])
    auditor.check_files()
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
    auditor = _Auditor(families, verify_hashes)
    fields = _sample_record(record) if isinstance(record, TrainingSample) else _micro_batch_record(record)
    auditor.record(_Loc(file, index), fields, trainer_bound=True)
    auditor.check_files()
    auditor.report.ok = not auditor.report.violations
    return auditor.report


def _sum_reports(reports: Sequence[AuditReport]) -> AuditReport:
    """Add up counts, and yes/no figures with ``all``; violations are listed in order."""
    total = AuditReport()
    for name in FIGURES:
        values = [getattr(report, name) for report in reports]
        setattr(total, name, all(values) if FIGURES[name] is bool else sum(values))
    total.violations = [violation for report in reports for violation in report.violations]
    return total


# --- expectations (--expect NAME<OP>VALUE) --------------------------------------------------

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
    return _judge(report, [parse_expectation(text) for text in texts])


def _judge(report: AuditReport, parsed: Sequence[tuple[str, str, int | float | bool]]) -> list[Expectation]:
    results = []
    for name, op, expected in parsed:
        actual = getattr(report, name)
        results.append(Expectation(name, op, expected, actual, OPERATORS[op](actual, expected)))
    report.expectations.extend(results)
    report.ok = report.ok and all(result.holds for result in results)
    return results


# --- helpers -------------------------------------------------------------------------------------


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"Cannot read input: {exc.strerror}", Where(file=str(path))) from exc


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cycle collector: decoding allocates millions of acyclic lists and numbers."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _hash_file(path: Path | str) -> str:
    try:
        return content_hash(read_verified(path, None))
    except MMOffloadError as exc:
        return f"unreadable ({exc.message})"  # Vanished, special or too large: disagrees with every ref.


def _ref_problems(item: dict[str, Any], digest: str, uri: str, offset: int, previous_end: int) -> list[str]:
    """Return what is wrong with a ref itself (its fields against each other and the previous ref)."""
    problems: list[str] = []
    if descriptor_uri(item) != uri:
        problems.append("Expected the ref's `uri` to equal its descriptor's `raw_image_uri`")
    if not HASH_PATTERN.fullmatch(digest):
        problems.append(f"Expected the ref's `hash` as 32 lowercase hex digits, got `{digest[:40]}`")
    if offset < previous_end:
        problems.append(
            f"Expected refs in token order without overlap, got offset {offset} before {previous_end}"
        )
    return problems


def _descriptors_and_samples(
    value: object, path: tuple[PathPart, ...] = ()
) -> Iterator[tuple[tuple[PathPart, ...], dict[str, Any]]]:
    """Yield every object in a JSON value that may be a descriptor or carry ``mm_kwargs``."""
    if isinstance(value, dict):
        if "mm_kwargs" in value or value.get("kind") == DESCRIPTOR_KIND:
            yield path, value
        for key, child in value.items():
            if isinstance(child, dict | list):
                yield from _descriptors_and_samples(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            if isinstance(child, dict | list):
                yield from _descriptors_and_samples(child, (*path, index))

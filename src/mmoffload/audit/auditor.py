"""The auditor: every check of a run's artifacts, counted as figures and violations."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from mmoffload.audit.plan import descriptors_and_samples
from mmoffload.audit.records import (
    FileUse,
    Loc,
    Packed,
    Record,
    Sequences,
    gc_paused,
    hash_file,
    micro_batch_record,
    packed_sequences,
    read_artifact,
    sample_record,
)
from mmoffload.audit.report import FIGURES, AuditReport, Violation, add_schemes
from mmoffload.contract.addresses import address_hash, asset_location, is_local_file_uri, is_object_uri
from mmoffload.contract.checks import length_problems, ref_problems
from mmoffload.contract.descriptors import DESCRIPTOR_KIND, descriptor_problems
from mmoffload.contract.imageparts import ImageSource, iter_image_sources, source_kind
from mmoffload.contract.spans import span_problems
from mmoffload.contract.wire import TRAINING_BATCH_DECODER, MMImageRef, iter_rank_file
from mmoffload.errors import BadInputError, PathPart, UsageError, Where, json_path, shorten
from mmoffload.families import DEFAULT_TOKEN_NAMES, Families
from mmoffload.io.inputs import decode_json_line, iter_lines, too_deep
from mmoffload.store.backend import asset_size
from mmoffload.store.read import AllowedRoots, check_allowed_location
from mmoffload.store.remap import Remap

_SHOWN_SOURCE_CHARS = 60


class Auditor:
    """Accumulates figures and violations over every artifact, then checks the files once."""

    def __init__(
        self,
        families: Families,
        verify_hashes: bool,
        remap: Remap | None = None,
        allowed_roots: AllowedRoots = None,
    ) -> None:
        self.families = families
        self.report = AuditReport(hashes_verified=verify_hashes)
        self.remap = remap or Remap()
        self.allowed_roots = allowed_roots
        # Local image files by path, object-store images by URL.
        self.files: dict[Path | str, FileUse] = {}
        # Per step directory: its samples and its micro batches, for the truncation figures.
        self.samples: dict[Path, Sequences] = {}
        self.micro_batches: dict[Path, list[Packed]] = {}

    def violation(self, loc: Loc, kind: str, reason: str, **where: Any) -> None:
        # Reasons quote user text: cut as every message is, so a 5 MB string is no 5 MB report.
        self.report.violations.append(
            Violation(
                file=loc.file, index=loc.index, reason=shorten(reason), kind=kind, line=loc.line, **where
            )
        )

    # --- binary artifacts

    def training_batch(self, path: Path, trainer_bound: bool) -> None:
        try:
            with gc_paused():
                batch = TRAINING_BATCH_DECODER.decode(read_artifact(path))
        except msgspec.DecodeError as exc:
            self.violation(Loc(str(path), None), "undecodable", f"Not a TrainingBatch: {exc}")
            return
        self.report.training_batches += 1
        self.report.examples += len(batch.examples)
        sequences = self.samples.setdefault(path.parent, Sequences())
        for sample in batch.examples:
            sequences.add(sample.token_ids, sample.mask, len(sample.mm_refs.images) if sample.mm_refs else 0)
        for index, sample in enumerate(batch.examples):
            if self.record(Loc(str(path), index), sample_record(sample), trainer_bound):
                self.report.samples_with_mm_refs += 1

    def rank_file(self, path: Path) -> None:
        """Audit a rank file one micro batch at a time: memory bounded by one, whatever the file's size."""
        packed = self.micro_batches.setdefault(path.parent, [])
        index = -1
        try:
            with gc_paused():
                for index, batch in enumerate(iter_rank_file(path)):
                    self.report.micro_batches += 1
                    packed.append(
                        Packed(hash(tuple(batch.input_ids)), any(batch.loss_mask), packed_sequences(batch))
                    )
                    if self.record(Loc(str(path), index), micro_batch_record(batch), trainer_bound=True):
                        self.report.micro_batches_with_mm_refs += 1
        except OSError as exc:
            raise UsageError(f"Cannot read input: {exc.strerror}", Where(file=str(path))) from exc
        except msgspec.DecodeError as exc:
            after = f" (after {index + 1:,} micro batches)" if index >= 0 else ""
            self.violation(Loc(str(path), None), "undecodable", f"Not a list of MicroBatch{after}: {exc}")
            return
        self.report.rank_files += 1

    def record(self, loc: Loc, record: Record, trainer_bound: bool) -> bool:
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

    def refs(self, loc: Loc, images: Sequence[MMImageRef], trainer_bound: bool) -> dict[int, list[str]]:
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
            for reason in ref_problems(ref.item, ref.hash, ref.uri, ref.offset, previous_end):
                self.violation(loc, "bad_ref", reason, image=image)
            previous_end = max(previous_end, ref.offset + ref.length)
            if reason := self.length_problem(ref.item, ref.length):
                placeholder_reasons.setdefault(image, []).append(reason)
        return placeholder_reasons

    def alignment(self, loc: Loc, record: Record) -> bool:
        """Report per-token arrays and totals that disagree with the token count; True if aligned."""
        problems = length_problems(record.num_tokens, record.per_token, record.totals)
        for problem in problems:
            self.violation(loc, "misaligned", problem)
        return not problems

    def length_problem(self, item: dict[str, Any], length: int) -> str | None:
        """Return why a ref's length is not its family's placeholder length, if it is not."""
        family = item.get("family")
        if not isinstance(family, str):
            return None  # Not strict: reported as such, no family to ask.
        try:
            owner = self.families.get(family)
            return owner.placeholder_problem(owner.grid(item.get("payload")), length)
        except BadInputError as exc:
            return f"Cannot compute the placeholder length: {exc.message}"

    def ref_sources(
        self, loc: Loc, image: int, uri: str, item: dict[str, Any], expected_hash: str | None
    ) -> None:
        """Count a ref's image sources (its uri and its descriptor's) by kind; register local files."""
        sources = {uri: ("uri",)}
        for source in self.image_sources(loc, item, ("item",), image):
            sources.setdefault(source.source, ("item", *source.path))
        for source, path in sources.items():
            self.source(loc, source, path, image=image, expected_hash=expected_hash)

    def image_sources(
        self, loc: Loc, value: object, prefix: tuple[PathPart, ...], image: int | None = None
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
        loc: Loc,
        source: str,
        path: Sequence[PathPart],
        *,
        image: int | None = None,
        expected_hash: str | None = None,
    ) -> None:
        """Count one image source; a stored file (local or object) is registered for the file check.

        Its hash is checked against the ref's (``expected_hash``) and, when its name is a content
        address (``<h32>.<ext>``), against the name: a JSONL image part has no other hash to check.
        """
        kind = source_kind(source)
        if kind == "file":
            try:
                file = asset_location(self.remap(source))
            except BadInputError as exc:
                self.violation(loc, "bad_uri", exc.message, path=json_path(path), image=image)
                return
            use = self.files.setdefault(file, FileUse(loc, image))
            use.hashes.update(digest for digest in (expected_hash, address_hash(file)) if digest is not None)
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
        loc = Loc(str(where.file), index, where.line)
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

    def jsonl_value(self, loc: Loc, value: object) -> None:
        """Audit one decoded JSONL record."""
        for source in self.image_sources(loc, value, ()):
            # Stored images in JSONL count as the trainer-bound refs do, local and object alike.
            if is_local_file_uri(source.source):
                self.report.file_uris += 1
            elif is_object_uri(source.source):
                self.report.object_uris += 1
            self.source(loc, source.source, source.path)
            if source.kind == "file":
                self.report.images += 1
                scheme, schemes = source.source.partition(":")[0].lower(), self.report.images_by_scheme
                schemes[scheme] = schemes.get(scheme, 0) + 1
        for parts, obj in descriptors_and_samples(value):
            if obj.get("mm_kwargs") is not None:
                self.report.eager_mm_kwargs += 1
                self.violation(loc, "eager_mm_kwargs", "Expected no eager `mm_kwargs`", path=json_path(parts))
            if obj.get("kind") == DESCRIPTOR_KIND and (problems := descriptor_problems(obj)):
                self.report.non_strict_descriptors += 1
                self.violation(loc, "non_strict_descriptor", "; ".join(problems), path=json_path(parts))

    def fresh(self) -> Auditor:
        """Return an auditor with this one's settings and nothing found yet (what a worker needs)."""
        return Auditor(self.families, self.report.hashes_verified, self.remap, self.allowed_roots)

    def merge(self, report: AuditReport, files: dict[Path | str, FileUse]) -> None:
        """Add the figures, violations and files of another auditor's later records (a Ray task's)."""
        for name, kind in FIGURES.items():
            if kind is int:
                setattr(self.report, name, getattr(self.report, name) + getattr(report, name))
        self.report.violations.extend(report.violations)
        add_schemes(self.report, report.images_by_scheme)
        for path, use in files.items():
            if (mine := self.files.setdefault(path, use)) is not use:
                mine.hashes |= use.hashes

    # --- files, once each

    def check_files(
        self,
        advance: Callable[[int], None] = lambda _n: None,
        add_total: Callable[[int], None] = lambda _n: None,
    ) -> None:
        """Stat (and with hashes on, hash) each distinct referenced file once.

        Args:
            advance: called with each file's size once its hash is checked (progress).
            add_total: called once with the bytes about to be hashed, before any is.
        """
        self.report.unique_images = len(self.files)
        present: list[tuple[Path | str, FileUse, int]] = []
        for path, use in self.files.items():
            try:
                check_allowed_location(path, self.allowed_roots)
            except BadInputError as exc:
                self.violation(use.first, "disallowed_file", exc.message, image=use.image)
                continue
            try:
                size = asset_size(path)
            except OSError as exc:
                self.report.missing_files += 1
                reason = (
                    "Missing image file" if isinstance(exc, FileNotFoundError) else exc.strerror or str(exc)
                )
                self.violation(use.first, "missing_file", f"{reason}: `{path}`", image=use.image)
                continue
            self.report.image_bytes += size
            if use.hashes:
                present.append((path, use, size))
        if self.report.hashes_verified and present:
            self._verify_hashes(present, advance, add_total)

    def _verify_hashes(
        self,
        present: list[tuple[Path | str, FileUse, int]],
        advance: Callable[[int], None],
        add_total: Callable[[int], None],
    ) -> None:
        """Hash each present file and count those whose refs claim another hash."""
        add_total(sum(size for _, _, size in present))
        # Hashing releases the GIL: threads overlap the reads and the SHA-256 work.
        with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
            hashes = pool.map(hash_file, (path for path, _, _ in present))
            for (path, use, size), actual in zip(present, hashes, strict=True):
                advance(size)
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


class JsonlTask:
    """Audit JSONL lines (a runner's task): each line on a fresh auditor, its findings returned to merge."""

    def __init__(self, auditor: Auditor) -> None:
        self.auditor = auditor.fresh()

    def __call__(
        self, batch: list[tuple[Where, bytes]]
    ) -> list[tuple[AuditReport, dict[Path | str, FileUse]]]:
        results = []
        for where, line in batch:
            fresh = self.auditor.fresh()
            fresh.jsonl_line(where.index or 0, where.at(index=None), line)
            results.append((fresh.report, fresh.files))
        return results

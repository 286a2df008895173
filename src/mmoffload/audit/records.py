"""One sample or micro batch as audit sees it, the sequences it holds, and file helpers."""

from __future__ import annotations

import contextlib
import gc
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmoffload.audit.report import AuditReport
from mmoffload.contract.addresses import content_hash
from mmoffload.contract.wire import (
    MICRO_BATCH_PER_TOKEN_FIELDS,
    MICRO_BATCH_TOTAL_FIELDS,
    SAMPLE_PER_TOKEN_FIELDS,
    MicroBatch,
    MMRefs,
    TrainingSample,
)
from mmoffload.errors import MMOffloadError, UsageError, Where
from mmoffload.store.read import read_verified


@dataclass(slots=True)
class Loc:
    """Where a record is: file and index (sample, micro batch or JSONL record)."""

    file: str
    index: int | None
    line: int | None = None


@dataclass(slots=True)
class FileUse:
    """A referenced image file: where it was first referenced, and the hashes refs claim for it."""

    first: Loc
    image: int | None
    hashes: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Record:
    """The fields of a TrainingSample or MicroBatch that audit reads, named once."""

    num_tokens: int
    token_ids: Sequence[int]
    per_token: dict[str, Sequence[Any] | None]
    totals: dict[str, Sequence[int] | None]
    mm_kwargs: object
    mm_refs: MMRefs | None
    type_ids: Sequence[int] | None


def sample_record(sample: TrainingSample) -> Record:
    return Record(
        num_tokens=len(sample.token_ids),
        token_ids=sample.token_ids,
        per_token={name: getattr(sample, name) for name in SAMPLE_PER_TOKEN_FIELDS},
        totals={},
        mm_kwargs=sample.mm_kwargs,
        mm_refs=sample.mm_refs,
        type_ids=sample.mm_token_type_ids,
    )


def micro_batch_record(batch: MicroBatch) -> Record:
    return Record(
        num_tokens=len(batch.input_ids),
        token_ids=batch.input_ids,
        per_token={name: getattr(batch, name) for name in MICRO_BATCH_PER_TOKEN_FIELDS},
        totals={name: getattr(batch, name) for name in MICRO_BATCH_TOTAL_FIELDS},
        mm_kwargs=batch.mm_kwargs,
        mm_refs=batch.mm_refs,
        type_ids=batch.mm_token_type_ids,
    )


@dataclass(slots=True)
class Sequences:
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


def packed_sequences(batch: MicroBatch) -> Sequences:
    """Cut a micro batch back into its samples' sequences, padding left out.

    Padding extends the last sequence with positions restarting at 0, which is where it starts.
    """
    sequences = Sequences()
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
class Packed:
    """What the truncation figures need of one micro batch."""

    content: int  # hash of its token ids: a dummy is an all-masked copy of another (packing.md 4)
    trained: bool
    sequences: Sequences


def truncation(report: AuditReport, samples: Sequences, micro_batches: list[Packed]) -> None:
    """Count what truncation dropped in one step: its samples against its real micro batches.

    Every sample is one packed sequence, so sequences beyond the number of samples are
    dummies: all-masked copies of another micro batch of the step (packing.md 4), dropped
    until the counts agree (never the last copy: a real micro batch may be all-masked too).
    """
    copies = Counter(batch.content for batch in micro_batches)
    excess = sum(batch.sequences.contents.total() for batch in micro_batches) - samples.contents.total()
    packed = Sequences()
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


def read_artifact(path: Path) -> bytes:
    """Return a binary artifact's bytes, naming the file when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"Cannot read input: {exc.strerror}", Where(file=str(path))) from exc


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cycle collector: decoding allocates millions of acyclic lists and numbers."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def hash_file(path: Path | str) -> str:
    try:
        return content_hash(read_verified(path, None))
    except MMOffloadError as exc:
        return f"unreadable ({exc.message})"  # Vanished, special or too large: disagrees with every ref.

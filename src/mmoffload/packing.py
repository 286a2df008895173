"""Training samples to per-rank micro batches: the pack stage (packing.md).

Each step's ``TrainingBatch`` becomes ``rank_<R>.bin`` files of
``list[MicroBatch]``: samples are truncated without splitting an image, packed
first-fit into bins that never mix model families, concatenated with shifted
image refs, padded, checked, and dealt to ranks so that every rank runs the
same number of micro batches and the k-th one has the same modality on all.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import msgspec

from mmoffload import rundir
from mmoffload.errors import BadInputError, IntegrityError, UsageError, Where
from mmoffload.io import atomic_write
from mmoffload.spans import span_problems
from mmoffload.wire import (
    MICRO_BATCH_PER_TOKEN_FIELDS,
    MICRO_BATCH_TOTAL_FIELDS,
    MicroBatch,
    MMImageRef,
    MMRefs,
    RoutedExperts,
    TrainingBatch,
    TrainingSample,
    encode,
    read_training_batch,
)

# Optional float streams: the value for a sample without the stream in a bin where
# another sample has it (neutral for training), and the value on padding tokens.
STREAM_FILL = {"ref_logprobs": 0.0, "rl_weights": 1.0, "ce_weights": 0.0, "ref_kl_weights": 0.0}
STREAM_PAD = 0.0
WEIGHT_STREAMS = ("rl_weights", "ce_weights", "ref_kl_weights")
T = TypeVar("T")
# Token id of padding: 0 exists in every vocabulary and is never an image token;
# padding is masked out of the loss, so its identity does not change training.
DEFAULT_PAD_TOKEN_ID = 0


@dataclass(frozen=True, slots=True)
class PackOptions:
    """How to pack.

    Attributes:
        seq_len: tokens per micro batch before padding.
        pad_multiple: pad each micro batch to a multiple of this (the context-parallel degree).
        world_size: number of data ranks.
        attention_weight: cost weight of the sum of squared sequence lengths when balancing ranks.
        pad_token_id: token id written on padding.
    """

    seq_len: int
    pad_multiple: int = 1
    world_size: int = 1
    attention_weight: float = 0.0
    pad_token_id: int = DEFAULT_PAD_TOKEN_ID

    def __post_init__(self) -> None:
        for name in ("seq_len", "pad_multiple", "world_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"Expected `{name}` >= 1, got {getattr(self, name)}")
        if self.attention_weight < 0:
            raise UsageError(f"Expected `attention_weight` >= 0, got {self.attention_weight}")


class StepPackReport(msgspec.Struct, kw_only=True):
    """What one step became."""

    step: int
    samples: int
    truncated_samples: int
    micro_batches_per_rank: int
    micro_batches_with_refs: int
    dummies: int
    real_tokens: int
    padding_tokens: int
    fill_ratio: float


class PackReport(msgspec.Struct, kw_only=True):
    """What the pack stage wrote, over all steps."""

    run_dir: str
    seq_len: int
    pad_multiple: int
    world_size: int
    pad_token_id: int
    steps_packed: int = 0
    samples: int = 0
    truncated_samples: int = 0
    micro_batches_per_rank: int = 0
    micro_batches_with_refs: int = 0
    dummies: int = 0
    real_tokens: int = 0
    padding_tokens: int = 0
    fill_ratio: float = 0.0
    steps: list[StepPackReport] = msgspec.field(default_factory=list)


@dataclass(slots=True)
class _Piece:
    """One sample as a single-sample micro batch, truncated to fit."""

    index: int
    input_ids: list[int]
    loss_mask: list[bool]
    advantages: list[float]
    logprobs: list[float]
    temperatures: list[float]
    env_name: str
    streams: dict[str, list[float]]
    type_ids: list[int] | None
    refs: list[MMImageRef]
    routed_experts: RoutedExperts | None
    family: str | None
    truncated: bool

    @property
    def length(self) -> int:
        return len(self.input_ids)


def pack_run(run_dir: str | os.PathLike[str], options: PackOptions) -> PackReport:
    """Pack every step of a run into ``rank_<R>.bin`` files.

    Rank files of a step are written only after the whole step packed and
    passed its checks; rank files beyond the world size (from an earlier pack)
    are removed.

    Args:
        run_dir: the run directory holding ``rollouts/step_<N>/train_rollouts.bin``.
        options: sequence length, padding, world size, balancing.

    Returns:
        The report: micro batches per rank, refs, dummies, fill ratio, truncations.

    Raises:
        BadInputError: a sample cannot be packed (leading image too long, bad type ids, mm_kwargs).
        IntegrityError: a packed micro batch breaks an invariant (a bug, never written).
        UsageError: no steps, or unreadable/unwritable files.
    """
    run_dir = Path(run_dir)
    steps = [step for step in rundir.steps(run_dir) if rundir.training_batch_path(run_dir, step).is_file()]
    if not steps:
        raise UsageError(
            "Expected steps with `train_rollouts.bin` (run `mmoffload refs` first)",
            Where(file=str(run_dir / rundir.ROLLOUTS)),
        )
    report = PackReport(
        run_dir=str(run_dir),
        seq_len=options.seq_len,
        pad_multiple=options.pad_multiple,
        world_size=options.world_size,
        pad_token_id=options.pad_token_id,
    )
    for step in steps:
        path = rundir.training_batch_path(run_dir, step)
        ranks, step_report = pack_batch(read_training_batch(path), options, step, Where(file=str(path)))
        for rank, micro_batches in enumerate(ranks):
            atomic_write(rundir.rank_path(run_dir, step, rank), encode(micro_batches))
        for stale in rundir.rank_paths(run_dir, step)[options.world_size :]:
            stale.unlink()
        _add_step(report, step_report)
    return report


def pack_batch(
    batch: TrainingBatch, options: PackOptions, step: int, where: Where | None = None
) -> tuple[list[list[MicroBatch]], StepPackReport]:
    """Pack one step's samples into ``world_size`` equal-length lists of micro batches.

    Raises:
        BadInputError: a sample cannot be packed.
        IntegrityError: a packed micro batch breaks an invariant.
    """
    where = where or Where()
    pieces = [
        _piece(sample, index, options.seq_len, where.at(index=index))
        for index, sample in enumerate(batch.examples)
    ]
    bins = _split_for_ranks(_first_fit(pieces, options.seq_len), options.world_size)
    micro_batches: list[MicroBatch] = []
    for number, members in enumerate(bins):
        micro_batch = _micro_batch(members, options)
        check_micro_batch(micro_batch, Where(file=where.file, index=number))
        micro_batches.append(micro_batch)
    ranks, dummies = _deal_to_ranks(micro_batches, options)
    real_tokens = sum(piece.length for piece in pieces)
    total_slots = options.seq_len * sum(len(rank) for rank in ranks)
    return ranks, StepPackReport(
        step=step,
        samples=len(pieces),
        truncated_samples=sum(piece.truncated for piece in pieces),
        micro_batches_per_rank=len(ranks[0]),
        micro_batches_with_refs=sum(mb.mm_refs is not None for mb in micro_batches),
        dummies=dummies,
        real_tokens=real_tokens,
        padding_tokens=sum(len(mb.input_ids) for mb in micro_batches) - real_tokens,
        fill_ratio=real_tokens / total_slots if total_slots else 0.0,
    )


def _piece(sample: TrainingSample, index: int, seq_len: int, where: Where) -> _Piece:
    """Check a sample and make it a single-sample micro batch, truncated to ``seq_len``."""
    if sample.mm_kwargs is not None:
        raise BadInputError("Expected no `mm_kwargs` (processed tensors are never packed), got some", where)
    n = len(sample.token_ids)
    streams = {name: values for name in STREAM_FILL if (values := getattr(sample, name)) is not None}
    per_token: dict[str, list[object] | None] = {
        "mask": sample.mask,
        "logprobs": sample.logprobs,
        "temperatures": sample.temperatures,
        "advantages": sample.advantages,
        "mm_token_type_ids": sample.mm_token_type_ids,
        **streams,
    }
    for name, values in per_token.items():
        if values is not None and len(values) != n:
            raise BadInputError(f"Expected `{name}` with one value per token ({n}), got {len(values)}", where)
    refs = sorted(sample.mm_refs.images, key=lambda ref: ref.offset) if sample.mm_refs else []
    if refs and sample.mm_token_type_ids is None:
        raise BadInputError("Expected `mm_token_type_ids` on a sample with `mm_refs`, got none", where)
    families = sorted({str(ref.item.get("family")) for ref in refs})
    if len(families) > 1:
        raise BadInputError(f"Expected one family per sample, got {', '.join(families)}", where)

    cut = _cut(refs, n, seq_len, where)
    routed = sample.routed_experts
    if routed is not None and (not routed.shape or routed.shape[0] != n):
        raise BadInputError(
            f"Expected `routed_experts` with one row per token ({n}), got shape {routed.shape}", where
        )
    if cut < n and routed is not None:
        row = len(routed.data) // n
        routed = RoutedExperts(routed.data[: cut * row], [cut, *routed.shape[1:]], routed.dtype)

    def keep(values: list[T]) -> list[T]:
        # Slicing copies: only truncated samples pay for it.
        return values[:cut] if cut < n else values

    return _Piece(
        index=index,
        input_ids=keep(sample.token_ids),
        loss_mask=keep(sample.mask),
        advantages=keep(sample.advantages) if sample.advantages is not None else [0.0] * cut,
        logprobs=keep(sample.logprobs),
        temperatures=keep(sample.temperatures),
        env_name=sample.env_name,
        streams={name: keep(values) for name, values in streams.items()},
        type_ids=keep(sample.mm_token_type_ids) if sample.mm_token_type_ids is not None else None,
        refs=[ref for ref in refs if ref.offset + ref.length <= cut],
        routed_experts=routed,
        family=families[0] if families else None,
        truncated=cut < n,
    )


def _cut(refs: list[MMImageRef], n: int, seq_len: int, where: Where) -> int:
    """Return where to cut a sample: ``seq_len``, or the offset of the image straddling it."""
    if n <= seq_len:
        return n
    for image, ref in enumerate(refs):
        if ref.offset + ref.length > seq_len:
            if ref.offset == 0:
                raise BadInputError(
                    f"Expected the sample's first image to fit in seq_len {seq_len}, got image {image} "
                    f"at [0, {ref.length}) (raise --seq-len; an image is never split)",
                    where.at(image=image),
                )
            return min(ref.offset, seq_len)
    return seq_len


def _first_fit(pieces: list[_Piece], seq_len: int) -> list[list[_Piece]]:
    """Pack longest first into the first compatible bin with room."""
    bins: list[list[_Piece]] = []
    totals: list[int] = []
    for piece in sorted(pieces, key=lambda p: p.length, reverse=True):
        for number, members in enumerate(bins):
            if totals[number] + piece.length <= seq_len and _compatible(members, piece):
                members.append(piece)
                totals[number] += piece.length
                break
        else:
            bins.append([piece])
            totals.append(piece.length)
    return bins


def _compatible(members: list[_Piece], piece: _Piece) -> bool:
    """Routed experts in all or none; multimodal samples of one family only (text joins any)."""
    if (members[0].routed_experts is None) != (piece.routed_experts is None):
        return False
    family = next((member.family for member in members if member.family is not None), None)
    return family is None or piece.family is None or family == piece.family


def _split_for_ranks(bins: list[list[_Piece]], world_size: int) -> list[list[_Piece]]:
    """Split the heaviest text-only bins until every rank can get a real bin (packing.md 2)."""
    if world_size == 1:
        return bins
    target = max(math.ceil(len(bins) / world_size) * world_size, world_size)
    bins = list(bins)
    while len(bins) < target:
        splittable = [
            number
            for number, members in enumerate(bins)
            if len(members) > 1 and all(member.family is None for member in members)
        ]
        if not splittable:
            break
        heaviest = max(splittable, key=lambda number: sum(member.length for member in bins[number]))
        halves: tuple[list[_Piece], list[_Piece]] = ([], [])
        for piece in sorted(bins[heaviest], key=lambda p: p.length, reverse=True):
            lighter = min(halves, key=lambda half: sum(member.length for member in half))
            lighter.append(piece)
        bins[heaviest : heaviest + 1] = list(halves)
    return bins


def _micro_batch(members: list[_Piece], options: PackOptions) -> MicroBatch:
    """Concatenate a bin's samples, shift their refs, fill absent streams, and pad."""
    lengths = [piece.length for piece in members]
    total = sum(lengths)
    pad = -total % options.pad_multiple
    micro_batch = MicroBatch(
        input_ids=_concat([p.input_ids for p in members], [options.pad_token_id] * pad),
        loss_mask=_concat([p.loss_mask for p in members], [False] * pad),
        advantages=_concat([p.advantages for p in members], [0.0] * pad),
        inference_logprobs=_concat([p.logprobs for p in members], [0.0] * pad),
        position_ids=_concat([range(length) for length in lengths], range(pad)),
        sequence_lengths=[*lengths[:-1], lengths[-1] + pad],
        temperatures=_concat([p.temperatures for p in members], [1.0] * pad),
        env_names=_concat([[p.env_name] * p.length for p in members], [""] * pad),
        seq_lens=[*lengths[:-1], lengths[-1] + pad],
        lora_num_tokens=[total + pad],
    )
    for name, fill in STREAM_FILL.items():
        if any(name in piece.streams for piece in members):
            parts = [piece.streams.get(name) or [fill] * piece.length for piece in members]
            setattr(micro_batch, name, _concat(parts, [STREAM_PAD] * pad))
    if any(piece.type_ids is not None for piece in members):
        parts = [piece.type_ids or [0] * piece.length for piece in members]
        micro_batch.mm_token_type_ids = _concat(parts, [0] * pad)
    refs: list[MMImageRef] = []
    start = 0
    for piece in members:
        refs += [msgspec.structs.replace(ref, offset=ref.offset + start) for ref in piece.refs]
        start += piece.length
    micro_batch.mm_refs = MMRefs(refs) if refs else None
    micro_batch.routed_experts = _concat_routed([piece.routed_experts for piece in members], pad, lengths)
    return micro_batch


def _concat(parts: Iterable[Iterable[T]], tail: Iterable[T]) -> list[T]:
    """Concatenate per-token parts and a padding tail (``+=`` copies at C speed)."""
    out: list[T] = []
    for part in parts:
        out += part
    out += tail
    return out


def _concat_routed(parts: list[RoutedExperts | None], pad: int, lengths: list[int]) -> RoutedExperts | None:
    """Concatenate routed-expert rows (bins hold them in all samples or none); pad with zero rows."""
    present = [part for part in parts if part is not None]
    if not present:
        return None
    first = present[0]
    for part in present[1:]:
        if part.shape[1:] != first.shape[1:] or part.dtype != first.dtype:
            raise BadInputError(
                f"Expected routed experts of one row shape and dtype in a micro batch, got "
                f"{first.shape[1:]} {first.dtype} and {part.shape[1:]} {part.dtype}"
            )
    row = len(first.data) // first.shape[0] if first.shape[0] else 0
    data = b"".join(part.data for part in present) + bytes(row * pad)
    return RoutedExperts(data, [sum(lengths) + pad, *first.shape[1:]], first.dtype)


def check_micro_batch(micro_batch: MicroBatch, where: Where | None = None) -> None:
    """Check packing.md section 3's invariants on a micro batch.

    Raises:
        IntegrityError: a per-token array of the wrong length, lengths that do not sum
            to the tokens, or a ref outside the micro batch or on non-image tokens.
    """
    n = len(micro_batch.input_ids)
    for name in MICRO_BATCH_PER_TOKEN_FIELDS:
        values = getattr(micro_batch, name)
        if values is not None and len(values) != n:
            raise IntegrityError(f"Expected `{name}` with {n} entries, got {len(values)}", where)
    for name in MICRO_BATCH_TOTAL_FIELDS:
        values = getattr(micro_batch, name)
        if values is not None and sum(values) != n:
            raise IntegrityError(f"Expected `{name}` to sum to {n} tokens, got {sum(values)}", where)
    if micro_batch.mm_refs is None:
        return
    if micro_batch.mm_token_type_ids is None:
        raise IntegrityError("Expected `mm_token_type_ids` in a micro batch with refs, got none", where)
    spans = [(ref.offset, ref.length) for ref in micro_batch.mm_refs.images]
    problems = span_problems(micro_batch.mm_token_type_ids, spans)
    if problems:
        at = where.at(image=problems[0].image) if where else Where(image=problems[0].image)
        raise IntegrityError(f"Expected image refs on image-typed tokens: {problems[0].message}", at)


def _deal_to_ranks(
    micro_batches: list[MicroBatch], options: PackOptions
) -> tuple[list[list[MicroBatch]], int]:
    """Deal micro batches to ranks: multimodal group first, each padded with dummies, balanced by cost."""
    world_size = options.world_size
    ranks: list[list[MicroBatch]] = [[] for _ in range(world_size)]
    costs = [0.0] * world_size
    dummies = 0
    multimodal = [mb for mb in micro_batches if mb.mm_refs is not None]
    text = [mb for mb in micro_batches if mb.mm_refs is None]
    for group in (multimodal, text):
        if not group:
            continue
        missing = -len(group) % world_size
        group = group + [_dummy(group[0]) for _ in range(missing)]
        dummies += missing
        per_rank = len(group) // world_size
        counts = [0] * world_size
        for micro_batch in sorted(group, key=lambda mb: _cost(mb, options), reverse=True):
            rank = min((r for r in range(world_size) if counts[r] < per_rank), key=lambda r: costs[r])
            ranks[rank].append(micro_batch)
            counts[rank] += 1
            costs[rank] += _cost(micro_batch, options)
    return ranks, dummies


def _dummy(micro_batch: MicroBatch) -> MicroBatch:
    """Copy a micro batch so it trains nothing; it keeps its refs so every rank runs the vision tower."""
    n = len(micro_batch.input_ids)
    return msgspec.structs.replace(
        micro_batch,
        loss_mask=[False] * n,
        advantages=[0.0] * n,
        rl_weights=None,
        ce_weights=None,
        ref_kl_weights=None,
    )


def _cost(micro_batch: MicroBatch, options: PackOptions) -> float:
    """Tokens, plus the attention weight times the sum of squared sequence lengths."""
    attention = sum(length * length for length in micro_batch.sequence_lengths)
    return len(micro_batch.input_ids) + options.attention_weight * attention


def _add_step(report: PackReport, step: StepPackReport) -> None:
    report.steps.append(step)
    report.steps_packed += 1
    report.samples += step.samples
    report.truncated_samples += step.truncated_samples
    report.micro_batches_per_rank += step.micro_batches_per_rank
    report.micro_batches_with_refs += step.micro_batches_with_refs
    report.dummies += step.dummies
    report.real_tokens += step.real_tokens
    report.padding_tokens += step.padding_tokens
    slots = report.seq_len * report.micro_batches_per_rank * report.world_size
    report.fill_ratio = report.real_tokens / slots if slots else 0.0

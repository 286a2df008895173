"""Samples to micro batches: truncation that never splits an image, first-fit bins per family, padding."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec

from mmoffload.contract.checks import length_problems
from mmoffload.contract.wire import (
    MicroBatch,
    MMImageRef,
    MMRefs,
    RoutedExperts,
    TrainingBatch,
    TrainingSample,
)
from mmoffload.errors import BadInputError, Where
from mmoffload.pack.options import STREAM_FILL, STREAM_PAD, PackOptions, TruncationFigures

T = TypeVar("T")


@dataclass(slots=True)
class _Piece:
    """One sample as a single-sample micro batch, truncated to fit, with what the cut dropped."""

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
    family: str | None  # of the refs kept: None makes a truncated-away image sample a text sample
    dropped: TruncationFigures = field(default_factory=TruncationFigures)

    @property
    def length(self) -> int:
        return len(self.input_ids)


def sample_pieces(batch: TrainingBatch, seq_len: int, where: Where) -> list[_Piece]:
    return [
        _piece(sample, index, seq_len, where.at(index=index)) for index, sample in enumerate(batch.examples)
    ]


def truncation(pieces: list[_Piece]) -> TruncationFigures:
    figures = TruncationFigures()
    for piece in pieces:
        figures.add(piece.dropped)
    return figures


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
    if problems := length_problems(n, per_token):
        raise BadInputError(problems[0], where)
    refs = sorted(sample.mm_refs.images, key=lambda ref: ref.offset) if sample.mm_refs else []
    if refs and sample.mm_token_type_ids is None:
        raise BadInputError("Expected `mm_token_type_ids` on a sample with `mm_refs`, got none", where)
    families = sorted({str(ref.item.get("family")) for ref in refs})
    if len(families) > 1:
        raise BadInputError(
            f"Expected one family per sample, got {', '.join(f'`{name}`' for name in families)}", where
        )

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

    kept = [ref for ref in refs if ref.offset + ref.length <= cut]
    dropped = TruncationFigures(trainable_tokens=sample.mask.count(True))
    if cut < n:
        dropped.samples_truncated = 1
        dropped.tokens_dropped = n - cut
        dropped.trainable_tokens_dropped = sample.mask[cut:].count(True)
        dropped.images_dropped = len(refs) - len(kept)
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
        refs=kept,
        routed_experts=routed,
        family=families[0] if kept else None,
        dropped=dropped,
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


def first_fit(pieces: list[_Piece], seq_len: int) -> list[list[_Piece]]:
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


def split_for_ranks(bins: list[list[_Piece]], options: PackOptions) -> list[list[_Piece]]:
    """Split the costliest text-only bins until every rank can get a real bin (packing.md 2 and 5)."""
    if options.world_size == 1:
        return bins
    target = max(math.ceil(len(bins) / options.world_size) * options.world_size, options.world_size)
    bins = list(bins)
    while len(bins) < target:
        candidates = [
            (options.cost([piece.length for piece in members]), number)
            for number, members in enumerate(bins)
            if len(members) > 1 and all(piece.family is None for piece in members)
        ]
        if not candidates:
            break
        _, number = max(candidates)  # on equal cost, the bin with the highest index
        halves: tuple[list[_Piece], list[_Piece]] = ([], [])
        costs = [0.0, 0.0]
        for piece in sorted(bins[number], key=lambda p: options.cost([p.length]), reverse=True):
            side = 0 if costs[0] <= costs[1] else 1
            halves[side].append(piece)
            costs[side] += options.cost([piece.length])
        bins[number] = halves[0]
        bins.append(halves[1])
    return bins


def pieces_micro_batch(members: list[_Piece], options: PackOptions) -> MicroBatch:
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


def dummy(micro_batch: MicroBatch) -> MicroBatch:
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

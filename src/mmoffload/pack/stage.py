"""Training samples to per-rank micro batches: the pack stage (packing.md).

Each step's ``TrainingBatch`` becomes ``rank_<R>.bin`` files of
``list[MicroBatch]``: samples are truncated without splitting an image, packed
first-fit into bins that never mix model families, concatenated with shifted
image refs, padded, checked, and partitioned over ranks (Karmarkar-Karp, then
swaps) so that every rank runs the same number of micro batches and the k-th
one has the same modality on all. Every tie-break is packing.md section 5's,
so the same samples give the same rank files as prime-rl's ``prepare_batch``.
"""

from __future__ import annotations

import heapq
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import msgspec
import numpy as np

from mmoffload.contract import rundir
from mmoffload.contract.checks import check_micro_batch, length_problems
from mmoffload.contract.wire import (
    MicroBatch,
    MMImageRef,
    MMRefs,
    RoutedExperts,
    TrainingBatch,
    TrainingSample,
    encode,
    read_training_batch,
)
from mmoffload.errors import BadInputError, UsageError, Where
from mmoffload.families import DEFAULT_TOKEN_NAMES
from mmoffload.io.outputs import atomic_write, check_writable_dir
from mmoffload.io.staging import staged_run

# Optional float streams: the value for a sample without the stream in a bin where
# another sample has it (neutral for training), and the value on padding tokens.
STREAM_FILL = {"ref_logprobs": 0.0, "rl_weights": 1.0, "ce_weights": 0.0, "ref_kl_weights": 0.0}
STREAM_PAD = 0.0
T = TypeVar("T")
# Token id of padding: 0 exists in every vocabulary and is never an image token;
# padding is masked out of the loss, so its identity does not change training.
DEFAULT_PAD_TOKEN_ID = 0
# How ranks are balanced: prime-rl's exact partition, or the most even of several (packing.md 5).
Balance = Literal["prime-rl", "best"]
BALANCES: tuple[Balance, ...] = ("prime-rl", "best")


@dataclass(frozen=True, slots=True)
class PackOptions:
    """How to pack.

    Attributes:
        seq_len: tokens per micro batch before padding.
        pad_multiple: pad each micro batch to a multiple of this (the context-parallel degree).
        world_size: number of data ranks.
        attention_weight: cost weight of the sum of squared sequence lengths when balancing ranks.
        pad_token_id: token id written on padding.
        balance: ``"prime-rl"`` (the exact partition) or ``"best"`` (never a heavier busiest rank).
        max_truncated_fraction: refuse to write when truncation would drop more than this
            fraction of the run's trainable tokens; None for no limit.
    """

    seq_len: int
    pad_multiple: int = 1
    world_size: int = 1
    attention_weight: float = 0.0
    pad_token_id: int = DEFAULT_PAD_TOKEN_ID
    balance: Balance = "prime-rl"
    max_truncated_fraction: float | None = None

    def __post_init__(self) -> None:
        for name in ("seq_len", "pad_multiple", "world_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"Expected `{name}` >= 1, got {getattr(self, name)}")
        if self.attention_weight < 0:
            raise UsageError(f"Expected `attention_weight` >= 0, got {self.attention_weight}")
        if self.balance not in BALANCES:
            raise UsageError(f"Expected `balance` one of {', '.join(BALANCES)}, got {self.balance!r}")
        if self.max_truncated_fraction is not None and not 0 <= self.max_truncated_fraction <= 1:
            raise UsageError(
                f"Expected `max_truncated_fraction` in [0, 1], got {self.max_truncated_fraction}"
            )

    def cost(self, lengths: Sequence[int]) -> float:
        """Return the balancing cost of sequence lengths: tokens + attention weight x sum of squares."""
        total = sum(lengths)
        if not self.attention_weight:
            return total
        return total + self.attention_weight * sum(length * length for length in lengths)


class TruncationFigures(msgspec.Struct, kw_only=True):
    """What truncation to ``seq_len`` cut off (packing.md 1): training data that is lost."""

    samples_truncated: int = 0
    tokens_dropped: int = 0
    trainable_tokens_dropped: int = 0
    images_dropped: int = 0
    trainable_tokens: int = 0  # before truncation: the base of the dropped fraction

    @property
    def any_dropped(self) -> bool:
        """Whether truncation lost anything."""
        return bool(self.samples_truncated)

    @property
    def trainable_fraction_dropped(self) -> float:
        """Trainable tokens dropped over trainable tokens before truncation."""
        return self.trainable_tokens_dropped / self.trainable_tokens if self.trainable_tokens else 0.0

    def add(self, other: TruncationFigures) -> None:
        """Add another count's figures to these."""
        for name in TruncationFigures.__struct_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class StepPackReport(TruncationFigures, kw_only=True):
    """What one step became."""

    step: int
    samples: int
    micro_batches_per_rank: int
    micro_batches_with_refs: int
    dummies: int
    real_tokens: int
    padding_tokens: int
    fill_ratio: float


class PackReport(TruncationFigures, kw_only=True):
    """What the pack stage wrote, over all steps.

    ``written`` is false when ``max_truncated_fraction`` refused the run: then
    nothing was written and only the truncation figures are filled in.
    """

    run_dir: str
    seq_len: int
    pad_multiple: int
    world_size: int
    pad_token_id: int
    balance: str = "prime-rl"
    max_truncated_fraction: float | None = None
    written: bool = True
    steps_packed: int = 0
    samples: int = 0
    micro_batches_per_rank: int = 0
    micro_batches_with_refs: int = 0
    dummies: int = 0
    real_tokens: int = 0
    padding_tokens: int = 0
    fill_ratio: float = 0.0
    steps: list[StepPackReport] = msgspec.field(default_factory=list)


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


def pack_run(run_dir: str | os.PathLike[str], options: PackOptions) -> PackReport:
    """Pack every step of a run into ``rank_<R>.bin`` files.

    Rank files are written only after their step packed and passed its checks,
    and every step's rank files appear at once when the whole run packed (see
    ``io.staging.staged_run``); rank files beyond the world size (from an earlier
    pack) are removed. A second pack of the same run at once is refused. With
    ``max_truncated_fraction``, the truncation of every step is counted first,
    and nothing is written when it drops too much.

    Args:
        run_dir: the run directory holding ``rollouts/step_<N>/train_rollouts.bin``.
        options: sequence length, padding, world size, balancing, truncation limit.

    Returns:
        The report: micro batches per rank, refs, dummies, fill ratio, truncation figures;
        ``written`` false when the truncation limit refused the run.

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
    check_writable_dir(run_dir / rundir.ROLLOUTS, "run directory")
    report = PackReport(
        run_dir=str(run_dir),
        seq_len=options.seq_len,
        pad_multiple=options.pad_multiple,
        world_size=options.world_size,
        pad_token_id=options.pad_token_id,
        balance=options.balance,
        max_truncated_fraction=options.max_truncated_fraction,
    )
    if options.max_truncated_fraction is not None:
        # A cheap first pass (decode and cut only), so that a refused run writes nothing.
        planned = TruncationFigures()
        samples = 0
        for step in steps:
            path = rundir.training_batch_path(run_dir, step)
            pieces = _pieces(read_training_batch(path), options.seq_len, Where(file=str(path)))
            planned.add(_truncation(pieces))
            samples += len(pieces)
        if planned.trainable_fraction_dropped > options.max_truncated_fraction:
            report.add(planned)
            report.samples = samples
            report.written = False
            return report
    with staged_run(run_dir) as staged:
        for step in steps:
            path = rundir.training_batch_path(run_dir, step)
            ranks, step_report = pack_batch(read_training_batch(path), options, step, Where(file=str(path)))
            _write_ranks(staged, step, ranks)
            _add_step(report, step_report)
    return report


def _write_ranks(run_dir: Path, step: int, ranks: list[list[MicroBatch]]) -> None:
    """Write a step's rank files and remove rank files beyond the world size (from an earlier pack)."""
    for rank, micro_batches in enumerate(ranks):
        atomic_write(rundir.rank_path(run_dir, step, rank), encode(micro_batches))
    for stale in rundir.rank_paths(run_dir, step)[len(ranks) :]:
        stale.unlink()


def pack_batch(
    batch: TrainingBatch, options: PackOptions, step: int, where: Where | None = None
) -> tuple[list[list[MicroBatch]], StepPackReport]:
    """Pack one step's samples into ``world_size`` equal-length lists of micro batches.

    Raises:
        BadInputError: a sample cannot be packed.
        IntegrityError: a packed micro batch breaks an invariant.
    """
    where = where or Where()
    pieces = _pieces(batch, options.seq_len, where)
    bins = _split_for_ranks(_first_fit(pieces, options.seq_len), options)
    micro_batches: list[MicroBatch] = []
    for number, members in enumerate(bins):
        micro_batch = _micro_batch(members, options)
        check_micro_batch(micro_batch, Where(file=where.file, index=number), DEFAULT_TOKEN_NAMES)
        micro_batches.append(micro_batch)
    ranks, dummies = _assign_ranks(micro_batches, options)
    real_tokens = sum(piece.length for piece in pieces)
    total_slots = options.seq_len * sum(len(rank) for rank in ranks)
    return ranks, StepPackReport(
        **msgspec.structs.asdict(_truncation(pieces)),
        step=step,
        samples=len(pieces),
        micro_batches_per_rank=len(ranks[0]),
        micro_batches_with_refs=sum(mb.mm_refs is not None for mb in micro_batches),
        dummies=dummies,
        real_tokens=real_tokens,
        padding_tokens=sum(len(mb.input_ids) for mb in micro_batches) - real_tokens,
        fill_ratio=real_tokens / total_slots if total_slots else 0.0,
    )


def _pieces(batch: TrainingBatch, seq_len: int, where: Where) -> list[_Piece]:
    return [
        _piece(sample, index, seq_len, where.at(index=index)) for index, sample in enumerate(batch.examples)
    ]


def _truncation(pieces: list[_Piece]) -> TruncationFigures:
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


def _split_for_ranks(bins: list[list[_Piece]], options: PackOptions) -> list[list[_Piece]]:
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


def _assign_ranks(
    micro_batches: list[MicroBatch], options: PackOptions
) -> tuple[list[list[MicroBatch]], int]:
    """Give ranks their micro batches: multimodal group first, each padded with dummies and partitioned."""
    ranks: list[list[MicroBatch]] = [[] for _ in range(options.world_size)]
    dummies = 0
    multimodal = [mb for mb in micro_batches if mb.mm_refs is not None]
    text = [mb for mb in micro_batches if mb.mm_refs is None]
    for group in (multimodal, text):
        if not group:
            continue
        missing = -len(group) % options.world_size
        group = group + [_dummy(group[0]) for _ in range(missing)]
        dummies += missing
        weights = [options.cost(mb.sequence_lengths) for mb in group]
        for rank, items in enumerate(partition(weights, options.world_size, options.balance)):
            ranks[rank] += [group[item] for item in items]
    return ranks, dummies


def partition(weights: Sequence[float], world_size: int, balance: Balance = "prime-rl") -> list[list[int]]:
    """Partition item indices into ``world_size`` equal-count ranks of near-equal total weight.

    ``"prime-rl"`` is packing.md section 5's exact algorithm: Karmarkar-Karp largest
    differencing, then pairwise swap refinement. ``"best"`` also refines a longest-first
    greedy dealing and keeps whichever has the smaller ``(max load, max - min load)``,
    ties to the exact one, so its busiest rank is never heavier.

    Args:
        weights: the cost of each item; their number must be a multiple of ``world_size``.
        world_size: number of ranks.
        balance: which partition to return.

    Returns:
        The item indices of each rank in section 5's order: ascending after Karmarkar-Karp
        (or in dealing order for the greedy partition), then changed in place by the swaps,
        never re-sorted (prime-rl's ``_refine_by_swapping`` does not sort either).
    """
    if len(weights) % world_size:
        raise UsageError(f"Expected a multiple of {world_size} items to partition, got {len(weights)}")
    if not weights:
        return [[] for _ in range(world_size)]
    ranks = _refine(weights, _karmarkar_karp(weights, world_size))
    if balance == "best":
        greedy = _refine(weights, _greedy(weights, world_size))
        if _score(weights, greedy) < _score(weights, ranks):
            ranks = greedy
    return ranks


class _KKState:
    """Karmarkar-Karp: W sets of ``(total, items)``, kept sorted descending; states order by spread."""

    __slots__ = ("sets", "spread")

    def __init__(self, sets: list[tuple[float, list[int]]]) -> None:
        self.sets = sorted(sets, reverse=True)
        self.spread = self.sets[0][0] - self.sets[-1][0]

    def __lt__(self, other: _KKState) -> bool:
        # heapq pops the smallest: the largest spread, ties to the larger first set.
        if self.spread != other.spread:
            return self.spread > other.spread
        return self.sets[0] > other.sets[0]

    def merge(self, other: _KKState) -> _KKState:
        """Return the state where set i of this one gains set W-1-i of ``other``."""
        w = len(self.sets)
        return _KKState(
            [
                (total + other.sets[w - 1 - i][0], items + other.sets[w - 1 - i][1])
                for i, (total, items) in enumerate(self.sets)
            ]
        )


def _karmarkar_karp(weights: Sequence[float], world_size: int) -> list[list[int]]:
    """Largest differencing over chunks of W items taken in ascending ``(weight, index)`` order."""
    ordered = sorted((weight, index) for index, weight in enumerate(weights))
    states = [
        _KKState([(weight, [index]) for weight, index in ordered[start : start + world_size]])
        for start in range(0, len(ordered), world_size)
    ]
    heapq.heapify(states)
    while len(states) > 1:
        first = heapq.heappop(states)
        heapq.heappush(states, first.merge(heapq.heappop(states)))
    return [sorted(items) for _, items in states[0].sets]


def _greedy(weights: Sequence[float], world_size: int) -> list[list[int]]:
    """Deal items heaviest first to the lightest rank that still has room (equal counts)."""
    per_rank = len(weights) // world_size
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0.0] * world_size
    for index in sorted(range(len(weights)), key=lambda i: weights[i], reverse=True):
        rank = min((r for r in range(world_size) if len(ranks[r]) < per_rank), key=loads.__getitem__)
        ranks[rank].append(index)
        loads[rank] += weights[index]
    return ranks


def _score(weights: Sequence[float], ranks: list[list[int]]) -> tuple[float, float]:
    loads = [sum(weights[index] for index in items) for items in ranks]
    return max(loads), max(loads) - min(loads)


def _refine(weights: Sequence[float], ranks: list[list[int]]) -> list[list[int]]:
    """Apply the best strictly improving swap of two items between two ranks until none is left.

    A swap is scored by the new ``(max load, max - min load)``; the first best one in
    the order (rank l < rank r, item of l, item of r) wins. A swapped item takes the
    place of the one it replaced. Each pair of ranks is scored with numpy over all its
    item pairs at once, with the same float operations in the same order as one at a
    time, so the result is exact (the scan is quadratic in items per rank).
    """
    ranks = [list(items) for items in ranks]
    values = np.asarray(weights)
    loads = [sum(weights[index] for index in items) for items in ranks]
    world_size = len(ranks)
    while True:
        best = (max(loads), max(loads) - min(loads))
        swap: tuple[int, int, int, int, float, float] | None = None
        by_load = sorted(range(world_size), key=loads.__getitem__)
        for left in range(world_size):
            for right in range(left + 1, world_size):
                others = [rank for rank in by_load if rank != left and rank != right]
                left_weights = values[ranks[left]][:, None]
                right_weights = values[ranks[right]][None, :]
                new_left = (loads[left] - left_weights) + right_weights
                new_right = (loads[right] - right_weights) + left_weights
                high = np.maximum(new_left, new_right)
                low = np.minimum(new_left, new_right)
                if others:
                    high = np.maximum(high, loads[others[-1]])
                    low = np.minimum(low, loads[others[0]])
                top = high.min()
                if top > best[0]:
                    continue
                spread = np.where(high == top, high - low, np.inf)
                least = spread.min()
                if (top, least) < best:
                    flat = int(np.flatnonzero(spread == least)[0])
                    i, j = divmod(flat, len(ranks[right]))
                    best = (top, least)
                    swap = (left, right, i, j, new_left[i, j].item(), new_right[i, j].item())
        if swap is None:
            return ranks
        left, right, i, j, loads[left], loads[right] = swap
        ranks[left][i], ranks[right][j] = ranks[right][j], ranks[left][i]


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


def _add_step(report: PackReport, step: StepPackReport) -> None:
    """Add a step's figures to the run's."""
    report.steps.append(step)
    report.steps_packed += 1
    report.samples += step.samples
    report.add(step)
    report.micro_batches_per_rank += step.micro_batches_per_rank
    report.micro_batches_with_refs += step.micro_batches_with_refs
    report.dummies += step.dummies
    report.real_tokens += step.real_tokens
    report.padding_tokens += step.padding_tokens
    slots = report.seq_len * report.micro_batches_per_rank * report.world_size
    report.fill_ratio = report.real_tokens / slots if slots else 0.0

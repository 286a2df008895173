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

import os
from collections.abc import Callable
from pathlib import Path

import msgspec

from mmoffload.contract import rundir
from mmoffload.contract.checks import check_micro_batch
from mmoffload.contract.packed import fill_ratio
from mmoffload.contract.wire import (
    MicroBatch,
    TrainingBatch,
    encode,
    read_training_batch,
)
from mmoffload.errors import UsageError, Where
from mmoffload.families import DEFAULT_TOKEN_NAMES
from mmoffload.io.outputs import atomic_write, check_writable_dir
from mmoffload.io.staging import staged_run
from mmoffload.pack.bins import (
    dummy,
    first_fit,
    pieces_micro_batch,
    sample_pieces,
    split_for_ranks,
    truncation,
)
from mmoffload.pack.options import PackOptions, PackReport, StepPackReport, TruncationFigures, add_step
from mmoffload.pack.partition import partition


def pack_run(
    run_dir: str | os.PathLike[str], options: PackOptions, advance: Callable[[int], None] = lambda _n: None
) -> PackReport:
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
            pieces = sample_pieces(read_training_batch(path), options.seq_len, Where(file=str(path)))
            planned.add(truncation(pieces))
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
            add_step(report, step_report)
            advance(path.stat().st_size)
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
    pieces = sample_pieces(batch, options.seq_len, where)
    bins = split_for_ranks(first_fit(pieces, options.seq_len), options)
    micro_batches: list[MicroBatch] = []
    # Real tokens by micro batch (by identity: the dummies _assign_ranks adds are new objects, with none).
    real: dict[int, int] = {}
    for number, members in enumerate(bins):
        micro_batch = pieces_micro_batch(members, options)
        check_micro_batch(micro_batch, Where(file=where.file, index=number), DEFAULT_TOKEN_NAMES)
        micro_batches.append(micro_batch)
        real[id(micro_batch)] = sum(piece.length for piece in members)
    ranks, dummies = _assign_ranks(micro_batches, options)
    real_tokens = sum(piece.length for piece in pieces)
    return ranks, StepPackReport(
        **msgspec.structs.asdict(truncation(pieces)),
        step=step,
        samples=len(pieces),
        micro_batches_per_rank=len(ranks[0]),
        micro_batches_with_refs=sum(mb.mm_refs is not None for mb in micro_batches),
        dummies=dummies,
        real_tokens=real_tokens,
        padding_tokens=sum(len(mb.input_ids) for mb in micro_batches) - real_tokens,
        fill_ratio=fill_ratio(real_tokens, sum(len(rank) for rank in ranks), options.seq_len),
        rank_fill_ratios=[
            fill_ratio(sum(real.get(id(mb), 0) for mb in rank), len(rank), options.seq_len) for rank in ranks
        ],
    )


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
        group = group + [dummy(group[0]) for _ in range(missing)]
        dummies += missing
        weights = [options.cost(mb.sequence_lengths) for mb in group]
        for rank, items in enumerate(partition(weights, options.world_size, options.balance)):
            ranks[rank] += [group[item] for item in items]
    return ranks, dummies

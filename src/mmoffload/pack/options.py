"""Pack options and reports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec

from mmoffload.contract.packed import fill_ratio
from mmoffload.errors import UsageError

# Optional float streams: the value for a sample without the stream in a bin where
# another sample has it (neutral for training), and the value on padding tokens.
STREAM_FILL = {"ref_logprobs": 0.0, "rl_weights": 1.0, "ce_weights": 0.0, "ref_kl_weights": 0.0}


STREAM_PAD = 0.0


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
    # Each rank's fill ratio (its real tokens over seq_len x its micro batches): how even the ranks are.
    rank_fill_ratios: list[float] = msgspec.field(default_factory=list)


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


def add_step(report: PackReport, step: StepPackReport) -> None:
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
    report.fill_ratio = fill_ratio(
        report.real_tokens, report.micro_batches_per_rank * report.world_size, report.seq_len
    )

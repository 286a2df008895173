"""What parity reports: one struct per sample, per step and per run (docs/parity.md)."""

from __future__ import annotations

import enum

import msgspec

# Mismatch KL above which a sample is flagged. Clean runs: about 1e-3 on real models in bfloat16
# (prime-rl), under 1e-6 on the tiny fixture in float32; damaged ones 0.05 and up (docs/parity.md).
DEFAULT_THRESHOLD = 0.01


class Status(enum.StrEnum):
    """A sample's verdict; every status but ``ok`` and ``untrained`` flags it (exit 1)."""

    OK = "ok"
    # Mismatch KL above the threshold: the trainer's distribution is not the sampler's.
    OVER_THRESHOLD = "over_threshold"
    # An image file is absent: the trainer saw placeholder pixels (its micro batch trains nothing).
    MISSING_IMAGE = "missing_image"
    # The trainer could not build or run the micro batch (wrong grid, placeholder count...).
    NOT_MATERIALIZED = "not_materialized"
    # No trainable token: nothing to compare (dummy micro batches, prompt-only samples).
    UNTRAINED = "untrained"


FLAGGED = frozenset({Status.OVER_THRESHOLD, Status.MISSING_IMAGE, Status.NOT_MATERIALIZED})


class SampleImage(msgspec.Struct, kw_only=True):
    """One image of a sample: its content hash, file, token span in the micro batch, and presence."""

    hash: str
    uri: str
    file: str
    offset: int
    length: int
    missing: bool = False


class SampleParity(msgspec.Struct, kw_only=True):
    """Trainer against sampler on one sample's trainable tokens.

    ``kl`` is the mismatch KL prime-rl reports: the mean over mask-true tokens of
    ``exp(d) - 1 - d``, ``d`` = trainer minus inference log-prob. The statistics are
    None when the sample was not compared (missing image, not materialized, untrained).
    ``step`` and ``rank`` are None when the caller (a trainer) did not say.
    """

    micro_batch: int
    index: int
    start: int
    length: int
    status: Status
    tokens: int = 0
    kl: float | None = None
    mean_abs_diff: float | None = None
    max_abs_diff: float | None = None
    images: list[SampleImage] = msgspec.field(default_factory=list)
    message: str | None = None
    step: int | None = None
    rank: int | None = None

    @property
    def flagged(self) -> bool:
        """True when this sample fails the check."""
        return self.status in FLAGGED

    def label(self) -> str:
        """Name the sample: ``step 0 rank 1 micro batch 2 sample 3``."""
        parts = [] if self.step is None else [f"step {self.step}"]
        parts += [] if self.rank is None else [f"rank {self.rank}"]
        return " ".join([*parts, f"micro batch {self.micro_batch}", f"sample {self.index}"])


class StepParity(msgspec.Struct, kw_only=True):
    """One step's figures over its compared samples."""

    step: int
    micro_batches: int
    samples: int
    samples_flagged: int
    tokens: int
    kl_mean: float | None
    kl_max: float | None


class ParityReport(msgspec.Struct, kw_only=True):
    """Figures of ``mmoffload parity``; ``per_sample`` lists every sample checked, worst first."""

    run_dir: str
    model: str
    device: str
    dtype: str
    threshold: float
    micro_batches: int
    micro_batches_checked: int
    micro_batches_untrained: int
    samples: int
    samples_compared: int
    samples_flagged: int
    samples_over_threshold: int
    samples_missing_image: int
    samples_not_materialized: int
    tokens: int
    # Token-weighted mean and the largest per-sample KL over compared samples (None: none compared).
    kl_mean: float | None
    kl_max: float | None
    max_abs_diff: float | None
    load_seconds: float
    materialize_seconds: float
    forward_seconds: float
    seconds: float
    ok: bool
    per_step: list[StepParity] = msgspec.field(default_factory=list)
    per_sample: list[SampleParity] = msgspec.field(default_factory=list)
    families: dict[str, str] = msgspec.field(default_factory=dict)
    warnings: list[str] = msgspec.field(default_factory=list)


def worst_first(samples: list[SampleParity]) -> list[SampleParity]:
    """Order samples worst first: not materialized, missing images, then by KL, largest first."""
    rank = {Status.NOT_MATERIALIZED: 0, Status.MISSING_IMAGE: 1}
    return sorted(samples, key=lambda s: (rank.get(s.status, 2), -(s.kl if s.kl is not None else -1.0)))

"""`mmoffload pack`: a run's ``TrainingBatch`` files to per-rank micro batches (prime-rl's packer, byte for byte)."""

from mmoffload.pack.options import (
    BALANCES,
    DEFAULT_PAD_TOKEN_ID,
    STREAM_FILL,
    STREAM_PAD,
    Balance,
    PackOptions,
    PackReport,
    StepPackReport,
    TruncationFigures,
)
from mmoffload.pack.partition import partition
from mmoffload.pack.stage import pack_batch, pack_run

__all__ = [
    "BALANCES",
    "DEFAULT_PAD_TOKEN_ID",
    "STREAM_FILL",
    "STREAM_PAD",
    "Balance",
    "PackOptions",
    "PackReport",
    "StepPackReport",
    "TruncationFigures",
    "pack_batch",
    "pack_run",
    "partition",
]

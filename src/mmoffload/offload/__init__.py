"""`mmoffload offload`: decode, hash and store each inline image once; rewrite its part to a ref."""

from mmoffload.offload.dataset import offload_dataset
from mmoffload.offload.stage import (
    CACHE_BYTES,
    REJECTS_SUFFIX,
    LineResult,
    Offloader,
    OffloadOptions,
    OffloadReport,
    OffloadTask,
    RecordCounts,
    RejectedLine,
    offload_files,
    offload_record,
    plan_outputs,
)

__all__ = [
    "CACHE_BYTES",
    "REJECTS_SUFFIX",
    "LineResult",
    "OffloadOptions",
    "OffloadReport",
    "OffloadTask",
    "Offloader",
    "RecordCounts",
    "RejectedLine",
    "offload_dataset",
    "offload_files",
    "offload_record",
    "plan_outputs",
]

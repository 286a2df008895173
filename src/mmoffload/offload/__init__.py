"""`mmoffload offload`: decode, hash and store each inline image once; rewrite its part to a ref."""

from mmoffload.offload.dataset import offload_dataset
from mmoffload.offload.records import (
    CACHE_BYTES,
    LineResult,
    Offloader,
    OffloadOptions,
    OffloadTask,
    RecordCounts,
    offload_record,
)
from mmoffload.offload.report import REJECTS_SUFFIX, OffloadReport
from mmoffload.offload.stage import offload_files, plan_outputs

__all__ = [
    "CACHE_BYTES",
    "REJECTS_SUFFIX",
    "LineResult",
    "OffloadOptions",
    "OffloadReport",
    "OffloadTask",
    "Offloader",
    "RecordCounts",
    "offload_dataset",
    "offload_files",
    "offload_record",
    "plan_outputs",
]

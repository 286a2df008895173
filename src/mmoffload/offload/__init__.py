"""`mmoffload offload`: decode, hash and store each inline image once; rewrite its part to a ref."""

from mmoffload.offload.stage import (
    CACHE_BYTES,
    REJECTS_SUFFIX,
    STALE_TEMP_SECONDS,
    LineResult,
    Offloader,
    OffloadOptions,
    OffloadReport,
    RecordCounts,
    RejectedLine,
    Results,
    offload_files,
    offload_record,
    plan_outputs,
    set_worker,
    sweep_stale_temps,
)

__all__ = [
    "CACHE_BYTES",
    "REJECTS_SUFFIX",
    "STALE_TEMP_SECONDS",
    "LineResult",
    "OffloadOptions",
    "OffloadReport",
    "Offloader",
    "RecordCounts",
    "RejectedLine",
    "Results",
    "offload_files",
    "offload_record",
    "plan_outputs",
    "set_worker",
    "sweep_stale_temps",
]

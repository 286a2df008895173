"""`mmoffload materialize`: the trainer side; raw refs to model kwargs with the family's own processor."""

from mmoffload.materialize.stage import (
    BATCHED_KWARGS,
    PIXEL_KWARGS,
    MaterializedMicroBatch,
    Materializer,
    MaterializeReport,
    MaterializeStats,
    MissingImagePolicy,
    iter_rank_files,
    materialize_run,
    save_micro_batch,
    saved_path,
)

__all__ = [
    "BATCHED_KWARGS",
    "PIXEL_KWARGS",
    "MaterializeReport",
    "MaterializeStats",
    "MaterializedMicroBatch",
    "Materializer",
    "MissingImagePolicy",
    "iter_rank_files",
    "materialize_run",
    "save_micro_batch",
    "saved_path",
]

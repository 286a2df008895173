"""`mmoffload materialize`: the trainer side; raw refs to model kwargs with the family's own processor."""

from mmoffload.materialize.materializer import (
    BATCHED_KWARGS,
    MaterializedMicroBatch,
    Materializer,
    MaterializeStats,
    MissingImagePolicy,
)
from mmoffload.materialize.saving import PIXEL_KWARGS, save_micro_batch, saved_path
from mmoffload.materialize.stage import MaterializeReport, iter_rank_files, materialize_run

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

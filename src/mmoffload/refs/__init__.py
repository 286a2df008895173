"""`mmoffload refs`: offloaded traces to a run's ``TrainingBatch`` files, every ref checked."""

from mmoffload.refs.report import GROUP_KEYS, RefsOptions, RefsReport
from mmoffload.refs.stage import build_refs

__all__ = [
    "GROUP_KEYS",
    "RefsOptions",
    "RefsReport",
    "build_refs",
]

"""Prove the images reach the gradient: the trainer's log-probs against the sampler's (docs/parity.md).

``check_micro_batch`` is the live check a trainer can call on a few micro batches
per step; ``parity_run`` is ``mmoffload parity`` over a run directory. torch and
transformers are needed (the ``torch`` and ``materialize`` extras) and imported
only when a model is loaded or run.
"""

from mmoffload.parity.check import CheckTimes, check_micro_batch
from mmoffload.parity.forward import load_model
from mmoffload.parity.report import (
    DEFAULT_THRESHOLD,
    ParityReport,
    SampleImage,
    SampleParity,
    Status,
    StepParity,
)
from mmoffload.parity.run import parity_run

__all__ = [
    "DEFAULT_THRESHOLD",
    "CheckTimes",
    "ParityReport",
    "SampleImage",
    "SampleParity",
    "Status",
    "StepParity",
    "check_micro_batch",
    "load_model",
    "parity_run",
]

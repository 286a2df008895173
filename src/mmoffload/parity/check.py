"""One micro batch: materialize it as the trainer does, run each sample alone, compare log-probs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmoffload.contract.wire import MicroBatch
from mmoffload.errors import BadInputError, IntegrityError, Where
from mmoffload.families import Family
from mmoffload.materialize import MaterializedMicroBatch, Materializer
from mmoffload.parity.forward import sample_kwargs, trained_logprobs
from mmoffload.parity.report import DEFAULT_THRESHOLD, SampleParity, Status
from mmoffload.parity.stats import image_indices, mismatch, sample_bounds, sample_images, trainable_positions


@dataclass
class CheckTimes:
    """Seconds spent materializing and in forward passes, summed over calls."""

    materialize: float = 0.0
    forward: float = 0.0


def check_micro_batch(
    model: Any,
    materializer: Materializer,
    micro_batch: MicroBatch,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    index: int = 0,
    where: Where | None = None,
    times: CheckTimes | None = None,
) -> list[SampleParity]:
    """Compare the trainer's log-probs with the sampler's on each sample of one micro batch.

    The micro batch is materialized by ``materializer`` (the trainer's own pixels), then
    each packed sample runs through ``model`` alone, so that it attends only to itself
    as in the trainer's varlen attention and in the engine. A micro batch the trainer
    could not build or run flags its samples instead of raising.

    Args:
        model: the Hugging Face model (the weights the inference server served), in eval mode.
        materializer: the trainer's materializer (numpy or torch output).
        micro_batch: a decoded micro batch with ``inference_logprobs``.
        threshold: mismatch KL above which a sample is flagged ``over_threshold``.
        index: the micro batch's index in its rank file, for the samples' names.
        where: names the micro batch in messages.
        times: accumulates materialize and forward seconds when given.

    Returns:
        One ``SampleParity`` per packed sample, in packing order.
    """
    times = times if times is not None else CheckTimes()
    bounds = sample_bounds(micro_batch)
    started = time.perf_counter()
    try:
        batch = materializer.materialize(micro_batch, where)
    except (BadInputError, IntegrityError) as exc:
        return [_unmaterialized(micro_batch, index, n, s, e, str(exc)) for n, (s, e) in enumerate(bounds)]
    finally:
        times.materialize += time.perf_counter() - started
    family = materializer.families.get(batch.family) if batch.family is not None else None
    results = []
    for number, (start, end) in enumerate(bounds):
        images = sample_images(micro_batch, start, end, batch.missing_uris)
        base = SampleParity(
            micro_batch=index, index=number, start=start, length=end - start, status=Status.OK, images=images
        )
        positions = trainable_positions(micro_batch.loss_mask, start, end)
        if any(image.missing for image in images):
            base.status, base.tokens = Status.MISSING_IMAGE, len(positions)
            base.message = "placeholder pixels stood in for a missing image file; not compared"
        elif not len(positions):
            base.status = Status.UNTRAINED
        else:
            started = time.perf_counter()
            try:
                base = _compare(model, batch, family, micro_batch, base, positions, threshold)
            except ValueError as exc:  # The model refusing its inputs (features vs placeholder tokens).
                base.status, base.message = Status.NOT_MATERIALIZED, f"the model refused the sample: {exc}"
            times.forward += time.perf_counter() - started
        results.append(base)
    return results


def _compare(
    model: Any,
    batch: MaterializedMicroBatch,
    family: Family | None,
    micro_batch: MicroBatch,
    sample: SampleParity,
    positions: np.ndarray,
    threshold: float,
) -> SampleParity:
    """Run one sample alone and fill in its figures and verdict."""
    start, end = sample.start, sample.start + sample.length
    kwargs = sample_kwargs(batch, family, image_indices(micro_batch, start, end), start, end)
    targets = np.asarray(micro_batch.input_ids, dtype=np.int64)[positions]
    temperatures = np.asarray(micro_batch.temperatures, dtype=np.float64)[positions]
    trainer = trained_logprobs(model, kwargs, targets, positions - start, temperatures)
    inference = np.asarray(micro_batch.inference_logprobs, dtype=np.float64)[positions]
    kl, mean_abs, max_abs = mismatch(trainer, inference)
    sample.tokens, sample.kl, sample.mean_abs_diff, sample.max_abs_diff = (
        len(positions),
        kl,
        mean_abs,
        max_abs,
    )
    sample.status = Status.OVER_THRESHOLD if kl > threshold else Status.OK
    return sample


def _unmaterialized(
    micro_batch: MicroBatch, index: int, number: int, start: int, end: int, message: str
) -> SampleParity:
    """Flag a sample of a micro batch the trainer could not build."""
    return SampleParity(
        micro_batch=index,
        index=number,
        start=start,
        length=end - start,
        status=Status.NOT_MATERIALIZED,
        tokens=len(trainable_positions(micro_batch.loss_mask, start, end)),
        images=sample_images(micro_batch, start, end),
        message=f"the trainer cannot build this micro batch: {message}",
    )

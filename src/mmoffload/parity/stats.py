"""The numbers parity compares, without torch: sample bounds, trainable positions, the mismatch KL."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmoffload.contract.addresses import uri_to_path
from mmoffload.contract.wire import MicroBatch
from mmoffload.errors import MMOffloadError
from mmoffload.parity.report import SampleImage


def sample_bounds(micro_batch: MicroBatch) -> list[tuple[int, int]]:
    """Return each packed sample's ``[start, end)`` token range, from ``sequence_lengths``.

    The last range includes the micro batch's padding (packing.md section 3): padding
    is never trainable, so it changes no figure.
    """
    ends = np.cumsum(np.asarray(micro_batch.sequence_lengths, dtype=np.int64))
    starts = np.concatenate([[0], ends[:-1]])
    return [(int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def trainable_positions(loss_mask: Sequence[bool], start: int, end: int) -> np.ndarray:
    """Return the positions in ``[start, end)`` whose token is trained, as int64.

    A sample's first token is left out even when masked: no position of the sample
    predicts it (its log-prob is the previous sample's business in a packed row).
    """
    mask = np.asarray(loss_mask[start:end], dtype=bool)
    mask[:1] = False
    return np.flatnonzero(mask).astype(np.int64) + start


def mismatch(trainer: np.ndarray, inference: np.ndarray) -> tuple[float, float, float]:
    """Return ``(kl, mean |d|, max |d|)`` with ``d = trainer - inference`` log-probs per token.

    ``kl`` is the mean of ``exp(d) - 1 - d``, the k3 estimator of KL(inference || trainer)
    on tokens the sampler drew: prime-rl's ``mismatch_kl``. It is >= 0 and about ``d**2 / 2``
    for small ``d``.
    """
    d = np.asarray(trainer, dtype=np.float64) - np.asarray(inference, dtype=np.float64)
    if d.size == 0:
        return 0.0, 0.0, 0.0
    # expm1 keeps the tiny differences of a clean run exact instead of cancelling to zero.
    kl = float(np.mean(np.expm1(d) - d))
    return kl, float(np.mean(np.abs(d))), float(np.max(np.abs(d)))


def sample_images(
    micro_batch: MicroBatch, start: int, end: int, missing_uris: Sequence[str] = ()
) -> list[SampleImage]:
    """Return the images whose spans lie in ``[start, end)``, in token order, marking missing ones."""
    refs = micro_batch.mm_refs.images if micro_batch.mm_refs is not None else []
    missing = set(missing_uris)
    return [
        SampleImage(
            hash=ref.hash,
            uri=ref.uri,
            file=_file_name(ref.uri),
            offset=int(ref.offset),
            length=int(ref.length),
            missing=ref.uri in missing,
        )
        for ref in refs
        if start <= ref.offset < end
    ]


def image_indices(micro_batch: MicroBatch, start: int, end: int) -> list[int]:
    """Return the indices (in the micro batch's refs) of the images in ``[start, end)``."""
    refs = micro_batch.mm_refs.images if micro_batch.mm_refs is not None else []
    return [i for i, ref in enumerate(refs) if start <= ref.offset < end]


def _file_name(uri: str) -> str:
    try:
        return uri_to_path(uri).name
    except MMOffloadError:
        return uri.rsplit("/", 1)[-1]

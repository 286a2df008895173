"""The trainer's forward pass, one packed sample at a time, and its log-probs of the trained tokens.

torch and transformers are imported only here, through ``extras.require``, so that
``mmoffload`` without the ``torch`` extra still imports and says what to install.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmoffload.errors import UsageError
from mmoffload.extras import require
from mmoffload.families import Family
from mmoffload.materialize import BATCHED_KWARGS, MaterializedMicroBatch

DTYPES = ("float32", "bfloat16")
DEVICES = ("cpu", "cuda")
PURPOSE = "mmoffload parity"


def torch_module() -> Any:
    """Return torch, or fail naming the extra that installs it."""
    return require("torch", PURPOSE)


def load_model(model_dir: str | os.PathLike[str], device: str = "cpu", dtype: str = "float32") -> Any:
    """Load the Hugging Face model of ``model_dir`` offline, in eval mode, on ``device`` in ``dtype``.

    Raises:
        UsageError: an unknown device or dtype, CUDA asked for but absent, or a model
            transformers cannot load from the directory.
    """
    torch = torch_module()
    if device not in DEVICES or dtype not in DTYPES:
        raise UsageError(
            f"Expected --device in {', '.join(DEVICES)} and --dtype in {', '.join(DTYPES)}, "
            f"got `{device}` and `{dtype}`"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("Expected a CUDA device for `--device cuda`, found none (torch.cuda.is_available())")
    transformers = require("transformers", PURPOSE)
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            os.fspath(model_dir), dtype=getattr(torch, dtype), local_files_only=True
        )
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"Cannot load the model of `{model_dir}`: {exc}") from exc
    return model.to(device).eval()


def sample_kwargs(
    batch: MaterializedMicroBatch, family: Family | None, images: Sequence[int], start: int, end: int
) -> dict[str, Any]:
    """Return the model kwargs of the sample at tokens ``[start, end)`` of a materialized micro batch.

    Per-token kwargs are sliced; the pixel rows and grid rows of the sample's ``images``
    (indices into the micro batch's refs, in token order) are taken. Positions are left
    to the model unless the family passes them (they restart at 0 per sample already).
    """
    kwargs: dict[str, Any] = {}
    for name, value in batch.model_kwargs.items():
        if name in BATCHED_KWARGS:
            if name == "position_ids" and family is None:
                continue  # Text only: the model's own 0..n-1 are the packed ones.
            kwargs[name] = value[:, start:end]
    if family is None or not images:
        return kwargs
    grids = batch.model_kwargs[family.grid_kwarg]
    # Each image's pixel rows follow the previous image's, in token order (Materializer's layout).
    rows = np.cumsum([0] + [family.pixel_shape(tuple(int(v) for v in grid))[0] for grid in grids])
    pixels = batch.model_kwargs[family.pixel_kwarg]
    kwargs[family.pixel_kwarg] = pixels[int(rows[images[0]]) : int(rows[images[-1] + 1])]
    kwargs[family.grid_kwarg] = grids[images[0] : images[-1] + 1]
    return kwargs


def trained_logprobs(
    model: Any, kwargs: dict[str, Any], targets: np.ndarray, positions: np.ndarray, temperatures: np.ndarray
) -> np.ndarray:
    """Return the model's log-prob of each target token under its temperature (float64, on the CPU).

    Args:
        model: a Hugging Face causal (vision-)language model.
        kwargs: one sample's model kwargs, numpy or torch, per-token ones shaped ``(1, n)``.
        targets: the token ids to score.
        positions: each target's position within the sample (>= 1: position ``p - 1`` predicts it).
        temperatures: each target's sampling temperature; 0 (greedy) scores at 1, as the
            engine reports greedy log-probs of the unscaled distribution.
    """
    torch = torch_module()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = {}
    for name, value in kwargs.items():
        tensor = torch.as_tensor(value).to(device)
        inputs[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    keep = torch.as_tensor(positions - 1, device=device)
    with torch.inference_mode():
        # Logits of the predicting positions only: a full (n, vocabulary) row is GBs on long samples.
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits[0].float()
        scale = torch.as_tensor(np.where(temperatures > 0, temperatures, 1.0), device=device).float()
        logprobs = torch.log_softmax(logits / scale[:, None], dim=-1)
        picked = logprobs.gather(1, torch.as_tensor(targets, device=device)[:, None])[:, 0]
    return picked.double().cpu().numpy()

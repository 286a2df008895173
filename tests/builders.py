"""Small builders for test inputs, shared by every test module (append only)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from mmoffload.contract.wire import MicroBatch, MMImageRef, MMRefs, TrainingBatch, TrainingSample, encode
from mmoffload.store.local import AssetStore, StoredImage


def image_bytes(width: int = 64, height: int = 48, fmt: str = "PNG", seed: int = 0) -> bytes:
    """Return a small deterministic image; ``seed`` changes its content (and so its hash)."""
    image = Image.new("RGB", (width, height), (seed * 37 % 256, 90, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle((2, 2, width // 2, height // 2), fill=(255, seed % 256, 0))
    draw.line((0, height - 1, width - 1, 0), fill=(0, 0, 0), width=2)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    """Return a ``data:`` URL carrying ``data`` in standard base64."""
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def store_image(assets: Path, data: bytes) -> StoredImage:
    """Store ``data`` in an asset directory and return it."""
    return AssetStore(assets).put(data)


def descriptor(uri: str, grid: list[int], family: str = "qwen_vl") -> dict[str, Any]:
    """Return a strict raw descriptor for an image of ``grid``."""
    key = "image_grid_thw" if family == "qwen_vl" else "grid_thws"
    return {
        "kind": "prime_raw_mm_item",
        "modality": "image",
        "family": family,
        "raw_image_uri": uri,
        "payload": {key: [grid]},
    }


# Image placeholder token ids of the fixture families (their published ids).
IMAGE_TOKEN = {"qwen_vl": 151655, "kimi_k25": 163605}


def place_images(
    tokens: list[int], spans: list[tuple[int, int]], family: str, index: int
) -> tuple[list[int], list[MMImageRef]]:
    """Write an image's placeholder tokens over each ``(offset, length)`` span of ``tokens``.

    Returns the token type ids and one ref per span (hashes unique per sample ``index``).
    """
    type_ids = [0] * len(tokens)
    refs = []
    for number, (offset, length) in enumerate(spans):
        tokens[offset : offset + length] = [IMAGE_TOKEN[family]] * length
        type_ids[offset : offset + length] = [1] * length
        digest = f"{index:016x}{number:016x}"
        uri = f"file:///assets/{digest}.png"
        refs.append(MMImageRef(descriptor(uri, [1, 2, 2 * length], family), digest, uri, offset, length))
    return type_ids, refs


def sidecar(images: list[tuple[dict[str, Any], str, int, int]]) -> dict[str, Any]:
    """Return a ``multi_modal_data`` sidecar from (descriptor, hash, offset, length) tuples."""
    return {
        "mm_items": {"image": [d for d, _, _, _ in images]},
        "mm_hashes": {"image": [h for _, h, _, _ in images]},
        "mm_placeholders": {"image": [{"offset": o, "length": n} for _, _, o, n in images]},
    }


QWEN_IMAGE_PAD, QWEN_VISION_START, QWEN_VISION_END = 151655, 151652, 151653


def qwen_sample(
    assets: Path, seeds: tuple[int, ...] = (0, 1), grid: tuple[int, int, int] = (1, 4, 4)
) -> TrainingSample:
    """Return a Qwen-VL TrainingSample with one stored image per seed, refs and type ids.

    Each image is ``<|vision_start|>``, t*h*w/4 image pads, ``<|vision_end|>``, between text tokens.
    """
    length = grid[0] * grid[1] * grid[2] // 4
    tokens, refs = [1, 2], []
    for seed in seeds:
        stored = store_image(assets, image_bytes(seed=seed))
        tokens.append(QWEN_VISION_START)
        refs.append(
            MMImageRef(descriptor(stored.uri, list(grid)), stored.hash, stored.uri, len(tokens), length)
        )
        tokens += [QWEN_IMAGE_PAD] * length + [QWEN_VISION_END, 3]
    n = len(tokens)
    return TrainingSample(
        token_ids=tokens,
        mask=[False] * (n - 1) + [True],
        logprobs=[0.0] * (n - 1) + [-0.5],
        temperatures=[1.0] * n,
        env_name="browse",
        mm_refs=MMRefs(refs) if refs else None,
        mm_token_type_ids=[int(t == QWEN_IMAGE_PAD) for t in tokens] if refs else None,
    )


def single_micro_batch(sample: TrainingSample) -> MicroBatch:
    """Return the micro batch holding just ``sample`` (packing.md section 1, no padding)."""
    n = len(sample.token_ids)
    return MicroBatch(
        input_ids=sample.token_ids,
        loss_mask=sample.mask,
        advantages=sample.advantages or [0.0] * n,
        inference_logprobs=sample.logprobs,
        position_ids=list(range(n)),
        sequence_lengths=[n],
        temperatures=sample.temperatures,
        env_names=[sample.env_name] * n,
        seq_lens=[n],
        lora_num_tokens=[n],
        mm_refs=sample.mm_refs,
        mm_token_type_ids=sample.mm_token_type_ids,
    )


def write_run(
    run: Path,
    samples: list[TrainingSample] | None = None,
    ranks: list[list[MicroBatch]] | None = None,
    step: int = 0,
) -> Path:
    """Write a step's TrainingBatch (when ``samples``) and rank files (one per list in ``ranks``)."""
    step_dir = run / "rollouts" / f"step_{step}"
    step_dir.mkdir(parents=True, exist_ok=True)
    if samples is not None:
        (step_dir / "train_rollouts.bin").write_bytes(encode(TrainingBatch(samples, step)))
    for rank, batches in enumerate(ranks or []):
        (step_dir / f"rank_{rank}.bin").write_bytes(encode(batches))
    return run

"""Compare the server's engine items with vLLM's own processing of the same images, in-process.

Run as ``python -m tests.vllm_engine_items DTYPE...`` with ``tests/vllm_shims`` on
``PYTHONPATH`` (the shims must load before transformers): for each model dtype it
builds vLLM's multimodal processor for the tiny Qwen2-VL (no engine, no weights
loaded), makes each image through ``RawRefEngineInputs`` as ``mmoffload serve``
does (a ``content_parts`` request with a ``data:`` URL), and prints one JSON line
per image: both pixel tensors' dtypes and whether they are equal.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image
from vllm.config import ModelConfig
from vllm.multimodal import MULTIMODAL_REGISTRY

from mmoffload.inference.engine import RawRefEngineInputs
from tests.builders import QWEN_IMAGE_PAD, image_bytes
from tests.vllm_helpers import build_tiny_model

SIZES = [(200, 120), (37, 91), (640, 360)]


def main(dtypes: list[str]) -> None:
    model_dir = build_tiny_model(Path(tempfile.mkdtemp(prefix="engine-items-")) / "model")
    for dtype in dtypes:
        model_config = ModelConfig(model=str(model_dir), dtype=dtype, max_model_len=2048)
        processor = MULTIMODAL_REGISTRY.create_processor(model_config)
        multimodal = model_config.multimodal_config
        assert multimodal is not None
        engine_inputs = RawRefEngineInputs(
            model_dir, processor, device_normalizes=bool(multimodal.mm_device_do_normalize)
        )
        engine_inputs.prepare()
        image_processor = processor.info.get_hf_processor().image_processor
        for seed, (width, height) in enumerate(SIZES):
            data = image_bytes(width, height, seed=seed)
            url = "data:image/png;base64," + base64.b64encode(data).decode()
            _, _, items = engine_inputs.content_items([{"type": "image_url", "url": url}], [QWEN_IMAGE_PAD])
            ours = items[0]["pixel_values"].data
            theirs = processor.info.ctx.call_hf_processor(
                image_processor, {"images": [Image.open(io.BytesIO(data)).convert("RGB")]}
            )["pixel_values"]
            line = {
                "dtype": dtype,
                "size": [width, height],
                "ours": str(ours.dtype),
                "theirs": str(theirs.dtype),
            }
            line["equal"] = ours.dtype == theirs.dtype and torch.equal(ours, theirs)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

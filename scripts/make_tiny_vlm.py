"""Build a tiny random-weight Qwen2-VL model directory for tests and the vLLM smoke run (no download).

About 40 M parameters (an untied, scaled output layer; see below): 2 text layers of width 128, a 1-layer vision tower with
patch 16 (the grid the fixtures' Qwen3-VL descriptors use), the Qwen special
tokens at their real ids and the byte-level tokenizer and Qwen-VL chat template of
``mmoffload.render.tiny`` (the fixtures' byte-level text). The image processor, tokenizer and chat
template are saved separately: building the combined processor object needs a
video processor, which needs torchvision.

Usage: python scripts/make_tiny_vlm.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmoffload.render.tiny import write_tiny_model

VOCAB_SIZE = 151_936
SPECIAL_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
# Small enough for a CPU engine, large enough for the fixtures' 1280x720 screenshots (880 tokens).
MIN_PIXELS, MAX_PIXELS = 32 * 32, 1280 * 720
PATCH_SIZE = 16
# Random init makes a model images barely move: logits nearly flat (std 0.23 over 151,936 tokens),
# image embeddings no larger than text ones, attention nearly uniform (a later token sees the mean of
# 880 patch features, much the same for any two screenshots) and, with tied embeddings, a model that
# repeats its last token with probability 1. Scaled up: an untied output layer (sharp logits, no
# echo), the vision merger's output (image tokens dominate the context) and the text attention's
# queries and keys (a token attends to particular patches). Swapping one screenshot of three then
# moves a greedy completion's mismatch KL from about 1e-4 to about 6 (docs/parity.md).
LM_HEAD_SCALE, VISION_OUTPUT_SCALE, ATTENTION_SCALE = 8.0, 32.0, 16.0


def build(out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny model to ``out_dir`` and return it."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": VOCAB_SIZE,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 8192,
            "rope_parameters": {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0},
            "tie_word_embeddings": False,
            "bos_token_id": SPECIAL_TOKENS["<|endoftext|>"],
            "eos_token_id": SPECIAL_TOKENS["<|im_end|>"],
        },
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 128,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=SPECIAL_TOKENS["<|image_pad|>"],
        video_token_id=SPECIAL_TOKENS["<|video_pad|>"],
        vision_start_token_id=SPECIAL_TOKENS["<|vision_start|>"],
        vision_end_token_id=SPECIAL_TOKENS["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = Qwen2VLForConditionalGeneration(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
        model.model.visual.merger.mlp[2].weight.mul_(VISION_OUTPUT_SCALE)
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(ATTENTION_SCALE)
            layer.self_attn.k_proj.weight.mul_(ATTENTION_SCALE)
    model = model.to(torch.bfloat16)

    # Byte-level text (id = byte value, as the fixtures' traces) and a Qwen-VL chat template with
    # image parts and tool calls, so vLLM's chat routes render what `mmoffload render` renders.
    write_tiny_model(out_dir, "qwen3_vl")
    model.save_pretrained(out_dir)

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
    )
    image_processor.save_pretrained(out_dir)
    # vLLM and mmoffload's family registry read the processor class and the layout from this file.
    config_path = out_dir / "preprocessor_config.json"
    settings = json.loads(config_path.read_text())
    settings.update(
        image_processor_type="Qwen2VLImageProcessor",
        processor_class="Qwen2VLProcessor",
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    )
    config_path.write_text(json.dumps(settings, indent=2))
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(build(Path(sys.argv[1])))

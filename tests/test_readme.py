"""The README's trainer snippet, run as written against a tiny random-weight Qwen3-VL."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.builders import qwen_sample, single_micro_batch, write_run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    [block] = [b for b in blocks if containing in b]
    return block


def tiny_qwen3_vl() -> torch.nn.Module:
    """Qwen3-VL with the real token ids and patch layout, and a few thousand weights per layer."""
    config = transformers.Qwen3VLConfig(
        text_config={
            "vocab_size": 151936,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 32,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "deepstack_visual_indexes": [1],
            "num_position_embeddings": 64,
        },
    )
    torch.manual_seed(0)
    return transformers.Qwen3VLForConditionalGeneration(config).eval()


def test_the_readme_trainer_snippet_feeds_a_qwen3_vl_forward_pass(tmp_path: Path) -> None:
    # The bundled processor lays a 64x48 image out as 14x20 patches.
    samples = [qwen_sample(tmp_path / "assets", seeds, grid=(1, 14, 20)) for seeds in ((0, 1), (2,))]
    run = write_run(tmp_path / "run", samples, [[single_micro_batch(s) for s in samples]])
    model = tiny_qwen3_vl()
    namespace = {"model": model, "model_dir": "qwen3_vl", "rank_path": run / "rollouts/step_0/rank_0.bin"}

    with torch.no_grad():
        exec(readme_block("Materializer("), namespace)

    batch, logits = namespace["batch"], namespace["logits"]
    tokens = len(samples[-1].token_ids)
    assert batch.model_kwargs["input_ids"].shape == (1, tokens)
    assert batch.model_kwargs["mm_token_type_ids"].shape == (1, tokens)
    assert logits.shape == (1, tokens, 151936) and torch.isfinite(logits).all()

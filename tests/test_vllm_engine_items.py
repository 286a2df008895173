"""The server's engine items are vLLM's own: the same pixel dtype and values as vLLM's processing of the image.

vLLM concatenates a batch's pixels into the first item's dtype, so an item of
another dtype can fail a batch mixed with vLLM's own items (and kill the engine),
and float32 items for a bfloat16 model carry twice the bytes to the engine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.vllm_helpers import REPO, SHIMS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


def test_engine_items_equal_vllms_own_processing_in_the_models_dtype() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SHIMS), str(REPO / "src"), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-m", "tests.vllm_engine_items", "bfloat16", "float32"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 6
    for line in lines:
        assert line["ours"] == line["theirs"] == f"torch.{line['dtype']}", line
        assert line["equal"], line


def test_a_processor_that_takes_no_plain_image_gives_the_models_dtype_and_the_server_starts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch = pytest.importorskip("torch")
    from mmoffload.inference.engine import vllm_pixel_dtype

    def refuses() -> object:
        raise ValueError("expected `medias`, got `images`")

    # The shape of vLLM's processor info that the probe reads: a processor that refuses a plain image.
    info = SimpleNamespace(
        get_hf_processor=refuses, ctx=SimpleNamespace(model_config=SimpleNamespace(dtype=torch.float16))
    )

    assert vllm_pixel_dtype(SimpleNamespace(info=info), "pixel_values") == torch.float16
    assert "Could not learn vLLM's pixel dtype (ValueError: expected `medias`" in caplog.text

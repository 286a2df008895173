"""Benchmark the inference side on the tiny random-weight Qwen2-VL (CPU is enough).

1. Materialization per image (read, hash, decode, grid check, the model's processor),
   beside the processor alone on the same decoded images, in process.
2. Requests per second for a 2-image prompt through ``mmoffload serve``, with the
   materialized-input cache and without it (``--cache-bytes 0``: every request reads,
   decodes and processes its images again), and the server's memory (all its processes).

Usage: python scripts/bench_serve.py [--requests 40] [--size 1280x720]
(needs vLLM; on a machine without torchvision put tests/vllm_shims on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "src"), str(REPO / "cli"), str(REPO)]

from scripts.make_tiny_vlm import build  # noqa: E402
from tests.builders import (  # noqa: E402
    QWEN_IMAGE_PAD,
    QWEN_VISION_END,
    QWEN_VISION_START,
    descriptor,
    image_bytes,
    sidecar,
    store_image,
)

from mmoffload.families import Families, Family  # noqa: E402
from mmoffload.inference.checks import materialize_ref  # noqa: E402
from mmoffload.inference.client import InferenceClient, build_request  # noqa: E402
from mmoffload.inference.refs import features_from_sidecars, parse_features  # noqa: E402


def two_image_prompt(model_dir: Path, assets: Path, size: tuple[int, int]) -> tuple[list[int], dict]:
    family = Families(model_dir).get("qwen_vl")
    tokens, images = [72, 105], []
    for seed in (1, 2):
        stored = store_image(assets, image_bytes(*size, seed=seed))
        grid = family.layout(*size)
        length = family.placeholder_length(grid)
        tokens.append(QWEN_VISION_START)
        images.append((descriptor(stored.uri, list(grid)), stored.hash, len(tokens), length))
        tokens += [QWEN_IMAGE_PAD] * length + [QWEN_VISION_END, 32]
    return tokens, sidecar(images)


def bench_materialize(model_dir: Path, assets: Path, size: tuple[int, int], rounds: int) -> dict[str, float]:
    families = Families(model_dir)
    family = families.get("qwen_vl")
    family.prepare_pixels()
    tokens, side = two_image_prompt(model_dir, assets, size)
    refs = parse_features(features_from_sidecars([side], len(tokens)), families)

    def make(fam: Family, image: Image.Image) -> dict[str, np.ndarray]:  # the engine side's, unnormalized
        return fam.engine_pixels([image], device_normalizes=True)

    images = []
    for ref in refs:
        with Image.open(ref.uri.removeprefix("file://")) as image:
            images.append(image.convert("RGB"))
    started = time.perf_counter()
    for _ in range(rounds):
        for ref in refs:
            materialize_ref(ref, make)
    full = (time.perf_counter() - started) / (rounds * len(refs))
    started = time.perf_counter()
    for _ in range(rounds):
        for image in images:
            make(family, image)
    alone = (time.perf_counter() - started) / (rounds * len(images))
    return {
        "materialize_ms_per_image": full * 1e3,
        "processor_ms_per_image": alone * 1e3,
        "ratio": full / alone,
    }


def bench_server(
    model_dir: Path, assets: Path, size: tuple[int, int], cache_bytes: int, requests: int
) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TMPDIR": str(tmp)}
    command = [
        sys.executable, "-c", "from mmoffload_cli.app import main; main()", "serve", "--model", str(model_dir),
        "--port", str(port), "--cache-bytes", str(cache_bytes), "--allow-root", str(assets), "--",
        "--dtype", "bfloat16",
        "--max-model-len", "4096", "--enforce-eager", "--limit-mm-per-prompt", '{"image": 2, "video": 0}',
    ]  # fmt: skip
    log = (tmp / "server.log").open("wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            except OSError:
                if process.poll() is not None:
                    raise SystemExit((tmp / "server.log").read_text()[-3000:]) from None
                time.sleep(1)
        tokens, side = two_image_prompt(model_dir, assets, size)
        client = InferenceClient(url)
        body = build_request(tokens, [side], {"max_tokens": 4, "temperature": 0.0, "logprobs": 0})
        client.post(body)  # warm-up
        started = time.perf_counter()
        for _ in range(requests):
            client.post(body)
        seconds = time.perf_counter() - started
        with urllib.request.urlopen(url + "/mmoffload/v1/stats") as response:
            stats = json.loads(response.read())
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        rss = sum(p.memory_info().rss for p in tree)
        return {
            "cache_bytes": cache_bytes,
            "requests_per_s": requests / seconds,
            "images_materialized": stats["images_materialized"],
            "server_rss_gib": rss / 2**30,
        }
    finally:
        process.terminate()
        process.wait(timeout=120)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--size", default="1280x720")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model_dir = build(work / "model")
    assets = work / "assets"
    print(json.dumps({"size": args.size, **bench_materialize(model_dir, assets, size, args.rounds)}))
    results = [bench_server(model_dir, assets, size, cache, args.requests) for cache in (2 << 30, 0)]
    for result in results:
        print(json.dumps(result))
    print(json.dumps({"cache_speedup": results[0]["requests_per_s"] / results[1]["requests_per_s"]}))


if __name__ == "__main__":
    main()

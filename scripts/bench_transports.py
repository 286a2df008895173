"""Benchmark the image transports on an 8-turn agent workload: stock vLLM beside ``mmoffload serve``.

Each client plays episodes of 8 turns; turn k sends k images (the k-1 earlier
ones again, and a new one), 4 greedy tokens each, one request at a time. Both
servers run the tiny Qwen2-VL with the same vLLM arguments. Transports:

- stock, file://: ``content_parts`` with every image's URL each turn (stock reads and decodes every time).
- stock, uuid-only: earlier images as ``uuid`` alone (stock trusts the client's uuid).
- ours, content_parts: ``mmoffload generate``'s protocol (uuid alone for images this server verified).
- ours, mmraw: every image as an ``mmraw:`` ref.

Rounds are interleaved (each round on fresh images, so every round starts cold) and
requests per second are compared within the run, for 1 and 4 concurrent clients.

Usage: python scripts/bench_transports.py [--rounds 2] [--size 640x360]
(needs vLLM; on a machine without torchvision it puts tests/vllm_shims on the servers' PYTHONPATH).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "src"), str(REPO / "cli"), str(REPO)]

from tests.builders import (  # noqa: E402
    QWEN_IMAGE_PAD,
    QWEN_VISION_END,
    QWEN_VISION_START,
    descriptor,
    image_bytes,
    store_image,
)
from tests.vllm_helpers import running_servers  # noqa: E402

from mmoffload.families import Families  # noqa: E402
from mmoffload.inference.client import InferenceClient, build_parts_request, parse_completion  # noqa: E402

TURNS = 8
SAMPLING = {"max_tokens": 4, "temperature": 0.0, "logprobs": 0}
VLLM_ARGS = ["--limit-mm-per-prompt", json.dumps({"image": TURNS, "video": 0})]
_seeds = itertools.count(1000)


def episode(family: Any, assets: Path, size: tuple[int, int]) -> list[tuple[list[int], dict[str, Any]]]:
    """Return the 8 prompts of one episode on fresh images: (expanded ids, sidecar) per turn."""
    grid = family.layout(*size)
    length = family.placeholder_length(grid)
    stored = [store_image(assets, image_bytes(*size, seed=next(_seeds))) for _ in range(TURNS)]
    prompts = []
    for turn in range(1, TURNS + 1):
        tokens, items, hashes, spans = [72, 105], [], [], []
        for image in stored[:turn]:
            tokens.append(QWEN_VISION_START)
            items.append(descriptor(image.uri, list(grid)))
            hashes.append(image.hash)
            spans.append({"offset": len(tokens), "length": length})
            tokens += [QWEN_IMAGE_PAD] * length + [QWEN_VISION_END, 32]
        sidecar = {
            "mm_items": {"image": items},
            "mm_hashes": {"image": hashes},
            "mm_placeholders": {"image": spans},
        }
        prompts.append((tokens, sidecar))
    return prompts


def play(transport: str, url: str, prompts: list[tuple[list[int], dict[str, Any]]]) -> None:
    """Run one episode's turns in order through one transport."""
    client = InferenceClient(url, retries=0)
    held: set[str] = set()
    for tokens, sidecar in prompts:
        if transport == "ours, content_parts":
            client.generate_parts(tokens, [sidecar], SAMPLING)
        elif transport == "ours, mmraw":
            client.generate(tokens, [sidecar], SAMPLING)
        else:
            request = build_parts_request(
                tokens, [sidecar], SAMPLING, held if transport == "stock, uuid-only" else ()
            )
            parse_completion(client.post(request.body))
            held.update(request.hashes)


def measure(run: Callable[[], None], requests: int) -> float:
    started = time.perf_counter()
    run()
    return requests / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", default="640x360")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    work = Path(tempfile.mkdtemp(prefix="bench-transports-"))
    ours_root, stock_root = work / "ours", work / "stock"
    ours_root.mkdir()
    stock_root.mkdir()
    assets = stock_root / "assets"  # readable by both: stock's media path, and one of ours' roots
    specs = [
        (ours_root, ("--allow-root", str(stock_root)), VLLM_ARGS, None, False),
        (stock_root, (), VLLM_ARGS, None, True),
    ]
    with running_servers(specs) as (ours, stock):
        family = Families(ours.model_dir).get("qwen_vl")
        urls = {"stock, file://": stock.url, "stock, uuid-only": stock.url}
        urls |= {"ours, content_parts": ours.url, "ours, mmraw": ours.url}
        play("ours, mmraw", ours.url, episode(family, assets, size))  # warm-up, both engines
        play("stock, file://", stock.url, episode(family, assets, size))
        rates: dict[tuple[str, int], list[float]] = {}
        for _, clients, transport in itertools.product(range(args.rounds), (1, 4), urls):
            episodes = [episode(family, assets, size) for _ in range(clients)]

            def run(episodes: list[Any] = episodes, transport: str = transport) -> None:
                with ThreadPoolExecutor(len(episodes)) as pool:
                    list(pool.map(lambda prompts: play(transport, urls[transport], prompts), episodes))

            rates.setdefault((transport, clients), []).append(measure(run, clients * TURNS))
    best = {key: max(values) for key, values in rates.items()}
    for (transport, clients), rate in sorted(best.items(), key=lambda item: (item[0][1], item[0][0])):
        print(f"{clients} client(s)  {transport:22s} {rate:6.2f} requests/s")
    for clients in (1, 4):
        ours_rate = best[("ours, content_parts", clients)]
        print(
            f"{clients} client(s): ours content_parts / stock uuid-only "
            f"{ours_rate / best[('stock, uuid-only', clients)]:.2f}x, / stock file:// "
            f"{ours_rate / best[('stock, file://', clients)]:.2f}x, / ours mmraw "
            f"{ours_rate / best[('ours, mmraw', clients)]:.2f}x"
        )


if __name__ == "__main__":
    main()

"""Benchmark the image transports on an 8-turn agent workload: stock vLLM beside ``mmoffload serve``.

Each client plays episodes of 8 turns; turn k sends k images (the k-1 earlier
ones again, and a new one), 4 greedy tokens each, one request at a time. Both
servers run the tiny Qwen2-VL with the same vLLM arguments. Transports:

- stock, file://: ``content_parts`` with every image's URL each turn (stock reads and decodes every time).
- stock, uuid-only: earlier images as ``uuid`` alone (stock trusts the client's uuid).
- ours, content_parts: ``mmoffload generate``'s protocol (uuid alone for images this server verified).
- ours, mmraw: every image as a compact ``mmraw:`` ref.

Rounds are interleaved (each measurement on images no earlier one sent, so every one starts cold) and
requests per second are compared within the run, for 1 and 4 concurrent clients.
While one server is measured the other is stopped (SIGSTOP on its processes): on a
small machine an idle vLLM engine still spins and would take the measured one's CPU.
The report also gives the API process's CPU per request (the engine's work is the same for
both servers), each turn's p95 latency (4 clients), each server's resident
memory (all its processes) after the workload, and a wrong-uuid probe: a fresh image's
URL under another image's uuid (stock accepts it, and then serves those pixels for that
uuid; ours refuses it).

Usage: python scripts/bench_transports.py [--rounds 2] [--size 640x360]
(needs vLLM; on a machine without torchvision it puts tests/vllm_shims on the servers' PYTHONPATH).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import itertools
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "src"), str(REPO / "cli"), str(REPO)]

from tests.builders import (  # noqa: E402
    QWEN_IMAGE_PAD,
    QWEN_VISION_END,
    QWEN_VISION_START,
    descriptor,
    sidecar,
    store_image,
)
from tests.vllm_helpers import Server, running_servers  # noqa: E402

from mmoffload.families import Families  # noqa: E402
from mmoffload.inference.client import (  # noqa: E402
    InferenceClient,
    InferenceServerError,
    build_parts_request,
    parse_completion,
)

TURNS = 8
SAMPLING = {"max_tokens": 4, "temperature": 0.0, "logprobs": 0}
VLLM_ARGS = ["--limit-mm-per-prompt", json.dumps({"image": TURNS, "video": 0})]
_seeds = itertools.count(1000)


def screenshot(size: tuple[int, int], seed: int) -> bytes:
    """Return a PNG unlike every other seed's: a flat page with random blocks (tests' images repeat every
    256 seeds, which would let a later transport hit the caches an earlier one filled)."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[...] = rng.integers(0, 256, 3, dtype=np.uint8)
    for _ in range(12):  # panels and text lines
        top, left = int(rng.integers(0, height - 8)), int(rng.integers(0, width - 8))
        pixels[top : top + int(rng.integers(4, 60)), left : left + int(rng.integers(8, 240))] = rng.integers(
            0, 256, 3
        )
    pixels[:32, :32] = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # a noisy icon
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def episode(family: Any, assets: Path, size: tuple[int, int]) -> list[tuple[list[int], dict[str, Any]]]:
    """Return the 8 prompts of one episode on fresh images: (expanded ids, sidecar) per turn."""
    grid = family.layout(*size)
    length = family.placeholder_length(grid)
    stored = [store_image(assets, screenshot(size, next(_seeds))) for _ in range(TURNS)]
    prompts = []
    for turn in range(1, TURNS + 1):
        tokens, images = [72, 105], []
        for image in stored[:turn]:
            tokens.append(QWEN_VISION_START)
            images.append((descriptor(image.uri, list(grid)), image.hash, len(tokens), length))
            tokens += [QWEN_IMAGE_PAD] * length + [QWEN_VISION_END, 32]
        prompts.append((tokens, sidecar(images)))
    return prompts


def play(transport: str, url: str, prompts: list[tuple[list[int], dict[str, Any]]]) -> list[float]:
    """Run one episode's turns in order through one transport; return each turn's latency (s)."""
    latencies = []
    held: set[str] = set()
    with InferenceClient(url, retries=0) as client:
        for tokens, sidecar in prompts:
            started = time.perf_counter()
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
            latencies.append(time.perf_counter() - started)
    return latencies


def processes(server: Server) -> list[psutil.Process]:
    """The server's processes: the API server, the engine core and its workers."""
    root = psutil.Process(server.process.pid)
    return [root, *root.children(recursive=True)]


@contextlib.contextmanager
def paused(server: Server) -> Iterator[None]:
    """Stop every process of ``server`` for the block (an idle engine spins on the CPU)."""
    stopped = processes(server)
    for process in stopped:
        process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for process in stopped:
            process.send_signal(signal.SIGCONT)


def api_cpu_seconds(server: Server) -> float:
    """CPU seconds used so far by the server's API process (HTTP, checks, images; not the engine's)."""
    times = psutil.Process(server.process.pid).cpu_times()
    return times.user + times.system


def measure(
    transport: str, server: Server, other: Server, warm: dict[str, Any], episodes: list[Any]
) -> tuple[float, list[list[float]], float]:
    """Play ``episodes`` at once through ``transport`` with ``other`` stopped.

    A warm request (one image already sent) goes first, off the clock: a resumed server's first
    answer is slower. Returns requests/s, each episode's latencies, and the API process's CPU
    milliseconds per request (steadier than rates on a shared machine).
    """
    with paused(other), ThreadPoolExecutor(len(episodes)) as pool:
        play("stock, file://", server.url, warm[server.url])
        started, cpu = time.perf_counter(), api_cpu_seconds(server)
        played = list(pool.map(functools.partial(play, transport, server.url), episodes))
        requests = len(episodes) * TURNS
        cpu_ms = 1000 * (api_cpu_seconds(server) - cpu) / requests
        return requests / (time.perf_counter() - started), played, cpu_ms


def accepts_a_wrong_uuid(url: str, family: Any, assets: Path, size: tuple[int, int]) -> bool:
    """Send a fresh image B's URL under another fresh image A's uuid: True when the server answers 200.

    Stock vLLM then holds B's pixels under A's uuid and serves them to every later request naming A.
    """
    (tokens, first), (_, second) = episode(family, assets, size)[:2]
    request = build_parts_request(tokens, [first], SAMPLING)
    request.body["content_parts"][0]["url"] = second["mm_items"]["image"][1]["raw_image_uri"]
    with InferenceClient(url, retries=0) as client:
        try:
            parse_completion(client.post(request.body))
        except InferenceServerError:
            return False
        return True


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
        servers = {"stock, file://": stock, "stock, uuid-only": stock}
        servers |= {"ours, content_parts": ours, "ours, mmraw": ours}
        warm = {server.url: episode(family, assets, size)[:1] for server in (ours, stock)}
        other = {ours.url: stock, stock.url: ours}
        # Warm-up: every transport with 4 clients (the engine pays once for each new batch shape).
        for transport, server in servers.items():
            measure(
                transport, server, other[server.url], warm, [episode(family, assets, size) for _ in range(4)]
            )
        rates: dict[tuple[str, int], list[float]] = {}
        api_cpu: dict[str, list[float]] = {}
        turns: dict[str, list[list[float]]] = {transport: [[] for _ in range(TURNS)] for transport in servers}
        order = list(servers)
        for round_ in range(args.rounds):
            # Each round starts with another transport: none always runs first after its server resumes.
            rotated = order[round_ % len(order) :] + order[: round_ % len(order)]
            for clients, transport in itertools.product((1, 4), rotated):
                server = servers[transport]
                episodes = [episode(family, assets, size) for _ in range(clients)]
                rate, played, cpu_ms = measure(transport, server, other[server.url], warm, episodes)
                rates.setdefault((transport, clients), []).append(rate)
                api_cpu.setdefault(transport, []).append(cpu_ms)
                if clients == 4:
                    for latencies in played:
                        for turn, latency in enumerate(latencies):
                            turns[transport][turn].append(latency)
        named = {"ours": ours, "stock": stock}
        rss = {name: sum(p.memory_info().rss for p in processes(server)) for name, server in named.items()}
        wrong = {
            name: accepts_a_wrong_uuid(server.url, family, assets, size) for name, server in named.items()
        }
    report(rates, api_cpu, turns, rss, wrong)


def report(
    rates: dict[tuple[str, int], list[float]],
    api_cpu: dict[str, list[float]],
    turns: dict[str, list[list[float]]],
    rss: dict[str, int],
    wrong: dict[str, bool],
) -> None:
    """Print the best rate of each transport, the ratios, API CPU, p95 per turn, memory, the wrong-uuid probe."""
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
    print("API process CPU per request, median of the measurements (ms):")
    for transport, values in api_cpu.items():
        print(f"  {transport:22s} {statistics.median(values):6.1f}")
    print("p95 latency per turn, 4 clients (ms):")
    for transport, per_turn in turns.items():
        p95 = [1000 * statistics.quantiles(values, n=20)[-1] for values in per_turn]
        print(f"  {transport:22s} " + " ".join(f"{value:6.0f}" for value in p95))
    print(
        f"resident memory after the workload: ours {rss['ours'] / 2**20:.0f} MiB, stock {rss['stock'] / 2**20:.0f} MiB"
    )
    print(
        "images accepted under a uuid their bytes do not hash to: "
        f"ours {int(wrong['ours'])}, stock {int(wrong['stock'])}"
    )


if __name__ == "__main__":
    main()

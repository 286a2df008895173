"""Start ``mmoffload serve`` on a tiny random-weight Qwen2-VL for the vLLM test modules (one engine each).

The engine starts as users start it, through the CLI, on a loopback port; its
images live under the per-module directory, which is its allowed root.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mmoffload.families import Families
from mmoffload.inference.client import build_request
from tests.builders import (
    QWEN_IMAGE_PAD,
    QWEN_VISION_END,
    QWEN_VISION_START,
    descriptor,
    image_bytes,
    sidecar,
    store_image,
)

REPO = Path(__file__).resolve().parent.parent
SHIMS = Path(__file__).resolve().parent / "vllm_shims"
START_TIMEOUT_S = 600


@dataclass(frozen=True)
class Server:
    url: str
    model_dir: Path
    assets: Path
    process: subprocess.Popen[bytes]

    def post(self, body: dict[str, Any] | bytes) -> tuple[int, dict[str, Any]]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + "/inference/v1/generate", data, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def get(self, route: str) -> tuple[int, Any]:
        with urllib.request.urlopen(self.url + route, timeout=30) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None


def raw_ref_request(
    server: Server,
    seeds: Sequence[int],
    sampling: dict[str, Any],
    size: tuple[int, int] = (200, 120),
    assets: Path | None = None,
    text: Sequence[int] = (72, 105),
    compact_refs: bool = True,
) -> dict[str, Any]:
    """Return a raw-ref request: ``text`` tokens, then one stored image per seed with text after it."""
    family = Families(server.model_dir).get("qwen_vl")
    tokens, images = list(text), []
    for seed in seeds:
        stored = store_image(assets or server.assets, image_bytes(*size, seed=seed))
        grid = family.layout(*size)
        length = family.placeholder_length(grid)
        tokens.append(QWEN_VISION_START)
        images.append((descriptor(stored.uri, list(grid)), stored.hash, len(tokens), length))
        tokens += [QWEN_IMAGE_PAD] * length + [QWEN_VISION_END, 32]
    return build_request(tokens, [sidecar(images)], sampling, compact_refs=compact_refs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_tiny_model(out_dir: Path) -> Path:
    spec = importlib.util.spec_from_file_location("make_tiny_vlm", REPO / "scripts" / "make_tiny_vlm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(out_dir)


@contextlib.contextmanager
def running_server(
    root: Path,
    serve_args: Sequence[str] = (),
    vllm_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    *,
    stock: bool = False,
) -> Iterator[Server]:
    """Run ``mmoffload serve`` on the tiny model under ``root`` (its allowed root) until the block ends.

    With ``stock``, run stock vLLM's API server instead (``--enable-scale-out``, local media under ``root``).
    """
    with running_servers([(root, serve_args, vllm_args, env, stock)]) as (server,):
        yield server


@contextlib.contextmanager
def running_servers(
    specs: Sequence[tuple[Path, Sequence[str], Sequence[str], dict[str, str] | None, bool]],
) -> Iterator[list[Server]]:
    """Start several servers at once (``running_server``'s arguments each), wait for all, stop all at the end."""
    started: list[tuple[Server, Path, Any]] = []
    try:
        for root, serve_args, vllm_args, env, stock in specs:
            started.append(_spawn(root, serve_args, vllm_args, env, stock))
        deadline = time.monotonic() + START_TIMEOUT_S
        for server, log_path, _ in started:
            _wait_ready(server, log_path, deadline)
        yield [server for server, _, _ in started]
    finally:
        for server, _, log in started:
            server.process.terminate()
            try:
                server.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.process.kill()
            log.close()


def _spawn(
    root: Path, serve_args: Sequence[str], vllm_args: Sequence[str], env: dict[str, str] | None, stock: bool
) -> tuple[Server, Path, Any]:
    model_dir = build_tiny_model(root / "model")
    private_tmp = root / "tmp"  # vLLM leaves IPC socket files in $TMPDIR at each start
    private_tmp.mkdir()
    port = _free_port()
    server_env = {
        **os.environ,
        # The test-only torchvision shims must reach the server and the engine processes it spawns.
        "PYTHONPATH": os.pathsep.join([str(SHIMS), str(REPO / "src"), str(REPO / "cli")]),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "TMPDIR": str(private_tmp),
        **(env or {}),
    }
    if stock:
        head = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--port", str(port), "--enable-scale-out", "--allowed-local-media-path", str(root),
        ]  # fmt: skip
    else:
        head = [
            sys.executable, "-c", "from mmoffload_cli.app import main; main()",
            "serve", "--model", str(model_dir), "--port", str(port), "--allow-root", str(root), *serve_args, "--",
        ]  # fmt: skip
    command = [*head, "--dtype", "bfloat16", "--max-model-len", "2048", "--enforce-eager", *vllm_args]
    log_path = root / "server.log"
    log = log_path.open("wb")
    process = subprocess.Popen(command, env=server_env, stdout=log, stderr=subprocess.STDOUT)
    return Server(f"http://127.0.0.1:{port}", model_dir, root / "assets", process), log_path, log


def _wait_ready(server: Server, log_path: Path, deadline: float) -> None:
    while True:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode}: {log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"server not ready after {START_TIMEOUT_S} s: {log_path.read_text()[-3000:]}")
        time.sleep(1)

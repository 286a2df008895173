"""Benchmark ``mmoffload offload`` against a naive offload and the floor, as commands, in one run.

Generates the issue's input (multi-turn rollouts, every turn's record re-sending
the whole history, one 1280x720 PNG screenshot per turn), then times, each as a
fresh process from an empty asset directory (median wall of ``--repeat`` runs,
variants interleaved so machine noise spreads evenly):

- project: ``mmoffload offload IN -o OUT --assets A -q``, one worker, and each ``--workers`` count;
- naive: stdlib ``json.loads`` per line, recursive walk, ``b64decode`` of every
  image part, sha256, temp file + fsync + rename, ``json.dumps``;
- floor: byte search for each data URL, decode and hash each distinct base64
  text once, write each image once (temp file + fsync + rename); no JSON work;
  and the same floor with its fsyncs on threads, as the project does them.

The project's modules are byte-compiled first, as an install leaves them (an editable
install under ``PYTHONDONTWRITEBYTECODE`` would otherwise recompile them in every run).

Every variant keeps the same durability promise (each image is fsynced before
it is renamed into place). Usage:

    python scripts/bench_offload.py --rollouts 16 --turns 15 --workers 2
"""

from __future__ import annotations

import argparse
import base64
import compileall
import importlib.util
import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
from PIL import Image, ImageDraw

NAIVE = r"""
import base64, hashlib, json, os, sys, tempfile
source, target, assets = sys.argv[1:4]
os.makedirs(assets, exist_ok=True)

def store(url):
    data = base64.b64decode(url.partition(",")[2])
    extension = ".png" if data.startswith(b"\x89PNG") else ".jpg"
    path = os.path.join(assets, hashlib.sha256(data).hexdigest()[:32] + extension)
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=assets)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    return "file://" + path

def walk(value):
    if isinstance(value, dict):
        if value.get("type") == "image_url" and value["image_url"]["url"].startswith("data:"):
            value["image_url"]["url"] = store(value["image_url"]["url"])
        for child in value.values():
            walk(child)
    elif isinstance(value, list):
        for child in value:
            walk(child)

with open(source) as lines, open(target, "w") as out:
    for line in lines:
        record = json.loads(line)
        walk(record)
        out.write(json.dumps(record) + "\n")
"""

FLOOR = r"""
import base64, hashlib, os, sys, tempfile
from concurrent.futures import ThreadPoolExecutor
source, assets, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.makedirs(assets, exist_ok=True)

def commit(fd, tmp, path):
    os.fsync(fd)
    os.close(fd)
    os.replace(tmp, path)

seen = set()
with ThreadPoolExecutor(threads) as syncer, open(source, "rb", buffering=8 << 20) as lines:
    for line in lines:
        start = line.find(b'"data:image/')
        while start != -1:
            comma = line.index(b",", start)
            end = line.index(b'"', comma)
            payload = line[comma + 1 : end]
            if payload not in seen:
                seen.add(payload)
                data = base64.b64decode(payload)
                path = os.path.join(assets, hashlib.sha256(data).hexdigest()[:32] + ".png")
                fd, tmp = tempfile.mkstemp(dir=assets)
                os.write(fd, data)
                if threads == 1:
                    commit(fd, tmp, path)
                else:
                    syncer.submit(commit, fd, tmp, path)
            start = line.find(b'"data:image/', end)
"""

CLI = "from mmoffload_cli.app import main; main()"


def screenshot(width: int, height: int, rng: random.Random) -> bytes:
    """Draw a desktop-like PNG screenshot: flat background, windows, text lines, a gradient."""
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for y in range(0, height // 3):
        draw.line((0, y, width, y), fill=(y % 256, 80, 160))
    for _ in range(15):
        x, y = rng.randrange(width - 200), rng.randrange(height - 120)
        draw.rectangle(
            (x, y, x + rng.randrange(100, 400), y + rng.randrange(60, 300)), fill=(240, 240, 240), outline=0
        )
        for line in range(5):
            draw.text((x + 8, y + 8 + 14 * line), f"item {rng.random():.6f} lorem ipsum", fill=(20, 20, 20))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def generate(path: Path, rollouts: int, turns: int, width: int, height: int, seed: int) -> int:
    """Write the rollouts JSONL (one record per turn, full history); return its image parts."""
    rng = random.Random(seed)
    parts = 0
    with path.open("wb") as records:
        for rollout in range(rollouts):
            history: list[dict] = []
            for turn in range(turns):
                url = f"data:image/png;base64,{base64.b64encode(screenshot(width, height, rng)).decode()}"
                history.append(
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": f"turn {turn}: what next?"},
                            {"type": "image_url", "image_url": {"url": url}},
                        ],
                    }
                )
                record = {
                    "id": f"r{rollout}",
                    "turn": turn,
                    "prompt": history,
                    "completion": [
                        {
                            "role": "assistant",
                            "content": f"click({rng.randrange(width)}, {rng.randrange(height)})",
                        }
                    ],
                    "reward": rng.random(),
                }
                records.write(msgspec.json.encode(record) + b"\n")
                parts += turn + 1
                history.append(record["completion"][0])
    return parts


def wall(command: list[str]) -> float:
    # The last run's dirty pages (a 161 MB output) would be written back during this one.
    os.sync()
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rollouts", type=int, default=16, help="rollouts to generate")
    parser.add_argument("--turns", type=int, default=15, help="turns per rollout (one record per turn)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--workers", type=int, nargs="*", default=[2], help="worker counts to time besides 1")
    parser.add_argument("--repeat", type=int, default=5, help="runs per variant; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dir", type=Path, default=None, help="work directory, kept (default: a temporary one)"
    )
    args = parser.parse_args()

    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-offload-"))
    root.mkdir(parents=True, exist_ok=True)
    source = root / f"rollouts-{args.rollouts}x{args.turns}-{args.width}x{args.height}-{args.seed}.jsonl"
    parts = args.rollouts * args.turns * (args.turns + 1) // 2
    if not source.exists():
        generate(source, args.rollouts, args.turns, args.width, args.height, args.seed)
    size = source.stat().st_size
    print(
        f"{args.rollouts} rollouts x {args.turns} turns: {size / 1e6:.0f} MB JSONL, {parts:,} image parts, "
        f"{args.rollouts * args.turns} distinct {args.width}x{args.height} PNGs, in {root}"
    )

    for package in ("mmoffload", "mmoffload_cli"):
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
        compileall.compile_dir(spec.submodule_search_locations[0], quiet=1)
    python = sys.executable
    variants: dict[str, list[str]] = {}
    for workers in [1, *args.workers]:
        flag = ["--workers", str(workers)] if workers > 1 else []
        name = " ".join(["mmoffload offload IN -o OUT --assets A -q", *flag])
        variants[name] = [
            python,
            "-c",
            CLI,
            "offload",
            str(source),
            "-o",
            "OUT",
            "--assets",
            "A",
            "-q",
            *flag,
        ]
    naive = "naive offload (json, walk, b64decode every part, sha256, temp + rename)"
    floor = "floor (byte search, decode + hash each distinct text once, write once)"
    variants[naive] = [python, "-c", NAIVE, str(source), "OUT", "A"]
    variants[floor] = [python, "-c", FLOOR, str(source), "A", "1"]
    variants["floor, fsyncs on threads as the project does"] = [python, "-c", FLOOR, str(source), "A", "8"]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeat):
        for index, (name, command) in enumerate(variants.items()):
            out, assets = root / f"out-{index}.jsonl", root / f"assets-{index}"
            shutil.rmtree(assets, ignore_errors=True)
            resolved = [str(out) if arg == "OUT" else str(assets) if arg == "A" else arg for arg in command]
            times[name].append(wall(resolved))
    median = {name: statistics.median(values) for name, values in times.items()}
    project = median[next(iter(variants))]
    width = max(len(name) for name in variants) + 2
    print(f"| {'command':<{width}} | median wall | vs project |")
    print(f"|{'-' * (width + 2)}|-------------|------------|")
    for name, seconds in median.items():
        print(f"| {f'`{name}`':<{width}} | {seconds:>9.2f} s | {seconds / project:>10.2f} |")
    print(f"naive / project: {median[naive] / project:.2f} (target >= 2)")
    print(f"project / floor: {project / median[floor]:.2f} (target <= 1.5)")
    print(f"project / floor with threaded fsyncs: {project / median[list(variants)[-1]]:.2f}")
    for workers, name in zip(args.workers, list(variants)[1:], strict=False):
        print(f"--workers {workers}: {project / median[name]:.2f}x the speed of one worker")
    if args.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

"""Measure the decode budget (issue 29 item 3): peak memory of concurrent large decodes, with and without it.

Six threads materialize six distinct 8000 x 8000 PNGs at once, through the
server's own path (``materialize_ref``: read, hash, header, grid, decode, the
family's engine pixels, as ``mmoffload serve`` makes them), in a fresh process per configuration; the peak resident
growth (``VmHWM`` after the runs minus ``VmRSS`` before, after resetting the
peak) is reported beside the budget, and the ratio of the two peaks measured
in this run.

Usage: python scripts/bench_decode_memory.py [--images 6] [--size 8000] [--budget 1200000000]
(the tiny Qwen2-VL is built in a temporary directory; no vLLM needed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "src"), str(REPO / "cli"), str(REPO)]

from scripts.make_tiny_vlm import build  # noqa: E402
from tests.builders import descriptor, image_bytes, sidecar, store_image  # noqa: E402

from mmoffload.families import Families  # noqa: E402
from mmoffload.inference.checks import materialize_ref  # noqa: E402
from mmoffload.inference.decode_budget import DecodeBudget, decode_cost  # noqa: E402
from mmoffload.inference.refs import EngineArrays, ImageRef, features_from_sidecars, parse_features  # noqa: E402


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) << 10
    raise RuntimeError(field)


def run_one(
    model_dir: Path, assets: Path, images: int, size: int, budget_bytes: int | None
) -> dict[str, float]:
    """Materialize ``images`` stored images at once in this process; return the peak resident growth."""
    families = Families(model_dir)
    family = families.get("qwen_vl")
    family.prepare_pixels()
    grid = family.layout(size, size)
    items = []
    for seed in range(images):
        stored = store_image(assets, image_bytes(size, size, seed=seed))
        items.append((descriptor(stored.uri, list(grid)), stored.hash, 0, family.placeholder_length(grid)))
    lengths = sum(length for *_, length in items)
    refs = [parse_features(features_from_sidecars([sidecar([item])], lengths), families)[0] for item in items]
    budget = DecodeBudget(budget_bytes) if budget_bytes is not None else None

    def make(ref: ImageRef) -> EngineArrays:
        return materialize_ref(
            ref, lambda f, image: f.engine_pixels([image], device_normalizes=True), None, budget
        )

    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _status_bytes("VmRSS")
    with ThreadPoolExecutor(images) as pool:
        list(pool.map(make, refs))
    return {"growth": _status_bytes("VmHWM") - before, "budget_peak": budget.peak if budget else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--size", type=int, default=8000)
    parser.add_argument("--budget", type=int, default=1_200_000_000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model_dir, assets, budget = json.loads(args.child)
        print(json.dumps(run_one(Path(model_dir), Path(assets), args.images, args.size, budget)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build(Path(tmp) / "model")
        results = {}
        for name, budget in (("unbounded", None), ("budget", args.budget)):
            child = json.dumps([str(model_dir), str(Path(tmp) / name), budget])
            command = [sys.executable, __file__, "--images", str(args.images), "--size", str(args.size)]
            out = subprocess.run([*command, "--child", child], capture_output=True, text=True, check=True)
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    one = decode_cost(args.size, args.size)
    print(f"{args.images} concurrent {args.size}x{args.size} PNG decodes, charged {one / 1e9:.2f} GB each")
    print(f"  unbounded: peak growth {results['unbounded']['growth'] / 1e9:.2f} GB")
    print(
        f"  --decode-bytes {args.budget / 1e9:.2f} GB: peak growth {results['budget']['growth'] / 1e9:.2f} GB "
        f"(budget + one image = {(args.budget + one) / 1e9:.2f} GB; held at most "
        f"{results['budget']['budget_peak'] / 1e9:.2f} GB)"
    )
    print(f"  ratio unbounded / budget: {results['unbounded']['growth'] / results['budget']['growth']:.2f}x")


if __name__ == "__main__":
    main()

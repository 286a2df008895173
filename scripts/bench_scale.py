"""Benchmark the scale-out paths: offload locally vs on Ray, and S3 put/get rates on loopback.

One run prints one Markdown table (docs/scale.md shows one):

- offload of generated rollouts (bench_offload's generator: screenshots, history
  repeated every turn) at two input sizes, the plain local loop (one process)
  beside ``--workers N`` (a process pool of as many CPUs) and ``--ray`` on a local cluster of ``--ray-cpus`` CPUs started once
  (its start-up is timed apart); the ratio is Ray's time over the local loop's;
- S3 through ``ObjectStore`` against moto's server on 127.0.0.1: conditional-create
  puts of distinct images, puts of images already there (read back and verified),
  and verified gets, beside ``AssetStore`` on local disk for the same images.

Needs the ``ray`` and ``s3`` extras and ``moto[server]``. Usage:

    python scripts/bench_scale.py --sizes 4 16 --turns 6 --images 200
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_offload import generate, screenshot  # The same generated rollouts.

from mmoffload.offload import offload_files
from mmoffload.store.local import AssetStore
from mmoffload.store.read import read_verified


def seconds(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def offload_rows(root: Path, sizes: list[int], turns: int, ray_cpus: int) -> list[str]:
    """Time offload locally and on Ray for each size (rollouts); return table rows."""
    import ray

    from mmoffload.runners.ray import RayOptions

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    start = seconds(lambda: ray.init(num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False))
    rows = [f"| Ray local cluster start ({ray_cpus} CPUs) | | {start:.2f} s | | |"]
    try:
        # The first Dataset run starts the workers: timed apart, so each size is measured warm.
        warm = root / "warm-up"
        warm.mkdir()
        jsonl = generate(warm, 1, 2, 256, 160, seed=0)[0]
        first = seconds(
            lambda: offload_files([jsonl], [warm / "out.jsonl"], warm / "assets", ray=RayOptions())
        )
        rows.append(
            f"| first `--ray` run (worker start-up, {jsonl.stat().st_size / 1e3:.0f} KB) | | {first:.2f} s | | |"
        )
        for rollouts in sizes:
            work = root / f"offload-{rollouts}"
            work.mkdir()
            jsonl, _, _, parts = generate(work, rollouts, turns, 1280, 720, seed=rollouts)
            megabytes = jsonl.stat().st_size / 1e6
            local = seconds(
                lambda j=jsonl, w=work: offload_files([j], [w / "local.jsonl"], w / "assets-local")
            )
            pool = seconds(
                lambda j=jsonl, w=work: offload_files(
                    [j], [w / "pool.jsonl"], w / "assets-pool", workers=ray_cpus
                )
            )
            on_ray = seconds(
                lambda j=jsonl, w=work: offload_files(
                    [j], [w / "ray.jsonl"], w / "assets-ray", ray=RayOptions()
                )
            )
            same = (work / "ray.jsonl").read_bytes() == (work / "local.jsonl").read_bytes().replace(
                b"/assets-local/", b"/assets-ray/"
            )
            label = f"offload {megabytes:.1f} MB, {parts} image parts"
            rows.append(f"| {label}: local loop | {megabytes / local:.1f} MB/s | {local:.2f} s | 1.00x | |")
            rows.append(
                f"| {label}: `--workers {ray_cpus}` | {megabytes / pool:.1f} MB/s | {pool:.2f} s | "
                f"{pool / local:.2f}x | |"
            )
            rows.append(
                f"| {label}: `--ray` | {megabytes / on_ray:.1f} MB/s | {on_ray:.2f} s | "
                f"{on_ray / local:.2f}x | same bytes: {same} |"
            )
            shutil.rmtree(work)
    finally:
        ray.shutdown()
    return rows


def s3_rows(root: Path, count: int) -> list[str]:
    """Time puts and gets of ``count`` distinct images on moto's S3 server and on local disk."""
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    try:
        import fsspec

        from mmoffload.store.objects import ObjectStore

        fsspec.filesystem("s3").mkdir("bench-assets")
        rng = random.Random(0)
        images = [screenshot(640, 360, "PNG" if i % 2 else "JPEG", rng) for i in range(count)]
        megabytes = sum(map(len, images)) / 1e6
        disk, store = AssetStore(root / "disk-assets"), ObjectStore("s3://bench-assets/run/images")
        disk.root.mkdir()
        disk_put = seconds(lambda: [disk.put(image) for image in images])
        stored = []
        s3_put = seconds(lambda: stored.extend(store.put(image) for image in images))
        s3_again = seconds(lambda: [store.put(image) for image in images])
        s3_get = seconds(lambda: [read_verified(s.uri, s.hash) for s in stored])
        disk_get = seconds(lambda: [read_verified(disk.root / Path(s.uri).name, s.hash) for s in stored])
    finally:
        server.stop()
    size = f"{count} images, {megabytes:.1f} MB"

    def row(name: str, took: float, baseline: float) -> str:
        return f"| {name} ({size}) | {count / took:.0f} images/s, {megabytes / took:.1f} MB/s | {took:.2f} s | {took / baseline:.2f}x | |"

    return [
        row("local disk put (atomic write)", disk_put, disk_put),
        row("S3 put, conditional create (`If-None-Match: *`)", s3_put, disk_put),
        row("S3 put of existing objects (412, read back, verified)", s3_again, disk_put),
        row("local disk get (read, hash verified)", disk_get, disk_get),
        row("S3 get (read, hash verified)", s3_get, disk_get),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs=2, default=[4, 16], help="rollouts of the two offload inputs"
    )
    parser.add_argument("--turns", type=int, default=6, help="turns per rollout")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--images", type=int, default=200, help="distinct images for the S3 rates")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        rows = offload_rows(root, args.sizes, args.turns, args.ray_cpus) + s3_rows(root, args.images)
    finally:
        shutil.rmtree(root)
    print(f"{os.cpu_count()} CPUs; ratios are against the first row of each group (local loop, local disk)\n")
    print("| what | rate | time | ratio | note |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

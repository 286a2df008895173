"""Benchmark Parquet offload against pyarrow's own read + write of the same file (the floor).

Generates a datasets-style Parquet file (an ``image`` struct column ``{bytes, path}`` of
distinct screenshots-like PNGs beside a text column) of ``--row-groups`` row groups, then
runs, each as a fresh process (median wall of ``--repeat`` runs, interleaved):

- floor: ``pyarrow.parquet`` reads the file row group by row group and writes each to a
  new file (no image work at all);
- project: ``mmoffload offload IN -o OUT --assets A -q`` (a fresh asset directory each run:
  every image is hashed, written and fsynced).

It reports each one's peak resident memory beside the size of one row group and of the
file: with ten row groups, a bounded offload peaks near the floor's, far below the file.

    python scripts/bench_parquet.py --rows-per-group 40 --row-groups 10
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

FLOOR = r"""
import sys

def peak_kib():
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report its parent's.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
import pyarrow.parquet as pq
source, target = sys.argv[1:3]
parquet = pq.ParquetFile(source)
with pq.ParquetWriter(target, parquet.schema_arrow) as writer:
    for group in range(parquet.metadata.num_row_groups):
        writer.write_table(parquet.read_row_group(group))
print(peak_kib())
"""

WHOLE = (
    FLOOR.split("source, target")[0]
    + """
pq.read_table(sys.argv[1])
print(peak_kib())
"""
)

PROJECT = r"""
import sys

def peak_kib():
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report its parent's.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
from mmoffload_cli.app import main
sys.argv = ["mmoffload", "offload", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    if exit.code:
        raise
print(peak_kib())
"""


def screenshot(seed: int, width: int, height: int) -> bytes:
    """A distinct PNG that compresses like a UI screenshot (flat regions, text-like strokes)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), (rng.randrange(256), 240, 240))
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x, y = rng.randrange(width), rng.randrange(height)
        draw.rectangle(
            (x, y, x + rng.randrange(200), y + rng.randrange(40)), fill=(rng.randrange(256), 90, 60)
        )
        draw.text((x, y), f"row {seed} {rng.random():.6f}", fill=(0, 0, 0))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def make_file(path: Path, rows_per_group: int, row_groups: int, width: int, height: int) -> None:
    rows = rows_per_group * row_groups
    images = [{"bytes": screenshot(i, width, height), "path": None} for i in range(rows)]
    table = pa.table({"image": images, "problem": [f"What is shown in screenshot {i}?" for i in range(rows)]})
    pq.write_table(table, path, row_group_size=rows_per_group)


def run(code: str, *args: str) -> tuple[float, int]:
    """Run one variant in a fresh process; return its wall seconds and peak RSS in KiB."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["src", "cli", os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True
    )
    return time.perf_counter() - started, int(result.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows-per-group", type=int, default=40)
    parser.add_argument("--row-groups", type=int, default=10)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = work / "train.parquet"
        make_file(source, args.rows_per_group, args.row_groups, args.width, args.height)
        group = pq.ParquetFile(source).metadata.row_group(0).total_byte_size
        floor, project = [], []
        for attempt in range(args.repeat):
            floor.append(run(FLOOR, str(source), str(work / f"floor{attempt}.parquet")))
            assets = work / f"assets{attempt}"
            project.append(
                run(
                    PROJECT,
                    str(source),
                    "-o",
                    str(work / f"out{attempt}.parquet"),
                    "--assets",
                    str(assets),
                    "-q",
                )
            )
        floor_s, project_s = statistics.median(t for t, _ in floor), statistics.median(t for t, _ in project)
        whole = run(WHOLE, str(source))[1]
        size = source.stat().st_size
        print(f"file: {size / 2**20:.1f} MiB, {args.row_groups} row groups of {group / 2**20:.1f} MiB")
        print(
            f"floor (pyarrow read + write): {floor_s:.2f} s, peak {max(m for _, m in floor) / 1024:.0f} MiB"
        )
        print(
            f"offload:                      {project_s:.2f} s, peak {max(m for _, m in project) / 1024:.0f} MiB"
        )
        print(f"reading the whole file at once (pq.read_table): peak {whole / 1024:.0f} MiB")
        print(f"offload / floor: {project_s / floor_s:.2f}x wall")


if __name__ == "__main__":
    main()

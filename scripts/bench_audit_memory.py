"""Benchmark audit's peak memory against the size of a rank file (not a test).

Writes one run per count in ``--micro-batches``: one step, one rank file of that many
micro batches of ``--tokens`` tokens each (text only: the per-token arrays are what
grows), then runs ``mmoffload audit RUN -q`` in a fresh process per run and reads
its peak resident set (``ru_maxrss``). Audit streams rank files, so the peak should
stay flat: the last line is the ratio of the largest run's peak to the smallest's.

Usage:
    python scripts/bench_audit_memory.py --micro-batches 100 1000 --tokens 3000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mmoffload.contract.wire import MicroBatch, encode

REPO = Path(__file__).resolve().parent.parent


def micro_batch(tokens: int, seed: int) -> MicroBatch:
    """A packed micro batch of one ``tokens``-long sequence, its last half trained."""
    half = tokens // 2
    return MicroBatch(
        input_ids=[(seed * 7919 + i) % 150_000 + 1 for i in range(tokens)],
        loss_mask=[False] * half + [True] * (tokens - half),
        advantages=[0.5] * tokens,
        inference_logprobs=[-0.25] * tokens,
        position_ids=list(range(tokens)),
        sequence_lengths=[tokens],
        temperatures=[1.0] * tokens,
        env_names=["browse"] * tokens,
        seq_lens=[tokens],
        lora_num_tokens=[tokens],
    )


def write_run(run: Path, count: int, tokens: int) -> int:
    """Write a run whose one rank file holds ``count`` micro batches, one at a time; return its size."""
    step = run / "rollouts" / "step_0"
    step.mkdir(parents=True)
    path = step / "rank_0.bin"
    with path.open("wb") as out:
        # A msgpack array32 header, then each element encoded on its own: the writer never holds them all.
        out.write(b"\xdd" + count.to_bytes(4, "big"))
        for seed in range(count):
            out.write(encode(micro_batch(tokens, seed)))
    return path.stat().st_size


def peak_rss(run: Path) -> int:
    """Run ``mmoffload audit RUN -q`` in a fresh process; return its peak resident set in bytes."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "cli"), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-c", "from mmoffload_cli.app import main; main()", "audit", str(run), "-q"]
    process = subprocess.Popen(command, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"audit exited {process.returncode} on {run}")
    return usage.ru_maxrss * 1024  # Linux reports KiB.


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--tokens", type=int, default=3000)
    args = parser.parse_args()
    peaks = []
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as root:
        for count in args.micro_batches:
            run = Path(root) / f"run-{count}"
            size = write_run(run, count, args.tokens)
            peak = peak_rss(run)
            peaks.append(peak)
            print(
                f"{count:>6,} micro batches ({size / 1e6:,.1f} MB rank file): peak RSS {peak / 2**20:,.1f} MiB"
            )
    print(
        f"ratio of peaks, {args.micro_batches[-1]:,} vs {args.micro_batches[0]:,}: {peaks[-1] / peaks[0]:.2f}x"
    )


if __name__ == "__main__":
    main()

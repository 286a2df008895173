"""Benchmark ``mmoffload parity`` per micro batch beside the forward pass alone (not a test).

On the bundled Qwen-VL fixture traces (1280x720 screenshots, three per sample, about
2,900 tokens each) packed two samples to a micro batch, with the tiny random-weight
Qwen2-VL of ``make_tiny_vlm.py`` in float32 on the CPU, it reports per micro batch:

- parity: ``check_micro_batch`` with a cold materializer (read, hash, decode, pixels,
  each sample's forward keeping logits of trained tokens only, the comparison);
- the floor: the forward pass alone, the packed row once on pixels made beforehand, with
  the logits of the trained positions only (the model time parity cannot avoid);
- per_sample: the per-sample forwards alone on the same pixels (what isolating samples costs);
- full_logits: the packed row with every position's logits, as a trainer's plain forward.

Rounds are interleaved; medians are printed with the ratios to the floor. The tiny
model makes the forward cheap, so the ratio here is an upper bound of parity's
overhead: on a real model the forward dominates.

Usage:
    python scripts/bench_parity.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.make_tiny_vlm import build  # noqa: E402

from mmoffload.contract.wire import MicroBatch, read_rank_file  # noqa: E402
from mmoffload.families import Families  # noqa: E402
from mmoffload.materialize import Materializer  # noqa: E402
from mmoffload.parity import check_micro_batch, load_model  # noqa: E402
from mmoffload.parity.forward import sample_kwargs, torch_module  # noqa: E402
from mmoffload.parity.stats import image_indices, sample_bounds, trainable_positions  # noqa: E402
from mmoffload_cli.app import app  # noqa: E402


def make_run(root: Path) -> tuple[Path, list[MicroBatch]]:
    """Offload, refs and pack the fixture traces into a run; return the model and its micro batches."""
    model = build(root / "model")
    run = root / "run"
    for args in (
        ["offload", str(REPO / "fixtures/traces/qwen_vl.jsonl"), "--assets", str(run / "assets/images"),
         "-o", str(root / "offloaded.jsonl")],
        ["refs", str(root / "offloaded.jsonl"), "--run-dir", str(run), "--model", str(model)],
        ["pack", str(run), "--seq-len", "8192"],
    ):  # fmt: skip
        result = CliRunner().invoke(app, [*args, "-q"])
        if result.exit_code:
            sys.exit(result.output)
    return model, read_rank_file(run / "rollouts/step_0/rank_0.bin")


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch = torch_module()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, micro_batches = make_run(Path(tmp))
        model = load_model(model_dir)
        families = Families(model_dir)
        prepared = [Materializer(families, as_torch=True).materialize(mb) for mb in micro_batches]
        family = families.get("qwen_vl")

        def parity() -> None:
            materializer = Materializer(Families(model_dir), as_torch=True)  # cold: reads every image
            for micro_batch in micro_batches:
                check_micro_batch(model, materializer, micro_batch)

        keep = [
            torch.as_tensor(
                np.concatenate([trainable_positions(mb.loss_mask, a, b) for a, b in sample_bounds(mb)]) - 1
            )
            for mb in micro_batches
        ]

        def floor() -> None:
            # The packed row once, logits of the trained positions only: the model time parity cannot avoid.
            with torch.inference_mode():
                for batch, positions in zip(prepared, keep, strict=True):
                    model(**batch.model_kwargs, logits_to_keep=positions, use_cache=False)

        def full_logits() -> None:
            with torch.inference_mode():
                for batch in prepared:
                    model(**batch.model_kwargs, use_cache=False)

        def per_sample() -> None:
            with torch.inference_mode():
                for micro_batch, batch in zip(micro_batches, prepared, strict=True):
                    for start, end in sample_bounds(micro_batch):
                        kwargs = sample_kwargs(
                            batch, family, image_indices(micro_batch, start, end), start, end
                        )
                        positions = trainable_positions(micro_batch.loss_mask, start, end) - start - 1
                        model(**kwargs, logits_to_keep=torch.as_tensor(positions), use_cache=False)

        floor()  # warm-up: first calls allocate
        works = {"parity": parity, "floor": floor, "per_sample": per_sample, "full_logits": full_logits}
        times: dict[str, list[float]] = {name: [] for name in works}
        for _ in range(args.rounds):
            for name, work in works.items():
                times[name].append(timed(work) / len(micro_batches))
        medians = {name: statistics.median(values) for name, values in times.items()}
        tokens = sum(len(mb.input_ids) for mb in micro_batches) / len(micro_batches)
        print(
            f"{len(micro_batches)} micro batches, {tokens:,.0f} tokens each on average, {args.rounds} rounds"
        )
        for name, seconds in medians.items():
            print(
                f"{name:>10}: {seconds * 1e3:8.1f} ms per micro batch ({seconds / medians['floor']:.2f}x the floor)"
            )


if __name__ == "__main__":
    main()

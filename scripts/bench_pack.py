"""Benchmark the pack stage (not a test).

Modes:
- ``pack`` (default): ``pack_batch`` on a synthetic run of ``--traces`` samples
  (Qwen-VL, two images each, about 4,900 tokens) in ``--steps`` steps at
  ``--world-size``; prints seconds per run. Uses only what every version of the
  packer has, so running it with another checkout on ``PYTHONPATH`` measures "before".
- ``partition``: the rank partition (Karmarkar-Karp + swap refinement) at 64, 256
  and 1,024 micro batches per step, the library's beside the plain reference written
  from packing.md in ``tests/test_packing_reference.py``: seconds, ratio, and whether
  both give the same partition.
- ``fingerprints``: one line per random case (``--cases``): a digest of its rank
  files; diff the output of two versions to count the cases that changed.

Usage:
    python scripts/bench_pack.py pack --traces 2000 --world-size 8
    python scripts/bench_pack.py partition --world-size 8
    python scripts/bench_pack.py fingerprints --cases 1000 > after.txt
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
from pathlib import Path

from mmoffload.contract.wire import MMImageRef, MMRefs, TrainingBatch, TrainingSample, encode
from mmoffload.errors import MMOffloadError
from mmoffload.pack import PackOptions, pack_batch

QWEN_IMAGE_PAD = 151655


def sample(rng: random.Random, index: int, n: int, images: int, image_length: int) -> TrainingSample:
    """A Qwen-VL-like sample of ``n`` tokens with ``images`` images spread over its first half."""
    tokens = [rng.randrange(1, 150_000) for _ in range(n)]
    type_ids = [0] * n
    refs = []
    for number in range(images):
        offset = (number + 1) * (n // 2) // (images + 1)
        if offset + image_length > n:
            break
        tokens[offset : offset + image_length] = [QWEN_IMAGE_PAD] * image_length
        type_ids[offset : offset + image_length] = [1] * image_length
        digest = f"{index:016x}{number:016x}"
        uri = f"file:///assets/{digest}.png"
        item = {
            "kind": "prime_raw_mm_item",
            "modality": "image",
            "family": "qwen_vl",
            "raw_image_uri": uri,
            "payload": {"image_grid_thw": [[1, 2, 2 * image_length]]},
        }
        refs.append(MMImageRef(item, digest, uri, offset, image_length))
    prompt = n // 2
    return TrainingSample(
        token_ids=tokens,
        mask=[False] * prompt + [True] * (n - prompt),
        logprobs=[0.0] * prompt + [-0.5] * (n - prompt),
        temperatures=[1.0] * n,
        env_name=f"env{index % 4}",
        mm_refs=MMRefs(refs) if refs else None,
        mm_token_type_ids=type_ids if refs else None,
        advantages=[0.0] * prompt + [0.25] * (n - prompt),
    )


def bench_pack(args: argparse.Namespace) -> None:
    rng = random.Random(0)
    samples = [sample(rng, i, rng.randint(1_000, 8_800), 2 if i % 4 else 0, 256) for i in range(args.traces)]
    per_step = -(-len(samples) // args.steps)
    steps = [
        TrainingBatch(samples[s : s + per_step], k) for k, s in enumerate(range(0, len(samples), per_step))
    ]
    options = PackOptions(seq_len=args.seq_len, pad_multiple=2, world_size=args.world_size)
    tokens = sum(len(s.token_ids) for s in samples)
    best = float("inf")
    for _ in range(args.repeat):
        start = time.perf_counter()
        micro_batches = 0
        for number, batch in enumerate(steps):
            ranks, _ = pack_batch(batch, options, step=number)
            micro_batches += sum(len(rank) for rank in ranks)
        best = min(best, time.perf_counter() - start)
    print(
        f"pack: {len(samples):,} samples, {tokens / 1e6:.1f} M tokens, {len(steps)} steps, world size "
        f"{args.world_size}, {micro_batches:,} micro batches: {best:.2f} s (best of {args.repeat})"
    )


def bench_partition(args: argparse.Namespace) -> None:
    from mmoffload.pack import partition

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.test_packing_reference import ref_partition

    rng = random.Random(1)
    for count in (64, 256, 1_024):
        weights = [rng.randint(8_000, 16_384) for _ in range(count)]
        start = time.perf_counter()
        fast = partition(weights, args.world_size)
        library = time.perf_counter() - start
        start = time.perf_counter()
        plain = ref_partition(weights, args.world_size)
        reference = time.perf_counter() - start
        print(
            f"partition: {count:>5,} micro batches, world size {args.world_size}: library {library:.3f} s, "
            f"plain reference {reference:.3f} s, {reference / library:.1f}x faster, "
            f"same result: {fast == plain}"
        )


def fingerprints(args: argparse.Namespace) -> None:
    rng = random.Random(2)
    for case in range(args.cases):
        world_size = rng.randint(1, 8)
        options = PackOptions(
            seq_len=rng.randint(8, 64), pad_multiple=rng.randint(1, 4), world_size=world_size
        )
        batch = [
            sample(rng, i, rng.randint(1, 64), rng.choice([0, 0, 1, 2]), rng.randint(1, 8))
            for i in range(rng.randint(1, 24))
        ]
        try:
            ranks, _ = pack_batch(TrainingBatch(batch, 0), options, step=0)
            digest = hashlib.sha256(b"".join(encode(rank) for rank in ranks)).hexdigest()[:16]
        except MMOffloadError as exc:  # an error is an output too, to compare
            digest = type(exc).__name__
        print(case, world_size, digest)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", default="pack", choices=("pack", "partition", "fingerprints"))
    parser.add_argument("--traces", type=int, default=2_000)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=16_384)
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cases", type=int, default=1_000)
    args = parser.parse_args()
    {"pack": bench_pack, "partition": bench_partition, "fingerprints": fingerprints}[args.mode](args)


if __name__ == "__main__":
    main()

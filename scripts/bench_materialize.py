"""Benchmark trainer-side materialization (not a test).

Reports, from one run:
- the family's own pixel path beside the reference it reproduces, on the same
  decoded images, once per micro batch: the Hugging Face PIL processor for
  Qwen-VL, families.md's plain float32 recipe for Kimi K2.5 (the speed-up);
- materialize cold (read, hash, decode, pixels, checks) beside read + decode +
  the family's pixels (the overhead ratio);
- the same run again with every image shared by a GRPO group (cache hits);
- the size of one micro batch file with raw refs beside the same micro batch
  with its pixel tensors embedded as ``mm_kwargs`` (the legacy eager transport).

Usage:
    python scripts/bench_materialize.py --family qwen_vl --images 32 --size 1280x720
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmoffload.contract import wire
from mmoffload.contract.spans import IMAGE_TYPE
from mmoffload.families import Families, Family, resolve_model_dir
from mmoffload.families.pixel_cache import PixelCache
from mmoffload.materialize import Materializer
from mmoffload.store.images import to_rgb
from mmoffload.store.local import AssetStore, StoredImage


def screenshot(width: int, height: int, seed: int) -> bytes:
    """Return a PNG that compresses like a UI screenshot: flat panels, text-like strokes, some noise."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.rectangle((x, y, x + int(rng.integers(20, 300)), y + int(rng.integers(10, 120))), fill=color)
    for row in range(0, height, 18):
        draw.text((10, row), f"line {row} of sample {seed}: " + "lorem ipsum " * 8, fill=(20, 20, 20))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def micro_batch(family: Family, images: list[StoredImage]) -> wire.MicroBatch:
    """Return one micro batch holding ``images``, each after a short text prefix."""
    pad = next(token for token, kind in family.token_types.items() if kind == IMAGE_TYPE)
    input_ids: list[int] = []
    type_ids: list[int] = []
    refs: list[wire.MMImageRef] = []
    for image in images:
        with Image.open(image.path) as opened:
            grid = family.layout(*opened.size)
        input_ids += [1] * 16
        type_ids += [0] * 16
        item = {
            "kind": "prime_raw_mm_item",
            "modality": "image",
            "family": family.name,
            "raw_image_uri": image.uri,
            "payload": family.payload(grid),
        }
        length = family.placeholder_length(grid)
        refs.append(wire.MMImageRef(item, image.hash, image.uri, len(input_ids), length))
        input_ids += [pad] * length
        type_ids += [IMAGE_TYPE] * length
    n = len(input_ids)
    return wire.MicroBatch(
        input_ids=input_ids,
        loss_mask=[True] * n,
        advantages=[0.5] * n,
        inference_logprobs=[-0.1] * n,
        position_ids=list(range(n)),
        sequence_lengths=[n],
        temperatures=[1.0] * n,
        env_names=["env"] * n,
        seq_lens=[n],
        mm_refs=wire.MMRefs(refs),
        mm_token_type_ids=type_ids,
    )


def best_seconds(run: Callable[[], object], repeat: int = 3) -> float:
    """Best of ``repeat`` timed calls (the first also warms caches and the allocator)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def reference_pixels(family: Family) -> Callable[[list[Image.Image]], object]:
    """Return the computation the family's own path reproduces, for one micro batch's images."""
    if family.name == "qwen_vl":
        from transformers import AutoImageProcessor

        directory = family.model_dir or resolve_model_dir("qwen3_vl")
        processor = AutoImageProcessor.from_pretrained(str(directory), local_files_only=True, backend="pil")
        return lambda images: processor(images=images, return_tensors="np")
    return lambda images: np.concatenate([kimi_recipe(family, image) for image in images])


def kimi_recipe(family: Family, image: Image.Image) -> np.ndarray:
    """families.md's Kimi K2.5 recipe on the whole float32 image (the implementation before the table)."""
    padded = Image.new("RGB", family.padded_size(*image.size), (0, 0, 0))
    padded.paste(image.resize(family.resized_size(*image.size), Image.Resampling.BICUBIC), (0, 0))
    mean = np.asarray(family.image_mean, dtype=np.float32)
    std = np.asarray(family.image_std, dtype=np.float32)
    values = (np.asarray(padded, dtype=np.float32) / np.float32(255) - mean) / std
    ps = family.patch_size
    grid_h, grid_w = padded.height // ps, padded.width // ps
    rows = values.reshape(grid_h, ps, grid_w, ps, 3).transpose(0, 2, 4, 1, 3)
    return np.ascontiguousarray(rows.reshape(grid_h * grid_w, 3, ps, ps))


def read_decode(paths: list[list[Path]]) -> list[list[Image.Image]]:
    """Read and decode every micro batch's images to RGB, as materialize does."""
    decoded = []
    for batch in paths:
        images = []
        for path in batch:
            with Image.open(io.BytesIO(path.read_bytes())) as image:
                image.load()
                images.append(to_rgb(image))
        decoded.append(images)
    return decoded


def materialize_seconds(families: Families, batches: list[wire.MicroBatch]) -> tuple[float, Materializer]:
    materializer = Materializer(families, cache=PixelCache(8 << 30))
    started = time.perf_counter()
    for batch in batches:
        materializer.materialize(batch)
    return time.perf_counter() - started, materializer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="qwen_vl", choices=["qwen_vl", "kimi_k25"])
    parser.add_argument("--model", default=None, help="Model directory or bundled config name.")
    parser.add_argument("--images", type=int, default=32, help="Distinct images.")
    parser.add_argument("--per-batch", type=int, default=4, help="Images per micro batch.")
    parser.add_argument("--group", type=int, default=8, help="GRPO group size for the cache run.")
    parser.add_argument("--size", default="1280x720", help="Image size WxH.")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    families = Families(resolve_model_dir(args.model) if args.model else None)
    family = families.get(args.family)

    with tempfile.TemporaryDirectory() as tmp:
        store = AssetStore(Path(tmp))
        images = [store.put(screenshot(width, height, seed)) for seed in range(args.images)]
        n = len(images)
        batches = [micro_batch(family, images[i : i + args.per_batch]) for i in range(0, n, args.per_batch)]
        paths = [
            [image.path for image in images[i : i + args.per_batch]] for i in range(0, n, args.per_batch)
        ]
        decoded = read_decode(paths)
        reference = reference_pixels(family)
        reference_s = best_seconds(lambda: [reference(batch) for batch in decoded])
        own_s = best_seconds(lambda: [family.pixels(batch) for batch in decoded])
        read_decode_s = best_seconds(lambda: read_decode(paths))
        materialize_s = min(materialize_seconds(families, batches)[0] for _ in range(3))
        _, materializer = materialize_seconds(families, batches)
        stats = materializer.stats
        group_s, grouped = materialize_seconds(families, [b for b in batches for _ in range(args.group)])

        raw = wire.encode(batches[0])
        result = Materializer(families).materialize(batches[0])
        vision = {name: result.model_kwargs[name] for name in (family.pixel_kwarg, family.grid_kwarg)}
        eager = wire.MicroBatch(
            **{
                **{f: getattr(batches[0], f) for f in wire.MicroBatch.__struct_fields__},
                "mm_kwargs": {
                    name: wire.EncodedTensor(str(a.dtype), list(a.shape), np.ascontiguousarray(a).tobytes())
                    for name, a in vision.items()
                },
                "mm_refs": None,
            }
        )
        eager_bytes = len(wire.encode(eager))
        image_file_bytes = sum(image.path.stat().st_size for image in images[: args.per_batch])

    reference_name = "HF PIL processor" if family.name == "qwen_vl" else "plain float32 recipe"
    own = "own pixel path" if getattr(family, "own_pixels", True) else "HF processor (settings not own)"
    print(f"family {family.name} (patch {family.patch_size}), {n} distinct {width}x{height} PNG screenshots")
    print(f"{reference_name + ' alone:':<34}{n / reference_s:8.1f} images/s ({reference_s:.3f} s)")
    print(
        f"{own + ' alone:':<34}{n / own_s:8.1f} images/s ({own_s:.3f} s), {reference_s / own_s:.2f}x faster"
    )
    base_s = read_decode_s + own_s
    print(f"{'read + decode + ' + own + ':':<34}{n / base_s:8.1f} images/s ({base_s:.3f} s)")
    print(
        f"{'materialize (cold):':<34}{n / materialize_s:8.1f} images/s ({materialize_s:.3f} s), "
        f"overhead {100 * (materialize_s / base_s - 1):+.1f}%"
    )
    print(
        f"  read {stats.read_seconds:.3f} s, hash {stats.hash_seconds:.3f} s, "
        f"decode {stats.decode_seconds:.3f} s, process {stats.process_seconds:.3f} s"
    )
    images_g = grouped.stats.images
    print(
        f"materialize (group of {args.group}, cache): {images_g / group_s:8.1f} images/s over {images_g} refs, "
        f"{grouped.stats.cache_hits} hits, {grouped.stats.images_processed} processed"
    )
    print(f"micro batch of {args.per_batch} images, raw refs:         {len(raw):>12,} bytes")
    print(f"same micro batch, mm_kwargs embedded:  {eager_bytes:>12,} bytes ({eager_bytes / len(raw):,.0f}x)")
    print(f"the {args.per_batch} image files themselves:         {image_file_bytes:>12,} bytes")


if __name__ == "__main__":
    main()

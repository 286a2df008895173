"""Materializing micro batches: pixels, integrity checks, missing-image policies, cache and CLI."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import safetensors.numpy
from PIL import Image
from typer.testing import CliRunner

from mmoffload.contract import rundir, wire
from mmoffload.contract.addresses import content_hash
from mmoffload.contract.spans import IMAGE_TYPE
from mmoffload.errors import BadInputError, IntegrityError, UsageError, Where
from mmoffload.families import Families, Family, Grid, resolve_model_dir
from mmoffload.families.pixel_cache import PixelCache
from mmoffload.materialize import Materializer, MissingImagePolicy
from mmoffload.store.local import StoredImage
from mmoffload_cli.app import app
from tests.builders import descriptor, image_bytes, store_image

FAMILIES = Families()
QWEN = FAMILIES.get("qwen_vl")
KIMI = FAMILIES.get("kimi_k25")


def stored(assets: Path, seed: int, width: int = 64, height: int = 48) -> StoredImage:
    return store_image(assets, image_bytes(width, height, seed=seed))


def decoded(image: StoredImage) -> Image.Image:
    return Image.open(io.BytesIO(image.path.read_bytes())).convert("RGB")


def ref_for(image: StoredImage, family: Family, offset: int, grid: Grid | None = None) -> wire.MMImageRef:
    """Return a ref whose descriptor carries the image's true grid (or ``grid``)."""
    if grid is None:
        with Image.open(image.path) as opened:
            grid = family.layout(*opened.size)
    item = descriptor(image.uri, list(grid), family.name)
    return wire.MMImageRef(item, image.hash, image.uri, offset, family.placeholder_length(grid))


def micro_batch(
    images: list[StoredImage],
    family: Family = QWEN,
    *,
    grids: list[Grid] | None = None,
    weights: bool = False,
    **ref_changes: Any,
) -> wire.MicroBatch:
    """Return a micro batch: two text tokens, then per image its pad tokens and one text token.

    Descriptors carry each image's true grid unless ``grids`` says otherwise; the
    last token trains (loss mask true, advantage 0.5).
    """
    pad = next(token for token, kind in family.token_types.items() if kind == IMAGE_TYPE)
    input_ids, type_ids, refs = [1, 2], [0, 0], []
    for index, image in enumerate(images):
        ref = ref_for(image, family, len(input_ids), grids[index] if grids else None)
        refs.append(msgspec.structs.replace(ref, **ref_changes))
        input_ids += [pad] * ref.length + [3]
        type_ids += [IMAGE_TYPE] * ref.length + [0]
    n = len(input_ids)
    loss_mask = [False] * (n - 1) + [True]
    return wire.MicroBatch(
        input_ids=input_ids,
        loss_mask=loss_mask,
        advantages=[0.5 if trains else 0.0 for trains in loss_mask],
        inference_logprobs=[-0.1] * n,
        position_ids=list(range(n)),
        sequence_lengths=[n],
        temperatures=[1.0] * n,
        env_names=["env"] * n,
        seq_lens=[n],
        mm_refs=wire.MMRefs(refs) if refs else None,
        mm_token_type_ids=type_ids if refs else None,
        rl_weights=[1.0] * n if weights else None,
    )


def test_qwen_micro_batch_gets_the_processors_pixels_in_token_order(tmp_path: Path) -> None:
    first, second = stored(tmp_path, 1, 64, 48), stored(tmp_path, 2, 512, 256)
    batch = Materializer(FAMILIES).materialize(micro_batch([first, second]))
    expected = QWEN.pixels([decoded(first), decoded(second)])
    assert batch.family == "qwen_vl" and batch.policy == QWEN.policy
    assert set(batch.model_kwargs) == {"input_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids"}
    np.testing.assert_array_equal(batch.model_kwargs["pixel_values"], expected["pixel_values"])
    assert batch.model_kwargs["image_grid_thw"].tolist() == [[1, 14, 20], [1, 16, 32]]
    assert batch.loss_mask[-1] and batch.advantages[-1] == 0.5
    assert batch.missing_uris == ()


def test_kimi_micro_batch_passes_position_ids_and_no_type_ids(tmp_path: Path) -> None:
    image = stored(tmp_path, 1, 30, 20)
    batch = Materializer(FAMILIES).materialize(micro_batch([image], KIMI))
    assert set(batch.model_kwargs) == {"input_ids", "position_ids", "pixel_values", "grid_thws"}
    assert batch.model_kwargs["grid_thws"].tolist() == [[1, 2, 4]]
    assert batch.model_kwargs["pixel_values"].shape == (8, 3, 14, 14)
    assert batch.model_kwargs["position_ids"].tolist() == [[0, 1, 2, 3]]  # (1, T), as HF models take it


def test_text_only_micro_batch_has_no_family_and_keeps_position_ids() -> None:
    batch = Materializer(FAMILIES).materialize(micro_batch([]))
    assert batch.family is None and batch.policy is None
    assert set(batch.model_kwargs) == {"input_ids", "position_ids"}


def test_hash_mismatch_is_an_integrity_error_naming_the_uri_and_both_hashes(tmp_path: Path) -> None:
    image = stored(tmp_path, 1)
    other = image_bytes(seed=9)
    image.path.write_bytes(other)
    with pytest.raises(IntegrityError) as caught:
        Materializer(FAMILIES, allowed_roots=[image.path.parent]).materialize(micro_batch([image]))
    message = str(caught.value)
    assert image.uri in message and image.hash in message and content_hash(other) in message


def test_grid_mismatch_is_an_integrity_error_naming_both_grids(tmp_path: Path) -> None:
    image = stored(tmp_path, 1, 64, 48)  # lays out as [1, 14, 20]
    batch = micro_batch([image], grids=[(1, 16, 32)])
    with pytest.raises(IntegrityError) as caught:
        Materializer(FAMILIES).materialize(batch, Where(file="rank_0.bin", index=0))
    message = str(caught.value)
    assert f"Grid mismatch for `{image.uri}`" in message
    assert "expected [1, 16, 32] (descriptor), got [1, 14, 20] (processor)" in message


def test_wrong_placeholder_length_is_rejected(tmp_path: Path) -> None:
    batch = micro_batch([stored(tmp_path, 1)], length=69)
    with pytest.raises(
        BadInputError, match=r"Expected placeholder length 70 for grid \[1, 14, 20\].* got 69"
    ):
        Materializer(FAMILIES).materialize(batch)


def test_missing_files_under_policy_error_name_the_micro_batch_and_every_uri(tmp_path: Path) -> None:
    images = [stored(tmp_path, seed) for seed in (1, 2, 3)]
    batch = micro_batch(images)
    images[0].path.unlink()
    images[2].path.unlink()
    materializer = Materializer(FAMILIES, missing_image_policy=MissingImagePolicy.ERROR)
    with pytest.raises(IntegrityError) as caught:
        materializer.materialize(batch, Where(file="rank_0.bin", index=4))
    message = str(caught.value)
    assert "2 missing" in message and "`rank_0.bin` index 4" in message
    assert images[0].uri in message and images[2].uri in message and images[1].uri not in message


def test_missing_file_under_zero_loss_zeroes_the_whole_micro_batch(tmp_path: Path) -> None:
    present, missing = stored(tmp_path, 1), stored(tmp_path, 2, 512, 256)
    unmaterialized = micro_batch([present, missing], weights=True)
    missing.path.unlink()
    materializer = Materializer(FAMILIES)
    batch = materializer.materialize(unmaterialized)
    assert batch.missing_uris == (missing.uri,)
    assert not batch.loss_mask.any() and not batch.advantages.any()
    assert set(batch.weights) == {"rl_weights", "ce_weights", "ref_kl_weights"}
    assert all(not stream.any() and len(stream) == len(batch.loss_mask) for stream in batch.weights.values())
    grids = batch.model_kwargs["image_grid_thw"].tolist()
    assert grids == [[1, 14, 20], [1, 16, 32]]  # the missing image's grid comes from its descriptor
    pixels = batch.model_kwargs["pixel_values"]
    assert pixels.shape == (280 + 512, 1536)
    assert pixels[:280].any() and not pixels[280:].any()
    assert materializer.stats.images_placeholdered == 1 and materializer.stats.micro_batches_zero_loss == 1


def test_a_micro_batch_with_two_families_is_rejected_naming_both(tmp_path: Path) -> None:
    qwen_batch = micro_batch([stored(tmp_path, 1)])
    kimi_ref = ref_for(stored(tmp_path, 2), KIMI, offset=len(qwen_batch.input_ids) - 1)
    mixed = msgspec.structs.replace(qwen_batch, mm_refs=wire.MMRefs([*qwen_batch.mm_refs.images, kimi_ref]))
    with pytest.raises(
        BadInputError, match=r"one family per micro batch, got `qwen_vl` \(image 0\) and `kimi_k25`"
    ):
        Materializer(FAMILIES).materialize(mixed)


def test_legacy_mm_kwargs_are_refused() -> None:
    legacy = msgspec.structs.replace(
        micro_batch([]), mm_kwargs={"pixel_values": wire.EncodedTensor("float32", [1], b"\x00" * 4)}
    )
    with pytest.raises(BadInputError, match="legacy processed `mm_kwargs` \\(pixel_values\\)"):
        Materializer(FAMILIES).materialize(legacy)


def test_a_stream_of_the_wrong_length_is_rejected() -> None:
    short = msgspec.structs.replace(micro_batch([]), advantages=[0.0])
    with pytest.raises(IntegrityError, match=r"Expected `advantages` with one value per token \(2\), got 1"):
        Materializer(FAMILIES).materialize(short)


def test_refs_without_image_typed_spans_are_rejected(tmp_path: Path) -> None:
    batch = micro_batch([stored(tmp_path, 1)])
    untyped = msgspec.structs.replace(batch, mm_token_type_ids=[0] * len(batch.input_ids))
    with pytest.raises(IntegrityError, match="not all image tokens"):
        Materializer(FAMILIES).materialize(untyped)


def test_an_image_shared_by_micro_batches_is_processed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    families = Families()
    family = families.get("qwen_vl")
    calls: list[int] = []
    original = family.prepare_image
    monkeypatch.setattr(family, "prepare_image", lambda image: calls.append(1) or original(image))
    shared, other = stored(tmp_path, 1), stored(tmp_path, 2)
    materializer = Materializer(families)
    first = materializer.materialize(micro_batch([shared, shared]))
    second = materializer.materialize(micro_batch([other, shared]))
    assert calls == [1, 1]  # one call per distinct image
    assert materializer.stats.images == 4 and materializer.stats.cache_hits == 2
    assert materializer.stats.images_processed == 2
    np.testing.assert_array_equal(
        first.model_kwargs["pixel_values"][:280], second.model_kwargs["pixel_values"][280:]
    )


def test_the_pixel_cache_evicts_the_least_recently_used_past_its_byte_bound() -> None:
    cache = PixelCache(max_bytes=200)
    arrays = {name: {"pixel_values": np.zeros(20, dtype=np.float32)} for name in "abc"}  # 80 bytes each
    cache.put(("f", "a"), arrays["a"])
    cache.put(("f", "b"), arrays["b"])
    assert cache.get(("f", "a")) is not None  # a is now the most recently used
    cache.put(("f", "c"), arrays["c"])
    assert cache.get(("f", "b")) is None and cache.get(("f", "a")) is not None
    assert cache.bytes == 160 and len(cache) == 2
    cache.put(("f", "big"), {"pixel_values": np.zeros(100, dtype=np.float32)})
    assert len(cache) == 2  # larger than the bound: not cached


def test_as_torch_returns_tensors(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    batch = Materializer(FAMILIES, as_torch=True).materialize(micro_batch([stored(tmp_path, 1)]))
    assert isinstance(batch.model_kwargs["pixel_values"], torch.Tensor)
    assert batch.loss_mask.dtype == torch.bool


def test_as_torch_without_torch_is_a_usage_error() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(UsageError, match="torch"):
            Materializer(FAMILIES, as_torch=True)
    else:
        pytest.skip("torch is installed")


# CLI


def write_run(run: Path, batches: list[wire.MicroBatch], step: int = 0, rank: int = 0) -> None:
    path = rundir.rank_path(run, step, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wire.encode(batches))


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(app, ["materialize", *args])


def test_cli_materializes_every_micro_batch_and_reports_cache_hits(tmp_path: Path) -> None:
    assets = tmp_path / "assets" / "images"
    shared, other = stored(assets, 1), stored(assets, 2, 30, 20)
    write_run(tmp_path, [micro_batch([shared]), micro_batch([]), micro_batch([shared, other])])
    write_run(tmp_path, [micro_batch([shared])], rank=1)
    result = run_cli(str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    report = msgspec.json.decode(result.stdout)
    assert report["rank_files"] == 2 and report["micro_batches"] == 4
    assert report["micro_batches_multimodal"] == 3
    assert report["images"] == 4 and report["images_processed"] == 2 and report["cache_hits"] == 2
    assert report["images_placeholdered"] == 0
    assert report["pixel_bytes"] == 280 * 4 * 1536 * 4 + 4 * 3 * 8  # four images of 280 rows, four grid rows


def test_cli_saves_safetensors_readable_without_torch(tmp_path: Path) -> None:
    image = stored(tmp_path / "assets", 1)
    qwen2_5 = Families(resolve_model_dir("qwen2_5_vl")).get("qwen_vl")
    write_run(tmp_path, [micro_batch([]), micro_batch([image], qwen2_5)], step=3, rank=1)
    out = tmp_path / "saved"
    result = run_cli(str(tmp_path), "--model", "qwen2_5_vl", "--save", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert msgspec.json.decode(result.stdout)["files_saved"] == 2
    assert sorted(p.name for p in (out / "step_3").iterdir()) == [
        "rank_1_mb_0.safetensors",
        "rank_1_mb_1.safetensors",
    ]
    tensors = safetensors.numpy.load_file(out / "step_3" / "rank_1_mb_1.safetensors")
    assert set(tensors) == {
        "input_ids",
        "pixel_values",
        "image_grid_thw",
        "mm_token_type_ids",
        "loss_mask",
        "advantages",
    }
    assert tensors["pixel_values"].shape[1] == 3 * 2 * 14 * 14  # the bundled Qwen2.5-VL config: patch 14
    assert tensors["loss_mask"].dtype == np.bool_ and tensors["loss_mask"][-1]


def test_cli_exits_1_when_a_missing_image_was_placeholdered(tmp_path: Path) -> None:
    image = stored(tmp_path / "assets", 1)
    write_run(tmp_path, [micro_batch([image])])
    image.path.unlink()
    out = tmp_path / "saved"
    result = run_cli(str(tmp_path), "--save", str(out), "--json")
    assert result.exit_code == 1
    report = msgspec.json.decode(result.stdout)
    assert report["images_placeholdered"] == 1 and report["micro_batches_zero_loss"] == 1
    saved = safetensors.numpy.load_file(out / "step_0" / "rank_0_mb_0.safetensors")
    assert not saved["loss_mask"].any() and not saved["rl_weights"].any()


def test_cli_rejects_descriptors_laid_out_for_another_model(tmp_path: Path) -> None:
    write_run(tmp_path, [micro_batch([stored(tmp_path / "assets", 1)])])  # Qwen3-VL grids
    result = run_cli(str(tmp_path), "--model", "qwen2_5_vl")
    assert result.exit_code == 2
    assert "expected [1, 14, 20] (descriptor), got [1, 4, 4] (processor)" in result.stderr


def test_cli_policy_error_exits_2_naming_the_missing_uri(tmp_path: Path) -> None:
    image = stored(tmp_path / "assets", 1)
    write_run(tmp_path, [micro_batch([image])])
    image.path.unlink()
    result = run_cli(str(tmp_path), "--missing-image-policy", "error")
    assert result.exit_code == 2
    assert image.uri in result.stderr and "rank_0.bin" in result.stderr
    assert result.stdout == ""


def test_cli_without_rank_files_exits_2(tmp_path: Path) -> None:
    result = run_cli(str(tmp_path))
    assert result.exit_code == 2
    assert "found none" in result.stderr

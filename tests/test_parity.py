"""``mmoffload parity`` with the Hugging Face model on both sides (no vLLM needed).

The "inference" log-probs are the tiny Qwen2-VL's own, computed one sample at a
time with full logits on undamaged inputs; the run is then damaged the ways the
field has shipped, and each damaged sample must be flagged, the others not.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mmoffload.contract.wire import MicroBatch, MMImageRef, MMRefs, TrainingBatch, TrainingSample
from mmoffload.families import Families
from mmoffload.materialize import Materializer
from mmoffload.pack import PackOptions, pack_batch
from mmoffload.parity import DEFAULT_THRESHOLD, Status, check_micro_batch, load_model, parity_run
from mmoffload.parity.stats import mismatch, sample_bounds, trainable_positions
from mmoffload_cli.app import app
from tests.builders import (
    QWEN_IMAGE_PAD,
    QWEN_VISION_END,
    QWEN_VISION_START,
    descriptor,
    single_micro_batch,
    store_image,
    write_run,
)
from tests.test_packaging import run_without_extras
from tests.test_progress import forced_terminal, shown

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parent.parent
SIZE = (160, 128)  # grid [1, 8, 10] on the tiny model: 20 image tokens
# Images per sample: sample 4 has two, sample 5 none (text only).
IMAGES = (1, 1, 1, 1, 2, 0)
COMPLETION = 6
runner = CliRunner()
Transform = Callable[[dict[str, Any]], dict[str, Any]]


def scene_png(seed: int) -> bytes:
    """A distinct picture per seed: a background colour and a few coloured boxes."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((SIZE[1], SIZE[0], 3), dtype=np.uint8)
    pixels[...] = rng.integers(0, 256, 3)
    for _ in range(4):
        top, left = rng.integers(0, SIZE[1] - 16), rng.integers(0, SIZE[0] - 16)
        pixels[top : top + rng.integers(8, 64), left : left + rng.integers(8, 64)] = rng.integers(0, 256, 3)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@dataclass(frozen=True)
class Fixture:
    model_dir: Path
    model: Any
    family: Any
    # Each sample's clean "inference" log-probs, computed once.
    logprobs: list[list[float]]


def build_tiny_model(out_dir: Path) -> Path:
    spec = importlib.util.spec_from_file_location("make_tiny_vlm", REPO / "scripts" / "make_tiny_vlm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(out_dir)


def sample(assets: Path, number: int, family: Any) -> TrainingSample:
    """A prompt with its images between text, then COMPLETION trained tokens."""
    tokens, refs = [72, 105], []
    for image in range(IMAGES[number]):
        stored = store_image(assets, scene_png(10 * number + image))
        grid = family.layout(*SIZE)
        tokens.append(QWEN_VISION_START)
        length = family.placeholder_length(grid)
        refs.append(
            MMImageRef(descriptor(stored.uri, list(grid)), stored.hash, stored.uri, len(tokens), length)
        )
        tokens += [QWEN_IMAGE_PAD] * length + [QWEN_VISION_END, 32]
    prompt = len(tokens)
    tokens += [40 + (7 * number + 13 * i) % 200 for i in range(COMPLETION)]
    n = len(tokens)
    return TrainingSample(
        token_ids=tokens,
        mask=[False] * prompt + [True] * COMPLETION,
        logprobs=[0.0] * n,
        temperatures=[1.0] * n,
        env_name="browse",
        mm_refs=MMRefs(refs) if refs else None,
        mm_token_type_ids=[int(t == QWEN_IMAGE_PAD) for t in tokens] if refs else None,
    )


def reference_logprobs(
    fixture: Fixture, sample: TrainingSample, transform: Transform | None = None
) -> list[float]:
    """The sample's log-probs from one plain forward with full logits, on its mask-true tokens."""
    batch = Materializer(Families(fixture.model_dir), as_torch=True).materialize(single_micro_batch(sample))
    kwargs = transform(dict(batch.model_kwargs)) if transform else batch.model_kwargs
    with torch.inference_mode():
        logits = fixture.model(**kwargs).logits[0].float()
    picked = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(sample.token_ids[1:])[:, None])[:, 0]
    values = [0.0, *picked.double().tolist()]
    return [value if trained else 0.0 for value, trained in zip(values, sample.mask, strict=True)]


def normalize_again(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The engine's device normalization applied to pixels the processor already normalized."""
    pixels = kwargs["pixel_values"]
    rows = pixels.reshape(len(pixels), 3, -1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[None, :, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[None, :, None]
    return {**kwargs, "pixel_values": ((rows / 255 - mean) / std).reshape(pixels.shape)}


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    root = tmp_path_factory.mktemp("parity")
    model_dir = build_tiny_model(root / "model")
    family = Families(model_dir).get("qwen_vl")
    made = Fixture(model_dir, load_model(model_dir), family, [])
    for number in range(len(IMAGES)):
        made.logprobs.append(reference_logprobs(made, sample(root / "assets", number, family)))
    return made


def make_run(
    fixture: Fixture, run: Path, damaged: dict[int, Transform] | None = None
) -> tuple[Path, list[MicroBatch]]:
    """Pack the samples three to a micro batch into a run holding their images.

    ``damaged`` maps a sample number to a change of its pixels on the inference side.
    """
    samples = []
    for number in range(len(IMAGES)):
        made = sample(run / "assets" / "images", number, fixture.family)
        transform = (damaged or {}).get(number)
        logprobs = reference_logprobs(fixture, made, transform) if transform else fixture.logprobs[number]
        samples.append(msgspec.structs.replace(made, logprobs=logprobs))
    ranks, _ = pack_batch(TrainingBatch(samples, 0), PackOptions(seq_len=100), 0)
    write_run(run, ranks=ranks)
    return run, ranks[0]


def sample_keys(report: Any, *statuses: Status) -> set[tuple[int, int]]:
    return {(s.micro_batch, s.index) for s in report.per_sample if s.status in statuses}


def key_of(ranks: list[MicroBatch], token_ids: list[int]) -> tuple[int, int]:
    """Return (micro batch, index) of the packed sample with these tokens."""
    for number, micro_batch in enumerate(ranks):
        for index, (start, end) in enumerate(sample_bounds(micro_batch)):
            if micro_batch.input_ids[start:end][: len(token_ids)] == token_ids:
                return number, index
    raise AssertionError("sample not packed")


def rewrite(run: Path, micro_batches: list[MicroBatch]) -> None:
    write_run(run, ranks=[micro_batches])


def run_parity(run: Path, fixture: Fixture, *args: str) -> tuple[int, dict[str, Any]]:
    result = runner.invoke(app, ["parity", str(run), "--model", str(fixture.model_dir), "--json", *args])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def flagged(report: dict[str, Any]) -> dict[tuple[int, int], str]:
    return {(s["micro_batch"], s["index"]): s["status"] for s in report["per_sample"] if s["status"] != "ok"}


# --- the numbers ------------------------------------------------------------------------------


def test_mismatch_kl_is_the_mean_of_exp_d_minus_1_minus_d() -> None:
    kl, mean_abs, max_abs = mismatch(np.array([-1.0, -2.0]), np.array([-1.1, -1.8]))

    assert kl == pytest.approx(((np.exp(0.1) - 1 - 0.1) + (np.exp(-0.2) - 1 + 0.2)) / 2)
    assert (mean_abs, max_abs) == (pytest.approx(0.15), pytest.approx(0.2))


def test_a_samples_first_token_is_never_compared() -> None:
    assert trainable_positions([True, True, False, True, True], 0, 3).tolist() == [1]
    assert trainable_positions([True, True, False, True, True], 3, 5).tolist() == [4]


# --- clean runs ---------------------------------------------------------------------------------


def test_clean_run_gives_every_sample_a_tiny_kl(fixture: Fixture, tmp_path: Path) -> None:
    run, ranks = make_run(fixture, tmp_path / "run")

    code, report = run_parity(run, fixture)

    assert code == 0 and report["ok"] is True
    assert [len(mb.sequence_lengths) for mb in ranks] == [3, 3]
    assert (report["micro_batches"], report["micro_batches_checked"], report["samples_compared"]) == (2, 2, 6)
    assert report["tokens"] == 6 * COMPLETION
    assert report["kl_max"] < 1e-9
    assert [s["status"] for s in report["per_sample"]] == ["ok"] * 6


def test_the_bar_on_a_terminal_counts_up_to_the_micro_batches_checked(
    fixture: Fixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, _ = make_run(fixture, tmp_path / "run")
    screen = forced_terminal(monkeypatch)

    run_parity(run, fixture)

    assert "2/2 micro batches, " in shown(screen), shown(screen)


def test_packed_samples_must_not_see_each_other(fixture: Fixture, tmp_path: Path) -> None:
    # Why parity runs each sample alone: one plain forward of the packed row lets later samples
    # attend to earlier ones, and its KL on this clean run is as large as a damaged one's.
    _, ranks = make_run(fixture, tmp_path / "run")
    micro_batch = ranks[0]
    batch = Materializer(Families(fixture.model_dir), as_torch=True).materialize(micro_batch)
    with torch.inference_mode():
        logits = fixture.model(**batch.model_kwargs).logits[0].float()
    positions = np.concatenate(
        [trainable_positions(micro_batch.loss_mask, s, e) for s, e in sample_bounds(micro_batch)]
    )
    targets = torch.tensor(micro_batch.input_ids)[positions]
    plain = torch.log_softmax(logits[positions - 1], -1).gather(1, targets[:, None])[:, 0].double().numpy()

    kl, _, _ = mismatch(plain, np.asarray(micro_batch.inference_logprobs)[positions])

    assert kl > DEFAULT_THRESHOLD


def test_check_micro_batch_is_a_live_check_for_a_trainer(fixture: Fixture, tmp_path: Path) -> None:
    _, ranks = make_run(fixture, tmp_path / "run")
    materializer = Materializer(Families(fixture.model_dir), as_torch=True)

    results = check_micro_batch(fixture.model, materializer, ranks[1], index=1)

    assert [(r.index, r.status, r.tokens) for r in results] == [(i, Status.OK, COMPLETION) for i in range(3)]
    assert results[0].label() == "micro batch 1 sample 0" and results[0].step is None


# --- damaged runs -------------------------------------------------------------------------------


def test_swapped_images_flag_both_samples_and_no_other(fixture: Fixture, tmp_path: Path) -> None:
    run, ranks = make_run(fixture, tmp_path / "run")
    first, second = ranks[0].mm_refs.images[0], ranks[1].mm_refs.images[0]
    # Valid files, valid hashes, the other sample's pixels.
    swapped = [
        msgspec.structs.replace(
            ranks[0], mm_refs=MMRefs([_retarget(first, second), *ranks[0].mm_refs.images[1:]])
        ),
        msgspec.structs.replace(
            ranks[1], mm_refs=MMRefs([_retarget(second, first), *ranks[1].mm_refs.images[1:]])
        ),
    ]
    rewrite(run, swapped)

    code, report = run_parity(run, fixture)

    assert code == 1 and report["samples_over_threshold"] == 2
    assert set(flagged(report)) == {_owner(ranks, 0, first), _owner(ranks, 1, second)}
    assert report["per_sample"][1]["kl"] > DEFAULT_THRESHOLD


def test_missing_image_is_reported_as_missing_not_measured(fixture: Fixture, tmp_path: Path) -> None:
    run, ranks = make_run(fixture, tmp_path / "run")
    gone = ranks[1].mm_refs.images[0]
    Path(gone.uri.removeprefix("file://")).unlink()

    code, report = run_parity(run, fixture)

    assert code == 1
    assert flagged(report) == {_owner(ranks, 1, gone): "missing_image"}
    worst = report["per_sample"][0]
    assert worst["kl"] is None and worst["images"][0]["missing"] is True
    assert worst["images"][0]["hash"] == gone.hash and worst["tokens"] == COMPLETION
    assert report["samples_compared"] == 5


def test_pixels_normalized_twice_at_inference_are_flagged(fixture: Fixture, tmp_path: Path) -> None:
    run, ranks = make_run(fixture, tmp_path / "run", damaged={2: normalize_again})

    code, report = run_parity(run, fixture)

    assert code == 1
    assert set(flagged(report)) == {key_of(ranks, sample(tmp_path / "x", 2, fixture.family).token_ids)}


def test_a_smaller_max_pixels_on_the_trainer_stops_every_image_micro_batch(
    fixture: Fixture, tmp_path: Path
) -> None:
    run, _ = make_run(fixture, tmp_path / "run")
    trainer_model = tmp_path / "trainer-model"
    shutil.copytree(fixture.model_dir, trainer_model)
    config_path = trainer_model / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config["max_pixels"] = config["size"]["longest_edge"] = 128 * 96
    config_path.write_text(json.dumps(config))

    result = runner.invoke(app, ["parity", str(run), "--model", str(trainer_model), "--json"])

    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["samples_not_materialized"] == 6
    assert "Grid mismatch" in report["per_sample"][0]["message"]


# --- the command ----------------------------------------------------------------------------------


def test_max_micro_batches_says_how_many_were_checked(fixture: Fixture, tmp_path: Path) -> None:
    run, _ = make_run(fixture, tmp_path / "run")

    result = runner.invoke(
        app, ["parity", str(run), "--model", str(fixture.model_dir), "--max-micro-batches", "1"]
    )

    assert result.exit_code == 0, result.output
    assert "parity: checking 1 of 2 micro batches" in result.stderr
    assert "1 of 2 micro batches checked" in result.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--device", "cuda"], "Expected a CUDA device"),
        (["--steps", "7"], "Expected steps of the run (0), got 7"),
        (["--steps", "two"], "Expected --steps as N, N,M or N-M"),
        (["--dtype", "float16"], "--dtype in float32, bfloat16"),
    ],
)
def test_what_cannot_run_exits_2_naming_why(
    fixture: Fixture, tmp_path: Path, args: list[str], words: str
) -> None:
    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    run, _ = make_run(fixture, tmp_path / "run")

    result = runner.invoke(app, ["parity", str(run), "--model", str(fixture.model_dir), *args])

    assert result.exit_code == 2
    assert words in result.stderr and "Traceback" not in result.output


def test_library_run_names_each_sample_by_step_rank_and_micro_batch(fixture: Fixture, tmp_path: Path) -> None:
    run, _ = make_run(fixture, tmp_path / "run")

    report = parity_run(run, model=fixture.model_dir, steps=[0])

    assert {(s.step, s.rank) for s in report.per_sample} == {(0, 0)}
    assert report.per_step[0].samples == 6 and report.per_step[0].kl_max == report.kl_max


def _retarget(ref: MMImageRef, other: MMImageRef) -> MMImageRef:
    """``ref``'s span with ``other``'s image (descriptor, hash, file)."""
    return MMImageRef(other.item, other.hash, other.uri, ref.offset, ref.length)


def _owner(ranks: list[MicroBatch], number: int, ref: MMImageRef) -> tuple[int, int]:
    bounds = sample_bounds(ranks[number])
    return number, next(i for i, (start, end) in enumerate(bounds) if start <= ref.offset < end)


def test_html_page_plots_each_sample_and_shows_the_worst_with_images(
    fixture: Fixture, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    run, ranks = make_run(fixture, tmp_path / "run")
    Path(ranks[0].mm_refs.images[0].uri.removeprefix("file://")).unlink()
    page = tmp_path / "parity.html"

    result = runner.invoke(
        app, ["parity", str(run), "--model", str(fixture.model_dir), "--html", str(page), "-q"]
    )

    assert result.exit_code == 1, result.output
    text = page.read_text()
    assert "data-plot='kl'" in text and "<svg" in text
    statuses = re.findall(r"<section class='sample[^']*' data-status='(\w+)'", text)
    assert statuses == ["missing_image"] + ["ok"] * 5
    assert text.count("class='missing-image'") == 1 and text.count("<img src='data:image/jpeg") == 5


def test_parity_without_torch_says_which_extra_to_install(tmp_path: Path) -> None:
    assert run_without_extras("demo", "--run-dir", str(tmp_path / "demo"), "-q").returncode == 0

    result = run_without_extras("parity", str(tmp_path / "demo" / "qwen_vl"), "--model", "qwen3_vl")

    assert result.returncode == 2
    assert "needs `torch`, from the `torch` extra: pip install 'mmoffload[torch]'" in result.stderr
    assert "Traceback" not in result.stderr

"""The render stage: chat rollouts to v1 episodes with the model's tokenizer and chat template."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mmoffload.assets import AssetStore
from mmoffload.errors import BadInputError, IntegrityError
from mmoffload.families import Families
from mmoffload.render import Renderer, RenderOptions, load_tokenizer, render_files, render_rollout
from mmoffload.render.tiny import write_tiny_model
from mmoffload_cli.app import app
from tests.builders import data_url, image_bytes

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
QWEN_PAD, QWEN_IM_END, KIMI_PAD = 151655, 151645, 163605


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: write_tiny_model(root / name, name) for name in ("qwen3_vl", "qwen2_5_vl", "kimi_k25")}


def renderer(model_dir: Path, assets: Path | None = None) -> Renderer:
    return Renderer(load_tokenizer(model_dir), Families(model_dir), assets=assets)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def chat(image_parts: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """An OpenAI chat rollout: system, a user turn with ``image_parts``, one assistant reply."""
    return {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is shown?"}, *image_parts]},
            {"role": "assistant", "content": "A box."},
        ],
        **extra,
    }


def nodes(episode: dict[str, Any]) -> list[dict[str, Any]]:
    return episode["traces"][0]["nodes"]


def tokens(episode: dict[str, Any]) -> list[int]:
    return [token for node in nodes(episode) for token in node["token_ids"]]


@pytest.mark.parametrize(("config", "family"), [("qwen3_vl", "qwen_vl"), ("kimi_k25", "kimi_k25")])
def test_fixture_rollouts_render_to_the_fixture_traces_token_for_token(
    models: dict[str, Path], tmp_path: Path, config: str, family: str
) -> None:
    out = tmp_path / "episodes.jsonl"
    report = render_files(
        [FIXTURES / "rollouts" / "mini_browse.jsonl"], out, models[config], RenderOptions(assets=tmp_path / "a")
    )
    assert (report.rollouts, report.images, report.images_read, report.sampled_nodes) == (4, 12, 9, 12)
    expected = [json.loads(line) for line in (FIXTURES / "traces" / f"{family}.jsonl").open()]
    for ours, theirs in zip(map(json.loads, out.open()), expected, strict=True):
        for node, fixture in zip(nodes(ours), nodes(theirs), strict=True):
            assert node["token_ids"] == fixture["token_ids"]
            assert node["mask"] == fixture["mask"]
            placeholders = fixture.get("multi_modal_data", {}).get("mm_placeholders")
            assert node.get("multi_modal_data", {}).get("mm_placeholders") == placeholders
        assert ours["example_id"] == theirs["traces"][0]["example_id"]
        assert ours["env"] == {"id": "mini-browse"}


def test_patch_14_model_expands_a_1280x720_image_to_1196_pads(models: dict[str, Path], tmp_path: Path) -> None:
    screenshot = (FIXTURES / "images" / "start_page.png").as_uri()
    episode, _ = renderer(models["qwen2_5_vl"]).rollout(chat([{"type": "image_url", "image_url": {"url": screenshot}}]))
    sidecar = nodes(episode)[1]["multi_modal_data"]
    assert sidecar["mm_items"]["image"][0]["payload"] == {"image_grid_thw": [[1, 52, 92]]}
    assert sidecar["mm_placeholders"]["image"] == [{"offset": sidecar["mm_placeholders"]["image"][0]["offset"], "length": 1196}]
    assert tokens(episode).count(QWEN_PAD) == 1196


def image_shapes(tmp_path: Path) -> dict[str, tuple[dict[str, Any], list[Any] | None]]:
    """Every image part shape for one image, each with its `images` column (TRL) or None."""
    data = image_bytes(96, 64)
    path = tmp_path / "shot.png"
    path.write_bytes(data)
    url, uri = data_url(data), path.as_uri()
    encoded = base64.b64encode(data).decode()
    return {
        "openai data URL": ({"type": "image_url", "image_url": {"url": url, "detail": "high"}}, None),
        "openai file URI": ({"type": "image_url", "image_url": {"url": uri}}, None),
        "openai string": ({"type": "image_url", "image_url": url}, None),
        "responses": ({"type": "input_image", "image_url": uri}, None),
        "hf url": ({"type": "image", "url": url}, None),
        "hf path": ({"type": "image", "path": str(path)}, None),
        "hf image": ({"type": "image", "image": uri}, None),
        "hf datasets image": ({"type": "image", "image": {"bytes": encoded, "path": None}}, None),
        "trl path": ({"type": "image"}, [str(path)]),
        "trl file URI": ({"type": "image"}, [uri]),
        "trl datasets": ({"type": "image"}, [{"bytes": encoded, "path": "shot.png"}]),
    }


def test_every_image_part_shape_renders_the_same_tokens_and_hash(models: dict[str, Path], tmp_path: Path) -> None:
    rendered = {}
    for name, (part, column) in image_shapes(tmp_path).items():
        record = chat([part]) if column is None else {**chat([part]), "images": column}
        episode, _ = renderer(models["qwen3_vl"], tmp_path / "assets").rollout(record)
        sidecar = nodes(episode)[1]["multi_modal_data"]
        rendered[name] = (tokens(episode), sidecar["mm_hashes"]["image"], sidecar["mm_items"]["image"][0]["payload"])
    baseline = rendered["openai data URL"]
    assert baseline[2] == {"image_grid_thw": [[1, 14, 20]]}  # 96x64 scaled up to 320x224 (min_pixels 65,536)
    assert {name: value == baseline for name, value in rendered.items()} == dict.fromkeys(rendered, True)


def test_verifiers_prompt_and_completion_render_like_the_same_messages(models: dict[str, Path]) -> None:
    messages = chat([])["messages"]
    as_verifiers = {"prompt": messages[:2], "completion": messages[2:], "reward": 1.0, "task": "t"}
    ours = renderer(models["kimi_k25"]).rollout(as_verifiers)[0]
    theirs = renderer(models["kimi_k25"]).rollout(chat([]))[0]
    assert tokens(ours) == tokens(theirs)
    assert (ours["reward"], ours["task"], ours["env"]) == (1.0, "t", {"id": ""})


def test_string_prompt_and_completion_are_one_user_and_one_assistant_message(models: dict[str, Path]) -> None:
    episode = renderer(models["kimi_k25"]).rollout({"prompt": "Hi", "completion": "Yo"})[0]
    assert [node["sampled"] for node in nodes(episode)] == [False, True]
    assert bytes(t for t in nodes(episode)[1]["token_ids"] if t < 256) == b"assistantYo"


def test_trl_images_column_fills_placeholders_in_order(models: dict[str, Path], tmp_path: Path) -> None:
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    first.write_bytes(image_bytes(64, 64, seed=1))
    second.write_bytes(image_bytes(128, 64, seed=2))
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "image"}]},
            {"role": "assistant", "content": "done"},
        ],
        "images": [str(first), str(second)],
    }
    episode, counts = renderer(models["qwen3_vl"]).rollout(record)
    items = [nodes(episode)[i]["multi_modal_data"]["mm_items"]["image"][0] for i in (0, 2)]
    assert [item["raw_image_uri"] for item in items] == [first.as_uri(), second.as_uri()]
    assert [item["payload"] for item in items] == [{"image_grid_thw": [[1, 16, 16]]}, {"image_grid_thw": [[1, 12, 24]]}]
    assert (counts.images, counts.sampled_nodes) == (2, 2)

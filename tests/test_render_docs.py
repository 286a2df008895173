"""docs/render.md's five commands, run as written from a results.jsonl to the audit."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmoffload.render.tiny import write_tiny_model
from mmoffload_cli.app import app

REPO = Path(__file__).resolve().parent.parent


def five_commands() -> list[str]:
    text = (REPO / "docs" / "render.md").read_text()
    section = text.split("## From `results.jsonl` to `audit` in five commands", 1)[1]
    [block] = re.findall(r"```bash\n(.*?)```", section, re.S)[:1]
    return block.strip().splitlines()


def test_the_walkthrough_has_five_commands() -> None:
    assert [line.split()[1] for line in five_commands()] == ["offload", "render", "refs", "pack", "audit"]


@pytest.mark.parametrize("config", ["qwen3_vl", "kimi_k25"])
def test_the_five_commands_take_a_results_file_to_a_clean_audit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str
) -> None:
    shutil.copyfile(REPO / "fixtures" / "rollouts" / "mini_browse.jsonl", tmp_path / "results.jsonl")
    variables = {"RUN": str(tmp_path / "run"), "MODEL": str(write_tiny_model(tmp_path / "model", config))}
    monkeypatch.chdir(tmp_path)
    for line in five_commands():
        args = [re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], arg) for arg in shlex.split(line)]
        result = CliRunner().invoke(app, args[1:])
        assert result.exit_code == 0, (line, result.output)
    assert "audit: ok, no violations" in result.output


def test_the_refs_page_episode_is_one_refs_takes_as_described(tmp_path: Path) -> None:
    from mmoffload.contract.wire import TRAINING_BATCH_DECODER
    from mmoffload.refs import build_refs
    from mmoffload.store.local import AssetStore
    from tests.builders import image_bytes

    text = (REPO / "docs" / "refs.md").read_text().split("## A complete small episode", 1)[1]
    [block] = re.findall(r"```json\n(.*?)```", text, re.S)[:1]
    # The page's screenshot is the builders' 1280x720 image, stored under the run's assets.
    stored = AssetStore(tmp_path / "run" / "assets" / "images").put(image_bytes(1280, 720))
    if stored.hash not in block:
        pytest.skip("this Pillow encodes the builders' image to other bytes than the page's")
    source = tmp_path / "episode.jsonl"
    source.write_text(
        block.replace(f"file:///runs/r1/assets/images/{stored.hash}.png", stored.uri).replace("\n", " ")
        + "\n"
    )
    build_refs([source], tmp_path / "run")
    [sample] = TRAINING_BATCH_DECODER.decode(
        (tmp_path / "run/rollouts/step_0/train_rollouts.bin").read_bytes()
    ).examples
    assert len(sample.token_ids) == 32
    assert sample.logprobs == [0.0] * 29 + [-0.25, -0.5, -0.125]
    assert sample.mm_token_type_ids == [0] * 15 + [1] + [0] * 16
    assert sample.mm_refs is not None and [(r.offset, r.length) for r in sample.mm_refs.images] == [(15, 1)]

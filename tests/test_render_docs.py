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

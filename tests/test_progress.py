"""refs and pack draw a progress bar on a terminal, and nothing on a pipe."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from mmoffload.demo import fixtures_dir
from mmoffload.offload import offload_files
from mmoffload_cli import sink
from mmoffload_cli.app import app

runner = CliRunner()


def refs_then_pack(tmp_path: Path) -> list[str]:
    traces = tmp_path / "offloaded.jsonl"
    offload_files(
        [fixtures_dir() / "traces" / "qwen_vl.jsonl"], [traces], tmp_path / "run" / "assets" / "images"
    )
    run = str(tmp_path / "run")
    refs = runner.invoke(app, ["refs", str(traces), "--run-dir", run, "--model", "qwen3_vl"])
    pack = runner.invoke(app, ["pack", run, "--seq-len", "4096"])
    assert (refs.exit_code, pack.exit_code) == (0, 0), refs.output + pack.output
    return [refs.stderr, pack.stderr]


def test_refs_and_pack_draw_a_bar_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(sink, "stderr", Console(file=screen, force_terminal=True, width=100))

    refs_then_pack(tmp_path)

    assert "refs" in screen.getvalue() and "pack" in screen.getvalue()
    assert "100%" in screen.getvalue() or "━" in screen.getvalue()


def test_refs_and_pack_draw_no_bar_on_a_pipe(tmp_path: Path) -> None:
    assert ["━" in text for text in refs_then_pack(tmp_path)] == [False, False]

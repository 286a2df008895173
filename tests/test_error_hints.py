"""Errors a new user hits say the fix: offload first, the missing model directory, run pack first."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from mmoffload.demo import fixtures_dir
from mmoffload_cli.app import app

runner = CliRunner()
RAW_TRACES = fixtures_dir() / "traces" / "qwen_vl.jsonl"  # inline images, not offloaded yet


def test_refs_on_traces_not_yet_offloaded_says_offload_first_and_names_the_part(tmp_path: Path) -> None:
    result = runner.invoke(app, ["refs", str(RAW_TRACES), "--run-dir", str(tmp_path), "--model", "qwen3_vl"])

    assert result.exit_code == 2
    assert "got an inline image in `raw_image_data`: offload first (`mmoffload offload" in result.stderr
    assert "`$.traces[0].nodes[1].multi_modal_data` image 0" in result.stderr
    assert "None" not in result.stderr


def test_a_mistyped_model_directory_is_named_as_missing(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["refs", str(RAW_TRACES), "--run-dir", str(tmp_path), "--model", "./Qwen3-VL-8B-Instruc"]
    )

    assert result.exit_code == 2
    assert "No such model directory `./Qwen3-VL-8B-Instruc`" in result.stderr


def test_materialize_on_a_run_without_rank_files_says_run_pack_first(tmp_path: Path) -> None:
    result = runner.invoke(app, ["materialize", str(tmp_path), "--model", "qwen3_vl"])

    assert result.exit_code == 2
    assert f"run `mmoffload pack {tmp_path}` first" in " ".join(result.stderr.split())

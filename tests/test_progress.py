"""refs, pack, audit --verify-hashes and materialize draw a progress bar on a terminal, and nothing on a pipe."""

from __future__ import annotations

import io
import json
import re
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


def forced_terminal(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """Make the sink's stderr a terminal; return what is drawn on it."""
    screen = io.StringIO()
    monkeypatch.setattr(sink, "stderr", Console(file=screen, force_terminal=True, width=100))
    return screen


def shown(screen: io.StringIO) -> str:
    """What the terminal showed, Rich's colour and cursor sequences set aside."""
    return re.sub("\x1b\\[[0-9;?]*[A-Za-z]", "", screen.getvalue())


@pytest.fixture
def packed_run(tmp_path: Path) -> Path:
    refs_then_pack(tmp_path)
    return tmp_path / "run"


def test_refs_and_pack_draw_a_bar_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    screen = forced_terminal(monkeypatch)

    refs_then_pack(tmp_path)

    assert "refs" in screen.getvalue() and "pack" in screen.getvalue()
    assert "100%" in screen.getvalue() or "━" in screen.getvalue()


def test_refs_and_pack_draw_no_bar_on_a_pipe(tmp_path: Path) -> None:
    assert ["━" in text for text in refs_then_pack(tmp_path)] == [False, False]


AUDIT = ["audit", "--verify-hashes", "--json"]
MATERIALIZE = ["materialize", "--json"]


def json_report(args: list[str], run: Path) -> dict[str, object]:
    result = runner.invoke(app, [args[0], str(run), *args[1:]])
    assert result.exit_code == 0, result.output
    # Times differ from run to run; every other figure must not.
    return {key: value for key, value in json.loads(result.stdout).items() if not key.endswith("seconds")}


def test_audit_verify_hashes_and_materialize_draw_a_bar_up_to_their_total_on_a_terminal(
    packed_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    screen = forced_terminal(monkeypatch)

    json_report(["audit", "--json"], packed_run)
    assert "━" not in shown(screen)  # A plain audit reads no image: it is quick.
    json_report(AUDIT, packed_run)
    micro_batches = json_report(MATERIALIZE, packed_run)["micro_batches"]

    # The totals are known only once the artifacts are read; each bar reaches its own.
    assert re.search(r"audit ━+ ([0-9.]+)/\1 kB", shown(screen)), shown(screen)
    assert f"{micro_batches}/{micro_batches} micro batches, " in shown(screen)


def test_audit_verify_hashes_and_materialize_draw_no_bar_on_a_pipe(packed_run: Path) -> None:
    results = [runner.invoke(app, [args[0], str(packed_run), *args[1:]]) for args in (AUDIT, MATERIALIZE)]

    assert [(result.exit_code, result.stderr) for result in results] == [(0, ""), (0, "")]


def test_a_bar_leaves_the_json_reports_as_on_a_pipe(
    packed_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    piped = [json_report(args, packed_run) for args in (AUDIT, MATERIALIZE)]
    forced_terminal(monkeypatch)

    assert [json_report(args, packed_run) for args in (AUDIT, MATERIALIZE)] == piped

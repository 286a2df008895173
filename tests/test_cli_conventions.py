"""Habits users bring from other CLIs: version, -h, python -m, completion, 80-column help, -q/-v."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mmoffload
from mmoffload_cli import app as app_module
from mmoffload_cli import verbosity
from mmoffload_cli.app import app
from tests.test_audit_cli import broken_run
from tests.test_guarantees import CONTROLS, IN_NAMES, payload

REPO = Path(__file__).resolve().parent.parent
COMMANDS = list(app_module.COMMANDS)
runner = CliRunner()


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "cli")])}


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_flags_print_the_package_version(flag: str) -> None:
    result = runner.invoke(app, [flag])

    assert result.exit_code == 0
    assert result.stdout == f"mmoffload {mmoffload.__version__}\n"
    assert mmoffload.__version__[0].isdigit()


def test_python_dash_m_runs_the_same_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mmoffload", "--version"], capture_output=True, text=True, env=cli_env()
    )

    assert (result.returncode, result.stdout) == (0, f"mmoffload {mmoffload.__version__}\n")


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_dash_h_is_help_and_fits_80_columns_uncut(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "-h"], env={"COLUMNS": "80"}, terminal_width=80)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Usage:")
    assert [line for line in lines if len(line) > 80] == []
    assert [line for line in lines if line.endswith("...") and not line.startswith("Usage:")] == []
    assert "…" not in result.stdout and "<list[" not in result.stdout


def test_every_example_in_the_help_stays_on_one_line() -> None:
    for command in COMMANDS:
        lines = runner.invoke(app, [command, "-h"], terminal_width=80).stdout.splitlines()
        start = lines.index("  Examples:") + 2
        block = lines[start : lines.index("", start)]
        # A wrapped example would leave a line that is not a whole command.
        assert block and all(line.startswith("      ") and "mmoffload " in line for line in block), block


def test_shell_completion_is_offered() -> None:
    result = runner.invoke(app, ["--help"])

    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout


def test_quiet_silences_library_logging_and_warnings(caplog: pytest.LogCaptureFixture) -> None:
    verbosity.set_quiet(True)
    try:
        with warnings.catch_warnings(record=True) as recorded:
            warnings.warn("library chatter", UserWarning, stacklevel=1)
        logging.getLogger("transformers").warning("PyTorch was not found.")
    finally:
        verbosity.set_quiet(False)

    assert (recorded, caplog.records) == ([], [])
    logging.getLogger("transformers").warning("shown again")
    assert [record.getMessage() for record in caplog.records] == ["shown again"]


def test_quiet_materialize_prints_nothing_at_all(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    assert runner.invoke(app, ["demo", "--run-dir", str(run_dir), "-q"]).exit_code == 0
    result = subprocess.run(
        [sys.executable, "-m", "mmoffload", "materialize", str(run_dir / "qwen_vl"), "-q"],
        capture_output=True,
        text=True,
        env=cli_env(),
    )

    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_verbose_audit_lists_every_violation(tmp_path: Path) -> None:
    run = broken_run(tmp_path, count=12)

    short = runner.invoke(app, ["audit", str(run)])
    full = runner.invoke(app, ["audit", str(run), "-v"])

    assert (short.exit_code, full.exit_code) == (1, 1)
    assert "and 2 more" in short.stdout
    assert "more" not in full.stdout and full.stdout.count("missing_type_ids") == 12


def test_materialize_save_prints_its_estimate_before_writing(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    assert runner.invoke(app, ["demo", "--run-dir", str(run_dir), "-q"]).exit_code == 0
    save = tmp_path / "pixels"

    result = runner.invoke(app, ["materialize", str(run_dir / "kimi_k25"), "--save", str(save)])

    assert result.exit_code == 0, result.output
    megabytes = float(result.stderr.split("saving about ")[1].split(" MB")[0].replace(",", ""))
    written = sum(p.stat().st_size for p in save.rglob("*.safetensors"))
    assert written <= megabytes * 1e6 * 1.01 and written >= megabytes * 1e6 * 0.9


def test_serve_refuses_to_start_without_a_root_to_read_images_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VF_RENDERER_IMAGE_OFFLOAD_DIR", raising=False)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")

    result = CliRunner().invoke(app, ["serve", "--model", str(model)])

    assert result.exit_code == 2
    assert "--allow-root DIR" in result.stderr and "never reads just any file" in result.stderr


# Each kind of usage error, with the user's text in it (file names hold no NUL: none here).
USAGE_ERRORS = {
    "unknown option": ["audit", f"--bad{payload(IN_NAMES)}"],
    "unknown command": [f"audi{payload(IN_NAMES)}"],
    "extra argument": ["demo", f"extra{payload(IN_NAMES)}"],
    "bad value": ["inline", "in.jsonl", "--format", f"jsonl{payload(IN_NAMES)}"],
    "bad value from our parser": ["offload", "in.jsonl", "-o", f"/dev/null/{payload(IN_NAMES)}/"],
}


@pytest.mark.parametrize("error", USAGE_ERRORS)
def test_a_usage_error_prints_the_users_text_escaped(error: str) -> None:
    result = runner.invoke(app, USAGE_ERRORS[error])

    assert result.exit_code == 2, result.output
    for family in IN_NAMES:
        raw, escaped = CONTROLS[family]
        assert raw not in result.stderr and escaped in result.stderr, (family, result.stderr)


def test_a_usage_error_quotes_the_users_text_short() -> None:
    result = runner.invoke(app, ["audit", "--" + "x" * 100_000])

    assert result.exit_code == 2
    assert "No such option" in result.stderr and len(result.stderr) < 3_000

"""The main job on the bundled fixtures: demo library, ``mmoffload demo`` and scripts/smoke.sh."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from mmoffload import demo
from mmoffload.audit import audit
from mmoffload.demo import DEMO_CASES, DemoReport, fixtures_dir, run_demo
from mmoffload.errors import UsageError
from mmoffload_cli.app import app

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory: pytest.TempPathFactory) -> DemoReport:
    return run_demo(tmp_path_factory.mktemp("demo"))


def test_a_checkout_finds_its_fixtures_folder() -> None:
    assert fixtures_dir() == REPO / "fixtures"


def test_a_wheel_finds_the_fixtures_shipped_in_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site-packages" / "mmoffload"
    (package / "_fixtures" / "traces").mkdir(parents=True)
    monkeypatch.setattr(demo, "__file__", str(package / "demo.py"))

    assert fixtures_dir() == package / "_fixtures"


def test_an_install_without_fixtures_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "__file__", str(tmp_path / "src" / "mmoffload" / "demo.py"))

    with pytest.raises(UsageError, match="Expected bundled fixtures at"):
        fixtures_dir()


def test_the_demo_runs_every_family_and_its_audit_is_ok(demo_report: DemoReport) -> None:
    assert [run.family for run in demo_report.runs] == [case.name for case in DEMO_CASES]
    assert demo_report.audit.ok, demo_report.audit.violations
    assert demo_report.audit.hashes_verified
    assert (demo_report.audit.examples, demo_report.audit.descriptors, demo_report.audit.data_uris) == (
        8,
        24,
        0,
    )


def test_the_demo_qwen_run_has_the_smoke_figures(demo_report: DemoReport) -> None:
    report = audit([Path(demo_report.root) / "qwen_vl"])

    figures = (
        report.examples,
        report.micro_batches_with_mm_refs,
        report.eager_mm_kwargs,
        report.descriptors,
        report.file_uris,
        report.data_uris,
        report.missing_files,
        report.type_ids_present,
    )
    assert figures == (4, 4, 0, 12, 12, 0, 0, True)


def test_mmoffload_demo_prints_one_json_report_and_exits_0(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--run-dir", str(tmp_path), "--json"])

    assert result.exit_code == 0, result.output
    report = msgspec.json.decode(result.stdout, type=DemoReport)
    assert report.audit.ok and report.root == str(tmp_path)
    names = ["chat_kimi_k25", "chat_models", "chat_qwen_vl", "kimi_k25", "qwen_vl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names


def test_mmoffload_demo_shows_each_stage_and_ends_with_the_audit(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--run-dir", str(tmp_path)])

    assert result.exit_code == 0, result.output
    titles = (
        "offload (qwen_vl)",
        "refs (qwen_vl)",
        "pack (kimi_k25)",
        "audit (all runs)",
        "render (kimi_k25)",
    )
    for title in (*titles, "audit (chat-rollout runs)"):
        assert title in result.stdout
    assert result.stdout.rstrip().endswith("audit: ok, no violations")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_smoke_script_passes_on_the_fixtures() -> None:
    # The script calls `mmoffload` from PATH: the one installed beside this interpreter.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "smoke.sh")], env=env, capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("smoke: ok")


def test_the_demo_chat_rollout_path_renders_both_families_and_audits_clean(demo_report: DemoReport) -> None:
    assert [run.family for run in demo_report.chat_runs] == ["qwen_vl", "kimi_k25"]
    assert [(run.render.rollouts, run.render.images) for run in demo_report.chat_runs] == [(4, 12), (4, 12)]
    assert demo_report.chat_audit is not None and demo_report.chat_audit.ok, demo_report.chat_audit
    assert (demo_report.chat_audit.examples, demo_report.chat_audit.descriptors) == (8, 24)
    assert demo_report.ok

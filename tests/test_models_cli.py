"""``--model`` as Hugging Face users give it: hub ids from the local cache, and the family actually used."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmoffload.errors import UsageError
from mmoffload.families import cached_model_dir, resolve_model_dir
from mmoffload_cli.app import app

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    assert runner.invoke(app, ["demo", "--run-dir", str(root), "-q"]).exit_code == 0
    return root


COMMIT = "0123abcd" * 5  # a snapshot is named by its full commit hash


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hub cache laid out as huggingface_hub writes it, holding Qwen/Qwen3-VL-2B-Instruct."""
    constants = pytest.importorskip("huggingface_hub.constants", reason="the hub extra")
    repo = tmp_path / "hub" / "models--Qwen--Qwen3-VL-2B-Instruct"
    shutil.copytree(REPO / "fixtures" / "models" / "qwen3_vl", repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    # huggingface_hub reads HF_HUB_CACHE once, when imported (conftest sets HF_HUB_OFFLINE before that).
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return repo / "snapshots" / COMMIT


def test_a_hub_id_resolves_to_its_cached_snapshot(hub_cache: Path) -> None:
    assert resolve_model_dir("Qwen/Qwen3-VL-2B-Instruct") == hub_cache
    assert resolve_model_dir("Qwen/Qwen3-VL-2B-Instruct@main") == hub_cache
    assert cached_model_dir(f"Qwen/Qwen3-VL-2B-Instruct@{COMMIT}") == hub_cache


def test_a_hub_id_not_in_the_cache_says_so_and_downloads_nothing(hub_cache: Path) -> None:
    with pytest.raises(
        UsageError, match=r"`Qwen/Qwen3-VL-8B` is not in the local Hugging Face cache .* nothing"
    ):
        resolve_model_dir("Qwen/Qwen3-VL-8B")
    with pytest.raises(UsageError, match=r"`Qwen/Qwen3-VL-2B-Instruct@v2` is not in the local"):
        resolve_model_dir("Qwen/Qwen3-VL-2B-Instruct@v2")
    assert sorted(p.name for p in hub_cache.parents[2].iterdir()) == ["models--Qwen--Qwen3-VL-2B-Instruct"]


def test_without_the_hub_extra_a_hub_id_names_the_extra_and_the_rest_resolves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # imported as if not installed
    monkeypatch.delitem(sys.modules, "mmoffload.families.hub", raising=False)

    with pytest.raises(
        UsageError, match=r"needs `huggingface_hub`, from the `hub` extra: .*mmoffload\[hub\]"
    ):
        resolve_model_dir("Qwen/Qwen3-VL-2B-Instruct")
    assert resolve_model_dir("qwen3_vl").name == "qwen3_vl"
    assert resolve_model_dir(REPO / "fixtures" / "models" / "kimi_k25").name == "kimi_k25"


def test_the_report_names_the_family_and_config_used(demo_root: Path, hub_cache: Path) -> None:
    run = str(demo_root / "qwen_vl")
    given = runner.invoke(app, ["audit", run, "--model", "Qwen/Qwen3-VL-2B-Instruct", "--json"])
    default = runner.invoke(app, ["audit", run, "--json"])

    assert (given.exit_code, default.exit_code) == (0, 0)
    # The hub id the user gave (with the snapshot's commit), not the cache's internal path.
    assert json.loads(given.stdout)["families"] == {"qwen_vl": f"Qwen/Qwen3-VL-2B-Instruct@{COMMIT[:12]}"}
    assert json.loads(default.stdout)["families"] == {"qwen_vl": "defaults"}


def test_a_bundled_config_is_named_as_given_not_by_its_path_in_the_package(demo_root: Path) -> None:
    result = runner.invoke(app, ["audit", str(demo_root / "qwen_vl"), "--model", "qwen3_vl", "--json"])

    assert result.exit_code == 0
    assert json.loads(result.stdout)["families"] == {"qwen_vl": "qwen3_vl"}


def test_a_model_of_another_family_is_a_warning_naming_both(demo_root: Path) -> None:
    result = runner.invoke(app, ["audit", str(demo_root / "qwen_vl"), "--model", "kimi_k25", "--json"])

    assert result.exit_code == 0
    [warning] = json.loads(result.stdout)["warnings"]
    assert "is a `kimi_k25` model, but the inputs' images are `qwen_vl`: it was not used" in warning
    assert "warning: Model" in result.stderr
    quiet = runner.invoke(app, ["audit", str(demo_root / "qwen_vl"), "--model", "kimi_k25", "-q"])
    assert quiet.stderr == ""


def test_refs_with_a_model_of_another_family_warns(demo_root: Path, tmp_path: Path) -> None:
    traces = demo_root / "qwen_vl" / "offloaded" / "qwen_vl.jsonl"
    result = runner.invoke(
        app, ["refs", str(traces), "--run-dir", str(tmp_path / "run"), "--model", "kimi_k25", "--json"]
    )

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["families"] == {"qwen_vl": "defaults"} and len(report["warnings"]) == 1

"""The light core runs the main job without the extras; a command that needs one names it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What `pip install mmoffload` (no extras) lacks: importing any of them fails as if absent.
NOT_IN_THE_CORE = ("PIL", "safetensors", "tokenizers", "transformers", "torch", "huggingface_hub", "httpx")


def run_without_extras(*args: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({NOT_IN_THE_CORE!r}))\n"
        "from mmoffload_cli.app import main\n"
        f"sys.argv = ['mmoffload', *{list(args)!r}]\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "cli")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_the_core_runs_offload_refs_pack_and_audit_without_the_materialize_extra(tmp_path: Path) -> None:
    result = run_without_extras("demo", "--run-dir", str(tmp_path / "demo"), "-q")

    assert (result.returncode, result.stderr) == (0, "")


def test_materialize_without_its_extra_says_which_extra_to_install(tmp_path: Path) -> None:
    assert run_without_extras("demo", "--run-dir", str(tmp_path / "demo"), "-q").returncode == 0

    result = run_without_extras("materialize", str(tmp_path / "demo" / "qwen_vl"))

    assert result.returncode == 2
    assert "needs `PIL`, from the `materialize` extra: pip install 'mmoffload[materialize]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_hub_id_and_generate_without_their_extras_say_which_extra_to_install(tmp_path: Path) -> None:
    assert run_without_extras("demo", "--run-dir", str(tmp_path / "demo"), "-q").returncode == 0
    run = tmp_path / "demo" / "qwen_vl"

    hub = run_without_extras("audit", str(run), "--model", "Qwen/Qwen3-VL-2B-Instruct")
    bundled = run_without_extras("audit", str(run), "--model", "qwen3_vl", "-q")
    generate = run_without_extras(
        "generate", str(run / "offloaded" / "qwen_vl.jsonl"), "--server", "http://127.0.0.1:9", "-o", "-"
    )

    assert (hub.returncode, bundled.returncode, generate.returncode) == (2, 0, 2)
    assert "needs `huggingface_hub`, from the `hub` extra: pip install 'mmoffload[hub]'" in hub.stderr
    assert "needs `httpx`, from the `client` extra: pip install 'mmoffload[client]'" in generate.stderr
    assert "Traceback" not in hub.stderr + generate.stderr


def test_a_quiet_offload_imports_nothing_it_does_not_use(tmp_path: Path) -> None:
    # Start-up is a measured share of an offload (scripts/bench_offload.py): pydantic (Typer 0.29+),
    # numpy, the trainer side, object storage, progress bars and worker pools stay out of the way.
    unused = ("pydantic", "numpy", "PIL", "transformers", "fsspec", "rich.progress", "rich.table")
    unused += ("multiprocessing", "ctypes", "pyarrow")
    source = tmp_path / "in.jsonl"
    source.write_text('{"messages": []}\n')
    code = (
        "import sys\n"
        "from mmoffload_cli.app import main\n"
        f"sys.argv = ['mmoffload', 'offload', {str(source)!r}, '-o', {str(tmp_path / 'out.jsonl')!r},"
        f" '--assets', {str(tmp_path / 'assets')!r}, '-q']\n"
        "try:\n    main()\nfinally:\n"
        f"    print(sorted(name for name in {unused!r} if name in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "cli")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)

    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, "[]", "")
    assert (tmp_path / "out.jsonl").read_text() == '{"messages": []}\n'


def test_token_text_from_a_full_tokenizer_without_its_extra_says_which_extra_to_install(
    tmp_path: Path,
) -> None:
    assert run_without_extras("demo", "--run-dir", str(tmp_path / "demo"), "-q").returncode == 0
    model = tmp_path / "model"
    shutil.copytree(REPO / "fixtures" / "models" / "qwen3_vl", model)
    (model / "tokenizer.json").write_text("{}")

    result = run_without_extras(
        "inspect",
        str(tmp_path / "demo" / "qwen_vl"),
        "--html",
        str(tmp_path / "p.html"),
        "--model",
        str(model),
    )

    assert result.returncode == 2
    assert (
        "needs `tokenizers`, from the `materialize` extra: pip install 'mmoffload[materialize]'"
        in result.stderr
    )
    assert "Traceback" not in result.stderr

"""The light core runs the main job without the materialize extra; materialize names its extra."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What `pip install mmoffload` (no extras) lacks: importing any of them fails as if absent.
MATERIALIZE_EXTRA = ("PIL", "safetensors", "transformers", "torch")


def run_without_extras(*args: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({MATERIALIZE_EXTRA!r}))\n"
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

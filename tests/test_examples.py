"""Every "Examples:" line of every command's --help runs as written (issues 22 and 26).

Each example runs in bash, in a sandbox holding every file the examples name (made from the
bundled fixtures and one demo run), with its placeholders replaced: ``RUN`` by a demo run,
``DEMO_DIR`` by the demo root, ``DIR`` and ``A`` by an asset directory (a model directory after
``--model``). An example that needs what no test machine has (a vLLM server, a Ray cluster, S3,
a model from the hub) is skipped, saying which.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmoffload.demo import fixtures_dir, run_demo
from mmoffload.offload import offload_files
from mmoffload_cli.app import COMMANDS, app

REPO = Path(__file__).resolve().parent.parent
# Why an example cannot run here, by what it names.
NEEDS = (
    (re.compile(r"^mmoffload (serve|generate)\b"), "a vLLM server (tests/test_vllm_server.py runs one)"),
    (re.compile(r"^mmoffload parity\b"), "a model with weights (no test machine downloads one)"),
    (re.compile(r"--ray\b"), "a Ray cluster (tests/test_ray_backend.py starts a local one)"),
    (re.compile(r"--assets s3://"), "S3 (tests/test_objectstore.py runs moto's server)"),
    (re.compile(r"/models/|ORG/NAME|Qwen/"), "a model from the Hugging Face hub"),
)


def help_examples() -> list[tuple[str, str]]:
    """Every ``(command, example line)`` of the app's help texts."""
    found = []
    for command in COMMANDS:
        text = CliRunner().invoke(app, [command, "--help"], terminal_width=200).stdout
        lines = text.split("Examples:", 1)[1].splitlines()[1:] if "Examples:" in text else []
        # The examples end where the next section (Arguments:, Options:) starts, at column 0.
        lines = lines[: next((i for i, line in enumerate(lines) if line[:1].strip()), len(lines))]
        found += [
            (command, line.strip()) for line in lines if line.strip().startswith(("mmoffload ", "cat "))
        ]
    return found


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sandbox holding every input the examples name."""
    root = tmp_path_factory.mktemp("examples")
    run_demo(root / "demo_root")
    raw = (fixtures_dir() / "traces" / "qwen_vl.jsonl").read_bytes()
    offloaded = (root / "demo_root" / "qwen_vl" / "offloaded" / "qwen_vl.jsonl").read_bytes()
    chat = (fixtures_dir() / "rollouts" / "mini_browse.jsonl").read_bytes()
    files = {
        "rollouts.jsonl": raw,
        "results.jsonl": chat,
        "runs/r1/results.jsonl.gz": gzip.compress(raw),
        "runs/r1/rollouts.offloaded.jsonl": offloaded,
        "runs/r1/traces.jsonl": offloaded,
        "dumps/d.jsonl": raw,
        "t.jsonl": offloaded,
        "t.jsonl.gz": gzip.compress(offloaded),
        "offloaded.jsonl.gz": gzip.compress(offloaded),
    }
    for name in (
        "a.jsonl",
        "b.jsonl",
        "offloaded.jsonl",
        "traces.jsonl",
        "new.jsonl",
        "rollouts.offloaded.jsonl",
    ):
        files[name] = offloaded
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    pq_offloaded = root / "demo_root" / "qwen_vl" / "assets" / "images"
    # Chat rollouts already offloaded: what `render` takes without --assets.
    offload_files(
        [fixtures_dir() / "rollouts" / "mini_browse.jsonl"], [root / "runs/r1/results.jsonl"], root / "assets"
    )
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    image = next((fixtures_dir() / "images").iterdir()).read_bytes()
    pq.write_table(pa.table({"image": [{"bytes": image, "path": None}], "q": ["?"]}), root / "train.parquet")
    offload_files([root / "train.parquet"], [root / "train.offloaded.parquet"], pq_offloaded)
    return root


def substitute(command: str, example: str, root: Path) -> str:
    """The example with its placeholders pointing into the sandbox."""
    model = (
        root / "demo_root" / "chat_models" / "qwen3_vl"
        if command == "render"
        else fixtures_dir() / "models" / "qwen3_vl"
    )
    example = re.sub(r"--model DIR\b", f"--model {model}", example)
    example = example.replace("/tmp/mmoffload-demo", str(root / "demo"))
    example = re.sub(r"\bDEMO_DIR\b", str(root / "demo_root"), example)
    example = re.sub(r"\bRUN\b", str(root / "demo_root" / "qwen_vl"), example)
    return re.sub(r"\b(DIR|A)\b", str(root / "assets"), example)


def run_in_sandbox(script: str, root: Path, extra_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a bash script in the sandbox with ``mmoffload`` as this checkout's CLI."""
    env = {
        **os.environ,
        "PY": sys.executable,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "cli")]),
        **extra_env,
    }
    script = f'mmoffload() {{ "$PY" -m mmoffload "$@"; }}\nset -eo pipefail\n{script}\n'
    return subprocess.run(
        ["bash", "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def skip_reason(text: str) -> str | None:
    """Why a script cannot run on a test machine, or None when it can."""
    if re.search(r"^\s*(pip|python3 -m venv)\b", text, re.M):
        return "a fresh virtual environment and package installs (.ci/run does them)"
    for pattern, needs in NEEDS:
        if any(
            pattern.search(line.strip()) for line in text.splitlines() if not line.lstrip().startswith("#")
        ):
            return needs
    if "jq " in text and shutil.which("jq") is None:
        return "jq"
    return None


@pytest.mark.parametrize(("command", "example"), help_examples(), ids=lambda value: value[:60])
def test_every_help_example_runs_as_written(command: str, example: str, template: Path) -> None:
    if (needs := skip_reason(example)) is not None:
        pytest.skip(f"needs {needs}")
    # One sandbox for all, in the help's order (refs point at its files; `inline out.parquet`
    # reads what `offload ... -o out.parquet` wrote). Offload's examples without --assets use
    # the variable, as rollout workers set it.
    env = {"VF_RENDERER_IMAGE_OFFLOAD_DIR": str(template / "assets")} if command == "offload" else {}

    result = run_in_sandbox(substitute(command, example, template), template, env)

    # 141: `| head` closed the pipe, as intended.
    assert result.returncode in (0, 141), f"{example}\n{result.stderr[-2000:]}"


def doc_scripts() -> list[tuple[str, str]]:
    """Every bash block of README.md and docs/*.md, as ``(file, block)``."""
    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", page.read_text(), re.S):
            found.append((page.relative_to(REPO).as_posix(), block))
    return found


@pytest.mark.parametrize(("page", "block"), doc_scripts(), ids=lambda value: value.splitlines()[0][:60])
def test_every_shell_snippet_of_the_docs_runs_as_written(page: str, block: str, template: Path) -> None:
    if (needs := skip_reason(block)) is not None:
        pytest.skip(f"needs {needs}")
    run = template / "demo_root" / "qwen_vl"
    # `$RUN` and `$MODEL` are the docs' variables; a bare RUN is the placeholder the help uses too.
    env = {"RUN": str(run), "MODEL": str(template / "demo_root" / "chat_models" / "qwen3_vl")}
    script = re.sub(r"(?<!\$)\bRUN\b", str(run), block)

    result = run_in_sandbox(script, template, env)

    assert result.returncode == 0, f"{page}:\n{block}\n{result.stderr[-2000:]}"

"""Every "Examples:" line of every --help, and every bash and Python block of the docs, runs as written.

(Issues 22 and 26.) Each example and bash block runs in bash, in a sandbox holding every file
the examples name (made from the bundled fixtures and one demo run), with its placeholders
replaced: ``RUN`` by a demo run, ``DEMO_DIR`` by the demo root, ``DIR`` and ``A`` by an asset
directory (a model directory after ``--model``). Each Python block runs in this process, given
the names its ``# given: NAME - what it is`` lines list (``GIVEN`` makes them). An example that
needs what no test machine has (a vLLM server, a Ray cluster, S3, a model from the hub) is
skipped, saying which: a ``# needs: ...`` line says so in a block; a Python block that needs one
is still checked to import.
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mmoffload.contract.wire import read_rank_file
from mmoffload.demo import fixtures_dir, run_demo
from mmoffload.offload import offload_files
from mmoffload.render.tiny import write_tiny_model
from mmoffload_cli.app import COMMANDS, app
from tests.builders import data_url, image_bytes, qwen_sample, single_micro_batch, write_run

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


def declared_needs(block: str) -> str | None:
    """What a block says it needs in a ``# needs: ...`` line, or None."""
    match = re.search(r"^\s*# needs: (.+)$", block, re.M)
    return match.group(1) if match else None


def skip_reason(text: str) -> str | None:
    """Why a script cannot run on a test machine, or None when it can."""
    if (needs := declared_needs(text)) is not None:
        return needs
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


# A fenced block: its indentation (inside a list item), language and text, up to the matching fence.
FENCE = re.compile(r"^( *)```(\w+)\n(.*?)^\1```$", re.M | re.S)


def doc_blocks(*languages: str) -> list[tuple[str, str]]:
    """Every block of README.md and docs/*.md in one of ``languages``, as ``(page:line, text)``, unindented."""
    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = page.read_text()
        for match in FENCE.finditer(text):
            if match.group(2) in languages:
                line = text.count("\n", 0, match.start()) + 1
                found.append((f"{page.relative_to(REPO).as_posix()}:{line}", textwrap.dedent(match.group(3))))
    return found


@pytest.mark.parametrize(("where", "block"), [pytest.param(*b, id=b[0]) for b in doc_blocks("bash", "sh")])
def test_every_shell_snippet_of_the_docs_runs_as_written(where: str, block: str, template: Path) -> None:
    if (needs := skip_reason(block)) is not None:
        pytest.skip(f"needs {needs}")
    run = template / "demo_root" / "qwen_vl"
    # `$RUN` and `$MODEL` are the docs' variables; a bare RUN is the placeholder the help uses too.
    env = {"RUN": str(run), "MODEL": str(template / "demo_root" / "chat_models" / "qwen3_vl")}
    script = re.sub(r"(?<!\$)\bRUN\b", str(run), block)

    result = run_in_sandbox(script, template, env)

    assert result.returncode == 0, f"{where}:\n{block}\n{result.stderr[-2000:]}"


def tiny_qwen3_vl() -> Any:
    """Qwen3-VL with the real token ids and patch layout, and a few thousand weights per layer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3VLConfig(
        text_config={
            "vocab_size": 151936,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 32,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "deepstack_visual_indexes": [1],
            "num_position_embeddings": 64,
        },
    )
    torch.manual_seed(0)
    return transformers.Qwen3VLForConditionalGeneration(config).eval()


def small_rank_file(tmp: Path) -> Path:
    """A rank file of two Qwen3-VL samples, one micro batch each (the tiny model takes their images)."""
    # The bundled processor lays a 64x48 image out as 14x20 patches.
    samples = [qwen_sample(tmp / "assets", seeds, grid=(1, 14, 20)) for seeds in ((0, 1), (2,))]
    run = write_run(tmp / "run", samples, [[single_micro_batch(sample)] for sample in samples])
    return run / "rollouts" / "step_0" / "rank_0.bin"


def chat_request() -> dict[str, Any]:
    """An OpenAI chat request with one inline PNG."""
    image = {"type": "image_url", "image_url": {"url": data_url(image_bytes())}}
    return {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "?"}, image]}]}


# What each name a Python block is given stands for, made in the test's directory.
GIVEN: dict[str, Callable[[Path], Any]] = {
    "request_body": lambda tmp: chat_request(),
    "model": lambda tmp: tiny_qwen3_vl(),
    "model_dir": lambda tmp: write_tiny_model(tmp / "model", "qwen3_vl"),
    "rank_path": small_rank_file,
    "micro_batches": lambda tmp: read_rank_file(small_rank_file(tmp)),
    "record": lambda tmp: json.loads(
        (fixtures_dir() / "rollouts" / "mini_browse.jsonl").read_text().split("\n")[0]
    ),
    "png_path": lambda tmp: sorted((fixtures_dir() / "images").iterdir())[0],
    "assets_dir": lambda tmp: tmp / "assets",
}


def given(block: str) -> list[str]:
    """The names a block lists in its ``# given: NAME - what it is`` lines."""
    return re.findall(r"^# given: (\w+) - ", block, re.M)


def run_imports(block: str, where: str) -> None:
    """Run the block's import statements alone; skip when one names a package not installed here."""
    imports = [node for node in ast.parse(block).body if isinstance(node, ast.Import | ast.ImportFrom)]
    try:
        exec(compile(ast.Module(body=imports, type_ignores=[]), where, "exec"), {})
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "mmoffload":
            raise
        pytest.skip(f"needs the {exc.name} package")


@pytest.mark.parametrize(("where", "block"), [pytest.param(*b, id=b[0]) for b in doc_blocks("python")])
def test_every_python_snippet_of_the_docs_runs_as_written(
    where: str, block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_imports(block, where)
    if (needs := declared_needs(block)) is not None:
        pytest.skip(f"needs {needs}")
    assert not (unknown := set(given(block)) - set(GIVEN)), f"{where}: no GIVEN makes {unknown}"
    namespace = {name: GIVEN[name](tmp_path) for name in given(block)}
    # Snippets write where a worker would: its offload directory, relative paths in its cwd.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VF_RENDERER_IMAGE_OFFLOAD_DIR", str(tmp_path / "offloaded"))

    exec(compile(block, where, "exec"), namespace)


def test_the_readme_trainer_snippet_feeds_a_qwen3_vl_forward_pass(tmp_path: Path) -> None:
    [block] = [
        text for where, text in doc_blocks("python") if where.startswith("README") and "Materializer(" in text
    ]
    namespace = {name: GIVEN[name](tmp_path) for name in given(block)}
    torch = pytest.importorskip("torch")

    with torch.no_grad():
        exec(block, namespace)

    batch, logits = namespace["batch"], namespace["logits"]
    tokens = len(read_rank_file(namespace["rank_path"])[-1].input_ids)
    assert batch.model_kwargs["input_ids"].shape == (1, tokens)
    assert batch.model_kwargs["mm_token_type_ids"].shape == (1, tokens)
    assert logits.shape == (1, tokens, 151936) and torch.isfinite(logits).all()

"""Runs stopped at random moments: by SIGKILL (nothing half written) and by Ctrl-C or SIGTERM (a clean stop).

The kill tests are seeded, so a failure replays: each trial kills a fresh copy
at a delay drawn from the run's own measured duration.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from mmoffload.contract import rundir, wire
from mmoffload.contract.addresses import IMAGE_EXTENSIONS, content_hash
from mmoffload.io.outputs import TEMP_PREFIX
from mmoffload.offload import offload_files

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
QWEN_MODEL = FIXTURES / "models" / "qwen3_vl"
TRIALS = 20
SEED = 10


def cli(*args: str | Path) -> list[str]:
    """The command line that runs ``mmoffload`` from this checkout in a fresh process."""
    return [sys.executable, "-c", "from mmoffload_cli.app import main; main()", *map(str, args)]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "cli"), env.get("PYTHONPATH", "")])
    env.pop("VF_RENDERER_IMAGE_OFFLOAD_DIR", None)
    env.pop("MMOFFLOAD_TRACEBACK", None)
    return env


def run_to_end(*args: str | Path) -> float:
    """Run a command to completion; return its wall time."""
    started = time.monotonic()
    subprocess.run(cli(*args), env=cli_env(), check=True, capture_output=True)
    return time.monotonic() - started


def kill_after(delay: float, *args: str | Path) -> None:
    """Start a command and SIGKILL it after ``delay`` seconds (or let it finish first)."""
    process = subprocess.Popen(
        cli(*args), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def images_file(path: Path, count: int) -> Path:
    """JSONL of ``count`` records, each with its own inline PNG."""
    lines = []
    for n in range(count):
        out = io.BytesIO()
        Image.new("RGB", (192, 128), (n % 256, n * 7 % 256, 90)).save(out, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
        part = {"type": "image_url", "image_url": {"url": url}}
        lines.append(json.dumps({"n": n, "messages": [{"role": "user", "content": [part]}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory``, by relative path."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def assert_assets_whole(assets: Path) -> None:
    """Every image in the store hashes to its name; anything else is a named temporary."""
    for path in assets.iterdir() if assets.is_dir() else []:
        if path.name.startswith(TEMP_PREFIX):
            continue
        assert path.suffix in IMAGE_EXTENSIONS, path
        assert content_hash(path.read_bytes()) == path.stem, f"{path} does not hash to its name"


def assert_bins_decode(run: Path) -> None:
    for step in rundir.steps(run):
        batch_path = rundir.training_batch_path(run, step)
        if batch_path.exists():
            wire.read_training_batch(batch_path)
        for path in rundir.rank_paths(run, step):
            wire.read_rank_file(path)


def delays(duration: float) -> list[float]:
    """Seeded kill moments spread over a run's duration (the start is mostly imports).

    A third fall past the measured duration: a trial runs slower than the measured run on a busy
    machine, and some trials must finish (the assertion that the kills did not all miss).
    """
    rng = random.Random(SEED)
    return [rng.uniform(0.3, 1.5) * duration for _ in range(TRIALS)]


@pytest.fixture(scope="module")
def offloaded_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Offloaded fixture traces and their assets, shared read-only by the refs and pack trials."""
    root = tmp_path_factory.mktemp("kill")
    assets = root / "run" / "assets" / "images"
    offloaded = root / "offloaded.jsonl"
    offload_files([FIXTURES / "traces" / "qwen_vl.jsonl"], [offloaded], assets)
    # Many small text traces too: a refs run then spends most of its time writing steps.
    node = {"token_ids": list(range(1, 200)), "mask": [False] * 100 + [True] * 99, "logprobs": [-0.1] * 99}
    many = root / "many.jsonl"
    many.write_text(offloaded.read_text() + "".join(json.dumps({"nodes": [node]}) + "\n" for _ in range(400)))
    return {"root": root, "offloaded": offloaded, "assets": assets, "many": many}


def test_offload_killed_at_random_moments_leaves_whole_files_only(tmp_path: Path) -> None:
    source = images_file(tmp_path / "in.jsonl", 150)
    original = source.read_bytes()
    reference = tmp_path / "reference.jsonl"
    duration = run_to_end("offload", source, "-o", reference, "--assets", tmp_path / "ref-assets", "-q")
    finished = 0
    for trial, delay in enumerate(delays(duration)):
        out = tmp_path / f"out-{trial}"
        out.mkdir()
        kill_after(delay, "offload", source, "-o", out / "o.jsonl", "--assets", out / "assets", "-q")
        if (out / "o.jsonl").exists():
            expected = reference.read_bytes().replace(
                (tmp_path / "ref-assets").as_uri().encode(), (out / "assets").as_uri().encode()
            )
            assert (out / "o.jsonl").read_bytes() == expected, f"trial {trial}: a partial output"
            finished += 1
        assert {p.name for p in out.iterdir()} - {"o.jsonl", "assets"} <= {
            p.name for p in out.iterdir() if p.name.startswith(TEMP_PREFIX)
        }
        assert_assets_whole(out / "assets")
    assert source.read_bytes() == original
    assert 0 < finished < TRIALS, f"{finished} of {TRIALS} runs finished: the kills missed the run"


def run_copy(offloaded_run: dict[str, Path], name: str, steps: dict[str, bytes]) -> Path:
    """A fresh run directory holding ``steps`` (a rollouts tree), its assets beside them."""
    run = offloaded_run["root"] / name
    (run / "assets").mkdir(parents=True)
    os.symlink(offloaded_run["assets"], run / "assets" / "images")
    for relative, data in steps.items():
        path = run / rundir.ROLLOUTS / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return run


def refs_args(
    offloaded_run: dict[str, Path], run: Path, step_size: int, *extra: str, traces: str = "offloaded"
) -> list[str | Path]:
    return [
        "refs",
        offloaded_run[traces],
        "--run-dir",
        run,
        "--model",
        QWEN_MODEL,
        "--step-size",
        str(step_size),
        "--allow-root",
        offloaded_run["assets"],
        "-q",
        *extra,
    ]


def NEW_REFS(offloaded_run: dict[str, Path], run: Path) -> list[str | Path]:
    # Every step of the old run rewritten with other figures: a mix is visible step by step.
    return refs_args(offloaded_run, run, 1, "--temperature", "0.5", traces="many")


def test_refs_killed_at_random_moments_leaves_the_old_steps_or_the_new(
    offloaded_run: dict[str, Path],
) -> None:
    old_run = run_copy(offloaded_run, "refs-old", {})
    run_to_end(*refs_args(offloaded_run, old_run, 1, traces="many"))
    run_to_end("pack", old_run, "--seq-len", "4096", "-q")
    old = tree(old_run / rundir.ROLLOUTS)
    new_run = run_copy(offloaded_run, "refs-new", old)
    duration = run_to_end(*NEW_REFS(offloaded_run, new_run))
    new = tree(new_run / rundir.ROLLOUTS)
    assert old != new
    inputs = offloaded_run["many"].read_bytes()
    outcomes: list[bool] = []
    for trial, delay in enumerate(delays(duration)):
        run = run_copy(offloaded_run, f"refs-{trial}", old)
        kill_after(delay, *NEW_REFS(offloaded_run, run))
        found = tree(run / rundir.ROLLOUTS)
        assert found in (old, new), f"trial {trial}: a mix of two refs runs"
        outcomes.append(found == new)
        assert_bins_decode(run)
    assert offloaded_run["many"].read_bytes() == inputs
    assert 0 < sum(outcomes) < TRIALS, f"{sum(outcomes)} of {TRIALS} runs finished: the kills missed the run"
    # A later run takes over whatever staging a killed one left.
    run_to_end(*NEW_REFS(offloaded_run, run))
    assert tree(run / rundir.ROLLOUTS) == new


def test_pack_killed_at_random_moments_leaves_each_step_from_one_pack(offloaded_run: dict[str, Path]) -> None:
    base = run_copy(offloaded_run, "pack-base", {})
    run_to_end(*refs_args(offloaded_run, base, 1))
    run_to_end("pack", base, "--seq-len", "4096", "--world-size", "2", "-q")
    old = tree(base / rundir.ROLLOUTS)
    new_run = run_copy(offloaded_run, "pack-new", old)
    new_args = ["--seq-len", "1024", "--world-size", "3", "-q"]
    duration = run_to_end("pack", new_run, *new_args)
    new = tree(new_run / rundir.ROLLOUTS)
    assert old != new
    batches = {name: data for name, data in old.items() if name.endswith(rundir.TRAINING_BATCH_FILE)}
    outcomes: list[bool] = []
    for trial, delay in enumerate(delays(duration)):
        run = run_copy(offloaded_run, f"pack-{trial}", old)
        kill_after(delay, "pack", run, *new_args)
        found = tree(run / rundir.ROLLOUTS)
        outcomes.append(found == new)
        # Every step's ranks (indeed every step) come from one pack; the inputs are unchanged.
        assert found in (old, new), f"trial {trial}: rank files of two packs"
        assert {name: found[name] for name in batches} == batches
        assert_bins_decode(run)
    assert 0 < sum(outcomes) < TRIALS, f"{sum(outcomes)} of {TRIALS} runs finished: the kills missed the run"


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(
    ("signum", "code", "said"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_ctrl_c_and_sigterm_stop_cleanly_and_say_what_was_written(
    tmp_path: Path, workers: int, signum: int, code: int, said: str
) -> None:
    source = images_file(tmp_path / "in.jsonl", 400)
    assets = tmp_path / "assets"
    output = tmp_path / "out.jsonl"
    process = subprocess.Popen(
        cli("offload", source, "-o", output, "--assets", assets, "--workers", str(workers), "-q"),
        env=cli_env(),
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if assets.is_dir() and len(os.listdir(assets)) >= 20:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be stopped"
    # Ctrl-C reaches the whole process group (workers too); SIGTERM usually only the parent.
    if signum == signal.SIGINT:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    message = stderr.decode()
    assert process.returncode == code, message
    assert said in message and "no output" in message and "Traceback" not in message
    assert "resource_tracker" not in message
    assert not output.exists()
    temps = [p for p in [*tmp_path.iterdir(), *assets.iterdir()] if p.name.startswith(TEMP_PREFIX)]
    assert not temps, (temps, message)
    assert_assets_whole(assets)
    shutil.rmtree(assets)

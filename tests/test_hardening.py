"""Never a traceback, never lost data: each class of bad input, fault and hostile ref, through the CLI.

Every failing case must exit 2 with one located error line on stderr, print no
traceback and leave every input byte for byte as it was.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from PIL import Image
from typer.testing import CliRunner

from mmoffload.contract import rundir, wire
from mmoffload.contract.addresses import content_hash
from mmoffload.errors import BadInputError
from mmoffload.io.staging import STAGING_PREFIX
from mmoffload.offload import offload_files
from mmoffload.pack import PackOptions, pack_run
from mmoffload.refs import RefsOptions, build_refs
from mmoffload.store.images import open_image
from mmoffload_cli import sink
from mmoffload_cli.app import app

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
QWEN_MODEL = FIXTURES / "models" / "qwen3_vl"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
runner = CliRunner()


# --- builders ------------------------------------------------------------------------------------


def make_run(tmp_path: Path) -> dict[str, Path]:
    """The fixture pipeline: raw traces, their offloaded copy, and a packed run with its own assets."""
    raw = tmp_path / "traces.jsonl"
    shutil.copy(FIXTURES / "traces" / "qwen_vl.jsonl", raw)
    run = tmp_path / "run"
    offloaded = tmp_path / "offloaded.jsonl"
    offload_files([raw], [offloaded], run / "assets" / "images")
    build_refs([offloaded], run, RefsOptions(model_dir=QWEN_MODEL))
    pack_run(run, PackOptions(seq_len=4096))
    return {"raw": raw, "offloaded": offloaded, "run": run, "assets": run / "assets" / "images"}


def jsonl(path: Path, *lines: str | bytes) -> Path:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def remote_image_line(url: str) -> str:
    part = {"type": "image_url", "image_url": {"url": url}}
    return json.dumps({"messages": [{"role": "user", "content": [part]}]})


def snapshot(*paths: Path) -> dict[Path, bytes]:
    """Every file under ``paths`` (files or directories) with its bytes."""
    files: dict[Path, bytes] = {}
    for path in paths:
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            files[file] = file.read_bytes()
    return files


def fails_cleanly(args: list[str | Path], inputs: list[Path], *expected: str, code: int = 2) -> str:
    """Run the CLI; check the exit code, one error line naming ``expected``, no traceback, inputs kept."""
    before = snapshot(*inputs)
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    if code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in result.stderr, (text, result.stderr)
    assert snapshot(*inputs) == before, "an input changed"
    return result.stderr


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    """Mount a small tmpfs at ``path`` (root only; skips the test where mounting is not permitted)."""
    if not IS_ROOT:
        pytest.skip("needs root to mount a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def read_only(path: Path) -> None:
    """Remount the tmpfs at ``path`` read-only (what chmod cannot do to root)."""
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def rewrite_rank_refs(run: Path, uri: str, digest: str | None = None) -> None:
    """Point every image ref of the run's rank files at ``uri`` (and ``digest``)."""
    for step in rundir.steps(run):
        for path in rundir.rank_paths(run, step):
            batches = wire.read_rank_file(path)
            for batch in batches:
                for ref in batch.mm_refs.images if batch.mm_refs else []:
                    ref.uri = uri
                    ref.item["raw_image_uri"] = uri
                    ref.hash = digest or ref.hash
            path.write_bytes(wire.encode(batches))


# --- data loss: outputs that are devices, FIFOs, symlinks or DIR/ -------------------------------


def test_an_output_that_is_a_device_is_written_through_not_replaced(tmp_path: Path) -> None:
    if not IS_ROOT:
        pytest.skip("needs root for mknod")
    device = tmp_path / "null"
    os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    source = jsonl(tmp_path / "in.jsonl", '{"a": 1}')
    result = runner.invoke(app, ["offload", str(source), "-o", str(device), "--assets", str(tmp_path / "a")])
    assert result.exit_code == 0, result.stderr
    assert stat.S_ISCHR(device.lstat().st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mmoffload")]


def test_an_output_that_is_a_fifo_is_written_through(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    source = jsonl(tmp_path / "in.jsonl", '{"a": 1}')
    result = runner.invoke(app, ["offload", str(source), "-o", str(fifo), "--assets", str(tmp_path / "a")])
    reader.join(timeout=30)
    assert result.exit_code == 0, result.stderr
    assert received == [b'{"a": 1}\n'] and stat.S_ISFIFO(fifo.lstat().st_mode)


@pytest.mark.parametrize("flag", ["-o", "--in-place"])
def test_a_symlinked_output_is_written_through_its_link(tmp_path: Path, flag: str) -> None:
    target = jsonl(tmp_path / "target.jsonl", '{"a": 1}')
    link = tmp_path / "link.jsonl"
    link.symlink_to(target.name)
    source = jsonl(tmp_path / "in.jsonl", '{"b": 2}')
    args = [str(link), "--in-place"] if flag == "--in-place" else [str(source), "-o", str(link)]
    result = runner.invoke(app, ["offload", *args, "--assets", str(tmp_path / "a")])
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == target.name
    assert target.read_bytes() == (b'{"a": 1}\n' if flag == "--in-place" else b'{"b": 2}\n')


def test_a_trailing_slash_output_is_a_directory_created_when_absent(tmp_path: Path) -> None:
    source = jsonl(tmp_path / "in.jsonl", '{"a": 1}')
    result = runner.invoke(app, ["offload", str(source), "-o", f"{tmp_path}/out/", "--assets", str(tmp_path)])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out" / "in.jsonl").read_text() == '{"a": 1}\n'


def test_a_trailing_slash_output_that_names_a_file_is_refused(tmp_path: Path) -> None:
    source = jsonl(tmp_path / "in.jsonl", '{"a": 1}')
    (tmp_path / "out").write_text("a file")
    result = runner.invoke(app, ["offload", str(source), "-o", f"{tmp_path}/out/", "--assets", str(tmp_path)])
    # A usage error: Typer's boxed message, folded to the terminal width.
    assert result.exit_code == 2 and "ends with `/`" in " ".join(result.stderr.replace("│", " ").split())
    assert (tmp_path / "out").read_text() == "a file"


# --- data loss: an output that is an input or another output -----------------------------------


SAME_FILE_CASES = {
    "offload rejects = input": lambda d: [
        ["offload", d["bad"], "-o", d["out"], "--skip-bad-lines", "--rejects", d["bad"], "--assets", d["a"]],
        "rejects file is the same file as the input",
    ],
    "offload rejects = output": lambda d: [
        ["offload", d["bad"], "-o", d["out"], "--skip-bad-lines", "--rejects", d["out"], "--assets", d["a"]],
        "rejects file is the same file as the output",
    ],
    "offload output = a hard link of the input": lambda d: [
        ["offload", d["bad"], "-o", d["hardlink"], "--assets", d["a"]],
        "output is the same file as the input",
    ],
    "offload output = a symlink to the input": lambda d: [
        ["offload", d["bad"], "-o", d["symlink"], "--assets", d["a"]],
        "is the input",
    ],
    "refs rejects = input": lambda d: [
        ["refs", d["bad"], "--run-dir", d["run"], "--skip-invalid", "--rejects", d["bad"]],
        "rejects file is the same file as the input",
    ],
}


@pytest.mark.parametrize("case", SAME_FILE_CASES)
def test_an_output_that_is_an_input_or_another_output_is_refused_before_work(
    tmp_path: Path, case: str
) -> None:
    paths = {
        "bad": jsonl(tmp_path / "in.jsonl", '{"a": 1}', "not json"),
        "out": tmp_path / "out.jsonl",
        "a": tmp_path / "assets",
        "run": tmp_path / "run",
        "hardlink": tmp_path / "hard.jsonl",
        "symlink": tmp_path / "sym.jsonl",
    }
    os.link(paths["bad"], paths["hardlink"])
    paths["symlink"].symlink_to(paths["bad"])
    args, message = SAME_FILE_CASES[case](paths)
    fails_cleanly(args, [paths["bad"]], message)
    assert not paths["out"].exists() and not paths["run"].exists()


# --- data loss: a run's steps and rank files appear as a unit; one writer at a time -------------


def test_a_second_writer_of_a_run_is_refused_while_the_first_lives(tmp_path: Path) -> None:
    run = make_run(tmp_path)["run"]
    lock = run / f"{STAGING_PREFIX}{rundir.ROLLOUTS}"
    lock.mkdir()
    (lock / "owner").write_text(f"{os.uname().nodename} {os.getpid()}\n")
    fails_cleanly(["pack", run, "--seq-len", "2048"], [run / rundir.ROLLOUTS], "Another mmoffload process")


def test_a_dead_writers_staging_is_taken_over(tmp_path: Path) -> None:
    run = make_run(tmp_path)["run"]
    lock = run / f"{STAGING_PREFIX}{rundir.ROLLOUTS}"
    (lock / rundir.ROLLOUTS).mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (lock / "owner").write_text(f"{os.uname().nodename} {dead.pid}\n")
    result = runner.invoke(app, ["pack", str(run), "--seq-len", "2048", "-q"])
    assert result.exit_code == 0, result.stderr
    assert not lock.exists()


# --- OS errors: located, exit 2, checked before work where they can be ---------------------------


def test_an_output_under_a_file_or_assets_that_are_a_file_are_refused(tmp_path: Path) -> None:
    source = jsonl(tmp_path / "in.jsonl", '{"a": 1}')
    blocker = jsonl(tmp_path / "file", "x")
    fails_cleanly(
        ["offload", source, "-o", blocker / "out.jsonl", "--assets", tmp_path / "a"],
        [source, blocker],
        "is not a directory",
        f"{blocker}/out.jsonl",
    )
    fails_cleanly(
        ["offload", source, "-o", tmp_path / "out.jsonl", "--assets", blocker],
        [source, blocker],
        "Cannot use as asset directory",
    )
    assert not (tmp_path / "out.jsonl").exists()


READ_ONLY_CASES = ["offload output", "offload assets", "refs run dir", "pack run dir", "materialize --save"]


@pytest.mark.parametrize("case", READ_ONLY_CASES)
def test_a_read_only_destination_is_named_before_any_work(tmp_path: Path, case: str) -> None:
    paths = make_run(tmp_path)
    with tmpfs(tmp_path / "ro", size="8m") as mount:
        run = mount / "run"
        shutil.copytree(paths["run"], run)
        read_only(mount)
        args = {
            "offload output": [
                "offload",
                paths["raw"],
                "-o",
                mount / "out.jsonl",
                "--assets",
                tmp_path / "a",
            ],
            "offload assets": [
                "offload",
                paths["raw"],
                "-o",
                tmp_path / "out.jsonl",
                "--assets",
                mount / "a",
            ],
            "refs run dir": ["refs", paths["offloaded"], "--run-dir", run, "--model", QWEN_MODEL],
            "pack run dir": ["pack", run, "--seq-len", "2048"],
            "materialize --save": [
                "materialize",
                paths["run"],
                "--model",
                QWEN_MODEL,
                "--save",
                mount / "px",
            ],
        }[case]
        fails_cleanly(args, [paths["raw"], paths["offloaded"], paths["run"], run], str(mount))
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "a").exists()


FULL_DISK_CASES = ["offload output", "offload assets", "refs run dir", "materialize --save"]


@pytest.mark.parametrize("case", FULL_DISK_CASES)
def test_a_full_disk_is_named_with_the_bytes_written(tmp_path: Path, case: str) -> None:
    paths = make_run(tmp_path)
    big = tmp_path / "big.jsonl"
    # Many distinct images, so outputs and assets outgrow a 2 MB disk.
    with Image.open(FIXTURES / "images" / "laptop_compare.png") as image:
        pixels = image.convert("RGB")
    # Text alone outgrows the disk as output; its images outgrow it as assets.
    lines = [json.dumps({"text": "x" * 100_000, "n": n}) for n in range(30)]
    for seed in range(40):
        out = io.BytesIO()
        pixels.rotate(seed, expand=True).save(out, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
        lines.append(remote_image_line(url))
    jsonl(big, *lines)
    with tmpfs(tmp_path / "full") as full:
        args = {
            "offload output": ["offload", big, "-o", full / "out.jsonl", "--assets", tmp_path / "a"],
            "offload assets": ["offload", big, "-o", tmp_path / "out.jsonl", "--assets", full / "a"],
            "refs run dir": ["refs", paths["offloaded"], "--run-dir", full / "run", "--model", QWEN_MODEL],
            "materialize --save": [
                *("materialize", paths["run"], "--model", QWEN_MODEL, "--save", full / "px", "-q")
            ],
        }[case]
        if case == "refs run dir":
            (full / "filler").write_bytes(b"x" * ((2 << 20) - (16 << 10)))  # No room for the TrainingBatch.
        # materialize --save estimates its size and checks the free space before it writes anything.
        expected = "bytes free" if case == "materialize --save" else "No space left on device"
        message = fails_cleanly(args, [big, paths["offloaded"], paths["run"]], expected)
        assert " bytes" in message and str(full) in message
        assert not [p for p in full.rglob("*") if p.name.startswith(".mmoffload-tmp-") and p.is_file()]


# --- malformed input: deep nesting, markup, huge strings, ints outside int64, bad model dirs -----


# A line every command accepts: a trace of one trainable node, no images.
TRACE = '{"nodes": [{"token_ids": [1, 2], "mask": [false, true], "logprobs": [-0.1]}]}'
DEEP = {
    "1,100 nested arrays": "[" * 1100 + "]" * 1100,
    "100,000 nested arrays": "[" * 100_000 + "]" * 100_000,
    "990 nested objects": '{"a":' * 990 + "1" + "}" * 990,
}


@pytest.mark.parametrize("command", ["offload", "refs", "audit"])
@pytest.mark.parametrize("shape", DEEP)
def test_deeply_nested_json_is_a_located_error(tmp_path: Path, command: str, shape: str) -> None:
    source = jsonl(tmp_path / "deep.jsonl", TRACE, DEEP[shape])
    args: list[str | Path] = {
        "offload": ["offload", source, "-o", tmp_path / "o.jsonl", "--assets", tmp_path / "a"],
        "refs": ["refs", source, "--run-dir", tmp_path / "run"],
        "audit": ["audit", source, "--json"],
    }[command]
    if command == "audit":
        # Audit reads every line and reports a bad one as a violation (exit 1), naming it.
        before = snapshot(source)
        result = runner.invoke(app, [str(arg) for arg in args])
        assert (result.exit_code == 1 and result.exception is None) or isinstance(
            result.exception, SystemExit
        )
        violations = json.loads(result.stdout)["violations"]
        assert any(v["line"] == 2 and v["kind"] == "undecodable" for v in violations), violations
        assert snapshot(source) == before
        return
    fails_cleanly(args, [source], "deep.jsonl:2", "nested")


MARKUP = {
    "closing tag in a URL": "https://example.com/[/x]",
    "bare closing tag": "https://example.com/[/]",
    "style tag": "https://example.com/[bold]bold[/bold]",
}


@pytest.mark.parametrize("command", ["offload", "refs", "audit"])
@pytest.mark.parametrize("url", MARKUP)
def test_rich_markup_in_user_data_prints_as_it_is(
    tmp_path: Path, command: str, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "rollouts[step=3].jsonl"
    if command == "refs":
        jsonl(source, json.dumps({MARKUP[url]: 1}))
        expected = ["rollouts[step=3].jsonl:1"]
    else:
        jsonl(source, remote_image_line(MARKUP[url]))
        expected = [MARKUP[url], "rollouts[step=3].jsonl"]
    if command == "audit":
        # The violations table goes through Rich: wide enough that no cell folds.
        monkeypatch.setattr(sink.stdout, "width", 1000)
        before = snapshot(source)
        result = runner.invoke(app, ["audit", str(source)])
        assert (result.exit_code == 1 and result.exception is None) or isinstance(
            result.exception, SystemExit
        )
        assert all(text in result.stdout for text in expected), result.stdout
        assert snapshot(source) == before
        return
    args: list[str | Path] = {
        "offload": ["offload", source, "-o", tmp_path / "o.jsonl", "--assets", tmp_path / "a"],
        "refs": ["refs", source, "--run-dir", tmp_path / "run"],
    }[command]
    fails_cleanly(args, [source], *expected)


def test_a_huge_string_is_quoted_short(tmp_path: Path) -> None:
    source = jsonl(tmp_path / "in.jsonl", remote_image_line("https://" + "x" * 10_000_000))
    message = fails_cleanly(
        ["offload", source, "-o", tmp_path / "o.jsonl", "--assets", tmp_path / "a"], [source], "in.jsonl:1"
    )
    assert len(message) < 3000


@pytest.mark.parametrize("token", [2**63, 2**64, -(2**63) - 1])
def test_token_ids_outside_int64_in_trace_json_are_located(tmp_path: Path, token: int) -> None:
    source = jsonl(tmp_path / "t.jsonl", json.dumps({"token_ids": [token, 1], "mask": [False, True]}))
    fails_cleanly(["refs", source, "--run-dir", tmp_path / "run"], [source], "t.jsonl:1", "$.token_ids[0]")


@pytest.mark.parametrize("command", ["pack", "audit", "materialize"])
@pytest.mark.parametrize("token", [2**63, 2**64 - 1])
def test_ints_outside_int64_in_bin_files_are_refused(tmp_path: Path, command: str, token: int) -> None:
    run = make_run(tmp_path)["run"]
    for path in [rundir.training_batch_path(run, 0), *rundir.rank_paths(run, 0)]:
        value = msgspec.msgpack.decode(path.read_bytes())
        first = value[0][0] if path.name == rundir.TRAINING_BATCH_FILE else value[0]
        first[0][0] = token  # The first token id.
        path.write_bytes(msgspec.msgpack.encode(value))
    inputs = [run / rundir.ROLLOUTS]
    if command == "audit":
        result = runner.invoke(app, ["audit", str(run), "--json"])
        assert result.exit_code == 1, result.stderr
        reasons = [v["reason"] for v in json.loads(result.stdout)["violations"]]
        assert any("9223372036854775807" in reason for reason in reasons), reasons
        return
    args = {"pack": ["pack", run, "--seq-len", "4096"], "materialize": ["materialize", run]}[command]
    fails_cleanly(args, inputs, "9223372036854775807", ".bin")


MODEL_DIR_CASES = {
    "patch_size as a string": ("preprocessor_config.json", {"patch_size": "16"}, "`patch_size`"),
    "merge_size 0": ("preprocessor_config.json", {"merge_size": 0}, "`merge_size`"),
    "tokenizer_config.json not JSON": ("tokenizer_config.json", "{bad", "tokenizer_config.json"),
    "added_tokens_decoder malformed": (
        "tokenizer_config.json",
        {"added_tokens_decoder": {"x": 5}},
        "`added_tokens_decoder`",
    ),
}


@pytest.mark.parametrize("case", MODEL_DIR_CASES)
def test_a_bad_model_directory_names_its_file_and_setting(tmp_path: Path, case: str) -> None:
    paths = make_run(tmp_path)
    model = tmp_path / "model"
    shutil.copytree(QWEN_MODEL, model)
    name, change, expected = MODEL_DIR_CASES[case]
    if isinstance(change, str):
        (model / name).write_text(change)
    else:
        config = json.loads((model / name).read_text())
        config.update(change)
        (model / name).write_text(json.dumps(config))
    fails_cleanly(
        ["refs", paths["offloaded"], "--run-dir", tmp_path / "run2", "--model", model],
        [paths["offloaded"], model],
        expected,
        name,
    )


@pytest.mark.parametrize("command", ["offload", "refs"])
def test_non_utf8_lines_skipped_are_named_and_kept_whole(tmp_path: Path, command: str) -> None:
    raw = b'\xff\xfe{"a": 2}'
    source = jsonl(tmp_path / "in.jsonl", TRACE, raw)
    if command == "offload":
        args = ["offload", source, "-o", tmp_path / "o.jsonl", "--assets", tmp_path / "a", "--skip-bad-lines"]
        rejects = tmp_path / "o.jsonl.rejects.jsonl"
    else:
        args = ["refs", source, "--run-dir", tmp_path / "run", "--skip-invalid"]
        rejects = tmp_path / "run" / "rollouts" / "rejects.jsonl"
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 1, result.stderr
    (entry,) = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert entry["line"] == 2 and "in.jsonl:2" in entry["reason"]
    kept = entry["text_base64"]
    assert base64.b64decode(kept) == raw


# --- hostile refs: allowed roots, regular files only, bounded reads, no leaks ---------------------


def hostile_targets(tmp_path: Path, assets: Path) -> dict[str, str]:
    secret = jsonl(tmp_path / "secret.txt", "password")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (assets / "escape.png").symlink_to(secret)
    return {
        "/etc/passwd": "file:///etc/passwd",
        "a file outside the run": secret.as_uri(),
        "dot-dot traversal": f"file://{assets}/../../../secret.txt",
        "percent-encoded traversal": f"file://{assets}/%2e%2e/%2e%2e/%2e%2e/secret.txt",
        "localhost host": f"file://localhost{secret}",
        "a symlink leaving the assets": (assets / "escape.png").as_uri(),
        "/dev/zero": "file:///dev/zero",
        "/proc/self/environ": "file:///proc/self/environ",
        "a FIFO": fifo.as_uri(),
        "a NUL byte": f"file://{assets}/x%00.png",
    }


HOSTILE = [
    "/etc/passwd",
    "a file outside the run",
    "dot-dot traversal",
    "percent-encoded traversal",
    "localhost host",
    "a symlink leaving the assets",
    "/dev/zero",
    "/proc/self/environ",
    "a FIFO",
    "a NUL byte",
]


@pytest.mark.parametrize("command", ["refs", "audit", "materialize"])
@pytest.mark.parametrize("target", HOSTILE)
def test_a_ref_outside_the_allowed_roots_is_refused_unread(tmp_path: Path, command: str, target: str) -> None:
    paths = make_run(tmp_path)
    uri = hostile_targets(tmp_path, paths["assets"])[target]
    secret_hashes = [content_hash((tmp_path / "secret.txt").read_bytes()), content_hash(b"")]
    if command == "refs":
        text = paths["offloaded"].read_text()
        first = json.loads(text.splitlines()[0])
        old_uri = json.dumps(first).split('"raw_image_uri": "')[1].split('"')[0]
        traces = tmp_path / "hostile.jsonl"
        traces.write_text(text.replace(old_uri, uri))
        args: list[str | Path] = ["refs", traces, "--run-dir", paths["run"], "--model", QWEN_MODEL]
        message = fails_cleanly(args, [traces, paths["run"]], "hostile.jsonl:")
    elif command == "audit":
        rewrite_rank_refs(paths["run"], uri)
        result = runner.invoke(app, ["audit", str(paths["run"]), "--verify-hashes", "--json"])
        assert result.exit_code == 1, result.stderr
        message = result.stdout
        kinds = {v["kind"] for v in json.loads(result.stdout)["violations"]}
        assert kinds & {"disallowed_file", "bad_uri"}, kinds
    else:
        rewrite_rank_refs(paths["run"], uri)
        message = fails_cleanly(
            ["materialize", paths["run"], "--model", QWEN_MODEL, "--missing-image-policy", "error"],
            [paths["run"]],
            "rank_0.bin",
        )
    assert "password" not in message and not any(digest in message for digest in secret_hashes)
    assert "allowed roots" in message or "NUL" in message


def test_an_explicit_allow_root_admits_files_there(tmp_path: Path) -> None:
    paths = make_run(tmp_path)
    moved = tmp_path / "elsewhere"
    shutil.copytree(paths["assets"], moved)
    text = paths["offloaded"].read_text().replace(paths["assets"].as_uri(), moved.as_uri())
    traces = jsonl(tmp_path / "moved.jsonl", *text.splitlines())
    refused = runner.invoke(
        app, ["refs", str(traces), "--run-dir", str(paths["run"]), "--model", str(QWEN_MODEL)]
    )
    assert refused.exit_code == 2 and "allowed roots" in refused.stderr
    allowed = runner.invoke(
        app,
        [
            "refs",
            str(traces),
            "--run-dir",
            str(paths["run"]),
            "--model",
            str(QWEN_MODEL),
            "--allow-root",
            str(moved),
        ],
    )
    assert allowed.exit_code == 0, allowed.stderr


@pytest.mark.parametrize("command", ["refs", "audit", "materialize", "inline"])
def test_an_object_store_allow_root_is_named_whole_when_a_file_is_refused(
    tmp_path: Path, command: str
) -> None:
    paths = make_run(tmp_path)
    args: dict[str, list[str | Path]] = {
        "refs": ["refs", paths["offloaded"], "--run-dir", tmp_path / "again", "--model", QWEN_MODEL],
        "audit": ["audit", paths["run"], "--json"],
        "materialize": ["materialize", paths["run"], "--model", QWEN_MODEL, "--missing-image-policy=error"],
        "inline": ["inline", paths["offloaded"], "-o", tmp_path / "inline.jsonl"],
    }

    result = runner.invoke(app, [str(arg) for arg in args[command]] + ["--allow-root", "s3://bucket/prefix"])

    assert result.exit_code == (1 if command == "audit" else 2), result.output
    assert "outside the allowed roots (`s3://bucket/prefix`)" in result.stdout + result.stderr


def test_directory_roots_still_admit_files_beside_an_object_store_root(tmp_path: Path) -> None:
    paths = make_run(tmp_path)
    roots = ["--allow-root", "s3://bucket/prefix", "--allow-root", str(paths["assets"])]

    result = runner.invoke(app, ["audit", str(paths["run"]), "--verify-hashes", "--json", *roots])

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["violations"] == []


def test_an_image_over_the_byte_limit_is_not_read(tmp_path: Path) -> None:
    paths = make_run(tmp_path)
    result = runner.invoke(
        app,
        ["materialize", str(paths["run"]), "--model", str(QWEN_MODEL)],
        env={"MMOFFLOAD_MAX_IMAGE_BYTES": "100"},
    )
    assert result.exit_code == 2 and "over the 100-byte limit" in result.stderr, result.stderr
    assert "rank_0.bin" in result.stderr


# --- decompression bombs: refused by header pixel count, before decoding -------------------------


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    out = io.BytesIO()
    Image.new("1", (13_000, 13_000)).save(out, format="PNG")
    with pytest.raises(BadInputError, match=r"13,000 x 13,000 pixels, over the 67,108,864-pixel limit"):
        open_image(out.getvalue(), "bomb.png")


def test_materialize_refuses_images_over_the_configured_pixel_limit(tmp_path: Path) -> None:
    paths = make_run(tmp_path)
    result = runner.invoke(
        app,
        ["materialize", str(paths["run"]), "--model", str(QWEN_MODEL)],
        env={"MMOFFLOAD_MAX_IMAGE_PIXELS": "1000"},
    )
    assert result.exit_code == 2, result.stderr
    assert "pixels, over the 1,000-pixel limit" in result.stderr and "rank_0.bin" in result.stderr

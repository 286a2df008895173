"""Guarantees without holes (issue 27): cut-short and corrupt inputs, bombs, escapes, verification.

Each class is driven through the CLI as an attacker or an unlucky operator would:
a failing case exits 2 with one located error line, never a traceback, and
never becomes a silently smaller result.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmoffload_cli import sink
from mmoffload_cli.app import app

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()

# A line every command accepts: a trace of one trainable node, no images.
TRACE = '{"nodes": [{"token_ids": [1, 2], "mask": [false, true], "logprobs": [-0.1]}]}'


# --- builders ------------------------------------------------------------------------------------


def lines(count: int, start: int = 0) -> bytes:
    """``count`` trace lines, each told apart by a field of its own."""
    return b"".join(
        TRACE.replace("{", f'{{"n": {n}, ', 1).encode() + b"\n" for n in range(start, start + count)
    )


def zstd_frame(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor(write_checksum=True).compress(data)


def command_args(command: str, source: Path | str, tmp_path: Path) -> list[str]:
    """The command line of ``command`` reading ``source`` (``-`` for stdin)."""
    return [
        str(arg)
        for arg in {
            "offload": ["offload", source, "-o", tmp_path / "o.jsonl", "--assets", tmp_path / "a"],
            "refs": ["refs", source, "--run-dir", tmp_path / "run"],
            "audit": ["audit", source, "--json"],
        }[command]
    ]


def cannot_run(args: list[str], *expected: str, stdin: bytes | None = None) -> str:
    """Run the CLI; check exit 2, one error line on stderr naming ``expected``, no traceback."""
    result = runner.invoke(app, args, input=stdin)
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    error_lines = result.stderr.strip().splitlines()
    assert len(error_lines) == 1 and error_lines[0].startswith("error: "), result.stderr
    message = " ".join(result.stderr.split())
    for text in expected:
        assert text in message, (text, message)
    return message


def cli(*args: str | Path) -> list[str]:
    """The command line that runs ``mmoffload`` from this checkout in a fresh process."""
    return [sys.executable, "-c", "from mmoffload_cli.app import main; main()", *map(str, args)]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "cli"), env.get("PYTHONPATH", "")])
    env.pop("MMOFFLOAD_TRACEBACK", None)
    env.pop("VF_RENDERER_IMAGE_OFFLOAD_DIR", None)
    return {**env, **extra}


# --- data loss: compressed input cut short is an error, never a shorter input -----------------


def cut_zstd(case: str) -> bytes:
    """Four lines of zstd cut short: in the middle of the only frame, or of the second of two."""
    if case == "mid-frame":
        whole = zstd_frame(lines(4))
        return whole[: len(whole) // 2]
    second = zstd_frame(lines(2, start=2))
    return zstd_frame(lines(2)) + second[: len(second) // 2]


@pytest.mark.parametrize("command", ["offload", "refs", "audit"])
@pytest.mark.parametrize("case", ["mid-frame", "second frame", "stdin"])
def test_a_zstd_input_cut_short_is_an_error_naming_the_file_and_last_line(
    tmp_path: Path, command: str, case: str
) -> None:
    data = cut_zstd("second frame" if case == "second frame" else "mid-frame")
    source = tmp_path / "cut.jsonl.zst"
    source.write_bytes(data)
    stdin = case == "stdin"

    message = cannot_run(
        command_args(command, "-" if stdin else source, tmp_path),
        "ended in the middle of a zstd frame",
        "<stdin>" if stdin else "cut.jsonl.zst",
        "after line 2" if case == "second frame" else "after line 0",
        stdin=data if stdin else None,
    )

    assert "Cannot decompress input" in message
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "run").exists()


def test_a_whole_multi_frame_zstd_input_reads_every_line(tmp_path: Path) -> None:
    source = tmp_path / "whole.jsonl.zst"
    source.write_bytes(zstd_frame(lines(2)) + zstd_frame(lines(2, start=2)))

    result = runner.invoke(app, ["audit", str(source), "--json"])

    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["jsonl_records"] == 4


# --- robustness: every decompression error, and lines too long to hold ----------------------------


def corrupt_gzip() -> bytes:
    """gzip with a valid header and garbage in its deflate stream (zlib raises, not gzip)."""
    whole = bytearray(gzip.compress(lines(200)))
    whole[30:60] = b"\xff" * 30
    return bytes(whole)


@pytest.mark.parametrize("command", ["offload", "refs", "audit"])
def test_a_corrupt_gzip_input_is_an_error_naming_the_file(tmp_path: Path, command: str) -> None:
    source = tmp_path / "bad.jsonl.gz"
    source.write_bytes(corrupt_gzip())

    cannot_run(command_args(command, source, tmp_path), "Cannot decompress input", "bad.jsonl.gz:")


def newline_free_bomb(path: Path, codec: str, size: int = 2 << 30) -> Path:
    """``size`` zero bytes without a newline, compressed to a few megabytes or less."""
    chunk = bytes(1 << 20)
    if codec == "zstd":
        zstandard = pytest.importorskip("zstandard")
        compressor = zstandard.ZstdCompressor(level=1).compressobj()
        path.write_bytes(b"".join(compressor.compress(chunk) for _ in range(size >> 20)) + compressor.flush())
        return path
    # A fully flushed deflate block of zeros compresses the same each time: write it once, repeat it.
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(size >> 20):
        crc = zlib.crc32(chunk, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    trailer = crc.to_bytes(4, "little") + (size & 0xFFFFFFFF).to_bytes(4, "little")
    with path.open("wb") as out:
        out.write(header + first)
        for _ in range((size >> 20) - 1):
            out.write(block)
        out.write(deflate.flush() + trailer)
    return path


def limit_memory(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_a_newline_free_bomb_under_a_memory_limit_is_refused_naming_the_file_and_line(
    tmp_path: Path, codec: str
) -> None:
    bomb = newline_free_bomb(tmp_path / "bomb.jsonl.gz", codec)
    assert bomb.stat().st_size < 3 << 20

    # 1.5 GiB of address space: the default line limit (1 GiB) or the memory runs out first.
    done = subprocess.run(
        cli("offload", bomb, "-o", tmp_path / "o.jsonl", "--assets", tmp_path / "a"),
        env=cli_env(),
        capture_output=True,
        preexec_fn=lambda: limit_memory(3 << 29),
        timeout=300,
    )

    message = done.stderr.decode()
    assert done.returncode == 2, message
    assert "Traceback" not in message and message.startswith("error: ") and len(message.splitlines()) == 1
    assert "bomb.jsonl.gz:1" in message
    assert "line limit" in message or "Out of memory" in message or "at most" in message


def test_a_line_over_the_configured_limit_is_refused_naming_the_limit(tmp_path: Path) -> None:
    source = tmp_path / "long.jsonl"
    source.write_bytes(lines(2) + b'{"x": "' + b"y" * 5000 + b'"}\n')

    result = runner.invoke(app, ["audit", str(source), "--json"], env={"MMOFFLOAD_MAX_LINE_BYTES": "1000"})

    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert "at most 1,000 bytes" in message and "MMOFFLOAD_MAX_LINE_BYTES" in message
    assert "long.jsonl:3" in message
    # At the limit exactly, the line is read.
    source.write_bytes(b'{"x": "' + b"y" * 990 + b'"}\n')
    limit = str(len(source.read_bytes()) - 1)
    result = runner.invoke(app, ["audit", str(source), "--json"], env={"MMOFFLOAD_MAX_LINE_BYTES": limit})
    assert result.exit_code == 0, result.stderr


# --- robustness: directories and globs -------------------------------------------------------------


def test_a_dangling_symlink_in_an_input_directory_is_an_error(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.jsonl").write_bytes(lines(1))
    (inputs / "b.jsonl").symlink_to(tmp_path / "gone.jsonl")

    for argument in (inputs, inputs / "*.jsonl"):
        cannot_run(
            ["offload", str(argument), "-o", str(tmp_path / "out"), "--assets", str(tmp_path / "a")],
            "symlink to nothing",
            "b.jsonl",
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("given", ["recursive glob", "directory"])
def test_a_second_run_reads_none_of_the_first_runs_outputs(tmp_path: Path, given: str) -> None:
    data = tmp_path / "d"
    (data / "sub").mkdir(parents=True)
    (data / "x.jsonl").write_bytes(lines(1))
    (data / "sub" / "y.jsonl").write_bytes(lines(1, start=1))
    argument = str(data / "**" / "*.jsonl") if given == "recursive glob" else str(data)
    args = ["offload", argument, "-o", str(data / "out"), "--assets", str(tmp_path / "a"), "--json"]

    for _ in range(2):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.stderr

    assert json.loads(result.stdout)["records"] == 2
    assert sorted(str(p.relative_to(data)) for p in data.rglob("*.jsonl")) == [
        "out/sub/y.jsonl",
        "out/x.jsonl",
        "sub/y.jsonl",
        "x.jsonl",
    ]


# --- security: user text never acts on the terminal -----------------------------------------------


# Each family of characters a terminal acts on, and how it must print instead.
CONTROLS = {
    "ESC clear screen": ("\x1b[2J", "\\x1b[2J"),
    "OSC window title": ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),
    # A hyperlink (no slash in it: file names carry it too).
    "OSC 8 hyperlink": ("\x1b]8;;mailto:x@evil.example\x1b\\", "\\x1b]8;;mailto:x@evil.example\\x1b\\"),
    "C1 CSI": ("\x9b31m", "\\x9b31m"),
    "NUL": ("\x00", "\\x00"),
    "bidi override": ("\u202e", "\\u202e"),
}
# File names cannot hold NUL: the printers fed by a file name get every family but that one.
IN_NAMES = [family for family in CONTROLS if family != "NUL"]


def payload(families: list[str]) -> str:
    return "".join(CONTROLS[family][0] for family in families)


def on_a_terminal(args: list[str | Path], json_stdout: bool = False) -> tuple[bytes, bytes]:
    """Run the CLI with stderr (and stdout unless ``json_stdout``) on a pseudo-terminal; return both."""
    import pty

    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        cli(*args),
        env=cli_env(TERM="xterm-256color", COLUMNS="4000", LINES="50"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if json_stdout else secondary,
        stderr=secondary,
    )
    os.close(secondary)
    terminal = b""
    while True:
        try:
            chunk = os.read(primary, 1 << 16)
        except OSError:  # EIO: the last writer closed the terminal.
            break
        if not chunk:
            break
        terminal += chunk
    stdout = process.stdout.read() if process.stdout else b""
    process.wait(timeout=60)
    os.close(primary)
    return terminal, stdout


def remote_url_line(url: str) -> str:
    part = {"type": "image_url", "image_url": {"url": url}}
    return json.dumps({"messages": [{"role": "user", "content": [part]}]})


def audited_run(tmp_path: Path) -> Path:
    """A one-sample Qwen-VL run in a directory whose name holds every control family a name can."""
    from tests.builders import qwen_sample, single_micro_batch, write_run

    run = tmp_path / f"run{payload(IN_NAMES)}"
    sample = qwen_sample(run / "assets" / "images", seeds=(0,))
    return write_run(run, [sample], [[single_micro_batch(sample)]])


PRINTERS = ["error", "--json error line", "warning", "report table", "violations table"]


@pytest.mark.parametrize("printer", PRINTERS)
def test_control_and_bidi_characters_in_user_text_print_escaped_on_a_terminal(
    tmp_path: Path, printer: str
) -> None:
    families = list(CONTROLS)
    source = tmp_path / "in.jsonl"
    source.write_text(remote_url_line("https://h/" + payload(families)) + "\n")
    json_stdout = printer == "--json error line"
    if printer in ("error", "--json error line"):
        args = ["offload", source, "-o", tmp_path / "o.jsonl", "--assets", tmp_path / "a"]
        args += ["--json"] if json_stdout else []
        starts = "error:"
    elif printer == "violations table":
        named = tmp_path / f"in{payload(IN_NAMES)}.jsonl"
        source.rename(named)
        args, starts = ["audit", named], "remote_uri"
    else:
        kimi = tmp_path / f"kimi{payload(IN_NAMES)}"
        kimi.symlink_to(REPO / "fixtures" / "models" / "kimi_k25")
        args = ["audit", audited_run(tmp_path), "--model", kimi]
        starts = "warning:" if printer == "warning" else "run"
        families = IN_NAMES

    terminal, stdout = on_a_terminal(args, json_stdout)

    text = terminal.decode()
    # Rich's own sequences (colours, the progress bar's line clearing) set aside to find the line.
    plain = re.sub("\x1b\\[[0-9;?]*[A-Za-z]", "", text)
    (line,) = [line for line in plain.splitlines() if line.split()[:1] == [starts]]
    for family in families:
        raw, escaped = CONTROLS[family]
        assert raw not in text, f"{family} reached the terminal raw: {text!r}"
        assert escaped in line, f"{family} is not shown escaped: {line!r}"
    if json_stdout:
        report = json.loads(stdout)
        assert payload(families) in report["message"]  # The same value, every character kept...
        assert not any(raw.encode() in stdout for raw, _ in CONTROLS.values())  # ...inert as JSON text.


def test_a_refused_file_is_described_without_its_bytes(tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_bytes(b"hunter2:*:20999:0:99999:7:::\n")
    source = tmp_path / "in.jsonl"
    source.write_text(remote_url_line(secret.as_uri()) + "\n")

    message = cannot_run(
        [
            "offload",
            str(source),
            "-o",
            str(tmp_path / "o.jsonl"),
            "--assets",
            str(tmp_path / "a"),
            "--adopt-files",
        ],
        "29 bytes in no image format",
        "in.jsonl:1",
    )

    assert "hunter2" not in message and "20999" not in message and "b'" not in message


HUGE = "F" * 5_000_000


def run_with_huge_family(tmp_path: Path) -> Path:
    """A one-sample run whose first descriptor of two names a 5 MB family."""
    from tests.builders import qwen_sample, single_micro_batch, write_run

    run = tmp_path / "run"
    sample = qwen_sample(run / "assets" / "images", seeds=(0, 1))
    assert sample.mm_refs is not None
    sample.mm_refs.images[0].item["family"] = HUGE
    return write_run(run, [sample], [[single_micro_batch(sample)]])


REPORTS = {
    "audit table": (["audit", "{run}", "-v"], 1),
    "audit --json": (["audit", "{run}", "--json"], 1),
    "pack": (["pack", "{run}", "--seq-len", "4096", "--json"], 2),
    "materialize": (["materialize", "{run}", "--json"], 2),
    "refs": (["refs", "{traces}", "--run-dir", "{out}", "--json"], 2),
}


@pytest.mark.parametrize("report", REPORTS)
def test_a_5_mb_string_is_quoted_at_most_200_characters_in_every_report(
    tmp_path: Path, report: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tables go through Rich: wide enough that no cell folds.
    monkeypatch.setattr(sink.stdout, "width", 1000)
    run = run_with_huge_family(tmp_path)
    from tests.builders import descriptor, sidecar

    image = descriptor("file:///a/0.png", [1, 2, 4], family=HUGE)
    flat = {"token_ids": [1, 151655, 151655, 2], "mask": [False] * 3 + [True], "logprobs": [0, 0, 0, -0.1]}
    traces = tmp_path / "traces.jsonl"
    traces.write_text(json.dumps({**flat, "multi_modal_data": sidecar([(image, "0" * 32, 1, 2)])}) + "\n")
    args, code = REPORTS[report]
    paths = {"run": run, "traces": traces, "out": tmp_path / "out"}

    result = runner.invoke(app, [arg.format(**paths) for arg in args])

    assert result.exit_code == code, result.stderr[:3000]
    printed = result.stdout + result.stderr
    assert len(printed) < 20_000, f"{len(printed):,} characters printed"
    assert "F" * 197 in printed and "F" * 201 not in printed and "5,000,0" in printed
    if "--json" in args:
        json.loads(result.stdout)


# --- robustness: what killed processes leave is removed by the next command -------------------------


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


STALE_COMMANDS = {
    "audit": ["audit", "{run}", "-q"],
    "pack": ["pack", "{run}", "--seq-len", "4096", "-q"],
    "refs": ["refs", "{traces}", "--run-dir", "{run}", "--overwrite", "-q"],
    "materialize": ["materialize", "{run}", "--model", "qwen3_vl", "-q"],
    "offload (the store)": ["offload", "{traces}", "-o", "{out}", "--assets", "{assets}", "-q"],
}


@pytest.mark.parametrize("command", STALE_COMMANDS)
def test_the_next_command_removes_temporaries_of_dead_processes_only(tmp_path: Path, command: str) -> None:
    from mmoffload.io.outputs import TEMP_PREFIX, own_temp_prefix
    from tests.builders import qwen_sample, single_micro_batch, write_run

    run = tmp_path / "run"
    assets = run / "assets" / "images"
    sample = qwen_sample(assets, seeds=(0,), grid=(1, 14, 20))  # The grid Qwen3-VL gives its 64x48 image.
    write_run(run, [sample], [[single_micro_batch(sample)]])
    traces = tmp_path / "traces.jsonl"
    traces.write_text(TRACE + "\n")
    host = own_temp_prefix().removesuffix("-").rpartition("@")[2]
    dead, live = dead_pid(), os.getpid()
    kept, removed = [], []
    for directory in (assets,) if command.startswith("offload") else (run, run / "rollouts"):
        removed += [
            directory / f"{TEMP_PREFIX}{dead}@{host}-file",
            directory / f"{TEMP_PREFIX}{dead}@{host}-dir",
        ]
        kept += [
            directory / f"{TEMP_PREFIX}{live}@{host}-file",
            directory / f"{TEMP_PREFIX}{dead}@00000000-file",
        ]
    for path in removed + kept:
        if path.name.endswith("-dir"):
            path.mkdir()
            (path / "rank_0.bin").write_bytes(b"partial")
        else:
            path.write_bytes(b"partial")
    paths = {"run": run, "traces": traces, "out": tmp_path / "out.jsonl", "assets": assets}

    result = runner.invoke(app, [arg.format(**paths) for arg in STALE_COMMANDS[command]])

    assert result.exit_code == 0, result.stderr
    assert [path.name for path in removed if path.exists()] == []
    assert all(path.exists() for path in kept), "a live or another host's temporary was removed"


# --- robustness: audit's memory is bounded by one micro batch, not the rank file ---------------------


def test_audit_peak_memory_is_flat_from_100_to_1000_micro_batches(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_audit_memory", REPO / "scripts" / "bench_audit_memory.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    peaks = {}
    for count in (100, 1000):
        bench.write_run(tmp_path / str(count), count, 3000)
        peaks[count] = bench.peak_rss(tmp_path / str(count))

    # Read whole, 1,000 micro batches of 3,000 tokens held about 1 GB (7x the 100's peak).
    assert peaks[1000] < 1.3 * peaks[100], peaks


def test_a_rank_file_cut_short_is_a_violation_after_the_micro_batches_read(tmp_path: Path) -> None:
    from mmoffload.audit import audit
    from tests.builders import qwen_sample, single_micro_batch, write_run

    run = tmp_path / "run"
    sample = qwen_sample(run / "assets" / "images", seeds=(0,))
    write_run(run, None, [[single_micro_batch(sample)] * 3])
    rank = run / "rollouts" / "step_0" / "rank_0.bin"
    rank.write_bytes(rank.read_bytes()[:-10])

    report = audit([run])

    (violation,) = [v for v in report.violations if v.kind == "undecodable"]
    assert "after 2 micro batches" in violation.reason and "truncated" in violation.reason
    assert (report.rank_files, report.micro_batches) == (0, 2)


# --- robustness: Ctrl-C stops every worker and the parent, every time ---------------------------------


CTRL_C_TRIALS = 10


def interrupted_run(tmp_path: Path, source: Path, stored_before_stop: int) -> tuple[int, str, int]:
    """Run offload --workers 2, Ctrl-C its process group once ``stored_before_stop`` images are stored.

    Returns the exit code, stderr, and the process group's id (to check that nothing of it lives on).
    """
    assets = tmp_path / "assets"
    process = subprocess.Popen(
        cli("offload", source, "-o", tmp_path / "out.jsonl", "--assets", assets, "--workers", "2", "-q"),
        env=cli_env(),
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    # 0: as the pool starts (its first process appears), else once that many images are stored.
    while process.poll() is None and not (
        children(process.pid) if stored_before_stop == 0 else stored(assets) >= stored_before_stop
    ):
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGINT)  # What Ctrl-C in a terminal does: the whole group.
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"offload --workers 2 hung after Ctrl-C ({stored_before_stop} images stored)")
    return process.returncode, stderr.decode(), process.pid


def children(pid: int) -> list[str]:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return []


def stored(assets: Path) -> int:
    return len(os.listdir(assets)) if assets.is_dir() else 0


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_stops_offload_with_workers_every_time_under_load(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from mmoffload.io.outputs import TEMP_PREFIX
    from tests.test_kill import images_file

    source = images_file(tmp_path / "in.jsonl", 300)
    rng = random.Random(27)
    # Two runs at a time, each stopped at its own seeded moment (half as the pool starts): the
    # other one is the load.
    moments = [rng.choice([0, rng.randrange(1, 250)]) for _ in range(2 * CTRL_C_TRIALS)]
    trials = [tmp_path / f"trial-{n}" for n in range(len(moments))]
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(interrupted_run, trials, [source] * len(trials), moments))

    for trial, moment, (code, stderr, pgid) in zip(trials, moments, outcomes, strict=True):
        finished = code == 0 and (trial / "out.jsonl").exists()  # Ctrl-C came as the run ended.
        assert finished or code == 130, (moment, code, stderr)
        assert "Traceback" not in stderr and "resource_tracker" not in stderr, stderr
        assert finished or "interrupted" in stderr
        deadline = time.monotonic() + 10
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group_alive(pgid), f"a process of the stopped run lives on ({moment} images stored)"
        leftovers = [
            p for p in [*trial.iterdir(), *(trial / "assets").iterdir()] if p.name.startswith(TEMP_PREFIX)
        ]
        assert not leftovers, leftovers
    assert sum(code == 130 for code, _, _ in outcomes) > CTRL_C_TRIALS, "the stops missed the runs"

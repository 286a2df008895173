"""Inputs and outputs as jq, ruff and uv users expect: -, compression, directories, globs, str paths."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from mmoffload.audit import audit
from mmoffload.contract.wire import read_rank_file, read_training_batch
from mmoffload.errors import BadInputError, UsageError
from mmoffload.io.inputs import expand_inputs, iter_lines
from mmoffload.offload import offload_record
from mmoffload_cli.app import app
from tests.builders import data_url, image_bytes

PNG = image_bytes(seed=5)
runner = CliRunner()


def record(url: str, turn: int = 0) -> dict:
    return {
        "turn": turn,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
    }


def jsonl(*records: dict) -> bytes:
    return b"".join(msgspec.json.encode(r) + b"\n" for r in records)


def lines_of(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines()]


def zstd(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor().compress(data)


def test_dash_reads_stdin_and_writes_stdout_not_a_file_named_dash(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-").write_bytes(jsonl({"stale": True}))  # Left by an older version: never read.

    result = runner.invoke(
        app, ["offload", "-", "-o", "-", "--assets", "assets"], input=jsonl(record(data_url(PNG)))
    )

    assert result.exit_code == 0, result.output
    [out] = lines_of(result.stdout_bytes)
    assert out["messages"][0]["content"][0]["image_url"]["url"].startswith("file://")
    assert "records" in result.stderr  # The report goes to stderr: stdout is the records'.
    assert (tmp_path / "-").read_bytes() == jsonl({"stale": True})


def test_stdout_output_and_json_report_cannot_share_stdout(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["offload", "-", "-o", "-", "--json", "--assets", str(tmp_path)], input=b"{}\n"
    )

    assert result.exit_code == 2
    assert "both would write to stdout" in json.loads(result.stdout)["message"]


@pytest.mark.parametrize("compress", [gzip.compress, zstd], ids=["gzip", "zstd"])
def test_compressed_inputs_are_read_by_their_magic_bytes_whatever_their_name(
    tmp_path: Path, compress
) -> None:
    source = tmp_path / "plain-name.jsonl"
    source.write_bytes(compress(jsonl(record(data_url(PNG)), {"plain": 1})))

    result = runner.invoke(
        app,
        [
            "offload",
            str(source),
            "-o",
            str(tmp_path / "out.jsonl"),
            "--assets",
            str(tmp_path / "a"),
            "--json",
        ],
    )

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["offloaded"] == 1
    assert lines_of((tmp_path / "out.jsonl").read_bytes())[1] == {"plain": 1}


@pytest.mark.parametrize(("suffix", "decompress"), [(".gz", gzip.decompress), (".zst", None)])
def test_an_output_named_gz_or_zst_is_written_compressed(tmp_path: Path, suffix: str, decompress) -> None:
    if decompress is None:
        zstandard = pytest.importorskip("zstandard")
        decompress = zstandard.ZstdDecompressor().decompressobj().decompress
    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl(record(data_url(PNG))))
    target = tmp_path / f"out.jsonl{suffix}"

    result = runner.invoke(app, ["offload", str(source), "-o", str(target), "--assets", str(tmp_path / "a")])

    assert result.exit_code == 0, result.output
    [out] = lines_of(decompress(target.read_bytes()))
    assert out["messages"][0]["content"][0]["image_url"]["url"].startswith("file://")
    # And it reads back through every command's input opener.
    assert [json.loads(line) for _, line in iter_lines(target)] == [out]


def test_a_truncated_gzip_input_is_bad_input_naming_the_file(tmp_path: Path) -> None:
    source = tmp_path / "cut.jsonl.gz"
    source.write_bytes(gzip.compress(jsonl(*[{"n": n} for n in range(1000)]))[:-40])

    result = runner.invoke(
        app, ["offload", str(source), "-o", str(tmp_path / "o.jsonl"), "--assets", str(tmp_path)]
    )

    assert result.exit_code == 2
    assert "Cannot decompress input" in result.stderr and "cut.jsonl.gz" in result.stderr
    with pytest.raises(BadInputError, match="Cannot decompress input"):
        list(iter_lines(source))


def nested_runs(tmp_path: Path) -> Path:
    """Two runs' results, each named results.jsonl: the same basename in different directories."""
    for name in ("run_a", "run_b"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "results.jsonl").write_bytes(jsonl(record(data_url(PNG)), {"run": name}))
    return tmp_path / "runs"


@pytest.mark.parametrize("given", ["dir", "glob"])
def test_directories_and_quoted_globs_mirror_outputs_by_relative_path(tmp_path: Path, given: str) -> None:
    runs = nested_runs(tmp_path)
    argument = str(runs) if given == "dir" else str(runs / "*" / "results.jsonl")

    result = runner.invoke(
        app, ["offload", argument, "-o", str(tmp_path / "out"), "--assets", str(tmp_path / "a")]
    )

    assert result.exit_code == 0, result.output
    for name in ("run_a", "run_b"):
        assert lines_of((tmp_path / "out" / name / "results.jsonl").read_bytes())[1] == {"run": name}


def test_two_inputs_that_would_collide_are_both_named(tmp_path: Path) -> None:
    runs = nested_runs(tmp_path)
    first, second = runs / "run_a" / "results.jsonl", runs / "run_b" / "results.jsonl"

    result = runner.invoke(
        app, ["offload", str(first), str(second), "-o", str(tmp_path / "out"), "--assets", str(tmp_path)]
    )

    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert f"Inputs `{first}` and `{second}` would both write" in message


def test_a_glob_that_matches_nothing_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="No file matches the pattern"):
        expand_inputs([str(tmp_path / "*.jsonl")])


def test_audit_of_a_directory_of_runs_audits_each_and_sums(tmp_path: Path) -> None:
    assert runner.invoke(app, ["demo", "--run-dir", str(tmp_path / "demo"), "-q"]).exit_code == 0

    result = runner.invoke(app, ["audit", str(tmp_path / "demo"), "--json"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [run["run"] for run in report["runs"]] == [
        str(tmp_path / "demo" / f) for f in ("chat_kimi_k25", "chat_qwen_vl", "kimi_k25", "qwen_vl")
    ]
    for figure in ("examples", "descriptors", "micro_batches", "unique_images", "image_bytes"):
        assert report[figure] == sum(run[figure] for run in report["runs"]) > 0, figure
    assert report["ok"] is True and all(run["ok"] for run in report["runs"])


def test_library_functions_take_str_paths(tmp_path: Path) -> None:
    assert runner.invoke(app, ["demo", "--run-dir", str(tmp_path / "demo"), "-q"]).exit_code == 0
    run = str(tmp_path / "demo" / "qwen_vl")

    assert read_rank_file(f"{run}/rollouts/step_0/rank_0.bin")
    assert read_training_batch(f"{run}/rollouts/step_0/train_rollouts.bin").examples
    assert audit([run]).ok
    body = record(data_url(PNG))
    assert offload_record(body, str(tmp_path / "assets")).offloaded == 1

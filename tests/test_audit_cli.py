"""``mmoffload audit`` through the real app: exit codes, JSON, table, expectations."""

from __future__ import annotations

from pathlib import Path

import msgspec
from typer.testing import CliRunner

from mmoffload.audit import AuditReport
from mmoffload_cli.app import app
from tests.builders import qwen_sample, single_micro_batch, write_run

runner = CliRunner()


def clean_run(tmp_path: Path) -> Path:
    samples = [qwen_sample(tmp_path / "assets", (0, 1)), qwen_sample(tmp_path / "assets", (2,))]
    return write_run(tmp_path / "run", samples, [[single_micro_batch(s) for s in samples]])


def broken_run(tmp_path: Path, count: int) -> Path:
    """A run whose ``count`` samples each lack type ids."""
    samples = [
        msgspec.structs.replace(qwen_sample(tmp_path / "assets", (seed,)), mm_token_type_ids=None)
        for seed in range(count)
    ]
    return write_run(tmp_path / "run", samples)


def test_a_clean_run_exits_0_with_one_json_report(tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", str(clean_run(tmp_path)), "--json", "--verify-hashes"])

    assert result.exit_code == 0, result.output
    report = msgspec.json.decode(result.stdout, type=AuditReport)
    assert (report.ok, report.examples, report.micro_batches_with_mm_refs, report.descriptors) == (
        True,
        2,
        2,
        3,
    )
    assert result.stderr == ""


def test_the_table_shows_figures_and_says_ok(tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", str(clean_run(tmp_path))])

    assert result.exit_code == 0
    assert "micro_batches_with_mm_refs" in result.stdout
    assert "audit: ok, no violations" in result.stdout


def test_violations_exit_1_and_the_table_shows_the_first_few(tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", str(broken_run(tmp_path, 12))])

    assert result.exit_code == 1
    assert "12 violation(s)" in result.stdout
    assert result.stdout.count("missing_type_ids") == 10
    assert "and 2 more" in result.stdout


def test_violations_in_json_are_all_listed_with_file_and_index(tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", str(broken_run(tmp_path, 3)), "--json"])

    assert result.exit_code == 1
    report = msgspec.json.decode(result.stdout)
    assert [(v["kind"], v["index"]) for v in report["violations"]] == [
        ("missing_type_ids", 0),
        ("missing_type_ids", 1),
        ("missing_type_ids", 2),
    ]
    assert report["ok"] is False and report["type_ids_present"] is False


def test_expectations_that_hold_exit_0(tmp_path: Path) -> None:
    args = ["--expect", "examples=2", "--expect", "data_uris=0", "--expect", "type_ids_present=true"]
    result = runner.invoke(app, ["audit", str(clean_run(tmp_path)), "-q", *args])

    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr == ""


def test_a_failed_expectation_exits_1_and_json_says_not_ok(tmp_path: Path) -> None:
    args = ["--expect", "examples>=4", "--expect", "ok=true"]
    result = runner.invoke(app, ["audit", str(clean_run(tmp_path)), "--json", *args])

    assert result.exit_code == 1
    report = msgspec.json.decode(result.stdout)
    assert report["ok"] is False
    assert report["expectations"] == [
        {"name": "examples", "op": ">=", "expected": 4, "actual": 2, "holds": False},
        {"name": "ok", "op": "=", "expected": True, "actual": True, "holds": True},
    ]
    assert result.stderr.strip() == "expectation failed: examples>=4, actual 2"


def test_comparisons_that_hold_exit_0(tmp_path: Path) -> None:
    args = ["--expect", "examples>=1", "--expect", "data_uris<1", "--expect", "missing_files!=1"]
    result = runner.invoke(app, ["audit", str(clean_run(tmp_path)), "--json", *args])

    assert result.exit_code == 0
    assert msgspec.json.decode(result.stdout)["ok"] is True


def test_a_typo_suggests_the_nearest_figure_and_json_carries_the_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", str(clean_run(tmp_path)), "--json", "--expect", "data_uri=0"])

    assert result.exit_code == 2
    error = msgspec.json.decode(result.stdout)
    assert (error["ok"], error["kind"]) == (False, "UsageError")
    assert "did you mean `data_uris`?" in error["message"] and "did you mean" in result.stderr


def test_an_unreadable_input_with_json_prints_one_error_object(tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", str(tmp_path / "no_run"), "--json"])

    assert result.exit_code == 2
    error = msgspec.json.decode(result.stdout)
    assert (error["file"], error["message"], error["ok"]) == (
        str(tmp_path / "no_run"),
        "No such file or directory",
        False,
    )


def test_an_unknown_figure_exits_2_listing_the_known_ones(tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", str(clean_run(tmp_path)), "--expect", "images=3"])

    assert result.exit_code == 2
    assert result.stdout == ""
    assert "Unknown figure `images`" in result.stderr
    assert "micro_batches_with_mm_refs" in result.stderr and "type_ids_present" in result.stderr


def test_a_corrupt_bin_exits_1_naming_it(tmp_path: Path) -> None:
    corrupt = tmp_path / "train_rollouts.bin"
    corrupt.write_bytes(b"\xc1")

    result = runner.invoke(app, ["audit", str(corrupt), "--json"])

    assert result.exit_code == 1
    [violation] = msgspec.json.decode(result.stdout)["violations"]
    assert (violation["kind"], violation["file"]) == ("undecodable", str(corrupt))


def test_a_missing_input_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", str(tmp_path / "no_run")])

    assert result.exit_code == 2
    assert "No such file or directory" in result.stderr


def test_no_input_at_all_exits_2() -> None:
    assert runner.invoke(app, ["audit"]).exit_code == 2


def test_every_expect_example_in_the_help_is_a_figure_audit_knows() -> None:
    from mmoffload.audit import parse_expectation
    from mmoffload_cli.options import Expect

    help_text = Expect.__metadata__[0].help
    examples = help_text.split("e.g. ")[1].split(" (ops")[0].split(", ")
    assert len(examples) == 3
    for example in examples:
        parse_expectation(example)  # An unknown figure raises.

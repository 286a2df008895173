"""``--remap FROM=TO``: prefix rewrites of image URIs."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmoffload.errors import UsageError
from mmoffload.store.remap import Remap
from mmoffload_cli.app import app


def test_a_path_rule_rewrites_file_uris_under_it():
    remap = Remap.parse(["/mnt/rollout/assets=/data/assets"])
    assert remap("file:///mnt/rollout/assets/ab.png") == "file:///data/assets/ab.png"


def test_only_whole_path_segments_match():
    remap = Remap.parse(["/mnt/a=/b"])
    assert remap("file:///mnt/ab/x.png") == "file:///mnt/ab/x.png"
    assert remap("file:///mnt/a") == "file:///b"


def test_the_longest_matching_rule_wins_whatever_the_order():
    remap = Remap.parse(["/mnt=/other", "/mnt/run/assets=/fast/assets"])
    assert remap("file:///mnt/run/assets/x.png") == "file:///fast/assets/x.png"
    assert remap("file:///mnt/run/y.png") == "file:///other/run/y.png"


def test_urls_map_to_paths_and_paths_with_spaces_are_percent_encoded():
    remap = Remap.parse(["s3://bucket/run/images/=/data/my images"])
    assert remap("s3://bucket/run/images/x.png") == "file:///data/my%20images/x.png"


def test_relative_paths_are_taken_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    remap = Remap.parse(["old=new"])
    assert remap((tmp_path / "old" / "x.png").as_uri()) == (tmp_path / "new" / "x.png").as_uri()


def test_uris_no_rule_matches_are_kept():
    assert Remap.parse(["/a=/b"])("s3://bucket/a/x.png") == "s3://bucket/a/x.png"
    assert Remap()(Path("/a/x.png").as_uri()) == "file:///a/x.png"


@pytest.mark.parametrize("text", ["/a", "=/b", "/a="])
def test_a_rule_without_both_sides_is_a_usage_error(text):
    with pytest.raises(UsageError, match="Expected --remap FROM=TO"):
        Remap.parse([text])


@pytest.mark.parametrize("command", ["audit", "materialize"])
def test_a_bad_remap_rule_is_exit_2_with_one_line(tmp_path, command):
    result = CliRunner().invoke(app, [command, str(tmp_path), "--remap", "no-equals-sign"])
    assert result.exit_code == 2
    assert "Expected --remap FROM=TO" in result.stderr
    assert "Traceback" not in result.stderr

"""Offload output pinned byte for byte: every fixture and the edge-case input give today's bytes.

The expected files under ``tests/golden/offload/`` were written by the offload
code as it was before the stage was made faster (commit eb85860), with the asset
directory's URI replaced by ``file:///ASSETS``; any change to what offload writes
shows here.
"""

import json
from pathlib import Path

import pytest

from mmoffload.contract.addresses import file_uri
from mmoffload.offload import offload_files

GOLDEN = Path(__file__).parent / "golden" / "offload"
ROOT = Path(__file__).parent.parent
INPUTS = [
    "tests/golden/offload/edge_cases.jsonl",
    "fixtures/rollouts/mini_browse.jsonl",
    "fixtures/traces/qwen_vl.jsonl",
    "fixtures/traces/kimi_k25.jsonl",
]
REPORTS = json.loads((GOLDEN / "reports.json").read_text())


# Workers are checked on the edge cases; the fixtures add nothing there.
@pytest.mark.parametrize(("name", "workers"), [*((name, 1) for name in INPUTS), (INPUTS[0], 2)])
def test_offload_writes_the_pinned_bytes_figures_and_images(tmp_path, name, workers):
    source, assets, output = ROOT / name, tmp_path / "assets", tmp_path / "out.jsonl"
    report = offload_files([source], [output], assets, workers=workers)
    written = output.read_bytes().replace(file_uri(assets.absolute()).encode(), b"file:///ASSETS")
    assert written == (GOLDEN / f"{source.stem}.offloaded.jsonl").read_bytes()
    expected = dict(REPORTS[name])
    assert sorted(p.name for p in assets.iterdir()) == expected.pop("assets")
    assert {key: getattr(report, key) for key in expected} == expected

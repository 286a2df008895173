"""``audit --html`` on the demo run: figures, distinct images and per-rank plots, in a real Chromium."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mmoffload.audit import audit
from mmoffload.contract import rundir
from mmoffload.contract.wire import read_rank_file, read_training_batch
from mmoffload.demo import run_demo
from mmoffload.pack import PackOptions, pack_run
from mmoffload_cli.app import app
from tests.browser import chromium, open_page, visible
from tests.builders import write_run

pytest.importorskip("matplotlib", reason="audit --html draws with matplotlib (the html extra)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return [Path(run.run_dir) for run in run_demo(tmp_path_factory.mktemp("demo")).runs]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from chromium()


def audit_html(paths: list[Path], out: Path, *options: str) -> int:
    result = CliRunner().invoke(app, ["audit", *map(str, paths), "--html", str(out), "-q", *options])
    assert result.stderr == ""
    return result.exit_code


def test_audit_html_of_the_demo_shows_figures_images_and_rank_plots(
    browser: Any, runs: list[Path], tmp_path: Path
) -> None:
    by = pytest.importorskip("selenium.webdriver.common.by").By
    page = tmp_path / "audit.html"
    assert audit_html(runs, page) == 0
    report = audit(runs)

    assert open_page(browser, page, tmp_path / "audit.png") == []
    assert browser.find_element(by.ID, "verdict").text == "ok: no violations"
    for name in ("examples", "micro_batches", "descriptors", "unique_images"):
        cell = browser.find_element(by.CSS_SELECTOR, f"tr[data-figure='{name}'] td:last-child")
        assert cell.text == f"{getattr(report, name):,}"
    gallery = browser.find_elements(by.CSS_SELECTOR, "figure.gallery-image")
    assert len(gallery) == report.unique_images
    assert sum(int(f.get_attribute("data-references")) for f in gallery) == report.descriptors
    assert all(visible(browser, f.find_element(by.TAG_NAME, "img")) for f in gallery)
    plots = browser.find_elements(by.CSS_SELECTOR, ".plot svg")
    assert [p.find_element(by.XPATH, "..").get_attribute("data-plot") for p in plots] == [
        "tokens",
        "fill_ratio",
        "padding",
        "truncation",
    ]
    assert all(visible(browser, plot) for plot in plots)
    assert len(browser.find_elements(by.CSS_SELECTOR, "tr[data-rank]")) == report.rank_files


def test_truncation_per_rank_is_what_the_cut_dropped(runs: list[Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    pack_run(run, PackOptions(seq_len=2000, world_size=2))
    page = tmp_path / "audit.html"
    # The copy's refs still point at the demo's images.
    assert audit_html([run], page, "--allow-root", str(runs[0] / "assets")) == 0

    samples = read_training_batch(rundir.training_batch_path(run, 0)).examples
    packed = [mb for path in rundir.rank_paths(run, 0) for mb in read_rank_file(path) if any(mb.loss_mask)]
    dropped = sum(len(s.token_ids) for s in samples) - sum(
        sum(name != "" for name in mb.env_names) for mb in packed
    )
    rows = page.read_text().split("<tr data-rank=")[1:]
    cells = [row.split("<td>")[-1].split("<")[0] for row in rows]
    assert dropped > 0 and sum(int(cell.replace(",", "")) for cell in cells) == dropped


def test_padding_and_fill_are_packs_own_even_when_samples_have_no_env_name(tmp_path: Path) -> None:
    from mmoffload.views.audit_html import _rank_figures
    from tests.test_packing import text_sample

    # Samples without an env name (`refs` gives them ""): only the layout tells padding.
    samples = [text_sample(n, first=100 * n, env_name="") for n in (10, 6, 5)]
    run = write_run(tmp_path / "run", samples)
    report = pack_run(run, PackOptions(seq_len=10, world_size=1, pad_multiple=4))
    step = rundir.step_dir(run, 0)

    (rank,) = _rank_figures([step / "train_rollouts.bin"], rundir.rank_paths(run, 0))
    assert (rank.padding, rank.real) == (report.padding_tokens, report.real_tokens) == (7, 21)
    assert rank.fill_ratio == report.fill_ratio == 21 / 30

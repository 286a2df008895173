"""``mmoffload inspect``: a demo micro batch and three broken ones, rendered in a real Chromium."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from typer.testing import CliRunner

from mmoffload.contract import rundir
from mmoffload.contract.wire import MicroBatch, MMRefs, encode, read_rank_file
from mmoffload.demo import fixtures_dir, run_demo
from mmoffload.pack import PackOptions, pack_run
from mmoffload_cli.app import app
from tests.browser import chromium, open_page, visible
from tests.builders import QWEN_IMAGE_PAD

TEXT_TOKEN = 72


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(run_demo(tmp_path_factory.mktemp("demo")).runs[0].run_dir)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from chromium()


def demo_batch(run: Path) -> MicroBatch:
    return read_rank_file(rundir.rank_path(run, 0, 0))[0]


def pad_replaced_inside_a_span(batch: MicroBatch) -> list[tuple[str, int]]:
    position = batch.mm_refs.images[0].offset + 10
    batch.input_ids[position], batch.mm_token_type_ids[position] = TEXT_TOKEN, 0
    return [("placeholder_mismatch", position)]


def offset_shifted_by_one(batch: MicroBatch) -> list[tuple[str, int]]:
    first, *rest = batch.mm_refs.images
    batch.mm_refs = MMRefs([msgspec.structs.replace(first, offset=first.offset + 1), *rest])
    # The span's last token is now <|vision_end|>, and its first pad is left outside.
    return [("placeholder_mismatch", first.offset + first.length), ("stray_image_token", first.offset)]


def stray_pad_before_the_span(batch: MicroBatch) -> list[tuple[str, int]]:
    position = batch.mm_refs.images[0].offset - 1
    batch.input_ids[position], batch.mm_token_type_ids[position] = QWEN_IMAGE_PAD, 1
    return [("stray_image_token", position)]


BREAKS: dict[str, Callable[[MicroBatch], list[tuple[str, int]]]] = {
    "pad replaced inside a span": pad_replaced_inside_a_span,
    "offset shifted by one": offset_shifted_by_one,
    "stray pad before the span": stray_pad_before_the_span,
}


def inspect(target: Path, out: Path, *args: str) -> int:
    result = CliRunner().invoke(app, ["inspect", str(target), "--html", str(out), "-q", *args])
    assert result.stderr == ""
    return result.exit_code


def assert_each_image_at_its_span(browser: Any, batch: MicroBatch) -> None:
    by = pytest.importorskip("selenium.webdriver.common.by").By
    figures = browser.find_elements(by.CSS_SELECTOR, "#tokens figure.image-span")
    assert len(figures) == len(batch.mm_refs.images)
    for index, (figure, ref) in enumerate(zip(figures, batch.mm_refs.images, strict=True)):
        assert figure.get_attribute("data-image") == str(index)
        assert figure.get_attribute("data-offset") == str(ref.offset)
        assert visible(browser, figure.find_element(by.TAG_NAME, "img"))
        # The card sits in the stream where its span is: right after the token before it.
        first = figure.find_element(by.CSS_SELECTOR, ".span-tokens .t")
        assert first.get_attribute("data-pos") == str(ref.offset)
        before = browser.execute_script(
            "let e = arguments[0].previousElementSibling;"
            "while (e && !e.matches('.t')) e = e.previousElementSibling; return e;",
            figure,
        )
        assert int(before.get_attribute("data-pos")) + int(before.get_attribute("data-count")) == ref.offset


def test_the_demo_micro_batch_shows_every_image_on_its_span(browser: Any, run: Path, tmp_path: Path) -> None:
    by = pytest.importorskip("selenium.webdriver.common.by").By
    page = tmp_path / "demo.html"
    assert inspect(run, page, "--model", str(fixtures_dir() / "models" / "qwen3_vl")) == 0

    errors = open_page(browser, page, tmp_path / "demo.png")
    assert errors == []
    assert (tmp_path / "demo.png").read_bytes().startswith(b"\x89PNG")
    assert_each_image_at_its_span(browser, demo_batch(run))
    assert browser.find_element(by.ID, "problems").text == "No problems"
    assert browser.find_elements(by.CSS_SELECTOR, "#tokens .problem") == []
    # The model directory's tokenizer config names the chat template's special tokens.
    assert browser.find_element(by.CSS_SELECTOR, ".t[data-pos='0']").text == "<|im_start|>"


@pytest.mark.parametrize("case", list(BREAKS))
def test_each_broken_micro_batch_has_its_problem_marked_where_it_is(
    browser: Any, run: Path, tmp_path: Path, case: str
) -> None:
    by = pytest.importorskip("selenium.webdriver.common.by").By
    batch = demo_batch(run)
    expected = BREAKS[case](batch)
    broken = tmp_path / "rank_0.bin"
    broken.write_bytes(encode([batch]))
    page = tmp_path / "broken.html"
    assert inspect(broken, page) == 1

    assert open_page(browser, page, tmp_path / "broken.png") == []
    if case != "offset shifted by one":
        assert_each_image_at_its_span(browser, batch)
    items = browser.find_elements(by.CSS_SELECTOR, "li.problem-item")
    assert sorted(
        (item.get_attribute("data-kind"), int(item.get_attribute("data-position"))) for item in items
    ) == (sorted(expected))
    for kind, position in expected:
        (item,) = browser.find_elements(by.CSS_SELECTOR, f"li.problem-item[data-kind='{kind}']")
        (token,) = browser.find_elements(by.CSS_SELECTOR, f".t.problem[data-pos='{position}']")
        assert visible(browser, token)
        assert item.get_attribute("data-problem") in token.get_attribute("data-problem").split()
        assert token.value_of_css_property("outline-style") == "solid"
    if any(kind == "placeholder_mismatch" for kind, _ in expected):
        figure = browser.find_element(by.CSS_SELECTOR, "figure.image-span[data-image='0']")
        assert "problem" in figure.get_attribute("class").split()


def test_a_missing_image_file_is_marked_on_its_card(run: Path, tmp_path: Path) -> None:
    batch = demo_batch(run)
    missing = msgspec.structs.replace(batch.mm_refs.images[1], uri="file:///nonexistent/" + "0" * 32 + ".png")
    missing.item = {**missing.item, "raw_image_uri": missing.uri}
    batch.mm_refs = MMRefs([batch.mm_refs.images[0], missing, *batch.mm_refs.images[2:]])
    broken = tmp_path / "rank_0.bin"
    broken.write_bytes(encode([batch]))
    page = tmp_path / "missing.html"
    assert inspect(broken, page) == 1

    document = page.read_text()
    assert re.search(r"<figure class='image-span problem' id='img-1'[^>]*data-problem='\d+'", document)
    assert "<li class='problem-item' data-kind='missing_file'" in document
    assert "<div class='missing-image'>Missing image file" in document


def test_a_corrupt_image_file_is_marked_on_its_card(run: Path, tmp_path: Path) -> None:
    batch = demo_batch(run)
    corrupt = tmp_path / "assets" / Path(batch.mm_refs.images[0].uri).name
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"not an image")
    ref = msgspec.structs.replace(batch.mm_refs.images[0], uri=corrupt.as_uri())
    ref.item = {**ref.item, "raw_image_uri": ref.uri}
    batch.mm_refs = MMRefs([ref, *batch.mm_refs.images[1:]])
    broken = tmp_path / "rank_0.bin"
    broken.write_bytes(encode([batch]))
    page = tmp_path / "corrupt.html"
    assert inspect(broken, page) == 1

    document = page.read_text()
    assert "<li class='problem-item' data-kind='hash_mismatch' data-problem='0' data-image='0'>" in document
    assert (
        "<li class='problem-item' data-kind='undecodable_image' data-problem='1' data-image='0'>" in document
    )
    assert re.search(r"<figure class='image-span problem' id='img-0'[^>]*data-problem='0 1'", document)
    assert "<div class='missing-image'>Image file does not decode: not an image format</div>" in document


def test_the_page_needs_no_network(run: Path, tmp_path: Path) -> None:
    page = tmp_path / "demo.html"
    assert inspect(run, page) == 0
    document = page.read_text()
    sources = re.findall(r"(?:src|href)='([^']*)'", document)
    assert sources and all(source.startswith(("data:", "#")) for source in sources)
    assert "<script" not in document and "http" not in document.split("<body>")[0]


def test_sequences_and_padding_are_banded(browser: Any, run: Path, tmp_path: Path) -> None:
    by = pytest.importorskip("selenium.webdriver.common.by").By
    packed = tmp_path / "run"
    shutil.copytree(run, packed)
    pack_run(packed, PackOptions(seq_len=8192, pad_multiple=64))
    batch = demo_batch(packed)
    page = tmp_path / "packed.html"
    assert inspect(packed, page) == 0

    assert open_page(browser, page, tmp_path / "packed.png") == []
    tags = browser.find_elements(by.CSS_SELECTOR, "#tokens .seq-start")
    starts = [sum(batch.sequence_lengths[:k]) for k in range(len(batch.sequence_lengths))]
    assert len(starts) > 1 and [int(tag.get_attribute("data-seq")) for tag in tags] == list(
        range(len(starts))
    )
    following = [
        browser.execute_script("return arguments[0].nextElementSibling.dataset.pos", tag) for tag in tags
    ]
    assert [int(pos) for pos in following] == starts
    padding = browser.find_elements(by.CSS_SELECTOR, "#tokens .t.pad")
    padded = sum(name == "" for name in batch.env_names)
    assert padded > 0 and sum(int(run.get_attribute("data-count")) for run in padding) == padded

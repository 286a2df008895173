"""Span errors show the tokens around the problem, in every stage that checks spans."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from mmoffload.audit import audit
from mmoffload.contract.spans import span_problems, token_window
from mmoffload.contract.wire import MMRefs, TrainingBatch
from mmoffload.errors import BadInputError, IntegrityError
from mmoffload.families import DEFAULT_TOKEN_NAMES, Families
from mmoffload.materialize import Materializer
from mmoffload.pack import PackOptions, pack_batch
from mmoffload.refs import RefsOptions, build_refs
from tests.builders import (
    QWEN_IMAGE_PAD,
    QWEN_VISION_END,
    QWEN_VISION_START,
    descriptor,
    image_bytes,
    qwen_sample,
    sidecar,
    single_micro_batch,
    store_image,
    write_run,
)

PAD, START, END = QWEN_IMAGE_PAD, QWEN_VISION_START, QWEN_VISION_END
TOKENS = [72, 105, START, *[PAD] * 880, END, 10, 11]


def type_ids(tokens: list[int]) -> list[int]:
    return [int(token == PAD) for token in tokens]


def test_a_window_collapses_runs_and_marks_the_token_and_the_span() -> None:
    assert token_window(TOKENS, 883, (3, 880), DEFAULT_TOKEN_NAMES) == (
        "... 105 <|vision_start|> [ <|image_pad|> x880 ] >><|vision_end|><< 10 11"
    )


def test_a_window_shows_an_offset_one_too_far() -> None:
    (problem, stray) = span_problems(type_ids(TOKENS), [(4, 880)], TOKENS, DEFAULT_TOKEN_NAMES)
    assert problem.message == (
        "span [4, 884) is not all image tokens: token 883 has type 0: "
        "... <|vision_start|> <|image_pad|> [ <|image_pad|> x879 >><|vision_end|><< ] 10 11"
    )
    assert (stray.kind, stray.position) == ("stray", 3)
    assert (
        stray.window
        == "72 105 <|vision_start|> >><|image_pad|><< [ <|image_pad|> x879 <|vision_end|> ] 10 ..."
    )


def test_a_window_shows_a_pad_replaced_inside_a_span() -> None:
    tokens = list(TOKENS)
    tokens[300] = 72
    (problem,) = span_problems(type_ids(tokens), [(3, 880)], tokens, DEFAULT_TOKEN_NAMES)
    assert problem.window == (
        "... 105 <|vision_start|> [ <|image_pad|> x297 >>72<< <|image_pad|> x582 ] <|vision_end|> 10 ..."
    )


def test_without_tokens_there_is_no_window_and_unnamed_tokens_print_as_ids() -> None:
    (problem,) = span_problems([0, 0, 0], [(1, 1)])
    assert problem.window is None and problem.message.endswith("has type 0")
    assert token_window([5, 6, 7], 1, token_names={}) == "5 >>6<< 7"
    assert token_window([], 0) == "(no tokens)"


def test_refs_names_the_tokens_around_a_shifted_placeholder(tmp_path: Path) -> None:
    stored = store_image(tmp_path / "assets", image_bytes())
    prompt = [1, START, *[PAD] * 4, END, 2]
    node = {"token_ids": prompt, "mask": [False] * len(prompt), "logprobs": []}
    node["multi_modal_data"] = sidecar([(descriptor(stored.uri, [1, 4, 4]), stored.hash, 3, 4)])
    traces = tmp_path / "traces.jsonl"
    completion = {"parent": 0, "token_ids": [10], "mask": [True], "logprobs": [-0.1]}
    traces.write_text(json.dumps({"id": "t", "nodes": [node, completion]}) + "\n")
    with pytest.raises(BadInputError) as caught:
        build_refs([traces], tmp_path / "run", RefsOptions())
    assert "... <|vision_start|> <|image_pad|> [ <|image_pad|> x3 >><|vision_end|><< ] 2 10" in str(
        caught.value
    )


def test_pack_names_the_tokens_around_a_pad_replaced_inside_a_span(tmp_path: Path) -> None:
    sample = qwen_sample(tmp_path, seeds=(0,))
    sample.mm_token_type_ids[4] = 0
    with pytest.raises(IntegrityError) as caught:
        pack_batch(TrainingBatch([sample], 0), PackOptions(seq_len=64), step=0)
    # The token is still a pad (its type id is what is wrong): the marker shows which one.
    assert "[ <|image_pad|> >><|image_pad|><< <|image_pad|> x2 ] <|vision_end|> 3" in str(caught.value)


def test_audit_names_the_tokens_around_a_stray_pad(tmp_path: Path) -> None:
    sample = qwen_sample(tmp_path, seeds=(0,))
    sample.token_ids[0] = PAD
    sample.mm_token_type_ids[0] = 1
    report = audit([write_run(tmp_path / "run", [sample])])
    (found,) = report.violations
    assert found.kind == "stray_image_token" and found.position == 0
    assert found.reason.endswith(": >><|image_pad|><< 2 <|vision_start|> [ <|image_pad|> x4 ] ...")


def test_materialize_names_the_tokens_around_a_span_on_text(tmp_path: Path) -> None:
    batch = single_micro_batch(qwen_sample(tmp_path, seeds=(0,)))
    (ref,) = batch.mm_refs.images
    batch.mm_refs = MMRefs([msgspec.structs.replace(ref, offset=ref.offset + 1)])
    with pytest.raises(IntegrityError) as caught:
        Materializer(Families()).materialize(batch)
    assert "[ <|image_pad|> x3 >><|vision_end|><< ]" in str(caught.value)

"""The refs stage: traces to TrainingBatch files with mm_refs (traces.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mmoffload.contract.wire import TRAINING_BATCH_DECODER, TrainingBatch
from mmoffload.errors import BadInputError, IntegrityError, UsageError
from mmoffload.families import resolve_model_dir
from mmoffload.families.qwen_vl import QwenVL
from mmoffload.refs import RefsOptions, build_refs
from tests.builders import descriptor, image_bytes, sidecar, store_image

PAD, START, END = 151655, 151652, 151653
KIMI_PAD = 163605


def image_span(length: int) -> list[int]:
    """Qwen-VL tokens of one image: start, ``length`` pads, end."""
    return [START, *[PAD] * length, END]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def read_step(run: Path, step: int = 0) -> TrainingBatch:
    return TRAINING_BATCH_DECODER.decode(
        (run / "rollouts" / f"step_{step}" / "train_rollouts.bin").read_bytes()
    )


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    return tmp_path / "assets"


def image_trace(assets: Path, trace_id: str = "t-1", seed: int = 0, **extra: Any) -> dict[str, Any]:
    """A trace: a prompt with one 4-token image (offset 2), then a two-token completion."""
    stored = store_image(assets, image_bytes(seed=seed))
    prompt = [1, *image_span(4), 2]
    return {
        "id": trace_id,
        "nodes": [
            {
                "token_ids": prompt,
                "mask": [False] * len(prompt),
                "logprobs": [],
                "multi_modal_data": sidecar([(descriptor(stored.uri, [1, 4, 4]), stored.hash, 2, 4)]),
            },
            {"parent": 0, "token_ids": [10, 11], "mask": [True, True], "logprobs": [-0.1, -0.2]},
        ],
        **extra,
    }


def run_refs(tmp_path: Path, records: list[dict[str, Any]], **options: Any) -> tuple[Path, Any]:
    run = tmp_path / "run"
    report = build_refs([write_jsonl(tmp_path / "traces.jsonl", records)], run, RefsOptions(**options))
    return run, report


def test_branches_share_their_prefix_and_its_images(tmp_path: Path, assets: Path) -> None:
    trace = image_trace(assets)
    trace["nodes"].append(
        {"parent": 0, "token_ids": [20, 21, 22], "mask": [True, False, True], "logprobs": [-0.3, -0.4]}
    )
    run, report = run_refs(tmp_path, [{"env": {"id": "chart-qa"}, "traces": [trace]}])

    examples = read_step(run).examples
    prompt = [1, *image_span(4), 2]
    assert [e.token_ids for e in examples] == [[*prompt, 10, 11], [*prompt, 20, 21, 22]]
    assert [e.mask for e in examples] == [
        [False] * 8 + [True, True],
        [False] * 8 + [True, False, True],
    ]
    assert examples[1].logprobs == [0.0] * 8 + [-0.3, 0.0, -0.4]
    for example in examples:
        assert example.env_name == "chart-qa"
        assert [(r.offset, r.length) for r in example.mm_refs.images] == [(2, 4)]
        assert example.mm_token_type_ids[:8] == [0, 0, 1, 1, 1, 1, 0, 0]
    assert (report.traces, report.branches, report.samples_written, report.images_referenced) == (1, 2, 2, 2)
    assert report.distinct_images == 1 and report.type_ids_cross_checked


def test_sidecars_merge_along_the_path_in_token_order(tmp_path: Path, assets: Path) -> None:
    trace = image_trace(assets)
    second = store_image(assets, image_bytes(seed=7))
    tool = [5, *image_span(1)]  # starts at 10: the image pad sits at 12
    trace["nodes"].append(
        {
            "parent": 1,
            "token_ids": tool,
            "mask": [False] * 4,
            "multi_modal_data": sidecar([(descriptor(second.uri, [1, 2, 2]), second.hash, 12, 1)]),
        }
    )
    trace["nodes"].append({"parent": 2, "token_ids": [30], "mask": [True], "logprobs": [-1.0]})
    run, _ = run_refs(tmp_path, [trace])

    (example,) = read_step(run).examples
    assert [(r.hash, r.offset, r.length) for r in example.mm_refs.images] == [
        (trace["nodes"][0]["multi_modal_data"]["mm_hashes"]["image"][0], 2, 4),
        (second.hash, 12, 1),
    ]
    assert example.mm_refs.images[1].uri == second.uri
    assert example.mm_refs.images[1].item["payload"] == {"image_grid_thw": [[1, 2, 2]]}
    assert example.logprobs == [0.0] * 8 + [-0.1, -0.2] + [0.0] * 4 + [-1.0]


def test_logprobs_are_placed_on_the_true_mask_entries(tmp_path: Path) -> None:
    trace = {
        "id": "t",
        "nodes": [{"token_ids": [1, 2, 3, 4], "mask": [0, 1, 0, 1], "logprobs": [-1.5, -2.5]}],
    }
    run, _ = run_refs(tmp_path, [trace])

    (example,) = read_step(run).examples
    assert example.mask == [False, True, False, True]
    assert example.logprobs == [0.0, -1.5, 0.0, -2.5]
    assert example.mm_refs is None and example.mm_token_type_ids is None


def test_advantages_are_reward_minus_the_group_mean(tmp_path: Path) -> None:
    def episode(task: str, rewards: Any) -> dict[str, Any]:
        node = {"token_ids": [1, 2], "mask": [False, True], "logprobs": [-0.1]}
        return {"task": task, "traces": [{"nodes": [node], "rewards": rewards}]}

    weighted = {"correct": {"score": 1.0, "weight": 1.0}, "format": {"score": 0.5, "weight": 2.0}}
    run, report = run_refs(tmp_path, [episode("a", weighted), episode("a", 0.5), episode("b", 1.0)])

    # On the trainable token only (traces.md): the prompt token gets 0.0.
    assert [e.advantages for e in read_step(run).examples] == [[0.0, 0.75], [0.0, -0.75], [0.0, 0.0]]
    assert report.advantages_from_group_reward == 3


def test_node_advantages_win_over_the_reward(tmp_path: Path) -> None:
    nodes = [
        {"token_ids": [1, 2]},  # no mask: nothing sampled
        {
            "parent": 0,
            "token_ids": [3, 4],
            "mask": [True, True],
            "logprobs": [-1.0, -1.0],
            "advantages": 0.25,
        },
    ]
    run, _ = run_refs(tmp_path, [{"nodes": nodes, "rewards": 1.0, "task": "x"}])

    assert read_step(run).examples[0].advantages == [0.0, 0.0, 0.25, 0.25]


def test_a_sampled_turn_shared_by_a_fork_is_trained_in_the_first_branch_only(tmp_path: Path) -> None:
    # prompt -> turn 1 (sampled) -> fork: turn 2a (sampled) | tool -> turn 2b (sampled);
    # a third leaf hangs straight off turn 1 with no sampled token of its own.
    nodes = [
        {"token_ids": [1, 2], "mask": [False, False]},
        {"parent": 0, "token_ids": [10, 11], "mask": [True, True], "logprobs": [-0.1, -0.2]},
        {"parent": 1, "token_ids": [20], "mask": [True], "logprobs": [-0.3]},
        {"parent": 1, "token_ids": [30]},
        {"parent": 3, "token_ids": [31, 32], "mask": [False, True], "logprobs": [-0.4]},
        {"parent": 1, "token_ids": [40]},
    ]
    other = {"token_ids": [5, 6], "mask": [False, True], "logprobs": [-1.0]}
    records = [{"nodes": nodes, "rewards": 1.0, "task": "x"}, {"nodes": [other], "rewards": 0.0, "task": "x"}]
    run, report = run_refs(tmp_path, records)

    first, second, _ = read_step(run).examples
    assert first.token_ids == [1, 2, 10, 11, 20]
    assert first.mask == [False, False, True, True, True]
    # Turn 1 rides along as context: tokens and logprobs kept, mask false, no advantage.
    assert second.token_ids == [1, 2, 10, 11, 30, 31, 32]
    assert second.mask == [False, False, False, False, False, False, True]
    assert second.logprobs == [0.0, 0.0, -0.1, -0.2, 0.0, 0.0, -0.4]
    assert second.advantages == [0.0] * 6 + [0.5]  # reward 1.0 minus the mean of 1.0 and 0.0
    assert first.advantages == [0.0, 0.0, 0.5, 0.5, 0.5]
    assert (report.branches, report.samples_written, report.sampled_turns_as_context) == (4, 3, 2)
    assert report.branches_without_trainable_tokens == 1  # the leaf [40]: its only sampled turn is trained


def test_recorded_temperature_wins_and_the_default_fills_in(tmp_path: Path) -> None:
    node = {"token_ids": [1, 2], "mask": [False, True], "logprobs": [-0.1]}
    records = [
        {"traces": [{"nodes": [node], "sampling_args": {"temperature": 0.7}}]},
        {"nodes": [node]},
    ]
    run, _ = run_refs(tmp_path, records, temperature=0.9, env_name="fallback")

    examples = read_step(run).examples
    assert [e.temperatures for e in examples] == [[0.7, 0.7], [0.9, 0.9]]
    assert [e.env_name for e in examples] == ["fallback", "fallback"]


def test_untrainable_agents_and_branches_without_trainable_tokens_yield_nothing(tmp_path: Path) -> None:
    node = {"token_ids": [1, 2], "mask": [False, True], "logprobs": [-0.1]}
    records = [
        {"nodes": [node], "agent": {"trainable": False}},
        {"nodes": [{"token_ids": [1, 2], "mask": [False, False]}]},
    ]
    _, report = run_refs(tmp_path, records)

    assert (report.untrainable_traces, report.branches_without_trainable_tokens) == (1, 1)
    assert report.samples_written == 0 and report.steps == []


def test_a_flat_sample_gives_its_fields_directly(tmp_path: Path, assets: Path) -> None:
    stored = store_image(assets, image_bytes(seed=3))
    flat = {
        "token_ids": [7, *image_span(1), 8],
        "mask": [False, False, False, False, True],
        "logprobs": [0.0, 0.0, 0.0, 0.0, -0.3],
        "temperatures": [0.5] * 5,
        "env_name": "ocr",
        "advantages": 2.0,
        "ref_logprobs": [0.0, 0.0, 0.0, 0.0, -0.4],
        "multi_modal_data": sidecar([(descriptor(stored.uri, [1, 2, 2]), stored.hash, 2, 1)]),
    }
    run, report = run_refs(tmp_path, [flat])

    (example,) = read_step(run).examples
    assert (example.env_name, example.temperatures, example.advantages) == ("ocr", [0.5] * 5, [2.0] * 5)
    assert example.ref_logprobs == [0.0, 0.0, 0.0, 0.0, -0.4]
    assert example.mm_token_type_ids == [0, 0, 1, 0, 0]
    assert report.flat_samples == 1


def test_steps_hold_step_size_samples(tmp_path: Path) -> None:
    node = {"token_ids": [1, 2], "mask": [False, True], "logprobs": [-0.1]}
    run, report = run_refs(tmp_path, [{"nodes": [node]}] * 5, step_size=2, first_step=3)

    assert report.steps == [3, 4, 5]
    assert [len(read_step(run, step).examples) for step in (3, 4, 5)] == [2, 2, 1]
    assert read_step(run, 5).step == 5


def test_with_a_model_a_text_sample_may_hold_no_image_token(tmp_path: Path) -> None:
    text = {"id": "plain", "nodes": [{"token_ids": [1, PAD], "mask": [False, True], "logprobs": [-0.1]}]}
    _, report = run_refs(tmp_path, [text])
    assert report.samples_written == 1

    with pytest.raises(
        BadInputError, match="no image tokens in a sample without images, got one at position 1"
    ):
        run_refs(tmp_path, [text], model_dir=resolve_model_dir("qwen2_5_vl"))


def test_kimi_images_take_one_media_pad(tmp_path: Path, assets: Path) -> None:
    stored = store_image(assets, image_bytes(seed=2))
    tokens = [163602, 1, 163603, KIMI_PAD, 163604, 9]
    trace = {
        "id": "k",
        "nodes": [
            {
                "token_ids": tokens,
                "mask": [False] * 5 + [True],
                "logprobs": [-0.2],
                "multi_modal_data": sidecar(
                    [(descriptor(stored.uri, [1, 4, 6], "kimi_k25"), stored.hash, 3, 1)]
                ),
            }
        ],
    }
    run, _ = run_refs(tmp_path, [trace])

    assert read_step(run).examples[0].mm_token_type_ids == [0, 0, 0, 1, 0, 0]


def test_without_a_token_map_type_ids_come_from_the_placeholders(
    tmp_path: Path, assets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(QwenVL, "default_token_ids", {})
    run, report = run_refs(tmp_path, [image_trace(assets)])

    assert read_step(run).examples[0].mm_token_type_ids == [0, 0, 1, 1, 1, 1, 0, 0, 0, 0]
    assert not report.type_ids_cross_checked and report.samples_type_ids_from_placeholders == 1


# --- every check names the line, the trace and the image -------------------------------------------


def broken(assets: Path, change: Any) -> list[dict[str, Any]]:
    """Line 1 is fine; line 2 is trace `t-2` whose first node's sidecar ``change`` breaks."""
    trace = image_trace(assets, "t-2", seed=1)
    change(trace["nodes"][0], assets)
    return [image_trace(assets), {"env": {"id": "e"}, "traces": [trace]}]


def add_second_image(node: dict[str, Any], assets: Path, offset: int, length: int = 1) -> None:
    stored = store_image(assets, image_bytes(seed=9))
    data = node["multi_modal_data"]
    data["mm_items"]["image"].append(descriptor(stored.uri, [1, 2, 2]))
    data["mm_hashes"]["image"].append(stored.hash)
    data["mm_placeholders"]["image"].append({"offset": offset, "length": length})


def first_item(node: dict[str, Any]) -> dict[str, Any]:
    return node["multi_modal_data"]["mm_items"]["image"][0]


def set_uri(node: dict[str, Any], uri: str) -> None:
    first_item(node)["raw_image_uri"] = uri


CASES = {
    "remote uri": (lambda n, a: set_uri(n, "https://example.com/cat.png"), "local `file://` URI", 0),
    "inline data": (
        lambda n, a: first_item(n).update(raw_image_data="data:image/png;base64,AA=="),
        "raw_image_data",
        0,
    ),
    "processed payload": (
        lambda n, a: first_item(n)["payload"].update(pixel_values=[[0.0]]),
        "processed key `pixel_values`",
        0,
    ),
    "length mismatch": (
        lambda n, a: n["multi_modal_data"]["mm_hashes"]["image"].append("0" * 32),
        "equal image list lengths",
        None,
    ),
    "unsorted": (lambda n, a: add_second_image(n, a, offset=1), "in token order", 1),
    "overlapping": (lambda n, a: add_second_image(n, a, offset=5), "without overlap", 1),
    "family length": (
        lambda n, a: first_item(n)["payload"].update(image_grid_thw=[[1, 4, 8]]),
        "Expected placeholder length 8",
        0,
    ),
    "missing file": (lambda n, a: set_uri(n, (a / "gone.png").as_uri()), "Missing image file", 0),
    "wrong hash": (
        lambda n, a: n["multi_modal_data"]["mm_hashes"]["image"].__setitem__(0, "f" * 32),
        "Content hash mismatch",
        0,
    ),
    "span not image tokens": (lambda n, a: n["token_ids"].__setitem__(3, 42), "not all image tokens", 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_sidecar_problem_names_line_trace_and_image(tmp_path: Path, assets: Path, case: str) -> None:
    change, expected, image = CASES[case]
    with pytest.raises((BadInputError, IntegrityError)) as caught:
        run_refs(tmp_path, broken(assets, change))

    message = str(caught.value)
    assert expected in message
    assert "traces.jsonl:2`" in message and "trace `t-2`" in message
    if image is not None:
        assert f"image {image}" in message
    assert not (tmp_path / "run" / "rollouts" / "step_0").exists()


def test_an_image_token_outside_every_placeholder_names_its_position(tmp_path: Path, assets: Path) -> None:
    trace = image_trace(assets, "t-9")
    trace["nodes"][1]["token_ids"] = [PAD, 11]
    with pytest.raises(BadInputError, match=r"image token at position 8 outside every placeholder") as caught:
        run_refs(tmp_path, [trace])
    assert "trace `t-9`" in str(caught.value) and "traces.jsonl:1`" in str(caught.value)


def test_a_sample_carrying_mm_kwargs_is_rejected(tmp_path: Path) -> None:
    flat = {
        "id": "s1",
        "token_ids": [1],
        "mask": [True],
        "logprobs": [-0.1],
        "mm_kwargs": {"pixel_values": {}},
    }
    with pytest.raises(BadInputError, match="Expected no `mm_kwargs`") as caught:
        run_refs(tmp_path, [flat])
    assert "trace `s1`" in str(caught.value)


def test_a_logprob_count_that_misses_the_true_entries_is_an_error(tmp_path: Path) -> None:
    trace = {"id": "t", "nodes": [{"token_ids": [1, 2], "mask": [True, True], "logprobs": [-0.1]}]}
    with pytest.raises(BadInputError, match=r"one logprob per true mask entry \(2\), got 1") as caught:
        run_refs(tmp_path, [trace])
    assert "`$.nodes[0].logprobs`" in str(caught.value)


def test_a_field_of_the_wrong_type_names_its_json_path(tmp_path: Path) -> None:
    trace = {"traces": [{"nodes": [{"token_ids": [1, "x"], "mask": [True, True]}]}]}
    with pytest.raises(BadInputError, match=r"Expected `int`, got `str`") as caught:
        run_refs(tmp_path, [trace])
    assert "`$.traces[0].nodes[0].token_ids[1]`" in str(caught.value)


def test_no_verify_hashes_still_checks_that_files_exist(tmp_path: Path, assets: Path) -> None:
    wrong_hash = broken(assets, CASES["wrong hash"][0])
    _, report = run_refs(tmp_path, wrong_hash, verify_hashes=False)
    assert report.samples_written == 2 and not report.hashes_verified

    missing = broken(assets, CASES["missing file"][0])
    with pytest.raises(IntegrityError, match="Missing image file"):
        run_refs(tmp_path, missing, verify_hashes=False)


def test_skip_invalid_writes_the_valid_samples_and_keeps_rejects_whole(tmp_path: Path, assets: Path) -> None:
    records = broken(assets, CASES["family length"][0])
    run, report = run_refs(tmp_path, records, skip_invalid=True)

    assert (report.samples_written, report.rejected_records) == (1, 1)
    assert (report.lines, report.episodes, report.traces, report.images_referenced) == (2, 0, 1, 1)
    (reject,) = [json.loads(line) for line in Path(report.rejects_path).read_text().splitlines()]
    assert json.loads(reject["text"]) == records[1]
    assert reject["line"] == 2 and "Expected placeholder length 8" in reject["reason"]
    assert len(read_step(run).examples) == 1


def test_a_step_that_cannot_be_written_is_named_and_no_step_is_written(tmp_path: Path) -> None:
    node = {"token_ids": [1, 2], "mask": [False, True], "logprobs": [-0.1]}
    blocker = tmp_path / "run" / "rollouts" / "step_1"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a directory")
    with pytest.raises(UsageError, match=r"Cannot write output: .* - at `.*step_1/train_rollouts.bin`"):
        run_refs(tmp_path, [{"nodes": [node]}] * 3, step_size=2)

    # The steps of one run appear as a unit: step 0 is not written without step 1.
    assert sorted(p.name for p in blocker.parent.iterdir()) == ["step_1"]


def test_sampled_node_without_logprobs_gets_zeros_counted_and_warned(tmp_path: Path) -> None:
    trace = {
        "nodes": [
            {"token_ids": [1, 2], "mask": [False, False]},
            {"parent": 0, "token_ids": [3, 4], "mask": [True, True], "sampled": True},
        ]
    }
    report = build_refs([write_jsonl(tmp_path / "t.jsonl", [trace])], tmp_path / "run")
    assert read_step(tmp_path / "run").examples[0].logprobs == [0.0, 0.0, 0.0, 0.0]
    assert report.sampled_nodes_without_logprobs == 1
    assert "1 sampled node(s) recorded no logprobs" in report.warnings[0]


def test_sampled_node_with_an_empty_logprobs_list_is_still_an_error(tmp_path: Path) -> None:
    trace = {"nodes": [{"token_ids": [3, 4], "mask": [True, True], "logprobs": []}]}
    with pytest.raises(BadInputError, match=r"one logprob per true mask entry \(2\), got 0"):
        build_refs([write_jsonl(tmp_path / "t.jsonl", [trace])], tmp_path / "run")

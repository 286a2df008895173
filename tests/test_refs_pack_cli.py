"""``mmoffload refs`` and ``mmoffload pack`` through the real app; files decoded by contract order only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from typer.testing import CliRunner

from mmoffload.audit import audit
from mmoffload.demo import run_demo
from mmoffload_cli.app import app
from tests.builders import descriptor, image_bytes, sidecar, store_image

runner = CliRunner()
PAD, START, END = 151655, 151652, 151653


# Declared here from contract.md section 6 alone, so a field order slip in the library shows up.
class ImageRef(msgspec.Struct, array_like=True):
    item: dict[str, Any]
    hash: str
    uri: str
    offset: int
    length: int


class Refs(msgspec.Struct, array_like=True):
    images: list[ImageRef]


class Sample(msgspec.Struct, array_like=True):
    token_ids: list[int]
    mask: list[bool]
    logprobs: list[float]
    temperatures: list[float]
    env_name: str
    ref_logprobs: list[float] | None = None
    mm_kwargs: dict[str, Any] | None = None
    mm_refs: Refs | None = None
    routed_experts: Any = None
    mm_token_type_ids: list[int] | None = None
    rl_weights: list[float] | None = None
    ce_weights: list[float] | None = None
    ref_kl_weights: list[float] | None = None
    advantages: list[float] | None = None


class Batch(msgspec.Struct, array_like=True):
    examples: list[Sample]
    step: int
    run_idx: int | None = None


class Micro(msgspec.Struct, array_like=True):
    input_ids: list[int]
    loss_mask: list[bool]
    advantages: list[float]
    inference_logprobs: list[float]
    position_ids: list[int]
    sequence_lengths: list[int]
    temperatures: list[float]
    env_names: list[str]
    seq_lens: list[int]
    ref_logprobs: list[float] | None = None
    lora_num_tokens: list[int] | None = None
    routed_experts: Any = None
    mm_kwargs: dict[str, Any] | None = None
    mm_refs: Refs | None = None
    mm_token_type_ids: list[int] | None = None
    rl_weights: list[float] | None = None
    ce_weights: list[float] | None = None
    ref_kl_weights: list[float] | None = None
    run_id: str | None = None
    run_step: int | None = None


def traces_file(tmp_path: Path, broken_second: bool = False) -> tuple[Path, str]:
    """Two episodes of task `q`: one with an image (reward 1), one text only (reward 0)."""
    stored = store_image(tmp_path / "assets", image_bytes(seed=4))
    prompt = [1, START, PAD, END, 2]
    image_episode = {
        "env": {"id": "vqa"},
        "task": "q",
        "traces": [
            {
                "id": "img",
                "rewards": 1.0,
                "nodes": [
                    {
                        "token_ids": prompt,
                        "mask": [False] * 5,
                        "multi_modal_data": sidecar([(descriptor(stored.uri, [1, 2, 2]), stored.hash, 2, 1)]),
                    },
                    {"parent": 0, "token_ids": [7, 8], "mask": [True, True], "logprobs": [-0.5, -0.25]},
                ],
            }
        ],
    }
    if broken_second:
        image_episode["traces"][0]["nodes"][0]["multi_modal_data"]["mm_placeholders"]["image"][0][
            "length"
        ] = 2
    text_episode = {
        "env": {"id": "vqa"},
        "task": "q",
        "traces": [
            {
                "id": "txt",
                "rewards": 0.0,
                "nodes": [{"token_ids": [3, 4, 5], "mask": [False, True, True], "logprobs": [-1.0, -2.0]}],
            }
        ],
    }
    records = [text_episode, image_episode]
    path = tmp_path / "offloaded.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, stored.uri


def test_refs_then_pack_write_files_that_decode_by_contract_order(tmp_path: Path) -> None:
    traces, uri = traces_file(tmp_path)
    run = tmp_path / "run"

    refs = runner.invoke(app, ["refs", str(traces), "--run-dir", str(run), "--model", "qwen3_vl", "--json"])
    assert refs.exit_code == 0, refs.stderr
    report = json.loads(refs.stdout)
    assert (report["samples_written"], report["images_referenced"], report["steps"]) == (2, 1, [0])
    assert report["type_ids_cross_checked"] is True

    batch = msgspec.msgpack.decode((run / "rollouts/step_0/train_rollouts.bin").read_bytes(), type=Batch)
    text, image = batch.examples
    # The group advantage sits on the trainable tokens only.
    assert (text.advantages, image.advantages) == ([0.0, -0.5, -0.5], [0.0] * 5 + [0.5] * 2)
    assert image.mm_refs.images[0].uri == uri and image.mm_refs.images[0].offset == 2
    assert image.mm_token_type_ids == [0, 0, 1, 0, 0, 0, 0] and text.mm_token_type_ids is None

    pack = runner.invoke(
        app, ["pack", str(run), "--seq-len", "16", "--pad-multiple", "4", "--world-size", "2", "--json"]
    )
    assert pack.exit_code == 0, pack.stderr
    packed = json.loads(pack.stdout)
    assert (packed["micro_batches_per_rank"], packed["dummies"], packed["micro_batches_with_refs"]) == (
        1,
        1,
        1,
    )
    assert packed["fill_ratio"] == 10 / 32

    rank0, rank1 = (
        msgspec.msgpack.decode((run / f"rollouts/step_0/rank_{r}.bin").read_bytes(), type=list[Micro])
        for r in (0, 1)
    )
    (dummy,), (real,) = rank0, rank1  # equal costs: the higher index (the dummy) goes to rank 0
    assert real.input_ids == [1, START, PAD, END, 2, 7, 8, 3, 4, 5, 0, 0]
    assert real.sequence_lengths == [7, 5] and real.lora_num_tokens == [12]
    assert [(r.offset, r.length) for r in real.mm_refs.images] == [(2, 1)]
    assert dummy.mm_refs == real.mm_refs and not any(dummy.loss_mask)


def test_refs_reports_a_bad_record_and_exits_2(tmp_path: Path) -> None:
    traces, _ = traces_file(tmp_path, broken_second=True)
    result = runner.invoke(app, ["refs", str(traces), "--run-dir", str(tmp_path / "run")])

    assert result.exit_code == 2 and result.stdout == ""
    assert "Expected placeholder length 1" in result.stderr
    assert "offloaded.jsonl:2`" in result.stderr and "trace `img`" in result.stderr
    assert not (tmp_path / "run" / "rollouts" / "step_0").exists()


def test_refs_skip_invalid_writes_the_rest_and_exits_1(tmp_path: Path) -> None:
    traces, _ = traces_file(tmp_path, broken_second=True)
    rejects = tmp_path / "bad.jsonl"
    args = [
        "refs",
        str(traces),
        "--run-dir",
        str(tmp_path / "run"),
        "--skip-invalid",
        "--rejects",
        str(rejects),
        "--json",
    ]
    result = runner.invoke(app, args)

    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert (report["samples_written"], report["rejected_records"], report["rejects_path"]) == (
        1,
        1,
        str(rejects),
    )
    (reject,) = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert reject["line"] == 2 and json.loads(reject["text"])["traces"][0]["id"] == "img"


def test_pack_of_a_run_without_steps_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["pack", str(tmp_path), "--seq-len", "8"])

    assert result.exit_code == 2 and "run `mmoffload refs` first" in result.stderr


def test_pack_prints_a_table_without_json(tmp_path: Path) -> None:
    traces, _ = traces_file(tmp_path)
    run = tmp_path / "run"
    assert runner.invoke(app, ["refs", str(traces), "--run-dir", str(run), "-q"]).stdout == ""
    result = runner.invoke(app, ["pack", str(run), "--seq-len", "16"])

    assert result.exit_code == 0 and "micro_batches_per_rank" in result.stdout


@pytest.fixture(scope="module")
def demo_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's Qwen-VL run: four traces, 12 images, 11,351 tokens (1,151 trainable)."""
    return Path(run_demo(tmp_path_factory.mktemp("demo")).runs[0].run_dir)


def rank_files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "rollouts" / "step_0").glob("rank_*.bin"))}


def test_pack_counts_what_truncation_drops_and_warns_on_stderr(demo_qwen: Path) -> None:
    result = runner.invoke(app, ["pack", str(demo_qwen), "--seq-len", "1000", "--json"])

    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    figures = ("samples_truncated", "tokens_dropped", "trainable_tokens_dropped", "images_dropped")
    assert [report[name] for name in figures] == [4, 10_255, 1_151, 12]
    assert report["steps"][0]["images_dropped"] == 12 and report["micro_batches_with_refs"] == 0
    (warning,) = result.stderr.splitlines()
    assert warning == (
        "warning: truncation to --seq-len 1,000 cut 4 of 4 samples: 10,255 tokens dropped, 1,151 of them "
        "trainable (100.0% of all trainable tokens), 12 images dropped"
    )


def test_pack_without_truncation_says_nothing_on_stderr(demo_qwen: Path) -> None:
    result = runner.invoke(app, ["pack", str(demo_qwen), "--seq-len", "4096", "--json"])

    assert result.exit_code == 0 and result.stderr == ""
    assert json.loads(result.stdout)["tokens_dropped"] == 0


def test_pack_v_prints_each_steps_micro_batches_fill_and_truncation(demo_qwen: Path) -> None:
    args = ["pack", str(demo_qwen), "--seq-len", "1000", "--world-size", "2"]
    result = runner.invoke(app, [*args, "-v"])

    assert result.exit_code == 0, result.stderr
    table = result.stdout.split("pack: each step (micro batches per rank)", 1)[1].splitlines()
    # step, samples, micro batches per rank, fill, the lightest and busiest rank's fill, then what
    # truncation cut: samples, tokens, trainable tokens, images.
    assert [line.split() for line in table if line.split()[:1] == ["0"]] == [
        ["0", "4", "1", "54.8%", "27-83%", "4", "10,255", "1,151", "12"]
    ]
    assert "pack: each step" not in runner.invoke(app, args).stdout


def test_pack_json_gives_each_ranks_fill_and_is_one_document_with_v(demo_qwen: Path) -> None:
    args = ["pack", str(demo_qwen), "--seq-len", "1000", "--world-size", "2", "--json", "-v"]
    result = runner.invoke(app, args)

    assert result.exit_code == 0, result.stderr
    (step,) = json.loads(result.stdout)["steps"]
    # One micro batch per rank: 828 and 268 of the step's 1,096 real tokens.
    assert (step["rank_fill_ratios"], step["real_tokens"]) == ([0.828, 0.268], 1_096)


def test_max_truncated_fraction_exits_1_and_writes_nothing(demo_qwen: Path) -> None:
    assert runner.invoke(app, ["pack", str(demo_qwen), "--seq-len", "4096", "-q"]).exit_code == 0
    before = rank_files(demo_qwen)
    args = ["pack", str(demo_qwen), "--seq-len", "1000", "--world-size", "2", "--json"]
    result = runner.invoke(app, [*args, "--max-truncated-fraction", "0.5"])

    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert not report["written"] and report["steps_packed"] == 0
    assert report["trainable_tokens_dropped"] == 1_151
    assert "nothing written: truncation would drop 100.0% of the trainable tokens" in result.stderr
    assert rank_files(demo_qwen) == before  # still the one rank file of the earlier pack
    # Dropping all of them is within a limit of 1.0 (the limit is "more than F").
    assert runner.invoke(app, [*args, "--max-truncated-fraction", "1"]).exit_code == 0
    assert sorted(rank_files(demo_qwen)) == ["rank_0.bin", "rank_1.bin"]


def test_pack_refuses_an_unknown_balance(demo_qwen: Path) -> None:
    result = runner.invoke(app, ["pack", str(demo_qwen), "--seq-len", "4096", "--balance", "even"])

    assert result.exit_code == 2 and "--balance" in result.stderr


@pytest.mark.parametrize(("seq_len", "world_size"), [(1000, 3), (1000, 8), (4096, 2)])
def test_audit_counts_the_truncation_figures_pack_reported(
    demo_qwen: Path, seq_len: int, world_size: int
) -> None:
    args = ["pack", str(demo_qwen), "--seq-len", str(seq_len), "--world-size", str(world_size)]
    packed = json.loads(runner.invoke(app, [*args, "--pad-multiple", "4", "--json"]).stdout)
    audited = msgspec.structs.asdict(audit([demo_qwen]))

    figures = ("samples_truncated", "tokens_dropped", "trainable_tokens_dropped", "images_dropped")
    assert [audited[name] for name in figures] == [packed[name] for name in figures]
    assert audited["truncation_steps_compared"] == 1 and audited["ok"]
    if world_size == 8:
        assert packed["dummies"] > 0  # dummies are told apart from real micro batches


def test_refs_warns_of_the_steps_an_earlier_run_left_and_overwrite_removes_them(tmp_path: Path) -> None:
    traces, _ = traces_file(tmp_path)
    run = tmp_path / "run"
    args = ["refs", str(traces), "--run-dir", str(run), "--model", "qwen3_vl"]
    assert runner.invoke(app, [*args, "--step-size", "1"]).exit_code == 0  # steps 0 and 1
    assert runner.invoke(app, ["pack", str(run), "--seq-len", "16"]).exit_code == 0

    again = runner.invoke(app, [*args, "--json"])  # one step now: step 1 is the earlier run's

    assert again.exit_code == 0, again.stderr
    report = json.loads(again.stdout)
    assert (report["steps_replaced"], report["steps_left"], report["steps_removed"]) == ([0], [1], [])
    assert "warning: step 1 of an earlier run left in the run directory" in again.stderr
    assert "--overwrite removes them" in again.stderr and "step 0 of an earlier run replaced" in again.stderr
    assert (run / "rollouts/step_1/rank_0.bin").is_file()
    assert not (run / "rollouts/step_0/rank_0.bin").exists()  # a rewritten step's rank files go

    overwritten = runner.invoke(app, [*args, "--overwrite", "--json"])

    assert overwritten.exit_code == 0 and "warning" not in overwritten.stderr
    report = json.loads(overwritten.stdout)
    assert (report["steps_replaced"], report["steps_left"], report["steps_removed"]) == ([0], [], [1])
    assert not (run / "rollouts/step_1").exists()
    assert audit([run]).examples == 2


def test_refs_into_a_new_run_directory_warns_of_nothing(tmp_path: Path) -> None:
    traces, _ = traces_file(tmp_path)
    result = runner.invoke(
        app, ["refs", str(traces), "--run-dir", str(tmp_path / "run"), "--model", "qwen3_vl"]
    )

    assert result.exit_code == 0 and "warning" not in result.stderr

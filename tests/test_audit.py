"""Audit: every figure of audit.md, and each kind of broken artifact caught and named."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from mmoffload.audit import (
    FIGURES,
    AuditReport,
    Violation,
    audit,
    check_expectations,
    parse_expectation,
)
from mmoffload.contract.wire import EncodedTensor, MMImageRef, MMRefs, TrainingSample
from mmoffload.errors import UsageError
from tests.builders import (
    QWEN_IMAGE_PAD,
    data_url,
    descriptor,
    image_bytes,
    qwen_sample,
    single_micro_batch,
    store_image,
    write_run,
)

replace = msgspec.structs.replace


def with_ref(sample: TrainingSample, image: int, **changes: object) -> TrainingSample:
    """Return ``sample`` with its ``image``-th ref changed."""
    assert sample.mm_refs is not None
    refs = list(sample.mm_refs.images)
    refs[image] = replace(refs[image], **changes)
    return replace(sample, mm_refs=MMRefs(refs))


def only(report: AuditReport, kind: str) -> Violation:
    """Return the one violation of ``kind``, after checking it is the only kind there."""
    assert {v.kind for v in report.violations} == {kind}, report.violations
    [violation] = [v for v in report.violations if v.kind == kind]
    return violation


def batch_file(run: Path) -> str:
    return str(run / "rollouts" / "step_0" / "train_rollouts.bin")


# --- a clean run ---------------------------------------------------------------------------


def test_a_clean_packed_run_is_ok_and_counts_rank_file_refs(tmp_path: Path) -> None:
    samples = [qwen_sample(tmp_path / "assets", (0, 1)), qwen_sample(tmp_path / "assets", (2,))]
    run = write_run(tmp_path / "run", samples, [[single_micro_batch(s)] for s in samples])

    report = audit([run], verify_hashes=True)

    sizes = sum(p.stat().st_size for p in (tmp_path / "assets").iterdir())
    assert report.ok and report.violations == []
    assert (report.training_batches, report.examples, report.samples_with_mm_refs) == (1, 2, 2)
    assert (report.rank_files, report.micro_batches, report.micro_batches_with_mm_refs) == (2, 2, 2)
    assert (report.descriptors, report.file_uris, report.unique_images) == (3, 3, 3)
    assert (report.image_bytes, report.hashes_verified, report.type_ids_present) == (sizes, True, True)


def test_refs_of_a_run_without_rank_files_come_from_the_training_batch(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [qwen_sample(tmp_path / "assets", (0, 1, 2))])

    report = audit([run])

    assert report.ok
    assert (report.rank_files, report.descriptors, report.file_uris) == (0, 3, 3)


def test_a_packed_run_counts_descriptors_once_not_per_artifact(tmp_path: Path) -> None:
    sample = qwen_sample(tmp_path / "assets", (0, 1))
    run = write_run(tmp_path / "run", [sample], [[single_micro_batch(sample)]])

    assert audit([run]).descriptors == 2


def test_a_text_only_sample_needs_no_type_ids(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [qwen_sample(tmp_path / "assets", seeds=())])

    report = audit([run])

    assert report.ok
    assert (report.examples, report.samples_with_mm_refs, report.type_ids_present) == (1, 0, True)


def test_a_kimi_ref_takes_one_placeholder_token(tmp_path: Path) -> None:
    stored = store_image(tmp_path / "assets", image_bytes())
    item = descriptor(stored.uri, [1, 4, 6], family="kimi_k25")
    tokens = [163602, 7, 163603, 163605, 163604, 9]
    sample = TrainingSample(
        token_ids=tokens,
        mask=[False] * 5 + [True],
        logprobs=[0.0] * 6,
        temperatures=[1.0] * 6,
        env_name="browse",
        mm_refs=MMRefs([MMImageRef(item, stored.hash, stored.uri, 3, 1)]),
        mm_token_type_ids=[0, 0, 0, 1, 0, 0],
    )

    assert audit([write_run(tmp_path / "run", [sample])]).ok
    wrong = with_ref(sample, 0, length=3)
    wrong = replace(wrong, mm_token_type_ids=[0, 0, 0, 1, 1, 1])
    report = audit([write_run(tmp_path / "run2", [wrong])])
    assert (
        "Expected placeholder length 1 for grid [1, 4, 6] of family `kimi_k25`, got 3"
        in only(report, "placeholder_mismatch").reason
    )


# --- each kind of broken artifact ------------------------------------------------------------


def test_a_data_url_left_in_a_descriptor_is_caught(tmp_path: Path) -> None:
    sample = qwen_sample(tmp_path / "assets", (0, 1))
    inline = data_url(image_bytes(seed=5))
    item = {**sample.mm_refs.images[1].item, "raw_image_uri": inline}  # type: ignore[union-attr]
    run = write_run(tmp_path / "run", [with_ref(sample, 1, item=item, uri=inline)])

    report = audit([run])

    assert not report.ok
    assert (report.data_uris, report.non_strict_descriptors, report.descriptors) == (1, 1, 1)
    [found] = [v for v in report.violations if v.kind == "data_uri"]
    assert (found.file, found.index, found.image, found.path) == (batch_file(run), 0, 1, "$.uri")
    assert "inline `data:` URL" in found.reason
    assert len(found.reason) < 200  # the payload itself is not dumped


def test_inline_raw_image_data_in_a_descriptor_is_a_data_uri(tmp_path: Path) -> None:
    sample = qwen_sample(tmp_path / "assets", (0,))
    item = {**sample.mm_refs.images[0].item, "raw_image_data": data_url(image_bytes())}  # type: ignore[union-attr]
    report = audit([write_run(tmp_path / "run", [with_ref(sample, 0, item=item)])])

    assert (report.data_uris, report.non_strict_descriptors) == (1, 1)
    [found] = [v for v in report.violations if v.kind == "data_uri"]
    assert found.path == "$.item.raw_image_data"


def test_a_remote_uri_is_caught(tmp_path: Path) -> None:
    sample = qwen_sample(tmp_path / "assets", (0,))
    url = "https://example.com/shot.png"
    item = {**sample.mm_refs.images[0].item, "raw_image_uri": url}  # type: ignore[union-attr]
    report = audit([write_run(tmp_path / "run", [with_ref(sample, 0, item=item, uri=url)])])

    assert (report.remote_uris, report.file_uris, report.unique_images) == (1, 0, 0)
    assert (
        "https://example.com/shot.png" in next(v for v in report.violations if v.kind == "remote_uri").reason
    )


def test_a_missing_file_is_caught_once_however_often_it_is_referenced(tmp_path: Path) -> None:
    samples = [qwen_sample(tmp_path / "assets", (0, 1)), qwen_sample(tmp_path / "assets", (0,))]
    run = write_run(tmp_path / "run", samples)
    gone = Path(samples[1].mm_refs.images[0].uri.removeprefix("file://"))  # type: ignore[union-attr]
    gone.unlink()

    report = audit([run])

    found = only(report, "missing_file")
    assert (report.missing_files, report.unique_images) == (1, 2)
    assert (found.file, found.index, found.image) == (batch_file(run), 0, 0)
    assert str(gone) in found.reason


def test_a_tampered_file_is_caught_when_hashes_are_verified(tmp_path: Path) -> None:
    sample = qwen_sample(tmp_path / "assets", (0, 1))
    run = write_run(tmp_path / "run", [sample])
    Path(sample.mm_refs.images[1].uri.removeprefix("file://")).write_bytes(image_bytes(seed=9))  # type: ignore[union-attr]

    assert audit([run]).ok  # content is not read without --verify-hashes
    report = audit([run], verify_hashes=True)

    found = only(report, "hash_mismatch")
    assert (report.hash_mismatches, found.index, found.image) == (1, 0, 1)
    assert sample.mm_refs.images[1].hash in found.reason  # type: ignore[union-attr]


def test_eager_mm_kwargs_are_caught_in_samples_and_micro_batches(tmp_path: Path) -> None:
    eager = {"pixel_values": EncodedTensor("float32", [1, 4], bytes(16))}
    sample = replace(qwen_sample(tmp_path / "assets", (0,)), mm_kwargs=eager)
    run = write_run(
        tmp_path / "run",
        [sample],
        [[single_micro_batch(sample), replace(single_micro_batch(sample), mm_kwargs=eager)]],
    )

    report = audit([run])

    assert report.eager_mm_kwargs == 2  # the sample, and the second micro batch
    assert {(v.file.rsplit("/", 1)[-1], v.index) for v in report.violations} == {
        ("train_rollouts.bin", 0),
        ("rank_0.bin", 1),
    }


def test_a_non_strict_descriptor_is_caught_and_not_counted_as_a_descriptor(tmp_path: Path) -> None:
    sample = qwen_sample(tmp_path / "assets", (0, 1))
    item = dict(sample.mm_refs.images[0].item)  # type: ignore[union-attr]
    item["payload"] = {**item["payload"], "pixel_values": [[0.0]]}
    report = audit([write_run(tmp_path / "run", [with_ref(sample, 0, item=item)])])

    found = only(report, "non_strict_descriptor")
    assert (report.non_strict_descriptors, report.descriptors, found.image) == (1, 1, 0)
    assert "processed key `pixel_values` at `$.payload.pixel_values`" in found.reason


def test_a_wrong_placeholder_length_is_caught(tmp_path: Path) -> None:
    sample = qwen_sample(tmp_path / "assets", (0, 1), grid=(1, 4, 4))
    item = {**sample.mm_refs.images[1].item, "payload": {"image_grid_thw": [[1, 4, 8]]}}  # type: ignore[union-attr]
    report = audit([write_run(tmp_path / "run", [with_ref(sample, 1, item=item)])])

    found = only(report, "placeholder_mismatch")
    assert (report.placeholder_mismatches, found.image) == (1, 1)
    assert found.reason == (
        "Expected placeholder length 8 for grid [1, 4, 8] of family `qwen_vl`, got 4"
        " (image features and image tokens would not match)"
    )


def test_a_placeholder_span_that_is_not_image_typed_is_caught(tmp_path: Path) -> None:
    sample = qwen_sample(tmp_path / "assets", (0,))
    offset = sample.mm_refs.images[0].offset  # type: ignore[union-attr]
    type_ids = list(sample.mm_token_type_ids)  # type: ignore[arg-type]
    type_ids[offset + 2] = 0
    report = audit([write_run(tmp_path / "run", [replace(sample, mm_token_type_ids=type_ids)])])

    found = only(report, "placeholder_mismatch")
    assert f"token {offset + 2} has type 0" in found.reason


def test_a_stray_image_token_is_caught_with_its_position(tmp_path: Path) -> None:
    sample = qwen_sample(tmp_path / "assets", (0,))
    n = len(sample.token_ids)
    stray = replace(
        sample,
        token_ids=[*sample.token_ids[:-1], QWEN_IMAGE_PAD],
        mm_token_type_ids=[*sample.mm_token_type_ids[:-1], 1],  # type: ignore[index]
    )
    report = audit([write_run(tmp_path / "run", [stray], [[single_micro_batch(stray)]])])

    assert report.stray_image_tokens == 2  # once in the TrainingBatch, once in the rank file
    found = report.violations[0]
    assert (found.kind, found.index, found.position) == ("stray_image_token", 0, n - 1)


def test_missing_type_ids_are_caught(tmp_path: Path) -> None:
    sample = replace(qwen_sample(tmp_path / "assets", (0,)), mm_token_type_ids=None)
    report = audit([write_run(tmp_path / "run", [sample])])

    assert report.type_ids_present is False
    assert only(report, "missing_type_ids").index == 0


def test_a_misaligned_per_token_array_is_caught(tmp_path: Path) -> None:
    sample = qwen_sample(tmp_path / "assets", (0,))
    n = len(sample.token_ids)
    batch = single_micro_batch(sample)
    batches = [replace(batch, loss_mask=batch.loss_mask[:-1]), replace(batch, sequence_lengths=[n - 1])]
    report = audit([write_run(tmp_path / "run", ranks=[batches])])

    assert [(v.kind, v.index, v.reason) for v in report.violations] == [
        ("misaligned", 0, f"Expected `loss_mask` with one value per token ({n}), got {n - 1}"),
        ("misaligned", 1, f"Expected sum(`sequence_lengths`) == {n} tokens, got {n - 1}"),
    ]


def test_a_ref_whose_uri_disagrees_with_its_descriptor_is_caught(tmp_path: Path) -> None:
    sample = qwen_sample(tmp_path / "assets", (0, 1))
    other = sample.mm_refs.images[1].uri  # type: ignore[union-attr]
    report = audit([write_run(tmp_path / "run", [with_ref(sample, 0, uri=other)])])

    assert (
        only(report, "bad_ref").reason == "Expected the ref's `uri` to equal its descriptor's `raw_image_uri`"
    )


def test_a_corrupt_bin_is_a_violation_and_the_rest_is_still_audited(tmp_path: Path) -> None:
    sample = qwen_sample(tmp_path / "assets", (0,))
    run = write_run(tmp_path / "run", [sample], [[single_micro_batch(sample)]])
    (run / "rollouts" / "step_0" / "rank_0.bin").write_bytes(b"\x93not msgpack")

    report = audit([run])

    found = only(report, "undecodable")
    assert found.file.endswith("rank_0.bin") and found.reason.startswith("Not a list of MicroBatch")
    assert (report.training_batches, report.rank_files, report.descriptors) == (1, 0, 0)


# --- JSONL --------------------------------------------------------------------------------


def test_jsonl_image_sources_are_counted_by_kind_with_their_json_path(tmp_path: Path) -> None:
    stored = store_image(tmp_path / "assets", image_bytes())
    missing = (tmp_path / "assets" / ("0" * 32 + ".png")).as_uri()
    records = [
        {"prompt": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": stored.uri}}]}]},
        {"prompt": [{"role": "user", "content": [{"type": "image", "image": data_url(image_bytes())}]}]},
        {"completion": [{"role": "tool", "content": [{"type": "input_image", "image_url": missing}]}]},
    ]
    rollouts = tmp_path / "rollouts.jsonl"
    rollouts.write_text("\n".join(json.dumps(r) for r in records) + "\n")

    report = audit([rollouts])

    assert (report.jsonl_records, report.data_uris, report.missing_files, report.unique_images) == (
        3,
        1,
        1,
        2,
    )
    data, gone = report.violations
    assert (data.kind, data.index, data.line, data.path) == ("data_uri", 1, 2, "$.prompt[0].content[0].image")
    assert (gone.kind, gone.index, gone.line) == ("missing_file", 2, 3)


def test_jsonl_eager_payloads_and_non_strict_descriptors_are_caught(tmp_path: Path) -> None:
    stored = store_image(tmp_path / "assets", image_bytes())
    bad = {**descriptor(stored.uri, [1, 4, 4]), "family": "qwen vl"}
    sample = {"token_ids": [1], "mask": [True], "mm_kwargs": {"pixel_values": [1]}}
    trace = {"nodes": [{"multi_modal_data": {"mm_items": {"image": [bad]}}}]}
    path = tmp_path / "traces.jsonl"
    path.write_text(f"{json.dumps(sample)}\n\nnot json\n{json.dumps(trace)}\n")

    report = audit([path])

    assert (report.eager_mm_kwargs, report.non_strict_descriptors, report.jsonl_records) == (1, 1, 2)
    assert [(v.kind, v.line) for v in report.violations] == [
        ("eager_mm_kwargs", 1),
        ("undecodable", 3),
        ("non_strict_descriptor", 4),
    ]
    assert report.violations[2].path == "$.nodes[0].multi_modal_data.mm_items.image[0]"


# --- unusable inputs ------------------------------------------------------------------------


def test_a_directory_without_artifacts_cannot_be_audited(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="Expected a run directory"):
        audit([tmp_path])


def test_a_missing_path_cannot_be_audited(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="No such file or directory"):
        audit([tmp_path / "nope.bin"])


# --- expectations ---------------------------------------------------------------------------


def test_expectations_parse_numbers_and_booleans() -> None:
    assert parse_expectation("examples=4") == ("examples", "=", 4)
    assert parse_expectation(" type_ids_present = TRUE ") == ("type_ids_present", "=", True)
    assert parse_expectation("ok=false") == ("ok", "=", False)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("examples>=1", ("examples", ">=", 1)),
        ("examples<=10", ("examples", "<=", 10)),
        ("data_uris<1", ("data_uris", "<", 1)),
        ("image_bytes>0", ("image_bytes", ">", 0)),
        ("missing_files==0", ("missing_files", "==", 0)),
        ("ok!=false", ("ok", "!=", False)),
        ("examples >= 2.5", ("examples", ">=", 2.5)),
    ],
)
def test_expectations_parse_every_comparison(text: str, parsed: tuple) -> None:
    assert parse_expectation(text) == parsed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("examples", "Expected --expect NAME<OP>VALUE (OP one of >= <= != == = > <), got `examples`"),
        ("examples=four", "Expected a number for `examples`, got `four`"),
        ("ok=1", "Expected true or false for `ok`, got `1`"),
        ("ok>true", "Expected `=` or `!=` for the yes/no figure `ok`, got `>`"),
        ("pictures=4", "Unknown figure `pictures` in --expect (known: training_batches, examples,"),
        ("exampels>=1", "Unknown figure `exampels` in --expect; did you mean `examples`? (known: "),
    ],
)
def test_a_bad_expectation_is_a_usage_error(text: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_expectation(text)
    assert caught.value.message.startswith(message)


def test_violations_is_no_figure() -> None:
    assert "violations" not in FIGURES and "descriptors" in FIGURES and FIGURES["ok"] is bool
    assert "expectations" not in FIGURES


def test_an_expectation_holds_only_for_the_actual_value() -> None:
    report = AuditReport(examples=4)
    texts = ["examples=4", "examples=3", "type_ids_present=true", "examples>=1", "examples<4", "examples!=3"]
    results = check_expectations(report, texts)
    assert [(e.name, e.op, e.expected, e.actual, e.holds) for e in results] == [
        ("examples", "=", 4, 4, True),
        ("examples", "=", 3, 4, False),
        ("type_ids_present", "=", True, True, True),
        ("examples", ">=", 1, 4, True),
        ("examples", "<", 4, 4, False),
        ("examples", "!=", 3, 4, True),
    ]
    assert report.expectations == results and report.ok is False


def test_a_typo_in_an_expectation_stops_the_audit_before_reading(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="did you mean `data_uris`"):
        audit([tmp_path / "not-read.bin"], expect=["data_uri=0"])


def test_an_image_typed_token_in_a_text_sample_is_stray(tmp_path: Path) -> None:
    text = replace(qwen_sample(tmp_path / "assets", seeds=()), mm_token_type_ids=[0, 1])
    report = audit([write_run(tmp_path / "run", [text])])

    assert (report.samples_with_mm_refs, report.stray_image_tokens) == (0, 1)
    assert only(report, "stray_image_token").position == 1

import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import msgspec
import pytest

from mmoffload.contract.addresses import content_hash, file_uri
from mmoffload.errors import BadInputError, IntegrityError, UsageError
from mmoffload.io.outputs import TEMP_PREFIX, remove_stale_temps
from mmoffload.offload import (
    OffloadOptions,
    RecordCounts,
    offload_files,
    offload_record,
    plan_outputs,
)
from mmoffload.store.local import AssetStore
from tests.builders import data_url, image_bytes

PNG = image_bytes(seed=1)
JPEG = image_bytes(fmt="JPEG", seed=2)


def chat_record(*urls: str) -> dict:
    """A rollout record whose prompt has one image part per URL, between text parts."""
    content = [{"type": "text", "text": "look"}]
    content += [{"type": "image_url", "image_url": {"url": url, "detail": "low"}} for url in urls]
    return {"prompt": [{"role": "user", "content": content}], "completion": [], "reward": 1.0}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_bytes(b"".join(msgspec.json.encode(record) + b"\n" for record in records))
    return path


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def stored_uri(assets: Path, data: bytes, ext: str) -> str:
    return file_uri(assets.absolute() / f"{content_hash(data)}{ext}")


def test_a_request_body_is_offloaded_in_place_and_counted(tmp_path):
    body = {
        "model": "qwen",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": data_url(PNG)}],
            },
            {"role": "user", "content": [{"type": "image", "image": data_url(PNG)}]},
        ],
        "max_tokens": 8,
    }
    counts = offload_record(body, tmp_path / "assets")
    uri = stored_uri(tmp_path / "assets", PNG, ".png")
    assert body["messages"][1]["content"][1] == {"type": "image_url", "image_url": {"url": uri}}
    assert body["messages"][2]["content"][0] == {"type": "image_url", "image_url": {"url": uri}}
    assert list(body) == ["model", "messages", "max_tokens"]
    assert counts == RecordCounts(
        records=1,
        records_rewritten=1,
        image_parts=2,
        offloaded=2,
        reshaped=2,
        unique_images_written=1,
        dedup_hits=1,
        image_bytes_written=len(PNG),
    )
    assert (tmp_path / "assets" / f"{content_hash(PNG)}.png").read_bytes() == PNG


def test_every_shape_and_source_kind_is_offloaded_from_a_file(tmp_path):
    assets = tmp_path / "assets"
    record = {
        "prompt": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": data_url(PNG), "detail": "high"}}],
            }
        ],
        "completion": [
            {"role": "tool", "content": [{"type": "image", "image": data_url(JPEG, "image/jpeg")}]}
        ],
        "responses": [{"type": "input_image", "image_url": data_url(PNG)}],
        "trace": {
            "nodes": [
                {
                    "multi_modal_data": {
                        "mm_items": {
                            "image": [
                                {
                                    "kind": "prime_raw_mm_item",
                                    "family": "qwen_vl",
                                    "raw_image_data": data_url(JPEG),
                                    "payload": {},
                                }
                            ]
                        }
                    }
                }
            ]
        },
        "kept": [{"type": "image_url", "image_url": "file:///elsewhere/a.png"}],
    }
    source = write_jsonl(tmp_path / "in.jsonl", [record])
    report = offload_files([source], [tmp_path / "out.jsonl"], assets)
    png, jpg = stored_uri(assets, PNG, ".png"), stored_uri(assets, JPEG, ".jpg")
    assert read_jsonl(tmp_path / "out.jsonl") == [
        {
            "prompt": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": png, "detail": "high"}}],
                }
            ],
            "completion": [{"role": "tool", "content": [{"type": "image_url", "image_url": {"url": jpg}}]}],
            "responses": [{"type": "input_image", "image_url": png}],
            "trace": {
                "nodes": [
                    {
                        "multi_modal_data": {
                            "mm_items": {
                                "image": [
                                    {
                                        "kind": "prime_raw_mm_item",
                                        "family": "qwen_vl",
                                        "raw_image_uri": jpg,
                                        "payload": {},
                                    }
                                ]
                            }
                        }
                    }
                ]
            },
            "kept": [{"type": "image_url", "image_url": {"url": "file:///elsewhere/a.png"}}],
        }
    ]
    assert (report.image_parts, report.offloaded, report.already_file, report.reshaped) == (5, 4, 1, 2)
    assert (report.unique_images_written, report.dedup_hits) == (2, 2)
    assert sorted(p.name for p in assets.iterdir()) == sorted(
        [f"{content_hash(PNG)}.png", f"{content_hash(JPEG)}.jpg"]
    )


def test_a_lying_media_type_is_stored_under_the_sniffed_extension(tmp_path):
    record = chat_record(data_url(JPEG, "image/png"))
    offload_record(record, tmp_path)
    assert record["prompt"][0]["content"][1]["image_url"]["url"].endswith(f"{content_hash(JPEG)}.jpg")
    assert [p.name for p in tmp_path.iterdir()] == [f"{content_hash(JPEG)}.jpg"]


def test_identical_images_are_stored_once_across_lines_and_spellings(tmp_path):
    spellings = [data_url(PNG), data_url(PNG, "IMAGE/PNG"), data_url(PNG).rstrip("=")]
    source = write_jsonl(tmp_path / "in.jsonl", [chat_record(url, url) for url in spellings])
    report = offload_files([source], [tmp_path / "out.jsonl"], tmp_path / "assets")
    assert [p.name for p in (tmp_path / "assets").iterdir()] == [f"{content_hash(PNG)}.png"]
    assert (report.offloaded, report.unique_images_written, report.dedup_hits) == (6, 1, 5)
    assert report.image_bytes_written == len(PNG)


def test_offloading_its_own_output_changes_nothing_and_writes_no_image(tmp_path):
    records = [chat_record(data_url(PNG)), {"no": "images"}, chat_record(data_url(JPEG), data_url(PNG))]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    offload_files([source], [tmp_path / "once.jsonl"], tmp_path / "assets")
    before = sorted((tmp_path / "assets").iterdir())
    again = offload_files([tmp_path / "once.jsonl"], [tmp_path / "twice.jsonl"], tmp_path / "assets")
    assert (tmp_path / "twice.jsonl").read_bytes() == (tmp_path / "once.jsonl").read_bytes()
    assert (again.records_rewritten, again.unique_images_written, again.already_file) == (0, 0, 3)
    assert sorted((tmp_path / "assets").iterdir()) == before


def test_lines_without_images_are_copied_byte_for_byte(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"a": 1.50,  "b": "\\u00e9"}\r\n{"c": [ ]}')
    report = offload_files([source], [tmp_path / "out.jsonl"], tmp_path / "assets")
    assert (tmp_path / "out.jsonl").read_bytes() == source.read_bytes()
    assert report.jsonl_bytes_out == report.jsonl_bytes_in


BAD_LINES = [
    (b'{"prompt": [', "Invalid JSON", "in.jsonl:2`"),
    (
        json.dumps(chat_record("data:image/png;base64,iVBOR*w0KGgo=")).encode(),
        "undecodable payload",
        "in.jsonl:2` `$.prompt[0].content[1].image_url.url`",
    ),
    (
        json.dumps(chat_record(data_url(b"hello, not an image", "image/png"))).encode(),
        "Expected image bytes, got 19 bytes",
        "in.jsonl:2` `$.prompt[0].content[1].image_url.url`",
    ),
    (
        json.dumps(chat_record("https://example.org/cat.png")).encode(),
        "remote `https:` URL",
        "in.jsonl:2` `$.prompt[0].content[1].image_url.url`",
    ),
    (
        json.dumps({"messages": [{"content": [{"type": "image", "src": "x"}]}]}).encode(),
        "unknown shape",
        "in.jsonl:2` `$.messages[0].content[0]`",
    ),
]


@pytest.mark.parametrize(("bad", "message", "where"), BAD_LINES)
def test_a_bad_line_stops_the_run_naming_file_line_and_path_and_leaves_no_output(
    tmp_path, bad, message, where
):
    source = tmp_path / "in.jsonl"
    source.write_bytes(msgspec.json.encode(chat_record(data_url(PNG))) + b"\n" + bad + b"\n")
    original = source.read_bytes()
    with pytest.raises(BadInputError) as caught:
        offload_files([source], [tmp_path / "out.jsonl"], tmp_path / "assets")
    assert message in str(caught.value)
    assert where in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assets", "in.jsonl"]
    assert source.read_bytes() == original


def test_remote_sources_pass_through_when_allowed(tmp_path):
    record = chat_record("https://example.org/cat.png", data_url(PNG))
    counts = offload_record(record, tmp_path, OffloadOptions(allow_remote=True))
    assert record["prompt"][0]["content"][1]["image_url"]["url"] == "https://example.org/cat.png"
    assert (counts.remote_kept, counts.offloaded) == (1, 1)


def test_checked_file_sources_must_exist(tmp_path):
    record = chat_record((tmp_path / "gone.png").as_uri())
    offload_record(record, tmp_path / "assets")
    with pytest.raises(IntegrityError, match="Missing image file"):
        offload_record(record, tmp_path / "assets", OffloadOptions(check_files=True))


def test_adopted_file_sources_are_copied_into_the_store(tmp_path):
    outside = tmp_path / "shot.png"
    outside.write_bytes(PNG)
    record = chat_record(outside.as_uri())
    counts = offload_record(record, tmp_path / "assets", OffloadOptions(adopt_files=True))
    uri = stored_uri(tmp_path / "assets", PNG, ".png")
    assert record["prompt"][0]["content"][1]["image_url"]["url"] == uri
    assert (counts.adopted, counts.unique_images_written) == (1, 1)
    again = offload_record(record, tmp_path / "assets", OffloadOptions(adopt_files=True))
    assert (again.already_file, again.adopted, again.records_rewritten) == (1, 0, 0)


def test_skipped_bad_lines_go_whole_to_the_rejects_file_with_their_reason(tmp_path):
    bad_json, bad_image = b'{"prompt": [', json.dumps(chat_record("https://x.org/a.png")).encode()
    source = tmp_path / "in.jsonl"
    good = msgspec.json.encode(chat_record(data_url(PNG))) + b"\n"
    source.write_bytes(good + bad_json + b"\n" + good + bad_image + b"\r\n" + b"\xff\xfe\n")
    report = offload_files([source], [tmp_path / "out.jsonl"], tmp_path / "assets", skip_invalid=True)
    assert report.records == 2
    assert report.rejected_lines == 3
    assert report.rejects == [str(tmp_path / "out.jsonl.rejects.jsonl")]
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 2
    rejects = read_jsonl(tmp_path / "out.jsonl.rejects.jsonl")
    assert [(r["line"], r.get("text")) for r in rejects] == [
        (2, bad_json.decode()),
        (4, bad_image.decode()),
        (5, None),
    ]
    assert "Invalid JSON" in rejects[0]["reason"]
    assert "`$.prompt[0].content[1].image_url.url`" in rejects[1]["reason"]
    assert rejects[2]["text_base64"] == "//4="


def test_no_rejects_file_is_written_when_nothing_was_rejected(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [chat_record(data_url(PNG))])
    report = offload_files([source], [tmp_path / "out.jsonl"], tmp_path / "assets", skip_invalid=True)
    assert report.rejects == []
    assert not (tmp_path / "out.jsonl.rejects.jsonl").exists()


def test_in_place_replaces_the_input(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [chat_record(data_url(PNG))])
    offload_files([source], plan_outputs([source], None, in_place=True), tmp_path / "assets")
    assert read_jsonl(source) == [chat_record(stored_uri(tmp_path / "assets", PNG, ".png"))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assets", "in.jsonl"]


def test_several_inputs_write_into_an_output_directory(tmp_path):
    (tmp_path / "a").mkdir()
    inputs = [write_jsonl(tmp_path / "a" / "x.jsonl", [{}]), write_jsonl(tmp_path / "y.jsonl", [{}])]
    assert plan_outputs(inputs, tmp_path / "out", in_place=False) == [
        tmp_path / "out/x.jsonl",
        tmp_path / "out/y.jsonl",
    ]
    assert plan_outputs(inputs[:1], tmp_path / "o.jsonl", in_place=False) == [tmp_path / "o.jsonl"]


@pytest.mark.parametrize(
    ("inputs", "output", "in_place", "message"),
    [
        (["x.jsonl"], None, False, "exactly one"),
        (["x.jsonl"], "o.jsonl", True, "exactly one"),
        (["x.jsonl"], "x.jsonl", False, "is the input"),
        (["a/x.jsonl", "x.jsonl"], "out", False, "a/x.jsonl` and `.*x.jsonl` would both write"),
    ],
)
def test_unusable_output_plans_are_usage_errors(tmp_path, inputs, output, in_place, message):
    (tmp_path / "a").mkdir()
    paths = [write_jsonl(tmp_path / name, [{}]) for name in inputs]
    with pytest.raises(UsageError, match=message):
        plan_outputs(paths, tmp_path / output if output else None, in_place)


def test_a_bad_line_in_a_later_input_leaves_no_output_of_earlier_inputs(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [chat_record(data_url(PNG))])
    second = tmp_path / "b.jsonl"
    second.write_bytes(b"{broken\n")
    with pytest.raises(BadInputError, match=r"b\.jsonl:1`"):
        offload_files(
            [first, second], plan_outputs([first, second], tmp_path / "out", False), tmp_path / "assets"
        )
    assert list((tmp_path / "out").iterdir()) == []


def rollouts(count: int) -> list:
    """Multi-turn rollouts repeating their history, like a rollout store writes them."""
    images = [data_url(image_bytes(seed=seed)) for seed in range(4)]
    return [chat_record(*images[: 1 + i % 4]) | {"id": i} for i in range(count)]


def test_workers_write_the_same_output_as_one_worker(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [*rollouts(150), {"plain": True}])
    one = offload_files([source], [tmp_path / "one.jsonl"], tmp_path / "a1")
    many = offload_files([source], [tmp_path / "many.jsonl"], tmp_path / "a2", workers=2)
    one_text = (tmp_path / "one.jsonl").read_text().replace(str((tmp_path / "a1").absolute()), "ASSETS")
    many_text = (tmp_path / "many.jsonl").read_text().replace(str((tmp_path / "a2").absolute()), "ASSETS")
    assert many_text == one_text
    assert (many.records, many.offloaded, many.image_parts) == (one.records, one.offloaded, one.image_parts)
    assert sorted(p.name for p in (tmp_path / "a1").iterdir()) == sorted(
        p.name for p in (tmp_path / "a2").iterdir()
    )


def test_workers_report_the_first_bad_line_in_input_order(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in rollouts(100)) + b"[\n{\n")
    with pytest.raises(BadInputError, match=r"in\.jsonl:101`"):
        offload_files([source], [tmp_path / "out.jsonl"], tmp_path / "assets", workers=2)
    assert not (tmp_path / "out.jsonl").exists()


def _offload_into(args: tuple[Path, Path, Path]) -> int:
    source, output, assets = args
    return offload_files([source], [output], assets).unique_images_written


def test_concurrent_processes_store_each_image_once_and_intact(tmp_path):
    images = [image_bytes(width=320, height=240, seed=seed) for seed in range(12)]
    records = [chat_record(*(data_url(image) for image in images[i : i + 4])) for i in range(0, 12)]
    jobs = []
    for worker in range(4):
        source = write_jsonl(tmp_path / f"in{worker}.jsonl", records[worker:] + records[:worker])
        jobs.append((source, tmp_path / f"out{worker}.jsonl", tmp_path / "assets"))
    with multiprocessing.get_context("forkserver").Pool(4) as pool:
        pool.map(_offload_into, jobs)
    names = sorted(os.listdir(tmp_path / "assets"))
    assert names == sorted(f"{content_hash(image)}.png" for image in images)
    for name in names:
        assert hashlib.sha256((tmp_path / "assets" / name).read_bytes()).hexdigest()[:32] == name[:32]
    outputs = {(tmp_path / f"out{w}.jsonl").read_text().count("file://") for w in range(4)}
    assert outputs == {sum(len(r["prompt"][0]["content"]) - 1 for r in records)}


def test_stale_temporaries_are_swept_and_fresh_ones_kept(tmp_path):
    stale, fresh = tmp_path / f"{TEMP_PREFIX}old", tmp_path / f"{TEMP_PREFIX}new"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (0, 0))
    assert remove_stale_temps(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == [fresh.name]


def test_a_store_given_as_a_store_works_too(tmp_path):
    counts = offload_record(chat_record(data_url(PNG)), AssetStore(tmp_path))
    assert counts.unique_images_written == 1

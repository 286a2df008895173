"""The render stage: chat rollouts to v1 episodes with the model's tokenizer and chat template."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mmoffload.errors import BadInputError, IntegrityError
from mmoffload.families import Families
from mmoffload.render import Renderer, RenderOptions, load_tokenizer, render_files, render_rollout
from mmoffload.render.tiny import write_tiny_model
from mmoffload.store.local import AssetStore
from mmoffload_cli.app import app
from tests.builders import data_url, image_bytes

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
QWEN_PAD, QWEN_IM_END, KIMI_PAD = 151655, 151645, 163605


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: write_tiny_model(root / name, name) for name in ("qwen3_vl", "qwen2_5_vl", "kimi_k25")}


def renderer(model_dir: Path, assets: Path | None = None) -> Renderer:
    return Renderer(load_tokenizer(model_dir), Families(model_dir), assets=assets)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def chat(image_parts: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """An OpenAI chat rollout: system, a user turn with ``image_parts``, one assistant reply."""
    return {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is shown?"}, *image_parts]},
            {"role": "assistant", "content": "A box."},
        ],
        **extra,
    }


def nodes(episode: dict[str, Any]) -> list[dict[str, Any]]:
    return episode["traces"][0]["nodes"]


def tokens(episode: dict[str, Any]) -> list[int]:
    return [token for node in nodes(episode) for token in node["token_ids"]]


@pytest.mark.parametrize(("config", "family"), [("qwen3_vl", "qwen_vl"), ("kimi_k25", "kimi_k25")])
def test_fixture_rollouts_render_to_the_fixture_traces_token_for_token(
    models: dict[str, Path], tmp_path: Path, config: str, family: str
) -> None:
    out = tmp_path / "episodes.jsonl"
    report = render_files(
        [FIXTURES / "rollouts" / "mini_browse.jsonl"],
        out,
        models[config],
        RenderOptions(assets=tmp_path / "a"),
    )
    assert (report.rollouts, report.images, report.images_read, report.sampled_nodes) == (4, 12, 9, 12)
    expected = [json.loads(line) for line in (FIXTURES / "traces" / f"{family}.jsonl").open()]
    for ours, theirs in zip(map(json.loads, out.open()), expected, strict=True):
        for node, fixture in zip(nodes(ours), nodes(theirs), strict=True):
            assert node["token_ids"] == fixture["token_ids"]
            assert node["mask"] == fixture["mask"]
            placeholders = fixture.get("multi_modal_data", {}).get("mm_placeholders")
            assert node.get("multi_modal_data", {}).get("mm_placeholders") == placeholders
        assert ours["example_id"] == theirs["traces"][0]["example_id"]
        assert ours["env"] == {"id": "mini-browse"}


def test_patch_14_model_expands_a_1280x720_image_to_1196_pads(
    models: dict[str, Path], tmp_path: Path
) -> None:
    screenshot = (FIXTURES / "images" / "start_page.png").as_uri()
    episode, _ = renderer(models["qwen2_5_vl"]).rollout(
        chat([{"type": "image_url", "image_url": {"url": screenshot}}])
    )
    sidecar = nodes(episode)[1]["multi_modal_data"]
    assert sidecar["mm_items"]["image"][0]["payload"] == {"image_grid_thw": [[1, 52, 92]]}
    assert sidecar["mm_placeholders"]["image"] == [
        {"offset": sidecar["mm_placeholders"]["image"][0]["offset"], "length": 1196}
    ]
    assert tokens(episode).count(QWEN_PAD) == 1196


def image_shapes(tmp_path: Path) -> dict[str, tuple[dict[str, Any], list[Any] | None]]:
    """Every image part shape for one image, each with its `images` column (TRL) or None."""
    data = image_bytes(96, 64)
    path = tmp_path / "shot.png"
    path.write_bytes(data)
    url, uri = data_url(data), path.as_uri()
    encoded = base64.b64encode(data).decode()
    return {
        "openai data URL": ({"type": "image_url", "image_url": {"url": url, "detail": "high"}}, None),
        "openai file URI": ({"type": "image_url", "image_url": {"url": uri}}, None),
        "openai string": ({"type": "image_url", "image_url": url}, None),
        "responses": ({"type": "input_image", "image_url": uri}, None),
        "hf url": ({"type": "image", "url": url}, None),
        "hf path": ({"type": "image", "path": str(path)}, None),
        "hf image": ({"type": "image", "image": uri}, None),
        "hf datasets image": ({"type": "image", "image": {"bytes": encoded, "path": None}}, None),
        "trl path": ({"type": "image"}, [str(path)]),
        "trl file URI": ({"type": "image"}, [uri]),
        "trl datasets": ({"type": "image"}, [{"bytes": encoded, "path": "shot.png"}]),
    }


def test_every_image_part_shape_renders_the_same_tokens_and_hash(
    models: dict[str, Path], tmp_path: Path
) -> None:
    rendered = {}
    for name, (part, column) in image_shapes(tmp_path).items():
        record = chat([part]) if column is None else {**chat([part]), "images": column}
        episode, _ = renderer(models["qwen3_vl"], tmp_path / "assets").rollout(record)
        sidecar = nodes(episode)[1]["multi_modal_data"]
        rendered[name] = (
            tokens(episode),
            sidecar["mm_hashes"]["image"],
            sidecar["mm_items"]["image"][0]["payload"],
        )
    baseline = rendered["openai data URL"]
    assert baseline[2] == {"image_grid_thw": [[1, 14, 20]]}  # 96x64 scaled up to 320x224 (min_pixels 65,536)
    assert {name: value == baseline for name, value in rendered.items()} == dict.fromkeys(rendered, True)


def test_verifiers_prompt_and_completion_render_like_the_same_messages(models: dict[str, Path]) -> None:
    messages = chat([])["messages"]
    as_verifiers = {"prompt": messages[:2], "completion": messages[2:], "reward": 1.0, "task": "t"}
    ours = renderer(models["kimi_k25"]).rollout(as_verifiers)[0]
    theirs = renderer(models["kimi_k25"]).rollout(chat([]))[0]
    assert tokens(ours) == tokens(theirs)
    assert (ours["reward"], ours["task"], ours["env"]) == (1.0, "t", {"id": ""})


def test_string_prompt_and_completion_are_one_user_and_one_assistant_message(models: dict[str, Path]) -> None:
    episode = renderer(models["kimi_k25"]).rollout({"prompt": "Hi", "completion": "Yo"})[0]
    assert [node["sampled"] for node in nodes(episode)] == [False, True]
    assert bytes(t for t in nodes(episode)[1]["token_ids"] if t < 256) == b"assistantYo"


def test_trl_images_column_fills_placeholders_in_order(models: dict[str, Path], tmp_path: Path) -> None:
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    first.write_bytes(image_bytes(64, 64, seed=1))
    second.write_bytes(image_bytes(128, 64, seed=2))
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "image"}]},
            {"role": "assistant", "content": "done"},
        ],
        "images": [str(first), str(second)],
    }
    episode, counts = renderer(models["qwen3_vl"]).rollout(record)
    items = [nodes(episode)[i]["multi_modal_data"]["mm_items"]["image"][0] for i in (0, 2)]
    assert [item["raw_image_uri"] for item in items] == [first.as_uri(), second.as_uri()]
    assert [item["payload"] for item in items] == [
        {"image_grid_thw": [[1, 16, 16]]},
        {"image_grid_thw": [[1, 12, 24]]},
    ]
    assert (counts.images, counts.sampled_nodes) == (2, 2)


def multi_turn(paths: list[Path]) -> dict[str, Any]:
    """A rollout of several turns: one image per user or tool turn, tool calls in OpenAI shape."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You browse."}]
    for turn, path in enumerate(paths):
        image = {"type": "image_url", "image_url": {"url": path.as_uri()}}
        if turn == 0:
            messages.append({"role": "user", "content": [{"type": "text", "text": "Go."}, image]})
        else:
            messages.append({"role": "tool", "tool_call_id": f"c{turn}", "content": [image]})
        call = {
            "id": f"c{turn + 1}",
            "type": "function",
            "function": {"name": "click", "arguments": '{"x": 1}'},
        }
        messages.append({"role": "assistant", "content": f"Step {turn}.", "tool_calls": [call]})
    return {"messages": messages}


def hf_expansion(model_dir: Path, messages: list[dict[str, Any]], sizes: list[tuple[int, int]]) -> list[int]:
    """The Hugging Face rendering of a prompt: template, tokenizer, then each pad expanded to its
    grid as the model's own image processor lays it out."""
    from PIL import Image
    from transformers import AutoImageProcessor

    tokenizer = load_tokenizer(model_dir)
    as_hf = [
        {**m, "content": [{"type": "image"} if "image_url" in p else p for p in m["content"]]}
        if isinstance(m["content"], list) else m
        for m in json.loads(json.dumps(messages))
    ]  # fmt: skip
    for message in as_hf:
        for call in message.get("tool_calls", []):
            call["function"] = {**call["function"], "arguments": json.loads(call["function"]["arguments"])}
    text = tokenizer.apply_chat_template(as_hf, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    processor = AutoImageProcessor.from_pretrained(model_dir)
    grids = [processor(images=[Image.new("RGB", size)])["image_grid_thw"][0] for size in sizes]
    lengths = iter(int(grid.prod()) // processor.merge_size**2 for grid in grids)
    return [t for token in ids for t in ([token] * next(lengths) if token == QWEN_PAD else [token])]


@pytest.mark.parametrize("config", ["qwen3_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_every_turns_prompt_equals_the_hf_processors_expansion(
    models: dict[str, Path], tmp_path: Path, config: str, count: int
) -> None:
    sizes = [(200, 120), (64, 300), (1280, 720)][:count]
    paths = []
    for number, size in enumerate(sizes):
        paths.append(tmp_path / f"{number}.png")
        paths[-1].write_bytes(image_bytes(*size, seed=number))
    record = multi_turn(paths)
    episode = renderer(models[config]).rollout(json.loads(json.dumps(record)))[0]
    for index, node in enumerate(nodes(episode)):
        if not node["sampled"]:
            continue
        header = node["mask"].index(True)
        before = [t for earlier in nodes(episode)[:index] for t in earlier["token_ids"]]
        shown = [size for size, _ in zip(sizes, range(index // 2), strict=False)]
        assert before + node["token_ids"][:header] == hf_expansion(
            models[config], record["messages"][:index], shown
        )


def with_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    record = chat([])
    record["messages"][2]["logprobs"] = {"content": entries}
    return record


def test_recorded_logprobs_are_kept_when_they_are_the_rendered_tokens(models: dict[str, Path]) -> None:
    # "A box." and the end-of-turn token, as vLLM writes token ids, then as text.
    as_ids = [{"token": f"token_id:{t}", "logprob": -0.5} for t in [*b"A box.", QWEN_IM_END]]
    as_text = [{"token": t, "logprob": -0.25} for t in [*"A box.", "<|im_end|>"]]
    for entries, value in ((as_ids, -0.5), (as_text, -0.25)):
        episode, counts = renderer(models["qwen3_vl"]).rollout(with_logprobs(entries))
        assert nodes(episode)[2]["logprobs"] == [value] * 7
        assert (counts.logprobs_kept, counts.sampled_nodes_without_logprobs) == (7, 0)


def test_logprobs_of_other_tokens_are_dropped_and_counted(models: dict[str, Path]) -> None:
    retokenized = [{"token": "A box.", "logprob": -0.5}, {"token": "<|im_end|>", "logprob": -0.1}]
    episode, counts = renderer(models["qwen3_vl"]).rollout(with_logprobs(retokenized))
    assert "logprobs" not in nodes(episode)[2]
    assert (counts.logprobs_kept, counts.sampled_nodes_without_logprobs) == (0, 1)


def test_mask_is_true_on_the_reply_and_end_of_turn_only(models: dict[str, Path]) -> None:
    node = nodes(renderer(models["qwen3_vl"]).rollout(chat([]))[0])[2]
    # <|im_start|>assistant\n is the prompt's; "A box.<|im_end|>" sampled; the trailing \n is template text.
    assert node["token_ids"] == [151644, *b"assistant\n", *b"A box.", QWEN_IM_END, 10]
    assert node["mask"] == [False] * 11 + [True] * 7 + [False]


def test_render_rollout_gives_an_episode_refs_takes(models: dict[str, Path], tmp_path: Path) -> None:
    record = chat(
        [{"type": "image_url", "image_url": {"url": data_url(image_bytes())}}], example_id=3, reward=1.0
    )
    episode = render_rollout(
        record, load_tokenizer(models["kimi_k25"]), Families(models["kimi_k25"]), assets=tmp_path
    )
    sidecar = nodes(episode)[1]["multi_modal_data"]
    stored = AssetStore(tmp_path).put(image_bytes())
    assert sidecar["mm_items"]["image"][0]["raw_image_uri"] == stored.uri
    assert sidecar["mm_hashes"]["image"] == [stored.hash]
    assert sidecar["mm_items"]["image"][0]["vllm_modality"] == "vision_chunk"
    assert tokens(episode).count(KIMI_PAD) == 1
    assert (episode["example_id"], episode["reward"]) == (3, 1.0)


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(app, ["render", *args])


def test_placeholder_without_an_image_exits_2_naming_file_line_message_and_image(
    models: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / "one.png"
    path.write_bytes(image_bytes())
    record = {**chat([{"type": "image"}, {"type": "image"}]), "images": [str(path)]}
    source = write_jsonl(tmp_path / "r.jsonl", [chat([]), record])
    result = run_cli(str(source), "--model", str(models["qwen3_vl"]), "-o", str(tmp_path / "out.jsonl"))
    assert result.exit_code == 2
    assert "r.jsonl:2` `$.messages[1].content[2]` image 1" in result.stderr
    assert "Expected an image for placeholder 1 (message 1)" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_an_image_without_a_placeholder_exits_2(models: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "one.png"
    path.write_bytes(image_bytes())
    source = write_jsonl(tmp_path / "r.jsonl", [{**chat([]), "images": [str(path)]}])
    result = run_cli(str(source), "--model", str(models["qwen3_vl"]), "-o", str(tmp_path / "out.jsonl"))
    assert result.exit_code == 2
    assert "`$.images[0]` image 0" in result.stderr and "placeholder per image" in result.stderr


def test_inline_image_without_assets_says_offload_first(models: dict[str, Path], tmp_path: Path) -> None:
    source = write_jsonl(
        tmp_path / "r.jsonl", [chat([{"type": "image_url", "image_url": {"url": data_url(image_bytes())}}])]
    )
    result = run_cli(str(source), "--model", str(models["qwen3_vl"]), "-o", str(tmp_path / "out.jsonl"))
    assert result.exit_code == 2
    assert "`$.messages[1].content[1].image_url.url` image 0" in result.stderr
    assert "offload first" in result.stderr


def test_a_part_the_template_cannot_render_exits_2(models: dict[str, Path], tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "r.jsonl", [chat([{"type": "input_audio", "input_audio": {}}])])
    result = run_cli(
        str(source), "--model", str(models["kimi_k25"]), "-o", str(tmp_path / "out.jsonl"), "--json"
    )
    assert result.exit_code == 2
    error = json.loads(result.stdout)
    assert "type `input_audio`" in error["message"] and "$.messages[1].content[1]" in error["error"]


def test_a_model_without_a_tokenizer_says_pass_one(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "r.jsonl", [chat([])])
    result = run_cli(
        str(source), "--model", str(FIXTURES / "models" / "qwen3_vl"), "-o", str(tmp_path / "o.jsonl")
    )
    assert result.exit_code == 2
    assert "pass --model with a tokenizer" in result.stderr


def test_an_image_the_family_cannot_lay_out_exits_2(models: dict[str, Path], tmp_path: Path) -> None:
    sliver = tmp_path / "sliver.png"
    sliver.write_bytes(image_bytes(1000, 4))
    source = write_jsonl(
        tmp_path / "r.jsonl", [chat([{"type": "image_url", "image_url": {"url": sliver.as_uri()}}])]
    )
    with pytest.raises(BadInputError, match=r"cannot lay out .* aspect ratio <= 200") as caught:
        render_files([source], tmp_path / "o.jsonl", models["qwen3_vl"])
    assert (caught.value.where.line, caught.value.where.image) == (1, 0)


def test_a_stored_image_whose_content_is_not_its_name_is_an_integrity_error(
    models: dict[str, Path], tmp_path: Path
) -> None:
    stored = AssetStore(tmp_path / "assets").put(image_bytes())
    stored.path.write_bytes(image_bytes(seed=9))
    with pytest.raises(IntegrityError):
        renderer(models["qwen3_vl"]).rollout(chat([{"type": "image_url", "image_url": {"url": stored.uri}}]))


@pytest.mark.parametrize("config", ["qwen3_vl", "qwen2_5_vl", "kimi_k25"])
def test_render_refs_pack_audit_passes_with_zero_violations(
    models: dict[str, Path], tmp_path: Path, config: str
) -> None:
    shapes = image_shapes(tmp_path)
    extra = [
        {
            **chat([shapes["trl datasets"][0]]),
            "images": shapes["trl datasets"][1],
            "example_id": 9,
            "reward": 1.0,
        },
        {**chat([shapes["responses"][0]]), "example_id": 9, "reward": 0.0},
    ]
    rollouts = (FIXTURES / "rollouts" / "mini_browse.jsonl").read_text() + "".join(
        json.dumps(r) + "\n" for r in extra
    )
    (tmp_path / "results.jsonl").write_text(rollouts)
    run, episodes = tmp_path / "run", str(tmp_path / "episodes.jsonl")
    model = str(models[config])
    steps = [
        ["render", str(tmp_path / "results.jsonl"), "--model", model, "-o", episodes, "--assets", str(run / "assets" / "images")],
        ["refs", episodes, "--run-dir", str(run), "--model", model],
        ["pack", str(run), "--seq-len", "8192"],
        ["audit", str(run), "--verify-hashes", "--expect", "examples=6", "--expect", "missing_files=0",
         "--expect", "data_uris=0", "--json"],
    ]  # fmt: skip
    for args in steps:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (args[0], result.output)
    report = json.loads(result.stdout)
    assert (report["ok"], report["violations"]) == (True, [])


def test_a_token_across_a_message_boundary_is_an_error_naming_the_message(
    models: dict[str, Path], tmp_path: Path
) -> None:
    from tokenizers import Tokenizer
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    # "a" + "b" is one token "ab", and this template writes messages back to back.
    vocab = {"a": 0, "b": 1, "ab": 2, "<|media_pad|>": 163605, "<|im_end|>": 163586}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[("a", "b")])),
        eos_token="<|im_end|>",
        additional_special_tokens=["<|media_pad|>"],
    )
    fast.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(BadInputError, match="a token spans the end of message 0") as caught:
        Renderer(fast, Families(models["kimi_k25"])).rollout(record)
    assert caught.value.where.path == ("messages", 0)


def test_an_images_column_entry_is_stored_once(models: dict[str, Path], tmp_path: Path) -> None:
    part, column = image_shapes(tmp_path)["trl datasets"]
    _, counts = renderer(models["qwen3_vl"], tmp_path / "assets").rollout({**chat([part]), "images": column})
    assert (counts.images, counts.images_offloaded) == (1, 1)
    assert len(list((tmp_path / "assets").iterdir())) == 1


def test_a_bad_inline_image_names_its_path_in_the_record(models: dict[str, Path], tmp_path: Path) -> None:
    record = chat([{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}])
    with pytest.raises(BadInputError, match="Expected an image media type") as caught:
        renderer(models["qwen3_vl"], tmp_path / "assets").rollout(record)
    assert caught.value.where.path == ("messages", 1, "content", 1, "image_url", "url")

"""Benchmark render: rollouts/s and images/s beside the tokenizer's own apply_chat_template (the floor).

Input: the fixtures' 4 chat rollouts (fixtures/rollouts/mini_browse.jsonl, 12 screenshots,
7 messages each), offloaded once, repeated ``--repeat`` times. Each repeat is a pass with
a cold image cache (every file read, hashed and its header laid out again), as a new run
would be. The floor is ``apply_chat_template(messages, tokenize=False)`` plus tokenizing
the text, once per rollout, on the same messages as the template sees them: what any
chat-to-tokens step must do at least. render does more (a render per message boundary,
each piece tokenized, the join checked, images read and expanded).

Usage: python scripts/bench_render.py [--repeat 25] [--config qwen3_vl] [--config kimi_k25]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from mmoffload.errors import Where
from mmoffload.families import Families
from mmoffload.offload import offload_files
from mmoffload.render import Renderer, load_tokenizer
from mmoffload.render.images import ImageReader
from mmoffload.render.messages import chat_message, conversation
from mmoffload.render.tiny import write_tiny_model

ROLLOUTS = Path(__file__).resolve().parent.parent / "fixtures" / "rollouts" / "mini_browse.jsonl"


def template_messages(record: dict) -> list[dict]:
    """The messages exactly as render hands them to the chat template."""
    found = conversation(record, Where())
    return [chat_message(i, path, m, sampled, Where()).template for i, (path, m, sampled) in enumerate(found)]


def bench(config: str, repeat: int, root: Path) -> None:
    model = write_tiny_model(root / config, config)
    offloaded = root / f"{config}.offloaded.jsonl"
    offload_files([ROLLOUTS], [offloaded], root / "assets")
    records = [json.loads(line) for line in offloaded.read_text().splitlines()]
    tokenizer = load_tokenizer(model)
    renderer = Renderer(tokenizer, Families(model))
    # The records are offloaded, so rendering changes nothing in them: the same objects serve every pass.
    for record in records:  # warm up: lazy imports and the template's compilation are not render's
        renderer.rollout(record)
    images = 0
    started = time.perf_counter()
    for _ in range(repeat):
        renderer.images = ImageReader(renderer.family)  # cold image cache each pass
        for record in records:
            images += renderer.rollout(record)[1].images
    render_s = time.perf_counter() - started
    prepared = [template_messages(record) for record in records]
    started = time.perf_counter()
    for _ in range(repeat):
        for messages in prepared:
            tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    floor_s = time.perf_counter() - started
    rollouts = repeat * len(records)
    print(
        f"{config}: {rollouts} rollouts, {images} images: render {render_s:.3f} s = {rollouts / render_s:,.0f} "
        f"rollouts/s, {images / render_s:,.0f} images/s; floor (apply_chat_template + tokenize) "
        f"{floor_s:.3f} s = {rollouts / floor_s:,.0f} rollouts/s; render / floor = {render_s / floor_s:.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=25)
    parser.add_argument("--config", action="append", choices=["qwen3_vl", "qwen2_5_vl", "kimi_k25"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.config or ["qwen3_vl", "kimi_k25"]:
            bench(config, args.repeat, Path(tmp))


if __name__ == "__main__":
    main()

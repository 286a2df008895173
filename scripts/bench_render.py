"""Benchmark render: rollouts/s and images/s beside the tokenizer's own apply_chat_template (the floor).

Input: the fixtures' 4 chat rollouts (fixtures/rollouts/mini_browse.jsonl, 12 screenshots,
7 messages each), offloaded once, rendered in ``--repeat`` rounds, each with a cold image cache (every
file read, hashed and its header laid out again, as a new run would) and followed by a
floor pass; the median round gives the rates and the ratio. The floor is ``apply_chat_template(messages, tokenize=False)`` plus tokenizing
the text, once per rollout, on the same messages as the template sees them: what any
chat-to-tokens step must do at least. render does more (a render per message boundary,
each piece tokenized, the join checked, images read and expanded).

Usage: python scripts/bench_render.py [--repeat 50] [--config qwen3_vl] [--config kimi_k25]
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    prepared = [template_messages(record) for record in records]
    # Interleaved rounds (one render pass, one floor pass) on a shared, noisy machine: the median
    # round gives the rates and the ratio.
    rounds: list[tuple[float, float]] = []
    images = 0
    for _ in range(repeat):
        renderer.images = ImageReader(renderer.family)  # cold image cache each pass, as a new run
        started = time.perf_counter()
        images = sum(renderer.rollout(record)[1].images for record in records)
        render_s = time.perf_counter() - started
        started = time.perf_counter()
        for record in records:  # the same rollouts again, their images cached: template and tokens only
            renderer.rollout(record)
        warm_s = time.perf_counter() - started
        started = time.perf_counter()
        for messages in prepared:
            tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
        rounds.append((render_s, warm_s, time.perf_counter() - started))
    render_s = statistics.median(r for r, _, _ in rounds)
    floor_s = statistics.median(f for _, _, f in rounds)
    ratio = statistics.median(r / f for r, _, f in rounds)
    warm_ratio = statistics.median(w / f for _, w, f in rounds)
    print(
        f"{config}: {len(records)} rollouts x {repeat} rounds, {images} images per round (cold cache): "
        f"render {len(records) / render_s:,.0f} rollouts/s, {images / render_s:,.0f} images/s; "
        f"floor (apply_chat_template + tokenize) {len(records) / floor_s:,.0f} rollouts/s; "
        f"render / floor = {ratio:.1f}x, with images cached {warm_ratio:.1f}x (median round)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--config", action="append", choices=["qwen3_vl", "qwen2_5_vl", "kimi_k25"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.config or ["qwen3_vl", "kimi_k25"]:
            bench(config, args.repeat, Path(tmp))


if __name__ == "__main__":
    main()

"""Tiny byte-level tokenizers with each family's chat template, for the demo, tests and benchmarks.

No tokenizer can be downloaded here, so ``write_tiny_model`` makes a model directory
that ``render`` (and ``refs``, ``materialize``) read as they read a real one: the
bundled ``preprocessor_config.json`` of a config, a ``tokenizer.json`` whose text
tokens are the 256 bytes (id = byte value, as the fixtures' traces tokenize text)
and whose special tokens carry their published ids, and a ``tokenizer_config.json``
with a chat template of the family's real markup (docs/fixtures.md): ChatML with
``<tool_call>`` / ``<tool_response>`` for Qwen-VL, Kimi's ``<|im_user|>``... openers
and tool-call sections for Kimi K2.5. Images render as one placeholder token per
image, as the real templates do; the inference server and ``render`` expand it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mmoffload.extras import require
from mmoffload.families import BUNDLED_CONFIGS

QWEN_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<tool_response>": 151665,
    "</tool_response>": 151666,
}
KIMI_TOKENS = {
    "[BOS]": 163584,
    "[EOS]": 163585,
    "<|im_end|>": 163586,
    "<|im_user|>": 163587,
    "<|im_assistant|>": 163588,
    "<|im_system|>": 163594,
    "<|tool_calls_section_begin|>": 163595,
    "<|tool_calls_section_end|>": 163596,
    "<|tool_call_begin|>": 163597,
    "<|tool_call_argument_begin|>": 163598,
    "<|tool_call_end|>": 163599,
    "<|im_middle|>": 163601,
    "<|media_begin|>": 163602,
    "<|media_content|>": 163603,
    "<|media_end|>": 163604,
    "<|media_pad|>": 163605,
    "[PAD]": 163839,
}

# Text or image parts, as Hugging Face chat templates read them; `IMAGE` is the family's markup.
_CONTENT_MACRO = (
    "{%- macro content_text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content is not none -%}{%- for part in content -%}"
    "{%- if part.type == 'image' or 'image' in part or 'image_url' in part -%}IMAGE"
    "{%- elif 'text' in part -%}{{ part.text }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)
QWEN_TEMPLATE = _CONTENT_MACRO.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>") + (
    "{%- for message in messages -%}"
    "{%- if message.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}<|im_start|>user{%- endif -%}"
    "{{ '\\n<tool_response>\\n' }}{{ content_text(message.content) }}{{ '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}<|im_end|>{{ '\\n' }}{%- endif -%}"
    "{%- else -%}"
    "<|im_start|>{{ message.role }}{{ '\\n' }}{{ content_text(message.content) }}"
    "{%- for call in message.tool_calls or [] -%}"
    "{%- if message.content or not loop.first -%}{{ '\\n' }}{%- endif -%}"
    '<tool_call>{{ \'\\n{"name": "\' }}{{ call.function.name }}{{ \'", "arguments": \' }}'
    "{{ call.function.arguments | tojson }}{{ '}\\n' }}</tool_call>"
    "{%- endfor -%}"
    "<|im_end|>{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\\n' }}{%- endif -%}"
)
KIMI_TEMPLATE = _CONTENT_MACRO.replace(
    "IMAGE", "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>"
) + (
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}<|im_system|>system<|im_middle|>"
    "{%- elif message.role == 'tool' -%}"
    "<|im_system|>tool<|im_middle|>## Return of {{ message.tool_call_id }}{{ '\\n' }}"
    "{%- elif message.role == 'assistant' -%}<|im_assistant|>assistant<|im_middle|>"
    "{%- else -%}<|im_user|>{{ message.role }}<|im_middle|>"
    "{%- endif -%}"
    "{{ content_text(message.content) }}"
    "{%- if message.tool_calls -%}<|tool_calls_section_begin|>"
    "{%- for call in message.tool_calls -%}"
    "<|tool_call_begin|>functions.{{ call.function.name }}:{{ call.id }}<|tool_call_argument_begin|>"
    "{{ call.function.arguments | tojson }}<|tool_call_end|>"
    "{%- endfor -%}<|tool_calls_section_end|>"
    "{%- endif -%}"
    "<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)

# Bundled config -> (special tokens, chat template, end-of-turn token).
TINY_MODELS: dict[str, tuple[dict[str, int], str, str]] = {
    "qwen2_5_vl": (QWEN_TOKENS, QWEN_TEMPLATE, "<|im_end|>"),
    "qwen3_vl": (QWEN_TOKENS, QWEN_TEMPLATE, "<|im_end|>"),
    "kimi_k25": (KIMI_TOKENS, KIMI_TEMPLATE, "<|im_end|>"),
}


def byte_chars() -> list[str]:
    """Return the character GPT-2's byte-level alphabet gives each byte value, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars: dict[int, int] = {byte: byte for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = 256 + extra
            extra += 1
    return [chr(chars[byte]) for byte in range(256)]


def write_tiny_model(out_dir: str | Path, config: str) -> Path:
    """Write a tiny model directory (no weights) for bundled config ``config`` and return it.

    Args:
        out_dir: the directory to write (created).
        config: a key of ``TINY_MODELS``: ``qwen2_5_vl`` (patch 14), ``qwen3_vl`` (patch 16), ``kimi_k25``.

    Raises:
        UsageError: the ``materialize`` extra (tokenizers, transformers) is missing.
        KeyError: an unknown config.
    """
    tokens, template, eos = TINY_MODELS[config]
    tokenizers = require("tokenizers", "Building a tiny tokenizer")
    transformers = require("transformers", "Building a tiny tokenizer")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(
        BUNDLED_CONFIGS / config / "preprocessor_config.json", out_dir / "preprocessor_config.json"
    )
    vocab = {char: byte for byte, char in enumerate(byte_chars())} | tokens
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=eos,
        additional_special_tokens=[name for name in tokens if name != eos],
    )
    fast.chat_template = template
    fast.save_pretrained(out_dir)
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": tokens[eos]}) + "\n")
    return out_dir

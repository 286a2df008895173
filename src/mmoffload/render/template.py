"""The model's own chat template and tokenizer, turn by turn: one token segment per message.

The whole conversation is rendered once; each message's end is where the render of
the conversation up to it stops agreeing with the whole (its common prefix), so a
template that closes a group of tool messages only after the last still splits at
every message. A sampled (assistant) message splits once more, after its role
header: the render of the messages before it with the generation prompt, which
must be a prefix of the whole, or the model was trained on other tokens than it saw.

Each piece is tokenized on its own and the pieces must join to the whole text's
tokens: a token across a message boundary is an error, never a silent shift.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmoffload.contract.spans import IMAGE_TYPE, VIDEO_TYPE
from mmoffload.errors import BadInputError, UsageError, Where
from mmoffload.families import Family
from mmoffload.render.messages import ChatMessage

FIX_TEMPLATE = "pass --model with a tokenizer whose chat template renders these messages"


@dataclass(slots=True)
class Segment:
    """One message's tokens before image expansion: ``header`` tokens of role header, then the body."""

    token_ids: list[int]
    header: int


class ChatTemplate:
    """A tokenizer and its chat template, with the family's image and end-of-turn tokens."""

    def __init__(
        self, tokenizer: Any, family: Family, model_dir: str | os.PathLike[str] | None = None
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"The tokenizer has no chat template: {FIX_TEMPLATE}")
        self.tokenizer = tokenizer
        self.family = family
        vocab = tokenizer.get_vocab()
        named = {name: vocab[name] for name in family.typed_tokens if name in vocab}
        if not any(family.typed_tokens[name] == IMAGE_TYPE for name in named):
            raise UsageError(
                f"The tokenizer has none of the `{family.name}` image tokens "
                f"({', '.join(family.typed_tokens)}): pass --model with the model's own tokenizer"
            )
        self.image_token = next(i for name, i in named.items() if family.typed_tokens[name] == IMAGE_TYPE)
        self.video_tokens = {i for name, i in named.items() if family.typed_tokens[name] == VIDEO_TYPE}
        self.end_of_turn = end_of_turn_ids(tokenizer, model_dir)
        # Added tokens that split text on their own (no stripping of the spaces beside them): a
        # boundary next to one cannot fall inside a token, so the whole text need not be re-tokenized.
        added = getattr(tokenizer, "added_tokens_decoder", {}).values()
        self.splitting = tuple(
            str(token)
            for token in added
            if not (getattr(token, "lstrip", False) or getattr(token, "rstrip", False))
        )

    def apply(self, messages: list[dict[str, Any]], generation_prompt: bool, where: Where) -> str:
        """Render messages to text with the template.

        Raises:
            BadInputError: the template fails on them.
        """
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as exc:  # Templates raise anything: jinja's errors, their own raise_exception.
            raise BadInputError(
                f"The chat template cannot render message {len(messages) - 1}: "
                f"{type(exc).__name__}: {str(exc)[:200]} ({FIX_TEMPLATE})",
                where,
            ) from exc
        if not isinstance(text, str):
            raise BadInputError(
                f"Expected the chat template to render text, got `{type(text).__name__}`", where
            )
        return text

    def segments(self, messages: list[ChatMessage], where: Where) -> list[Segment]:
        """Return each message's tokens (image placeholders not yet expanded).

        Raises:
            BadInputError: the template fails, does not render turn by turn, or a token
                spans two messages.
        """
        dicts = [message.template for message in messages]
        whole = self.apply(dicts, False, where.at(path=messages[-1].path))
        texts: list[tuple[str, str]] = []  # each message's role header (sampled ones) and body
        end = 0
        for index, message in enumerate(messages):
            at = where.at(path=message.path)
            header_end = end
            if message.sampled:
                prompt = self.apply(dicts[:index], True, at) if index else ""
                if not whole.startswith(prompt) or len(prompt) < end:
                    raise BadInputError(
                        f"The chat template does not render turn by turn: the prompt of message {index} "
                        "is not a prefix of the whole conversation (the model saw other tokens) "
                        f"({FIX_TEMPLATE})",
                        at,
                    )
                header_end = len(prompt)
            message_end = self._message_end(dicts, index, whole, header_end, at)
            texts.append((whole[end:header_end], whole[header_end:message_end]))
            end = message_end
        return self._tokenize(texts, messages, where)

    def _message_end(
        self, dicts: list[dict[str, Any]], index: int, whole: str, start: int, where: Where
    ) -> int:
        """Return where message ``index`` ends in the whole text: its render's common prefix with it."""
        if index == len(dicts) - 1:
            return len(whole)
        text = self.apply(dicts[: index + 1], False, where)
        end = _common_prefix(text, whole)
        if end < start:
            raise BadInputError(
                f"The chat template does not render turn by turn: message {index} changes the text "
                f"of the messages before it ({FIX_TEMPLATE})",
                where,
            )
        return end

    def _tokenize(
        self, texts: list[tuple[str, str]], messages: list[ChatMessage], where: Where
    ) -> list[Segment]:
        """Tokenize each message's header and body on their own (as vLLM tokenizes each turn's prompt).

        A header and its body are tokenized apart because the model generated the body after
        the header's last token. Between messages, a boundary next to a splitting special
        token cannot fall inside a token; any other boundary is checked: the two texts
        tokenized together must give the same tokens as apart.
        """
        encoded = self.tokenizer([text for pair in texts for text in pair], add_special_tokens=False)[
            "input_ids"
        ]
        segments = [
            Segment([*encoded[2 * i], *encoded[2 * i + 1]], len(encoded[2 * i])) for i in range(len(texts))
        ]
        whole = [(index, "".join(pair)) for index, pair in enumerate(texts) if any(pair)]
        for (index, before), (_, after) in itertools.pairwise(whole):
            if self._split_at_special(before, after):
                continue
            together = self.tokenizer(before + after, add_special_tokens=False)["input_ids"]
            if (
                together
                != self.tokenizer(before, add_special_tokens=False)["input_ids"]
                + self.tokenizer(after, add_special_tokens=False)["input_ids"]
            ):
                raise BadInputError(
                    f"Expected the messages' tokens to join to the conversation's, but a token spans the "
                    f"end of message {index} (the template puts no special token between them)",
                    where.at(path=messages[index].path),
                )
        return segments

    def _split_at_special(self, before: str, after: str) -> bool:
        """True when the boundary between two non-empty pieces lies next to a splitting added token."""
        return before.endswith(self.splitting) or after.startswith(self.splitting)


def _common_prefix(a: str, b: str) -> int:
    """Return the length of the longest common prefix of two strings."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low] and a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


def end_of_turn_ids(tokenizer: Any, model_dir: str | os.PathLike[str] | None) -> frozenset[int]:
    """Return the tokens that end a generated turn: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    if config is not None and config.is_file():
        try:
            value = json.loads(config.read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            value = None
        ids.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    return frozenset(ids)

"""Chat rollouts to the messages a chat template renders (one per node), with their images.

A rollout is one JSON object in one of these layouts:

- ``messages``: OpenAI chat (and TRL / Hugging Face datasets) conversations; every
  assistant message is sampled;
- ``prompt`` + ``completion``: verifiers' results; a string becomes one user (prompt) or
  assistant (completion) message; assistant messages of the completion are sampled,
  those of the prompt (few-shot examples) are context.

Image parts take every shape ``imageparts`` reads. In the TRL / datasets layout,
bare ``{"type": "image"}`` placeholders take their images from the record's
``images`` column, in order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mmoffload.contract.imageparts import HF_SOURCE_KEYS, ImagePart, find_parts
from mmoffload.errors import BadInputError, PathPart, Where

# Part types whose `text` a template renders.
TEXT_PARTS = frozenset(("text", "input_text", "output_text"))
# Message keys a chat template reads besides `role` and `content`.
TEMPLATE_KEYS = ("name", "tool_calls", "tool_call_id", "reasoning_content")
IMAGES_COLUMN = "images"


@dataclass(slots=True)
class ChatMessage:
    """One message of a rollout: what its template sees, its images, whether it was sampled.

    Attributes:
        index: the message's index in the conversation (prompt, then completion).
        path: the message's JSON path in the record.
        template: the message as chat templates read it (image parts as ``{"type": "image"}``).
        images: its image parts, in order.
        sampled: the model generated it (an assistant message of the completion).
        logprobs: the per-token logprobs the rollout recorded for it (OpenAI ``logprobs.content``).
        message: the message as in the record (images pointing at their files once offloaded).
    """

    index: int
    path: tuple[PathPart, ...]
    template: dict[str, Any]
    images: list[ImagePart]
    sampled: bool
    logprobs: list[Any] | None
    message: dict[str, Any] = field(repr=False)


def conversation(record: Any, where: Where) -> list[tuple[tuple[PathPart, ...], dict[str, Any], bool]]:
    """Return each message of a rollout with its JSON path and whether it was sampled.

    Raises:
        BadInputError: the record holds no chat messages, or a message is not an object.
    """
    if not isinstance(record, dict):
        raise BadInputError(f"Expected a rollout object, got `{type(record).__name__}`", where)
    if isinstance(record.get("messages"), list):
        found = [(("messages", i), m, _role(m) == "assistant") for i, m in enumerate(record["messages"])]
    elif "prompt" in record and "completion" in record:
        found = [*_listed(record, "prompt", "user", False), *_listed(record, "completion", "assistant", True)]
    else:
        keys = ", ".join(f"`{key}`" for key in list(record)[:12]) or "no keys"
        raise BadInputError(
            f"Expected chat messages (`messages`, or `prompt` and `completion`), got keys {keys}", where
        )
    for path, message, _ in found:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadInputError("Expected a message object with a string `role`", where.at(path=path))
    if not found:
        raise BadInputError("Expected at least one message, got none", where)
    return found


def _listed(
    record: dict[str, Any], key: str, role: str, sampled: bool
) -> list[tuple[tuple[PathPart, ...], Any, bool]]:
    value = record[key]
    if isinstance(value, str):
        # A string prompt or completion is one message; the record is not changed.
        return [((key,), {"role": role, "content": value}, sampled)]
    if not isinstance(value, list):
        return [((key,), value, sampled)]
    return [((key, i), m, sampled and _role(m) == "assistant") for i, m in enumerate(value)]


def _role(message: Any) -> object:
    return message.get("role") if isinstance(message, dict) else None


def fill_images_column(
    record: dict[str, Any], messages: list[tuple[tuple[PathPart, ...], dict[str, Any], bool]], where: Where
) -> None:
    """Give each bare ``{"type": "image"}`` part the next image of the ``images`` column, in place.

    Entries are paths (relative to the working directory), URLs (``file://``, ``data:``) or
    datasets' ``{bytes, path}`` objects. Without an ``images`` column nothing changes.

    Raises:
        BadInputError: a placeholder without an image, or an image without a placeholder.
    """
    column = record.get(IMAGES_COLUMN)
    if column is None:
        return
    if not isinstance(column, list):
        raise BadInputError("Expected `images` as a list", where.at(path=(IMAGES_COLUMN,)))
    bare = [
        (index, path, part)
        for index, (path, message, _) in enumerate(messages)
        for path, part in _content_parts(message, path)
        if part.get("type") == "image" and all(part.get(key) is None for key in HF_SOURCE_KEYS)
    ]
    for number, (index, path, part) in enumerate(bare):
        if number >= len(column):
            raise BadInputError(
                f"Expected an image for placeholder {number} (message {index}), got only "
                f"{len(column)} in the `images` column",
                where.at(path=path, image=number),
            )
        # A copy: the column itself is not rendered, and its entry must not be rewritten as a part.
        part.update(_column_part(column[number], where.at(path=(IMAGES_COLUMN, number), image=number)))
    if len(column) > len(bare):
        raise BadInputError(
            f'Expected one `{{"type": "image"}}` placeholder per image of the `images` column '
            f"({len(column)}), got {len(bare)}",
            where.at(path=(IMAGES_COLUMN, len(bare)), image=len(bare)),
        )


def _content_parts(
    message: dict[str, Any], path: tuple[PathPart, ...]
) -> list[tuple[tuple[PathPart, ...], dict[str, Any]]]:
    content = message.get("content")
    if not isinstance(content, list):
        return []
    return [((*path, "content", i), part) for i, part in enumerate(content) if isinstance(part, dict)]


def _column_part(entry: Any, where: Where) -> dict[str, Any]:
    """Return the source key of an HF image part for one entry of the ``images`` column."""
    if isinstance(entry, dict):
        return {"image": dict(entry)}
    if isinstance(entry, str):
        # `path` makes a local path its absolute file:// URI; a URL stays itself.
        return {"path": entry}
    raise BadInputError(
        f"Expected an image path, URL or `{{bytes, path}}` object, got `{type(entry).__name__}`", where
    )


def chat_message(
    index: int, path: tuple[PathPart, ...], message: dict[str, Any], sampled: bool, where: Where
) -> ChatMessage:
    """Return a message as its template reads it, with its image parts in order.

    Raises:
        BadInputError: content that is neither a string nor a list of text and image parts.
    """
    at = where.at(path=path)
    content = message.get("content")
    images: list[ImagePart] = []
    if isinstance(content, list):
        try:
            images = find_parts(content)
        except BadInputError as exc:
            inner = exc.where.path if exc.where is not None and exc.where.path is not None else ()
            raise BadInputError(exc.message, at.at(path=(*path, "content", *inner))) from exc
        by_part = {id(part.container): part for part in images}
        rendered: Any = [_template_part(part, i, by_part, at) for i, part in enumerate(content)]
        items = {id(part) for part in content}
        if len(by_part) != len(images) or not by_part.keys() <= items:
            raise BadInputError("Expected each image part directly in the message's content list", at)
    elif content is None or isinstance(content, str):
        rendered = content or ""
    else:
        raise BadInputError(
            f"Expected `content` as a string or a list of parts, got `{type(content).__name__}`",
            at.at(path=(*path, "content")),
        )
    template = {"role": message["role"], "content": rendered}
    for key in TEMPLATE_KEYS:
        if message.get(key) is not None:
            template[key] = message[key]
    if isinstance(template.get("tool_calls"), list):
        template["tool_calls"] = [_parsed_call(call) for call in template["tool_calls"]]
    return ChatMessage(index, path, template, images, sampled, _logprobs(message), message)


def _template_part(part: Any, i: int, images: dict[int, ImagePart], where: Where) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise BadInputError(
            f"Expected a content part object, got `{type(part).__name__}`",
            where.at(path=(*(where.path or ()), "content", i)),
        )
    if id(part) in images:
        return {"type": "image"}
    if part.get("type") in TEXT_PARTS and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    raise BadInputError(
        f"Expected a text or image part, got type `{str(part.get('type'))[:40]}` "
        "(a message the chat template cannot render)",
        where.at(path=(*(where.path or ()), "content", i)),
    )


def _parsed_call(call: Any) -> Any:
    """Return a tool call with JSON-string arguments parsed, as vLLM gives them to templates."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    arguments = call["function"].get("arguments")
    if not isinstance(arguments, str):
        return call
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return call
    return {**call, "function": {**call["function"], "arguments": parsed}}


def _logprobs(message: dict[str, Any]) -> list[Any] | None:
    """Return the message's recorded per-token logprobs: ``logprobs.content`` (or a bare list)."""
    value = message.get("logprobs")
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, list) else None

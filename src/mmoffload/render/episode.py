"""One chat rollout to one v1 episode (traces.md): one node per message, images expanded.

``Renderer`` holds what a run shares (the template, the family, the image cache, the
asset store); ``render_rollout`` is the one-call form for rollout workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from mmoffload.errors import BadInputError, MMOffloadError, PathPart, UsageError, Where
from mmoffload.families import Families
from mmoffload.offload import Offloader
from mmoffload.render.images import ImageReader, RenderedImage
from mmoffload.render.logprobs import matched_logprobs
from mmoffload.render.messages import ChatMessage, chat_message, conversation, fill_images_column
from mmoffload.render.template import ChatTemplate, Segment
from mmoffload.store.backend import open_store
from mmoffload.store.local import AssetStore
from mmoffload.store.read import AllowedRoots

# Rollout fields carried onto the episode as they are (group keys, rewards, metadata).
CARRIED = ("id", "example_id", "task", "group", "reward", "rewards", "metrics", "info", "answer",
           "temperature", "sampling_args")  # fmt: skip
ENV_ID_KEYS = ("env_id", "env")


class RenderCounts(msgspec.Struct):
    """What rendering one rollout (or many, summed) did."""

    rollouts: int = 0
    messages: int = 0
    sampled_nodes: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    images: int = 0
    images_offloaded: int = 0
    images_adopted: int = 0
    logprobs_kept: int = 0
    sampled_nodes_without_logprobs: int = 0

    def add(self, other: RenderCounts) -> None:
        """Add ``other``'s figures to these."""
        for name in RenderCounts.__struct_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(slots=True)
class _Stream:
    """The episode's tokens so far: where the next node starts."""

    position: int = 0
    nodes: list[dict[str, Any]] = field(default_factory=list)


class Renderer:
    """Renders chat rollouts with one model's tokenizer, chat template and image family."""

    def __init__(
        self,
        tokenizer: Any,
        families: Families,
        *,
        assets: str | os.PathLike[str] | AssetStore | None = None,
        allowed_roots: AllowedRoots = None,
        env_name: str = "",
    ) -> None:
        family = families.model()
        if family is None:
            raise UsageError("Rendering needs a model: pass --model with a model directory (tokenizer and "
                             "preprocessor config) or a hub id in the local cache")  # fmt: skip
        families.get(family.name)  # Counted as used: every image of a rendered rollout is its.
        self.family = family
        self.template = ChatTemplate(tokenizer, family, families.model_dir)
        store = (
            open_store(Path(assets) if isinstance(assets, os.PathLike) else assets)
            if assets is not None
            else None
        )
        self.offloader = Offloader(store) if store is not None else None
        self.images = ImageReader(family, allowed_roots, store)
        self.env_name = env_name

    def rollout(self, record: Any, where: Where | None = None) -> tuple[dict[str, Any], RenderCounts]:
        """Render one rollout (changed in place: inline images point at their stored files).

        Raises:
            BadInputError: the rollout breaks the input shapes, its template or its images.
            IntegrityError: a stored image is missing or its content disagrees with its name.
        """
        where = where or Where()
        found = conversation(record, where)
        fill_images_column(record, found, where)
        counts = RenderCounts(rollouts=1, messages=len(found))
        if self.offloader is not None:
            counts.images_offloaded = sum(self._offload(message, path, where) for path, message, _ in found)
        messages = [
            chat_message(i, path, message, sampled, where) for i, (path, message, sampled) in enumerate(found)
        ]
        segments = self.template.segments(messages, where)
        stream = _Stream()
        for message, segment in zip(messages, segments, strict=True):
            stream.nodes.append(self._node(message, segment, stream.position, where, counts))
            stream.position += len(stream.nodes[-1]["token_ids"])
        counts.tokens = stream.position
        return self._episode(record, stream.nodes), counts

    def _offload(self, message: dict[str, Any], path: tuple[PathPart, ...], where: Where) -> int:
        """Store a message's inline images as offload does, in place; return how many.

        Messages only: an ``images`` column's entries are in the messages by now, and the
        column is not carried onto the episode.
        """
        assert self.offloader is not None
        try:
            return self.offloader.record(message, where.at(path=path)).offloaded
        except MMOffloadError as exc:
            # The offloader names paths within the message: put the message's own path first.
            inner = exc.where.path if exc.where is not None and exc.where.path is not None else ()
            raise type(exc)(exc.message, (exc.where or where).at(path=(*path, *inner))) from exc

    def _node(
        self, message: ChatMessage, segment: Segment, start: int, where: Where, counts: RenderCounts
    ) -> dict[str, Any]:
        """Return a message's node: tokens with images expanded, mask, logprobs and sidecar."""
        at = where.at(path=message.path)
        images = [self.images.read(part.source, at.at(path=(*message.path, "content", *part.path), image=i))
                  for i, part in enumerate(message.images)]  # fmt: skip
        tokens, offsets = self._expand(segment.token_ids, images, message, at)
        header = segment.header
        mask = [False] * len(tokens)
        node: dict[str, Any] = {
            "parent": message.index - 1 if message.index else None,
            "message": message.message,
        }
        if message.sampled:
            counts.sampled_nodes += 1
            end = next(
                (i + 1 for i in range(header, len(tokens)) if tokens[i] in self.template.end_of_turn),
                len(tokens),
            )
            mask[header:end] = [True] * (end - header)
            counts.trainable_tokens += end - header
            logprobs = matched_logprobs(message.logprobs, tokens[header:end], self.template.tokenizer)
            if logprobs is None:
                counts.sampled_nodes_without_logprobs += 1
            else:
                node["logprobs"] = logprobs
                counts.logprobs_kept += len(logprobs)
        node.update(token_ids=tokens, mask=mask, sampled=message.sampled)
        if images:
            counts.images += len(images)
            node["multi_modal_data"] = {
                "mm_items": {"image": [image.descriptor(self.family) for image in images]},
                "mm_hashes": {"image": [image.hash for image in images]},
                "mm_placeholders": {"image": [{"offset": start + o, "length": image.length} for o, image in zip(offsets, images, strict=True)]},
            }  # fmt: skip
        return node

    def _expand(
        self, tokens: list[int], images: list[RenderedImage], message: ChatMessage, where: Where
    ) -> tuple[list[int], list[int]]:
        """Expand each image token to its image's placeholder length; return tokens and offsets."""
        pad = self.template.image_token
        positions = [i for i, token in enumerate(tokens) if token == pad]
        if len(positions) != len(images):
            raise BadInputError(
                f"Expected one image placeholder per image of message {message.index}: the chat template "
                f"rendered {len(positions)} for {len(images)} image(s) (an image part the template does "
                "not render, or placeholder text in the message)",
                where.at(image=min(len(positions), len(images)) if images else None),
            )
        if self.template.video_tokens.intersection(tokens):
            raise BadInputError(
                f"Expected no video placeholder in message {message.index} (videos are not supported)", where
            )
        out: list[int] = []
        offsets: list[int] = []
        previous = 0
        for position, image in zip(positions, images, strict=True):
            out += tokens[previous:position]
            offsets.append(len(out))
            out += [pad] * image.length
            previous = position + 1
        out += tokens[previous:]
        return out, offsets

    def _episode(self, record: dict[str, Any], nodes: list[dict[str, Any]]) -> dict[str, Any]:
        """Return the v1 episode: env id, carried fields and one trainable trace."""
        carried = {key: record[key] for key in CARRIED if key in record}
        # The trace's id names it in refs' errors; refs reads rewards and group keys off the episode.
        trace = {"id": record["id"]} if "id" in record else {}
        trace.update(agent={"id": "policy", "trainable": True}, nodes=nodes)
        return {"env": {"id": env_id(record, self.env_name)}, **carried, "traces": [trace]}


def env_id(record: dict[str, Any], default: str) -> str:
    """Return the rollout's environment id: ``env.id``, ``env_id`` or ``info.env_id``, else ``default``."""
    env = record.get("env")
    for value in (env.get("id") if isinstance(env, dict) else env, record.get("env_id"),
                  (record.get("info") or {}).get("env_id") if isinstance(record.get("info"), dict) else None):  # fmt: skip
        if isinstance(value, str):
            return value
    return default


def render_rollout(
    record: Any,
    tokenizer: Any,
    families: Families,
    *,
    assets: str | os.PathLike[str] | AssetStore | None = None,
) -> dict[str, Any]:
    """Render one chat rollout to a v1 episode that ``refs`` takes.

    Args:
        record: the rollout (``messages``, or ``prompt`` + ``completion``); inline images
            are stored and pointed at their files, in place.
        tokenizer: the model's Hugging Face tokenizer, with its chat template.
        families: the run's families, configured from the model directory.
        assets: where inline ``data:`` images are stored (None: they are an error).

    Returns:
        The episode: ``env``, the rollout's rewards and group keys, one trace of one node per message.

    Raises:
        BadInputError: bad rollout, a message the template cannot render, an image mismatch.
        IntegrityError: a stored image is missing or disagrees with its name.
        UsageError: no model family, or a tokenizer without a chat template or image tokens.
    """
    return Renderer(tokenizer, families, assets=assets).rollout(record)[0]

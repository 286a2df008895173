"""Trace lines as refs decodes them: v1 episodes, traces and flat samples."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec

from mmoffload.contract.wire import Int64
from mmoffload.errors import PathPart, Where
from mmoffload.refs.images import Image


class Node(msgspec.Struct):
    """One trace node: the tokens one message adds to the stream."""

    token_ids: list[Int64]
    mask: list[bool | int] | None = None  # absent: nothing sampled (a prompt or tool node)
    parent: int | None = None
    logprobs: list[float] | None = None
    advantages: list[float] | float | None = None
    multi_modal_data: Any = None
    mm_kwargs: Any = None


class Record(msgspec.Struct):
    """Any line (episode, trace or flat sample) and any trace inside an episode.

    One typed view decodes every shape in a single pass; unknown keys (messages,
    timestamps...) are skipped without being built.
    """

    traces: list[Record] | None = None
    env: Any = None
    nodes: list[Node] | None = None
    agent: Any = None
    token_ids: list[Int64] | None = None
    mask: list[bool | int] | None = None
    logprobs: list[float] | None = None
    temperatures: list[float] | None = None
    env_name: str | None = None
    advantages: list[float] | float | None = None
    ref_logprobs: list[float] | None = None
    rl_weights: list[float] | None = None
    ce_weights: list[float] | None = None
    ref_kl_weights: list[float] | None = None
    multi_modal_data: Any = None
    mm_kwargs: Any = None
    id: Any = None
    trace_id: Any = None
    rewards: Any = None
    reward: Any = None
    task: Any = None
    example_id: Any = None
    group: Any = None
    temperature: float | None = None
    sampling_args: Any = None


RECORD_DECODER = msgspec.json.Decoder(Record)


PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


@dataclass(slots=True)
class Part:
    """A node (or a whole flat sample) made per-token and validated."""

    tokens: list[int]
    mask: list[bool]
    logprobs: list[float]
    advantages: list[float] | None
    images: list[Image]


def under(where: Where, *parts: PathPart) -> Where:
    """Point ``where`` at a child of its JSON path."""
    return where.at(path=(*(where.path or ()), *parts))


def first_present(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)

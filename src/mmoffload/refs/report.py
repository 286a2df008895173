"""The refs report and options, and the context one run's checks share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from mmoffload.errors import MMOffloadError
from mmoffload.families import Families
from mmoffload.store.read import AllowedRoots
from mmoffload.store.remap import Remap

# Where a group key is looked up, most specific first.
GROUP_KEYS = ("group", "example_id", "task")


class RefsReport(msgspec.Struct, kw_only=True):
    """What the refs stage read, wrote and checked."""

    run_dir: str
    files: int = 0
    lines: int = 0
    episodes: int = 0
    traces: int = 0
    untrainable_traces: int = 0
    flat_samples: int = 0
    branches: int = 0
    branches_without_trainable_tokens: int = 0
    sampled_turns_as_context: int = 0
    samples_written: int = 0
    samples_with_images: int = 0
    images_referenced: int = 0
    distinct_images: int = 0
    image_files_checked: int = 0
    hashes_verified: bool = True
    steps_written: int = 0
    steps: list[int] = msgspec.field(default_factory=list)
    # Steps an earlier run had written: rewritten by this one, left as they were, or removed (--overwrite).
    steps_replaced: list[int] = msgspec.field(default_factory=list)
    steps_left: list[int] = msgspec.field(default_factory=list)
    steps_removed: list[int] = msgspec.field(default_factory=list)
    advantages_from_group_reward: int = 0
    samples_without_advantages: int = 0
    rejected_records: int = 0
    rejects_path: str | None = None
    type_ids_cross_checked: bool = True
    samples_type_ids_from_placeholders: int = 0
    # Sampled nodes that recorded no `logprobs` (null or absent): 0.0 placed on their trainable tokens.
    sampled_nodes_without_logprobs: int = 0
    # Each family the samples used, with its config (a model directory or "defaults").
    families: dict[str, str] = msgspec.field(default_factory=dict)
    warnings: list[str] = msgspec.field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RefsOptions:
    """User choices of the refs stage.

    Attributes:
        model_dir: model directory for layout settings and the tokenizer's token-type map.
        step_size: samples per step; None puts every sample in one step.
        first_step: number of the first step written.
        temperature: sampling temperature when a trace records none.
        env_name: env name when an episode has no ``env.id``.
        verify_hashes: check each file's content hash (existence is always checked).
        skip_invalid: reject bad records into ``rejects_path`` instead of stopping.
        rejects_path: where rejected records go (default ``RUN/rollouts/rejects.jsonl``).
        remap: URI prefix rewrites applied to every image URI, checked and written rewritten.
        allowed_roots: directories image refs may point into; None allows any regular file.
        overwrite: replace an earlier run's steps without a warning, and remove its steps
            this run does not write (else they stay, with a warning).
    """

    model_dir: Path | None = None
    step_size: int | None = None
    first_step: int = 0
    temperature: float = 1.0
    env_name: str = ""
    verify_hashes: bool = True
    skip_invalid: bool = False
    rejects_path: Path | None = None
    remap: Remap = field(default_factory=Remap)
    allowed_roots: AllowedRoots = None
    overwrite: bool = False


@dataclass(slots=True)
class Context:
    """State shared across lines: families, the file-check cache, the report."""

    options: RefsOptions
    families: Families
    report: RefsReport
    checked_files: dict[tuple[Path | str, str | None], MMOffloadError | None] = field(default_factory=dict)
    traces_seen: int = 0

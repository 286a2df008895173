"""Training samples from walked traces: temperatures, rewards and group advantages."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import numpy as np

from mmoffload.contract.spans import IMAGE_TYPE, span_problems, type_ids_from_spans, type_ids_from_tokens
from mmoffload.contract.wire import MMRefs, TrainingSample
from mmoffload.errors import BadInputError, Where
from mmoffload.refs.images import check_no_image_tokens
from mmoffload.refs.records import Part, Record, under
from mmoffload.refs.report import GROUP_KEYS, Context, RefsReport


@dataclass(slots=True)
class Pending:
    """A built sample whose advantages may still wait for its group's mean reward."""

    sample: TrainingSample
    trace: int
    group: tuple[str, bytes] | None
    reward: float | None


def per_token_advantages(value: list[float] | float | None, n: int, where: Where) -> list[float] | None:
    """Return per-token advantages from a list (one per token) or one number (broadcast)."""
    if value is None:
        return None
    if isinstance(value, float):
        return [value] * n
    if len(value) != n:
        raise BadInputError(f"Expected one advantage per token ({n}) or one number, got {len(value)}", where)
    return value


def build_sample(
    branch: Part, temperatures: list[float], env_name: str, where: Where, context: Context
) -> TrainingSample:
    """Make a ``TrainingSample`` with refs and image type ids, cross-checked against tokens."""
    report = context.report
    sample = TrainingSample(
        token_ids=branch.tokens,
        mask=branch.mask,
        logprobs=branch.logprobs,
        temperatures=temperatures,
        env_name=env_name,
        advantages=branch.advantages,
    )
    report.samples_written += 1
    if not branch.images:
        check_no_image_tokens(branch.tokens, where, context)
        return sample
    family_names = sorted({image.family for image in branch.images})
    if len(family_names) > 1:
        raise BadInputError(
            f"Expected one family per sample, got {', '.join(f'`{name}`' for name in family_names)}", where
        )
    spans = [(image.ref.offset, image.ref.length) for image in branch.images]
    family = context.families.get(family_names[0], where)
    token_types = family.token_types
    if IMAGE_TYPE in token_types.values():
        type_ids = type_ids_from_tokens(branch.tokens, token_types)
        problems = span_problems(type_ids, spans, branch.tokens, family.token_names)
        if problems:
            problem = problems[0]
            at = branch.images[problem.image].where if problem.image is not None else where
            raise BadInputError(f"Expected image tokens exactly on the placeholders: {problem.message}", at)
    else:
        type_ids = type_ids_from_spans(len(branch.tokens), spans)
        report.type_ids_cross_checked = False
        report.samples_type_ids_from_placeholders += 1
    sample.mm_refs = MMRefs([image.ref for image in branch.images])
    sample.mm_token_type_ids = type_ids
    report.samples_with_images += 1
    report.images_referenced += len(branch.images)
    return sample


def trace_temperature(trace: Record, episode: Record | None, default: float) -> float:
    """Return the sampling temperature the trace (or its episode) recorded, else ``default``."""
    for record in (trace, episode):
        if record is None:
            continue
        if record.temperature is not None:
            return record.temperature
        if isinstance(record.sampling_args, dict) and isinstance(
            record.sampling_args.get("temperature"), int | float
        ):
            return float(record.sampling_args["temperature"])
    return default


def env_id(trace: Record, episode: Record | None, default: str) -> str:
    """Return the episode's (or the trace's own) ``env.id``, else ``default``."""
    for record in (episode, trace):
        if record is not None and isinstance(record.env, dict) and isinstance(record.env.get("id"), str):
            return record.env["id"]
    return default


def group_and_reward(
    trace: Record, episode: Record | None, where: Where
) -> tuple[tuple[str, bytes] | None, float | None]:
    """Return the trace's group key and reward (trace fields first, then the episode's)."""
    reward: float | None = None
    group: tuple[str, bytes] | None = None
    for record in (trace, episode):
        if record is None:
            continue
        if reward is None:
            reward = _reward(record, where)
        if group is None:
            group = next(
                (
                    (key, msgspec.json.encode(value))
                    for key in GROUP_KEYS
                    if (value := getattr(record, key)) is not None
                ),
                None,
            )
    return group, reward


def _reward(record: Record, where: Where) -> float | None:
    """Return ``rewards`` summed as score x weight (or the number), else ``reward``, else None."""
    for name in ("rewards", "reward"):
        value = getattr(record, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float | dict):
            raise BadInputError(
                f"Expected `{name}` as a number or a map of {{score, weight}}, got `{value!r}`", where
            )
        if not isinstance(value, dict):
            return float(value)
        total = 0.0
        for key, entry in value.items():
            score, weight = (
                (entry.get("score"), entry.get("weight", 1.0)) if isinstance(entry, dict) else (entry, 1.0)
            )
            if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in (score, weight)):
                raise BadInputError(
                    f"Expected `{name}.{key}` as {{score, weight}} numbers, got `{entry!r}`",
                    under(where, name, key),
                )
            total += score * weight
        return total
    return None


def fill_group_advantages(pending: list[Pending], report: RefsReport) -> list[TrainingSample]:
    """Give samples without node advantages their trace's reward minus its group's mean reward.

    The advantage sits on the trainable (mask-true) tokens, 0.0 elsewhere, as prime-rl's
    orchestrator writes it. A trace counts once in its group's mean however many branches
    it has.
    """
    rewards_by_trace = {item.trace: (item.group, item.reward) for item in pending if item.reward is not None}
    totals: dict[tuple[str, bytes] | None, list[float]] = {}
    for group, reward in rewards_by_trace.values():
        totals.setdefault(group, []).append(reward)
    means = {group: sum(values) / len(values) for group, values in totals.items()}
    samples: list[TrainingSample] = []
    for item in pending:
        sample = item.sample
        if sample.advantages is None:
            if item.reward is not None:
                advantage = item.reward - means[item.group]
                sample.advantages = np.where(np.asarray(sample.mask, dtype=bool), advantage, 0.0).tolist()
                report.advantages_from_group_reward += 1
            else:
                report.samples_without_advantages += 1
        samples.append(sample)
    return samples

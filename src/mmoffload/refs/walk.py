"""Walk decoded trace lines into samples: branches expanded, masks and logprobs per token."""

from __future__ import annotations

import dataclasses

import msgspec
import numpy as np

from mmoffload.contract.checks import per_token_problem
from mmoffload.contract.spans import order_problem
from mmoffload.errors import BadInputError, PathPart, Where
from mmoffload.refs.images import Image, image_end, mm_kwargs_error, sidecar_images
from mmoffload.refs.records import PATH_PART, RECORD_DECODER, Node, Part, Record, first_present, under
from mmoffload.refs.report import Context
from mmoffload.refs.samples import (
    Pending,
    build_sample,
    env_id,
    group_and_reward,
    per_token_advantages,
    trace_temperature,
)


def line_samples(line: bytes, where: Where, context: Context) -> list[Pending]:
    """Decode one line, detect its shape, and build its samples."""
    try:
        record = RECORD_DECODER.decode(line)
    except msgspec.ValidationError as exc:
        raise _decode_error(exc, where) from exc
    except msgspec.DecodeError as exc:
        raise BadInputError(f"Invalid JSON: {exc}", where) from exc
    report = context.report
    if record.traces is not None:
        report.episodes += 1
        samples: list[Pending] = []
        for index, trace in enumerate(record.traces):
            samples.extend(_trace_samples(trace, record, where.at(path=("traces", index)), context))
        return samples
    if record.nodes is not None:
        return _trace_samples(record, None, where.at(path=()), context)
    if record.token_ids is not None and record.mask is not None:
        report.flat_samples += 1
        return _flat_samples(record, where, context)
    raise BadInputError(
        "Expected an episode (`traces`), a trace (`nodes`) or a flat sample (`token_ids` and `mask`), "
        "got none of them",
        where,
    )


def _decode_error(exc: msgspec.ValidationError, where: Where) -> BadInputError:
    """Re-home msgspec's ``... - at `$.a[0]``` message onto the file and line."""
    message, _, path = str(exc).rpartition(" - at `")
    if not message:
        return BadInputError(str(exc), where)
    parts: list[PathPart] = [
        name if name else int(index) for name, index in PATH_PART.findall(path.rstrip("`"))
    ]
    return BadInputError(message, where.at(path=tuple(parts)))


def _trace_samples(trace: Record, episode: Record | None, where: Where, context: Context) -> list[Pending]:
    """Build one sample per trainable root-to-leaf branch of a trace."""
    report = context.report
    report.traces += 1
    trace_id = first_present(trace.id, trace.trace_id)
    where = where.at(trace=str(trace_id)) if trace_id is not None else where
    if isinstance(trace.agent, dict) and trace.agent.get("trainable") is False:
        report.untrainable_traces += 1
        return []
    nodes = trace.nodes or []
    if trace.mm_kwargs is not None:
        raise mm_kwargs_error(where)

    parts: list[Part] = []
    starts: list[int] = []
    image_ends: list[int] = []  # end of the last image on the path up to each node
    has_child = [False] * len(nodes)
    for index, node in enumerate(nodes):
        at = under(where, "nodes", index)
        parent = node.parent
        if parent is not None and not 0 <= parent < index:
            raise BadInputError(f"Expected `parent` as an earlier node index (< {index}), got {parent}", at)
        if parent is not None:
            has_child[parent] = True
        start = 0 if parent is None else starts[parent] + len(parts[parent].tokens)
        part = _node_part(node, start, at, context)
        previous_end = 0 if parent is None else image_ends[parent]
        if part.images and (problem := order_problem(part.images[0].ref.offset, previous_end)):
            raise BadInputError(problem, part.images[0].where)
        parts.append(part)
        starts.append(start)
        image_ends.append(image_end(part.images, previous_end))

    temperature = trace_temperature(trace, episode, context.options.temperature)
    env_name = env_id(trace, episode, context.options.env_name)
    group, reward = group_and_reward(trace, episode, where)
    context.traces_seen += 1
    samples: list[Pending] = []
    trained: set[int] = set()  # sampled nodes trained in an earlier branch (leaf order)
    for leaf in (index for index in range(len(nodes)) if not has_child[index]):
        report.branches += 1
        path = _path_to(leaf, nodes)
        carried = [index for index in path if index in trained]
        report.sampled_turns_as_context += len(carried)
        # A sampled turn shared by several branches is trained in the first one only.
        branch = _join([_as_context(parts[index]) if index in trained else parts[index] for index in path])
        trained.update(index for index in path if True in parts[index].mask)
        if not any(branch.mask):
            report.branches_without_trainable_tokens += 1
            continue
        leaf_where = under(where, "nodes", leaf)
        sample = build_sample(branch, [temperature] * len(branch.tokens), env_name, leaf_where, context)
        samples.append(Pending(sample, context.traces_seen, group, reward))
    return samples


def _flat_samples(record: Record, where: Where, context: Context) -> list[Pending]:
    """Build the sample of a flat sample line (per-token fields given directly)."""
    sample_id = first_present(record.id, record.trace_id)
    where = where.at(trace=str(sample_id)) if sample_id is not None else where
    if record.mm_kwargs is not None:
        raise mm_kwargs_error(where)
    tokens = record.token_ids or []
    n = len(tokens)
    mask = _mask(record.mask or [], n, where.at(path=("mask",)))
    logprobs = _per_token(record.logprobs, "logprobs", n, where)
    if logprobs is None:
        raise BadInputError(f"Expected `logprobs` with one float per token ({n})", where)
    advantages = per_token_advantages(record.advantages, n, where.at(path=("advantages",)))
    images = sidecar_images(record.multi_modal_data, n, where.at(path=("multi_modal_data",)), context)
    context.report.branches += 1
    if not any(mask):
        context.report.branches_without_trainable_tokens += 1
        return []
    temperatures = (
        _per_token(record.temperatures, "temperatures", n, where)
        or [trace_temperature(record, None, context.options.temperature)] * n
    )
    env_name = (
        record.env_name if record.env_name is not None else env_id(record, None, context.options.env_name)
    )
    sample = build_sample(
        Part(tokens, mask, logprobs, advantages, images), temperatures, env_name, where, context
    )
    for name in ("ref_logprobs", "rl_weights", "ce_weights", "ref_kl_weights"):
        setattr(sample, name, _per_token(getattr(record, name), name, n, where))
    group, reward = group_and_reward(record, None, where)
    context.traces_seen += 1
    return [Pending(sample, context.traces_seen, group, reward)]


def _node_part(node: Node, start: int, where: Where, context: Context) -> Part:
    """Validate a node and make its logprobs and advantages per token."""
    if node.mm_kwargs is not None:
        raise mm_kwargs_error(where)
    n = len(node.token_ids)
    mask = _mask(node.mask, n, under(where, "mask")) if node.mask is not None else [False] * n
    if node.logprobs is None and True in mask:
        # A sampled node that says it has none (render drops logprobs that are not the rendered
        # tokens'): 0.0 on its trainable tokens, counted and warned about, never an error.
        context.report.sampled_nodes_without_logprobs += 1
    logprobs = _expand_logprobs(mask, node.logprobs or [], under(where, "logprobs"), node.logprobs is None)
    advantages = per_token_advantages(node.advantages, n, under(where, "advantages"))
    sidecar_where = under(where, "multi_modal_data")
    images = sidecar_images(node.multi_modal_data, start + n, sidecar_where, context)
    return Part(node.token_ids, mask, logprobs, advantages, images)


def _mask(values: list[bool | int], n: int, where: Where) -> list[bool]:
    """Return a mask of ``n`` bools (0/1 accepted for false/true)."""
    if len(values) != n:
        raise BadInputError(f"Expected one mask entry per token ({n}), got {len(values)}", where)
    # Set and map work at C speed: masks are long, and usually bools already.
    if set(map(type, values)) <= {bool}:
        return values  # type: ignore[return-value]
    if not set(values) <= {0, 1}:
        bad = next(index for index, value in enumerate(values) if value not in (0, 1))
        raise BadInputError(
            f"Expected mask entries true/false (or 1/0), got {values[bad]!r}",
            under(where, bad),
        )
    return list(map(bool, values))


def _expand_logprobs(mask: list[bool], given: list[float], where: Where, none: bool = False) -> list[float]:
    """Place one logprob per true mask entry on its token, 0.0 elsewhere (everywhere when ``none``)."""
    trainable = mask.count(True)
    if none:
        return [0.0] * len(mask)
    if len(given) != trainable:
        raise BadInputError(
            f"Expected one logprob per true mask entry ({trainable}), got {len(given)}", where
        )
    if trainable == len(mask):
        return given
    if not trainable:
        return [0.0] * len(mask)
    logprobs = np.zeros(len(mask), dtype=np.float64)
    logprobs[np.asarray(mask, dtype=bool)] = given
    return logprobs.tolist()


def _per_token(values: list[float] | None, name: str, n: int, where: Where) -> list[float] | None:
    """Check an optional per-token stream's length."""
    if problem := per_token_problem(name, values, n):
        raise BadInputError(problem, where.at(path=(name,)))
    return values


def _path_to(leaf: int, nodes: list[Node]) -> list[int]:
    """Return the node indices from the root to ``leaf``."""
    path = [leaf]
    while (parent := nodes[path[-1]].parent) is not None:
        path.append(parent)
    return path[::-1]


def _as_context(part: Part) -> Part:
    """Return a sampled node as context: mask false, tokens, logprobs and advantages unchanged."""
    return dataclasses.replace(part, mask=[False] * len(part.mask))


def _join(parts: list[Part]) -> Part:
    """Concatenate the nodes of a branch; advantages only if some node carries them."""
    tokens: list[int] = []
    mask: list[bool] = []
    logprobs: list[float] = []
    images: list[Image] = []
    for part in parts:
        tokens += part.tokens
        mask += part.mask
        logprobs += part.logprobs
        images += part.images
    advantages: list[float] | None = None
    if any(part.advantages is not None for part in parts):
        # Nodes without advantages (prompts, tool output) contribute 0.0 on their tokens.
        advantages = []
        for part in parts:
            advantages += part.advantages if part.advantages is not None else [0.0] * len(part.tokens)
    return Part(tokens, mask, logprobs, advantages, images)

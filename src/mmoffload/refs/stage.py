"""Rollout traces to trainer-bound ``TrainingBatch`` files: the refs stage (traces.md).

Each JSONL line is an episode (``traces``), a bare trace (``nodes``) or a flat
sample (``token_ids`` + ``mask``), detected per line. Every root-to-leaf branch
of a trace with a trainable token becomes one ``TrainingSample`` whose images
are ``mm_refs`` to files already offloaded, checked against their family's
placeholder length, their content hash and the token stream's image tokens.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
import numpy as np

from mmoffload.contract import rundir
from mmoffload.contract.addresses import asset_location
from mmoffload.contract.descriptors import validate_sidecar
from mmoffload.contract.spans import IMAGE_TYPE, span_problems, type_ids_from_spans, type_ids_from_tokens
from mmoffload.contract.wire import Int64, MMImageRef, MMRefs, TrainingBatch, TrainingSample, encode
from mmoffload.errors import BadInputError, IntegrityError, MMOffloadError, PathPart, UsageError, Where
from mmoffload.families import Families
from mmoffload.io.inputs import iter_lines, too_deep
from mmoffload.io.outputs import (
    atomic_write,
    atomic_writer,
    check_distinct,
    check_output_path,
    check_writable_dir,
)
from mmoffload.io.staging import staged_run
from mmoffload.store.backend import asset_size
from mmoffload.store.read import check_allowed, read_verified
from mmoffload.store.remap import Remap

# Where a group key is looked up, most specific first.
GROUP_KEYS = ("group", "example_id", "task")


class _Node(msgspec.Struct):
    """One trace node: the tokens one message adds to the stream."""

    token_ids: list[Int64]
    mask: list[bool | int] | None = None  # absent: nothing sampled (a prompt or tool node)
    parent: int | None = None
    logprobs: list[float] | None = None
    advantages: list[float] | float | None = None
    multi_modal_data: Any = None
    mm_kwargs: Any = None


class _Record(msgspec.Struct):
    """Any line (episode, trace or flat sample) and any trace inside an episode.

    One typed view decodes every shape in a single pass; unknown keys (messages,
    timestamps...) are skipped without being built.
    """

    traces: list[_Record] | None = None
    env: Any = None
    nodes: list[_Node] | None = None
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


_RECORD_DECODER = msgspec.json.Decoder(_Record)
_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


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
    allowed_roots: tuple[Path, ...] | None = None
    overwrite: bool = False


@dataclass(slots=True)
class _Image:
    """One image of a node's sidecar, validated, with where it came from."""

    ref: MMImageRef
    family: str
    where: Where


@dataclass(slots=True)
class _Part:
    """A node (or a whole flat sample) made per-token and validated."""

    tokens: list[int]
    mask: list[bool]
    logprobs: list[float]
    advantages: list[float] | None
    images: list[_Image]


@dataclass(slots=True)
class _Pending:
    """A built sample whose advantages may still wait for its group's mean reward."""

    sample: TrainingSample
    trace: int
    group: tuple[str, bytes] | None
    reward: float | None


@dataclass(slots=True)
class _Context:
    """State shared across lines: families, the file-check cache, the report."""

    options: RefsOptions
    families: Families
    report: RefsReport
    checked_files: dict[tuple[Path | str, str | None], MMOffloadError | None] = field(default_factory=dict)
    traces_seen: int = 0


def build_refs(
    trace_files: Sequence[str | os.PathLike[str]],
    run_dir: str | os.PathLike[str],
    options: RefsOptions | None = None,
) -> RefsReport:
    """Turn offloaded rollout traces into ``RUN/rollouts/step_<N>/train_rollouts.bin`` files.

    Every record is read and checked before any step is written, so bad input
    leaves the run directory as it was (unless ``skip_invalid`` sets it aside).

    Args:
        trace_files: JSONL files of episodes, traces or flat samples.
        run_dir: the run directory to write steps into.
        options: user choices; defaults when None.

    Returns:
        The report of what was read, checked and written.

    Raises:
        BadInputError: a record breaks traces.md (first one, unless ``skip_invalid``).
        IntegrityError: an image file is missing or its content has another hash.
        UsageError: unreadable input, bad options, a rejects file that is an input, or a
            run directory or step that cannot be written.
    """
    options = options or RefsOptions()
    run_dir = Path(run_dir)
    if options.step_size is not None and options.step_size < 1:
        raise UsageError(f"Expected a step size >= 1, got {options.step_size}")
    families = Families(options.model_dir)
    report = RefsReport(run_dir=str(run_dir), hashes_verified=options.verify_hashes)
    context = _Context(options, families, report)
    rejects_path = options.rejects_path or run_dir / rundir.ROLLOUTS / "rejects.jsonl"
    # Refuse, before reading anything, outputs that would overwrite an input or cannot be written.
    check_writable_dir(run_dir, "run directory")
    if options.skip_invalid:
        check_distinct(trace_files, [("rejects file", rejects_path)])
        check_output_path(rejects_path, "rejects file")

    pending: list[_Pending] = []
    with contextlib.ExitStack() as stack:
        rejects = stack.enter_context(atomic_writer(rejects_path)) if options.skip_invalid else None
        for path in trace_files:
            report.files += 1
            for where, line in iter_lines(path):
                report.lines += 1
                counted = msgspec.structs.asdict(report)
                try:
                    pending.extend(_line_samples(line, where, context))
                except (BadInputError, IntegrityError, RecursionError) as caught:
                    exc = too_deep(where) if isinstance(caught, RecursionError) else caught
                    if rejects is None:
                        raise exc from caught
                    _write_reject(rejects, line, where, exc)
                    # A rejected line counts in no figure but its own.
                    for name, value in counted.items():
                        setattr(report, name, value)
                    report.rejected_records += 1
    if options.skip_invalid:
        report.rejects_path = str(rejects_path)

    samples = _fill_group_advantages(pending, report)
    report.distinct_images = len(
        {ref.hash for sample in samples if sample.mm_refs for ref in sample.mm_refs.images}
    )
    report.image_files_checked = len(context.checked_files)
    earlier = [step for step in rundir.steps(run_dir) if _step_files(run_dir, step)]
    _write_steps(samples, run_dir, options, report)
    report.steps_replaced = sorted(set(earlier) & set(report.steps))
    leftover = sorted(set(earlier) - set(report.steps))
    if options.overwrite:
        _remove_steps(run_dir, leftover)
        report.steps_removed = leftover
    else:
        report.steps_left = leftover
    report.families = families.configs()
    report.warnings = families.warnings() + _earlier_steps_warnings(report, options.overwrite)
    return report


def _step_files(run_dir: Path, step: int) -> list[Path]:
    """Return a step's TrainingBatch (when there is one) and rank files."""
    batch = rundir.training_batch_path(run_dir, step)
    return ([batch] if batch.is_file() else []) + rundir.rank_paths(run_dir, step)


def _remove_steps(run_dir: Path, steps: list[int]) -> None:
    """Remove the TrainingBatch and rank files of ``steps`` (and each step directory left empty).

    Raises:
        UsageError: a file cannot be removed.
    """
    for step in steps:
        try:
            for path in _step_files(run_dir, step):
                path.unlink()
            with contextlib.suppress(OSError):
                rundir.step_dir(run_dir, step).rmdir()  # Kept when it holds anything else.
        except OSError as exc:
            raise UsageError(
                f"Cannot remove step {step} of an earlier run: {exc.strerror or exc}",
                Where(file=str(rundir.step_dir(run_dir, step))),
            ) from exc


def _earlier_steps_warnings(report: RefsReport, overwrite: bool) -> list[str]:
    """Say which steps of an earlier run were replaced or left (nothing with ``overwrite``)."""
    found = []
    if report.steps_left:
        found.append(
            f"{_step_list(report.steps_left)} of an earlier run left in the run directory, "
            "read by pack, audit and materialize too: --overwrite removes them"
        )
    if report.steps_replaced and not overwrite:
        found.append(
            f"{_step_list(report.steps_replaced)} of an earlier run replaced (--overwrite says that is meant)"
        )
    return found


def _step_list(steps: list[int]) -> str:
    """Name steps for a message: ``step 3``, ``steps 0, 1``, ``steps 0 to 9 (10 steps)``."""
    if len(steps) == 1:
        return f"step {steps[0]}"
    if len(steps) <= 6:
        return "steps " + ", ".join(map(str, steps))
    return f"steps {steps[0]} to {steps[-1]} ({len(steps)} steps)"


def _line_samples(line: bytes, where: Where, context: _Context) -> list[_Pending]:
    """Decode one line, detect its shape, and build its samples."""
    try:
        record = _RECORD_DECODER.decode(line)
    except msgspec.ValidationError as exc:
        raise _decode_error(exc, where) from exc
    except msgspec.DecodeError as exc:
        raise BadInputError(f"Invalid JSON: {exc}", where) from exc
    report = context.report
    if record.traces is not None:
        report.episodes += 1
        samples: list[_Pending] = []
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
        name if name else int(index) for name, index in _PATH_PART.findall(path.rstrip("`"))
    ]
    return BadInputError(message, where.at(path=tuple(parts)))


def _trace_samples(
    trace: _Record, episode: _Record | None, where: Where, context: _Context
) -> list[_Pending]:
    """Build one sample per trainable root-to-leaf branch of a trace."""
    report = context.report
    report.traces += 1
    trace_id = _first_present(trace.id, trace.trace_id)
    where = where.at(trace=str(trace_id)) if trace_id is not None else where
    if isinstance(trace.agent, dict) and trace.agent.get("trainable") is False:
        report.untrainable_traces += 1
        return []
    nodes = trace.nodes or []
    if trace.mm_kwargs is not None:
        raise _mm_kwargs_error(where)

    parts: list[_Part] = []
    starts: list[int] = []
    image_ends: list[int] = []  # end of the last image on the path up to each node
    has_child = [False] * len(nodes)
    for index, node in enumerate(nodes):
        at = _under(where, "nodes", index)
        parent = node.parent
        if parent is not None and not 0 <= parent < index:
            raise BadInputError(f"Expected `parent` as an earlier node index (< {index}), got {parent}", at)
        if parent is not None:
            has_child[parent] = True
        start = 0 if parent is None else starts[parent] + len(parts[parent].tokens)
        part = _node_part(node, start, at, context)
        previous_end = 0 if parent is None else image_ends[parent]
        if part.images and part.images[0].ref.offset < previous_end:
            raise BadInputError(
                f"Expected placeholders in token order without overlap, got offset "
                f"{part.images[0].ref.offset} before the previous end {previous_end}",
                part.images[0].where,
            )
        parts.append(part)
        starts.append(start)
        image_ends.append(_image_end(part.images, previous_end))

    temperature = _temperature(trace, episode, context.options.temperature)
    env_name = _env_id(trace, episode, context.options.env_name)
    group, reward = _group_and_reward(trace, episode, where)
    context.traces_seen += 1
    samples: list[_Pending] = []
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
        leaf_where = _under(where, "nodes", leaf)
        sample = _sample(branch, [temperature] * len(branch.tokens), env_name, leaf_where, context)
        samples.append(_Pending(sample, context.traces_seen, group, reward))
    return samples


def _flat_samples(record: _Record, where: Where, context: _Context) -> list[_Pending]:
    """Build the sample of a flat sample line (per-token fields given directly)."""
    sample_id = _first_present(record.id, record.trace_id)
    where = where.at(trace=str(sample_id)) if sample_id is not None else where
    if record.mm_kwargs is not None:
        raise _mm_kwargs_error(where)
    tokens = record.token_ids or []
    n = len(tokens)
    mask = _mask(record.mask or [], n, where.at(path=("mask",)))
    logprobs = _per_token(record.logprobs, "logprobs", n, where)
    if logprobs is None:
        raise BadInputError(f"Expected `logprobs` with one float per token ({n})", where)
    advantages = _advantages(record.advantages, n, where.at(path=("advantages",)))
    images = _sidecar_images(record.multi_modal_data, n, where.at(path=("multi_modal_data",)), context)
    context.report.branches += 1
    if not any(mask):
        context.report.branches_without_trainable_tokens += 1
        return []
    temperatures = (
        _per_token(record.temperatures, "temperatures", n, where)
        or [_temperature(record, None, context.options.temperature)] * n
    )
    env_name = (
        record.env_name if record.env_name is not None else _env_id(record, None, context.options.env_name)
    )
    sample = _sample(
        _Part(tokens, mask, logprobs, advantages, images), temperatures, env_name, where, context
    )
    for name in ("ref_logprobs", "rl_weights", "ce_weights", "ref_kl_weights"):
        setattr(sample, name, _per_token(getattr(record, name), name, n, where))
    group, reward = _group_and_reward(record, None, where)
    context.traces_seen += 1
    return [_Pending(sample, context.traces_seen, group, reward)]


def _node_part(node: _Node, start: int, where: Where, context: _Context) -> _Part:
    """Validate a node and make its logprobs and advantages per token."""
    if node.mm_kwargs is not None:
        raise _mm_kwargs_error(where)
    n = len(node.token_ids)
    mask = _mask(node.mask, n, _under(where, "mask")) if node.mask is not None else [False] * n
    logprobs = _expand_logprobs(mask, node.logprobs or [], _under(where, "logprobs"))
    advantages = _advantages(node.advantages, n, _under(where, "advantages"))
    sidecar_where = _under(where, "multi_modal_data")
    images = _sidecar_images(node.multi_modal_data, start + n, sidecar_where, context)
    return _Part(node.token_ids, mask, logprobs, advantages, images)


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
            _under(where, bad),
        )
    return list(map(bool, values))


def _expand_logprobs(mask: list[bool], given: list[float], where: Where) -> list[float]:
    """Place one logprob per true mask entry on its token, 0.0 elsewhere."""
    trainable = mask.count(True)
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
    if values is not None and len(values) != n:
        raise BadInputError(
            f"Expected `{name}` with one value per token ({n}), got {len(values)}", where.at(path=(name,))
        )
    return values


def _advantages(value: list[float] | float | None, n: int, where: Where) -> list[float] | None:
    """Return per-token advantages from a list (one per token) or one number (broadcast)."""
    if value is None:
        return None
    if isinstance(value, float):
        return [value] * n
    if len(value) != n:
        raise BadInputError(f"Expected one advantage per token ({n}) or one number, got {len(value)}", where)
    return value


def _sidecar_images(sidecar: object, num_tokens: int, where: Where, context: _Context) -> list[_Image]:
    """Validate a sidecar against family rules and the image files; return its images."""
    if sidecar is None:
        return []
    images: list[_Image] = []
    for index, image in enumerate(validate_sidecar(sidecar, num_tokens, where)):
        at = where.at(image=index)
        family_name = image.descriptor["family"]
        family = context.families.get(family_name, at)
        expected = family.placeholder_length(family.grid(image.descriptor["payload"], at))
        if image.placeholder.length != expected:
            raise BadInputError(
                f"Expected placeholder length {expected} for the `{family_name}` payload "
                f"{image.descriptor['payload']}, got {image.placeholder.length} "
                "(image features and image tokens would not match)",
                at,
            )
        descriptor = image.descriptor
        uri = context.options.remap(descriptor["raw_image_uri"])
        if uri != descriptor["raw_image_uri"]:
            descriptor = {**descriptor, "raw_image_uri": uri}
        _check_file(asset_location(uri, at), image.hash, at, context)
        ref = MMImageRef(descriptor, image.hash, uri, image.placeholder.offset, image.placeholder.length)
        images.append(_Image(ref, family_name, at))
    return images


def _check_file(path: Path | str, digest: str, where: Where, context: _Context) -> None:
    """Check an image file (or object) once per run: it exists, and hashes to ``digest`` when verifying."""
    key = (path, digest if context.options.verify_hashes else None)
    if key not in context.checked_files:
        try:
            roots = context.options.allowed_roots
            if context.options.verify_hashes:
                read_verified(path, digest, allowed_roots=roots)
            elif isinstance(path, str):
                _object_exists(path)
            elif not check_allowed(path, roots).is_file():
                raise IntegrityError(f"Missing image file `{path}`")
            context.checked_files[key] = None
        except (BadInputError, IntegrityError) as exc:
            context.checked_files[key] = exc
    problem = context.checked_files[key]
    if problem is not None:
        raise type(problem)(problem.message, where)


def _object_exists(uri: str) -> None:
    """Check that an object-store image exists (its size is one HEAD request).

    Raises:
        IntegrityError: it does not, or cannot be reached.
    """
    try:
        asset_size(uri)
    except FileNotFoundError as exc:
        raise IntegrityError(f"Missing image file `{uri}`") from exc
    except OSError as exc:
        raise IntegrityError(f"Cannot read image file `{uri}`: {exc}") from exc


def _image_end(images: list[_Image], previous_end: int) -> int:
    return images[-1].ref.offset + images[-1].ref.length if images else previous_end


def _path_to(leaf: int, nodes: list[_Node]) -> list[int]:
    """Return the node indices from the root to ``leaf``."""
    path = [leaf]
    while (parent := nodes[path[-1]].parent) is not None:
        path.append(parent)
    return path[::-1]


def _as_context(part: _Part) -> _Part:
    """Return a sampled node as context: mask false, tokens, logprobs and advantages unchanged."""
    return dataclasses.replace(part, mask=[False] * len(part.mask))


def _join(parts: list[_Part]) -> _Part:
    """Concatenate the nodes of a branch; advantages only if some node carries them."""
    tokens: list[int] = []
    mask: list[bool] = []
    logprobs: list[float] = []
    images: list[_Image] = []
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
    return _Part(tokens, mask, logprobs, advantages, images)


def _sample(
    branch: _Part, temperatures: list[float], env_name: str, where: Where, context: _Context
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
        _check_no_image_tokens(branch.tokens, where, context)
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


def _check_no_image_tokens(tokens: list[int], where: Where, context: _Context) -> None:
    """With a model given, a sample without images must hold none of its image tokens."""
    model = context.families.model()
    if model is None:
        return
    token_types = model.token_types
    image_tokens = [token for token, kind in token_types.items() if kind == IMAGE_TYPE]
    stray = np.flatnonzero(np.isin(np.asarray(tokens, dtype=np.int64), image_tokens))
    if len(stray):
        raise BadInputError(
            f"Expected no image tokens in a sample without images, got one at position {int(stray[0])}",
            where,
        )


def _under(where: Where, *parts: PathPart) -> Where:
    """Point ``where`` at a child of its JSON path."""
    return where.at(path=(*(where.path or ()), *parts))


def _first_present(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def _temperature(trace: _Record, episode: _Record | None, default: float) -> float:
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


def _env_id(trace: _Record, episode: _Record | None, default: str) -> str:
    """Return the episode's (or the trace's own) ``env.id``, else ``default``."""
    for record in (episode, trace):
        if record is not None and isinstance(record.env, dict) and isinstance(record.env.get("id"), str):
            return record.env["id"]
    return default


def _group_and_reward(
    trace: _Record, episode: _Record | None, where: Where
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


def _reward(record: _Record, where: Where) -> float | None:
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
                    _under(where, name, key),
                )
            total += score * weight
        return total
    return None


def _fill_group_advantages(pending: list[_Pending], report: RefsReport) -> list[TrainingSample]:
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


def _write_steps(
    samples: list[TrainingSample], run_dir: Path, options: RefsOptions, report: RefsReport
) -> None:
    """Write one ``TrainingBatch`` per step, all steps as a unit; stale rank files of a rewritten step go."""
    size = options.step_size or max(len(samples), 1)
    with staged_run(run_dir) as staged:
        for number, start in enumerate(range(0, len(samples), size)):
            step = options.first_step + number
            batch = TrainingBatch(examples=samples[start : start + size], step=step)
            atomic_write(rundir.training_batch_path(staged, step), encode(batch))
            for stale in rundir.rank_paths(staged, step):
                stale.unlink()
            report.steps.append(step)
    report.steps_written = len(report.steps)


def _write_reject(out: BinaryIO, line: bytes, where: Where, exc: MMOffloadError) -> None:
    """Append a rejected record, whole, with its reason and location."""
    entry: dict[str, Any] = {"file": where.file, "line": where.line, "reason": str(exc)}
    try:
        msgspec.json.decode(line)
        entry["record"] = msgspec.Raw(line.strip())
    except (msgspec.DecodeError, RecursionError):
        # Not JSON (or too deep to re-read): the exact text, or its bytes when it is not UTF-8.
        text = line.rstrip(b"\r\n")
        try:
            entry["record"] = text.decode()
        except UnicodeDecodeError:
            entry["record_base64"] = base64.b64encode(text).decode()
    out.write(msgspec.json.encode(entry) + b"\n")


def _mm_kwargs_error(where: Where) -> BadInputError:
    return BadInputError(
        "Expected no `mm_kwargs` (processed tensors never enter trainer-bound files), got some", where
    )

"""Pick one TrainingSample or MicroBatch out of a run, and show it with field names.

The wire structs are positional msgpack arrays (contract.md section 6): without
the struct definitions a ``.bin`` file is a list of unnamed lists. ``select``
finds one record by step, rank and index; ``named`` turns it into plain JSON
values keyed by the contract's field names, summarising per-token arrays.

Selection rules (docs/inspect.md says the same):

- A run directory: ``step`` defaults to the run's first step. ``sample`` picks a
  sample of that step's ``train_rollouts.bin``; otherwise ``rank`` (default 0)
  and ``micro_batch`` (default 0) pick a micro batch of ``rank_<R>.bin``, or,
  when the step has no rank files yet, ``micro_batch`` is not allowed and
  sample 0 is shown.
- A ``rank_<R>.bin`` file: ``micro_batch`` picks the micro batch. Any other
  ``.bin`` is a TrainingBatch: ``sample`` picks the sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from mmoffload.contract import rundir
from mmoffload.contract.wire import (
    MICRO_BATCH_PER_TOKEN_FIELDS,
    SAMPLE_PER_TOKEN_FIELDS,
    MicroBatch,
    TrainingSample,
    read_rank_file,
    read_training_batch,
)
from mmoffload.errors import UsageError, Where

# Per-token arrays longer than this are summarised (unless full): the first and last few entries.
SUMMARY_EDGE = 8
_PER_TOKEN = {"token_ids", "input_ids", *SAMPLE_PER_TOKEN_FIELDS, *MICRO_BATCH_PER_TOKEN_FIELDS}


@dataclass(frozen=True, slots=True)
class Selected:
    """One record and where it came from.

    ``index`` is the sample index in a TrainingBatch or the micro batch index in a
    rank file; ``step`` and ``rank`` are known from the run layout (None when not).
    """

    file: Path
    index: int
    record: TrainingSample | MicroBatch
    step: int | None = None
    rank: int | None = None

    @property
    def kind(self) -> str:
        """``TrainingSample`` or ``MicroBatch``."""
        return type(self.record).__name__


def select(
    path: Path,
    *,
    step: int | None = None,
    rank: int | None = None,
    micro_batch: int | None = None,
    sample: int | None = None,
) -> Selected:
    """Return one sample or micro batch of a run directory or a ``.bin`` file.

    Args:
        path: A run directory, a ``rank_<R>.bin`` file or a TrainingBatch ``.bin`` file.
        step: The step of a run (default: its first).
        rank: The rank file of a run's step (default: 0).
        micro_batch: The micro batch index in the rank file (default: 0).
        sample: The sample index in the TrainingBatch; excludes ``rank`` and ``micro_batch``.

    Returns:
        The record and where it is.

    Raises:
        UsageError: conflicting selectors, a missing step, rank or file, or an index out of range.
        BadInputError: the file does not decode as its kind.
    """
    if sample is not None and (micro_batch is not None or rank is not None):
        raise UsageError("Expected --sample or --rank/--micro-batch, not both")
    if path.is_dir():
        return _select_in_run(path, step, rank, micro_batch, sample)
    if not path.exists():
        raise UsageError("No such file or directory", Where(file=str(path)))
    if step is not None or rank is not None:
        raise UsageError("--step and --rank select within a run directory; give the run, not a file")
    file_step = rundir.step_of(path.parent)
    if (rank := rundir.rank_of(path)) is not None:
        if sample is not None:
            raise UsageError("A rank file holds micro batches: use --micro-batch, not --sample")
        return _pick_micro_batch(path, micro_batch or 0, file_step, rank)
    if micro_batch is not None:
        raise UsageError("A TrainingBatch holds samples: use --sample, not --micro-batch")
    return _pick_sample(path, sample or 0, file_step)


def _select_in_run(
    run: Path, step: int | None, rank: int | None, micro_batch: int | None, sample: int | None
) -> Selected:
    steps = rundir.steps(run)
    if not steps:
        raise UsageError("Expected a run directory with rollouts/step_<N>/, found none", Where(file=str(run)))
    if step is None:
        step = steps[0]
    elif step not in steps:
        raise UsageError(f"No step {step} (steps: {', '.join(map(str, steps))})", Where(file=str(run)))
    ranks = rundir.rank_paths(run, step)
    if sample is None and ranks:
        rank = rank or 0
        path = rundir.rank_path(run, step, rank)
        if not path.is_file():
            raise UsageError(
                f"No rank {rank} in step {step} ({len(ranks)} rank files)", Where(file=str(path))
            )
        return _pick_micro_batch(path, micro_batch or 0, step, rank)
    if micro_batch is not None or rank is not None:
        raise UsageError(f"Step {step} has no rank files yet (run `mmoffload pack`)", Where(file=str(run)))
    return _pick_sample(rundir.training_batch_path(run, step), sample or 0, step)


def _pick_micro_batch(path: Path, index: int, step: int | None, rank: int | None) -> Selected:
    batches = read_rank_file(path)
    _check_index(index, len(batches), "micro batch", path)
    return Selected(path, index, batches[index], step, rank)


def _pick_sample(path: Path, index: int, step: int | None) -> Selected:
    if not path.is_file():
        raise UsageError("No TrainingBatch file (run `mmoffload refs`)", Where(file=str(path)))
    examples = read_training_batch(path).examples
    _check_index(index, len(examples), "sample", path)
    return Selected(path, index, examples[index], step)


def _check_index(index: int, count: int, what: str, path: Path) -> None:
    if not 0 <= index < count:
        raise UsageError(f"No {what} {index}: the file has {count} (0..{count - 1})", Where(file=str(path)))


def named(selected: Selected, *, full: bool = False) -> dict[str, Any]:
    """Return the record as JSON values keyed by field name, with where it came from.

    Args:
        selected: The record.
        full: Keep every per-token array whole; otherwise an array longer than
            ``2 * SUMMARY_EDGE`` becomes ``{"length", "head", "tail"}`` (plus ``"true"``,
            the count of true entries, for a boolean array).

    Returns:
        ``{"file", "type", "step", "rank", "index", "record": {field: value}}``; bytes
        (tensor data, routed experts) become ``{"bytes": n}`` unless full, then base64.
    """
    record = {
        name: _value(getattr(selected.record, name), full, name in _PER_TOKEN)
        for name in selected.record.__struct_fields__
    }
    return {
        "file": str(selected.file),
        "type": selected.kind,
        "step": selected.step,
        "rank": selected.rank,
        "index": selected.index,
        "record": record,
    }


def _value(value: object, full: bool, per_token: bool = False) -> Any:
    """Convert a wire value to JSON values, structs as objects with field names."""
    if isinstance(value, msgspec.Struct):
        return {name: _value(getattr(value, name), full) for name in value.__struct_fields__}
    if isinstance(value, dict):
        return {key: _value(item, full) for key, item in value.items()}
    if isinstance(value, bytes):
        return msgspec.to_builtins(value) if full else {"bytes": len(value)}
    if isinstance(value, list):
        if per_token and not full and len(value) > 2 * SUMMARY_EDGE:
            summary: dict[str, Any] = {
                "length": len(value),
                "head": value[:SUMMARY_EDGE],
                "tail": value[-SUMMARY_EDGE:],
            }
            if value and isinstance(value[0], bool):
                summary["true"] = sum(value)
            return summary
        if value and isinstance(value[0], msgspec.Struct | dict | bytes | list):
            return [_value(item, full) for item in value]
    return value

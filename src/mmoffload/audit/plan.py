"""What to audit: runs, their steps and files, and JSONL inputs, grouped by run."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmoffload.contract import rundir
from mmoffload.contract.descriptors import DESCRIPTOR_KIND
from mmoffload.errors import PathPart, UsageError, Where
from mmoffload.io.inputs import is_jsonl_name, is_stdio
from mmoffload.io.staging import remove_dead_temps


@dataclass(slots=True)
class Group:
    """Binary artifacts whose trainer-bound refs are decided together (one run, or loose files)."""

    training_batches: list[Path] = field(default_factory=list)
    rank_files: list[Path] = field(default_factory=list)
    run: Path | None = None


@dataclass(slots=True)
class _Plan:
    groups: list[Group] = field(default_factory=list)
    jsonl: list[Path] = field(default_factory=list)


def plan_inputs(paths: Sequence[str | os.PathLike[str]]) -> _Plan:
    """Sort inputs into runs, loose binary artifacts and JSONL files.

    Raises:
        UsageError: a path does not exist, has an unknown kind, or nothing is there to audit.
    """
    plan = _Plan()
    loose = Group()
    for path in map(Path, paths):
        if path.is_dir():
            # A run, else a directory of runs (the demo's root is one): each run found under it.
            runs = [run for run in (_run_group(d) for d in _run_dirs(path)) if run is not None]
            if not runs:
                raise UsageError(
                    "Expected a run directory with rollouts/step_<N>/train_rollouts.bin or rank_<R>.bin, "
                    "or a directory of such runs, found none",
                    Where(file=str(path)),
                )
            plan.groups.extend(runs)
        elif is_stdio(path) or (path.exists() and is_jsonl_name(path)):
            plan.jsonl.append(path)
        elif not path.exists():
            raise UsageError("No such file or directory", Where(file=str(path)))
        elif path.suffix == ".bin":
            # The contract's names say what a file holds: rank_<R>.bin is a list of micro batches.
            (loose.rank_files if rundir.rank_of(path) is not None else loose.training_batches).append(path)
        else:
            raise UsageError(
                "Expected a run directory, a .bin artifact or a .jsonl file", Where(file=str(path))
            )
    if loose.training_batches or loose.rank_files:
        plan.groups.append(loose)
    return plan


def _run_dirs(path: Path) -> list[Path]:
    """Return ``path`` if it is a run, else every run directory below it, in path order."""
    if (path / rundir.ROLLOUTS).is_dir():
        return [path]
    return sorted(p.parent for p in path.rglob(rundir.ROLLOUTS) if p.is_dir())


def _run_group(path: Path) -> Group | None:
    """Return a run's artifacts, or None when it has none (first removing killed processes' temporaries)."""
    remove_dead_temps(path)
    run = Group(run=path)
    for step in rundir.steps(path):
        batch = rundir.training_batch_path(path, step)
        if batch.is_file():
            run.training_batches.append(batch)
        run.rank_files.extend(rundir.rank_paths(path, step))
    return run if run.training_batches or run.rank_files else None


def binary_artifacts(paths: Sequence[Path]) -> list[tuple[list[Path], list[Path]]]:
    """Return the TrainingBatch and rank files ``audit`` reads, per run (loose files are one run).

    Raises:
        UsageError: as ``audit`` does for the same paths.
    """
    return [(group.training_batches, group.rank_files) for group in plan_inputs(paths).groups]


def descriptors_and_samples(
    value: object, path: tuple[PathPart, ...] = ()
) -> Iterator[tuple[tuple[PathPart, ...], dict[str, Any]]]:
    """Yield every object in a JSON value that may be a descriptor or carry ``mm_kwargs``."""
    if isinstance(value, dict):
        if "mm_kwargs" in value or value.get("kind") == DESCRIPTOR_KIND:
            yield path, value
        for key, child in value.items():
            if isinstance(child, dict | list):
                yield from descriptors_and_samples(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            if isinstance(child, dict | list):
                yield from descriptors_and_samples(child, (*path, index))

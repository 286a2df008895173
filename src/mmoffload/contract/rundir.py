"""The run directory layout (contract.md section 1)."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROLLOUTS = "rollouts"
TRAINING_BATCH_FILE = "train_rollouts.bin"
_STEP = re.compile(r"step_(\d+)")
_RANK = re.compile(r"rank_(\d+)\.bin")


def rank_of(path: str | os.PathLike[str]) -> int | None:
    """Return the rank a file name says (``rank_<R>.bin``), or None: the one rule for what a rank file is."""
    match = _RANK.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def step_of(directory: str | os.PathLike[str]) -> int | None:
    """Return the step a directory name says (``step_<N>``), or None."""
    match = _STEP.fullmatch(Path(directory).name)
    return int(match.group(1)) if match else None


def step_dir(run_dir: str | os.PathLike[str], step: int) -> Path:
    """Return ``RUN/rollouts/step_<N>``."""
    return Path(run_dir) / ROLLOUTS / f"step_{step}"


def training_batch_path(run_dir: str | os.PathLike[str], step: int) -> Path:
    """Return ``RUN/rollouts/step_<N>/train_rollouts.bin``."""
    return step_dir(run_dir, step) / TRAINING_BATCH_FILE


def rank_path(run_dir: str | os.PathLike[str], step: int, rank: int) -> Path:
    """Return ``RUN/rollouts/step_<N>/rank_<R>.bin``."""
    return step_dir(run_dir, step) / f"rank_{rank}.bin"


def steps(run_dir: str | os.PathLike[str]) -> list[int]:
    """Return the run's step numbers in numeric order."""
    root = Path(run_dir) / ROLLOUTS
    if not root.is_dir():
        return []
    found = (step_of(p) for p in root.iterdir() if p.is_dir())
    return sorted(step for step in found if step is not None)


def rank_paths(run_dir: str | os.PathLike[str], step: int) -> list[Path]:
    """Return a step's ``rank_<R>.bin`` files in rank order."""
    directory = step_dir(run_dir, step)
    if not directory.is_dir():
        return []
    ranked = {rank: p for p in directory.iterdir() if (rank := rank_of(p)) is not None}
    return [ranked[rank] for rank in sorted(ranked)]

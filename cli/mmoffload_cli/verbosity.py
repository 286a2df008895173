"""How much a command prints: ``-q`` (errors only, library warnings included) and ``-v`` (more detail).

Set by the shared ``-q``/``-v`` options' callbacks before the command body runs,
so every command gets the same behaviour without code of its own.
"""

from __future__ import annotations

import logging
import os
import warnings

# transformers' import-time advice ("PyTorch was not found...") is not an error of ours.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

_IGNORE_ALL = ("ignore", None, Warning, None, 0)
_state = {"quiet": False, "verbose": False}


def set_quiet(quiet: bool) -> bool:
    """Silence (or restore) library logging below ERROR and Python warnings; return ``quiet``."""
    _state["quiet"] = quiet
    if quiet:
        logging.disable(logging.WARNING)
        if _IGNORE_ALL not in warnings.filters:
            warnings.filterwarnings("ignore")
    else:
        logging.disable(logging.NOTSET)
        if _IGNORE_ALL in warnings.filters:
            warnings.filters.remove(_IGNORE_ALL)  # type: ignore[arg-type]
    return quiet


def set_verbose(verbose: bool) -> bool:
    """Ask for more detail (every violation, each input's output); return ``verbose``."""
    _state["verbose"] = verbose
    return verbose


def quiet() -> bool:
    """Whether ``-q`` was given."""
    return _state["quiet"]


def verbose() -> bool:
    """Whether ``-v`` was given (and not ``-q``)."""
    return _state["verbose"] and not _state["quiet"]

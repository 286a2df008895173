"""The one output sink: results on stdout, progress and errors on stderr, one error-to-exit map."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from mmoffload.errors import MMOffloadError

# Exit codes as ruff uses them; a signal exits 128 + its number, as shells report it.
EXIT_OK, EXIT_PROBLEMS, EXIT_CANNOT_RUN = 0, 1, 2
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM
TRACEBACK_ENV_VAR = "MMOFFLOAD_TRACEBACK"
# User text quoted in a message (between backticks) is cut to this many characters; a whole message too.
QUOTE_CHARS, MESSAGE_CHARS = 200, 2000

# Markup is off: user text (file names, keys, URLs) prints as it is; our own markup opts in.
stdout = Console(highlight=False, soft_wrap=True, markup=False)
stderr = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

_QUOTED = re.compile(f"`([^`]{{{QUOTE_CHARS + 1},}})`")


def shorten(text: str) -> str:
    """Cut each quoted span of user text to ``QUOTE_CHARS`` and the whole text to ``MESSAGE_CHARS``."""
    text = _QUOTED.sub(lambda m: f"`{m.group(1)[:QUOTE_CHARS]}...` ({len(m.group(1)):,} chars)", text)
    return text if len(text) <= MESSAGE_CHARS else f"{text[:MESSAGE_CHARS]}... ({len(text):,} chars)"


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C, so every ``finally`` removes its temporaries."""


def _raise_terminated(_signum: int, _frame: FrameType | None) -> None:
    raise Terminated


@contextlib.contextmanager
def errors_to_exit(on_interrupt: str = "nothing was written") -> Iterator[None]:
    """Map every failure to one message on stderr and an exit code: the one error-to-exit map.

    A library error or an OS error exits 2; Ctrl-C exits 130 and SIGTERM 143,
    after every temporary is removed, saying ``on_interrupt`` (what was and was
    not written). A traceback only with ``MMOFFLOAD_TRACEBACK`` set.

    Args:
        on_interrupt: what an interrupted run leaves behind, for the user.
    """
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C (or kill -INT) must still stop the run.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    except MMOffloadError as exc:
        fail(str(exc), EXIT_CANNOT_RUN)
    except OSError as exc:
        where = f" - at `{exc.filename}`" if exc.filename else ""
        fail(f"{exc.strerror or exc}{where}", EXIT_CANNOT_RUN)
    except RecursionError:
        fail("Input nested too deep to process", EXIT_CANNOT_RUN)
    except KeyboardInterrupt:
        fail(f"interrupted (Ctrl-C): {on_interrupt}", EXIT_SIGINT)
    except Terminated:
        fail(f"terminated (SIGTERM): {on_interrupt}", EXIT_SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def fail(message: str, code: int) -> None:
    """Print one error line (user text escaped and cut short) and exit with ``code``."""
    if os.environ.get(TRACEBACK_ENV_VAR):
        traceback.print_exc()
    stderr.print(f"[bold red]error:[/] {escape(shorten(message))}", markup=True)
    raise typer.Exit(code) from None


def report_table(report: msgspec.Struct, title: str) -> Table:
    """Render a flat report struct as a two-column figure/value table."""
    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2))
    table.add_column("figure", style="bold")
    table.add_column("value", justify="right")
    for name, value in msgspec.structs.asdict(report).items():
        if isinstance(value, int | float | str | bool) or value is None:
            table.add_row(name, format_value(value))
    return table


def format_value(value: Any) -> str:
    """Format a figure for people: thousands separators, short floats, lowercase booleans."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.3f}"
    return str(value)


def emit_report(report: msgspec.Struct, title: str, *, as_json: bool, quiet: bool = False) -> None:
    """Print a report: exactly one JSON document with ``--json``, else a table unless quiet."""
    if as_json:
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
    elif not quiet:
        stdout.print(report_table(report, title))


@contextlib.contextmanager
def progress_bar(
    description: str, total: int | None, *, enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """Yield an ``advance(n)`` callback that drives a bar on an interactive stderr only."""
    if not (enabled and stderr.is_terminal and not stderr.is_dumb_terminal):
        yield lambda _n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)

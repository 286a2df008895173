"""The one output sink: results on stdout, progress and errors on stderr, one error-to-exit map."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

# Typer vendors Click (0.26 on) and exports only BadParameter of its usage errors.
from typer._click.exceptions import NoArgsIsHelpError
from typer._click.exceptions import UsageError as ClickUsageError
from typer.core import TyperGroup

from mmoffload.errors import MMOffloadError, UsageError, Where, json_path, shorten
from mmoffload.io.inputs import is_stdio
from mmoffload_cli import verbosity

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID
    from rich.table import Table
    from typer._click import Context

# Exit codes as ruff uses them; a signal exits 128 + its number, as shells report it.
EXIT_OK, EXIT_PROBLEMS, EXIT_CANNOT_RUN = 0, 1, 2
EXIT_SIGINT, EXIT_SIGTERM, EXIT_SIGPIPE = 128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGPIPE
TRACEBACK_ENV_VAR = "MMOFFLOAD_TRACEBACK"
# Characters a terminal acts on instead of showing: C0 and C1 controls and DEL (ESC starts clear-screen,
# window-title and OSC 8 hyperlink sequences; U+009B is CSI), line and paragraph separators, and the
# bidi marks, embeddings, overrides and isolates that reorder what is shown (U+202E).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """Escape what a terminal would act on (``\\x1b``, ``\\x9b``, ``\\u202e``) and cut user text short.

    The one function every printer's text goes through (errors, warnings, tables, report
    rows, the stderr line of ``--json`` runs): see ``shorten`` for the cut.
    """
    return shorten(_UNPRINTABLE.sub(_escaped, text))


def json_text(value: Any) -> str:
    """Encode ``value`` as one line of JSON in which no character acts on a terminal.

    msgspec escapes C0 controls; C1 controls, DEL and bidi characters are escaped here as
    ``\\u009b`` or ``\\u202e``: the same JSON value, still valid JSON, shown inert.
    """
    return _UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", msgspec.json.encode(value).decode())


class _Console(Console):
    """A console whose text arguments are always passed through ``printable`` first."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(printable(o) if isinstance(o, str) else o for o in objects), **kwargs)


# Markup is off: user text (file names, keys, URLs) prints as it is; our own markup opts in.
stdout = _Console(highlight=False, soft_wrap=True, markup=False)
stderr = _Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C, so every ``finally`` removes its temporaries."""


def _raise_terminated(_signum: int, _frame: FrameType | None) -> None:
    raise Terminated


class ErrorReport(msgspec.Struct):
    """What ``--json`` prints on stdout when a command cannot run (exit 2)."""

    error: str
    kind: str
    message: str
    file: str | None = None
    line: int | None = None
    path: str | None = None
    ok: bool = False


@contextlib.contextmanager
def errors_to_exit(as_json: bool = False, on_interrupt: str = "nothing was written") -> Iterator[None]:
    """Map every failure to one message on stderr and an exit code: the one error-to-exit map.

    A library error or an OS error exits 2; Ctrl-C exits 130 and SIGTERM 143,
    after every temporary is removed, saying ``on_interrupt`` (what was and was
    not written). A traceback only with ``MMOFFLOAD_TRACEBACK`` set.

    Args:
        as_json: also print the error as one JSON object on stdout, so ``jq`` always has a document.
        on_interrupt: what an interrupted run leaves behind, for the user.
    """
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C (or kill -INT) must still stop the run.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    except MMOffloadError as exc:
        where = exc.where or Where()
        report = ErrorReport(
            error=str(exc),
            kind=type(exc).__name__,
            message=exc.message,
            file=where.file,
            line=where.line,
            path=json_path(where.path) if where.path is not None else None,
        )
        fail(report, EXIT_CANNOT_RUN, as_json)
    except BrokenPipeError:
        # The reader of the output went away (`| head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(EXIT_SIGPIPE) from None
    except OSError as exc:
        message = exc.strerror or str(exc)
        error = f"{message} - at `{exc.filename}`" if exc.filename else message
        file = str(exc.filename) if exc.filename else None
        fail(ErrorReport(error, "OSError", message, file=file), EXIT_CANNOT_RUN, as_json)
    except RecursionError:
        message = "Input nested too deep to process"
        fail(ErrorReport(message, "RecursionError", message), EXIT_CANNOT_RUN, as_json)
    except MemoryError:
        # Whatever ran out has been let go by now: there is room to say so.
        message = "Out of memory (a line, an image or a batch larger than this machine can hold)"
        fail(ErrorReport(message, "MemoryError", message), EXIT_CANNOT_RUN, as_json)
    except KeyboardInterrupt:
        message = f"interrupted (Ctrl-C): {on_interrupt}"
        fail(ErrorReport(message, "Interrupted", message), EXIT_SIGINT, as_json)
    except Terminated:
        message = f"terminated (SIGTERM): {on_interrupt}"
        fail(ErrorReport(message, "Terminated", message), EXIT_SIGTERM, as_json)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def fail(report: ErrorReport, code: int, as_json: bool = False) -> None:
    """Print one error line (user text escaped and cut short), with ``--json`` also the report; exit."""
    if os.environ.get(TRACEBACK_ENV_VAR):
        traceback.print_exc()
    stderr.print(f"[bold red]error:[/] {escape(printable(report.error))}", markup=True)
    if as_json:
        sys.stdout.write(json_text(report) + "\n")
    raise typer.Exit(code) from None


class EscapingGroup(TyperGroup):
    """The app's group: a usage error (unknown option, bad value, extra argument) prints the user's
    text escaped and cut short, as every other error does (Typer escapes some of it, C0/C1 only)."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: Context | None = None, **extra: Any
    ) -> Context:
        with _printable_usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: Context) -> Any:
        # Covers the command's own parsing too: it runs inside the group's invoke.
        with _printable_usage_errors():
            return super().invoke(ctx)


@contextlib.contextmanager
def _printable_usage_errors() -> Iterator[None]:
    try:
        yield
    except NoArgsIsHelpError:  # Its message is the help, ours.
        raise
    except ClickUsageError as exc:
        # User text lives in the message; the parameter hints Click adds around it are ours.
        exc.message = printable(exc.message)
        raise


def report_table(report: msgspec.Struct, title: str) -> Table:
    """Render a report struct as a two-column figure/value table (plain lists too with ``-v``)."""
    from rich.table import Table  # Here and in the bars: imported only when something is shown.

    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2))
    table.add_column("figure", style="bold")
    table.add_column("value", justify="right", overflow="fold")
    for name, value in msgspec.structs.asdict(report).items():
        if isinstance(value, int | float | str | bool) or value is None:
            table.add_row(name, cell(format_figure(name, value)))
        elif isinstance(value, dict) and value and all(isinstance(v, str) for v in value.values()):
            # Which config each family ran on (`qwen_vl=defaults`): always worth a line.
            table.add_row(name, cell(", ".join(f"{key}={v}" for key, v in value.items())))
        elif verbosity.verbose() and isinstance(value, list) and all(isinstance(v, str | int) for v in value):
            table.add_row(name, cell(", ".join(map(str, value))))
    return table


def format_figure(name: str, value: Any) -> str:
    """Format a named figure: a byte count (``*bytes*``) in human units beside its exact number."""
    shown = format_value(value)
    if "bytes" in name and isinstance(value, int) and not isinstance(value, bool) and value >= 1024:
        return f"{human_bytes(value)} ({shown})"
    return shown


def human_bytes(count: int) -> str:
    """Return a byte count in binary units, as people read them: ``164.5 MiB``."""
    size, unit = float(count), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{size:,.1f} {unit}"


def cell(text: str) -> Text:
    """A table cell of user text: escaped and cut by ``printable``, never read as markup."""
    return Text(printable(text))


def format_value(value: Any) -> str:
    """Format a figure for people: thousands separators, short floats, lowercase booleans."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.3f}"
    return str(value)


def results_on_stdout(output: str | os.PathLike[str] | None, as_json: bool, option: str = "-o") -> bool:
    """Whether a command writes its results to stdout (``-o -``): its report then goes to stderr.

    Raises:
        UsageError: ``--json`` would write to stdout too.
    """
    on_stdout = output is not None and is_stdio(output)
    if on_stdout and as_json:
        raise UsageError(f"Expected one of `{option} -` and `--json`: both would write to stdout")
    return on_stdout


def emit_report(
    report: msgspec.Struct, title: str, *, as_json: bool, quiet: bool = False, stdout_taken: bool = False
) -> None:
    """Print a report: exactly one JSON document with ``--json``, else a table unless quiet.

    Args:
        stdout_taken: the command's results went to stdout (see ``results_on_stdout``): the table
            goes to stderr.
    """
    if as_json:
        sys.stdout.write(json_text(report) + "\n")
    elif not quiet:
        (stderr if stdout_taken else stdout).print(report_table(report, title))
    if not quiet:
        for warning in getattr(report, "warnings", None) or []:
            stderr.print(f"warning: {warning}", markup=False)  # Escaped and cut by the console.


class Bar:
    """What ``progress_bar`` yields: call it with work done; ``add_total`` as more work becomes known.

    A stage that learns its total only after reading its inputs (audit's files to hash,
    materialize's micro batches) grows the total then; a bar without one pulses until it does.
    Both calls do nothing where no bar is drawn (a pipe, ``TERM=dumb``, ``-q``).
    """

    def __init__(self, shown: tuple[Progress, TaskID] | None = None) -> None:
        self.shown = shown

    def __call__(self, n: int) -> None:
        if self.shown is not None:
            self.shown[0].advance(self.shown[1], n)

    def add_total(self, n: int) -> None:
        """Add ``n`` to the bar's total (a bar without a total gets one)."""
        if self.shown is not None:
            progress, task = self.shown
            progress.update(task, total=(progress.tasks[task].total or 0) + n)


class CountingBar(Bar):
    """What ``counting_bar`` yields: call it with ``(micro_batches, images)`` done."""

    images = 0

    def __call__(self, n: int, images: int = 0) -> None:
        if self.shown is None:
            return
        progress, task = self.shown
        self.images += images
        elapsed = progress.tasks[task].elapsed or 0.0
        rate = f"{self.images / elapsed:,.1f} images/s" if elapsed else ""
        progress.update(task, advance=n, images=self.images, rate=rate)


def _drawn(enabled: bool) -> bool:
    """Whether a bar is drawn: asked for, and stderr an interactive terminal (rich decides)."""
    return enabled and stderr.is_terminal and not stderr.is_dumb_terminal


def local_bytes(paths: Iterable[str | os.PathLike[str]]) -> int:
    """Return the size of the local files among ``paths``: a bar's total (stdin and URLs add nothing)."""
    return sum(path.stat().st_size for path in paths if isinstance(path, Path) and path.is_file())


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, *, enabled: bool = True) -> Iterator[Bar]:
    """Yield a ``Bar`` of bytes done that draws on an interactive stderr only."""
    if not _drawn(enabled):
        yield Bar()
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True) as bar:
        yield Bar((bar, bar.add_task(description, total=total)))


@contextlib.contextmanager
def counting_bar(description: str, total: int | None, *, enabled: bool = True) -> Iterator[CountingBar]:
    """Yield a ``CountingBar``: a bar of micro batches with images and a rate.

    Shown on an interactive stderr only, like ``progress_bar``.
    """
    if not _drawn(enabled):
        yield CountingBar()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("micro batches, {task.fields[images]:,} images, {task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=True) as bar:
        yield CountingBar((bar, bar.add_task(description, total=total, images=0, rate="")))

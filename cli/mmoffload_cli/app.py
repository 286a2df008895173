"""The ``mmoffload`` application: one Typer app, one command per pipeline stage.

Each command's module is imported only when that command runs: ``offload`` needs
none of the numpy, Pillow and processor code the trainer-side commands import,
and start-up is a large share of a short offload. Typer itself is imported by
``build``, after ``main`` has taken Ctrl-C over: an interrupted start-up is an
exit 130 with one line, never a traceback.
"""

from __future__ import annotations

import importlib
import signal
import sys
from collections.abc import Iterable
from types import FrameType
from typing import TYPE_CHECKING

import mmoffload

if TYPE_CHECKING:
    import typer

# Command name -> the module in this package that defines the function of that name.
COMMANDS = (
    "offload",
    "inline",
    "render",
    "refs",
    "pack",
    "audit",
    "demo",
    "materialize",
    "show",
    "inspect",
    "serve",
    "generate",
    "parity",
)
# `serve` passes the arguments after `--` on to vLLM.
CONTEXT_SETTINGS = {"serve": {"allow_extra_args": True, "ignore_unknown_options": True}}


def build(commands: Iterable[str] = COMMANDS) -> typer.Typer:
    """Return the app with ``commands`` registered (all of them by default)."""
    import typer

    from mmoffload_cli.sink import EscapingGroup

    app = typer.Typer(
        name="mmoffload",
        cls=EscapingGroup,
        help="Raw image offload for multimodal RL: store each image once, pass file:// refs, "
        "let the trainer make its own pixels.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    for name in commands:
        command = getattr(importlib.import_module(f"mmoffload_cli.{name}"), name)
        app.command(context_settings=CONTEXT_SETTINGS.get(name))(command)

    def print_version(value: bool) -> None:
        if value:
            typer.echo(f"mmoffload {mmoffload.__version__}")
            raise typer.Exit()

    def root(
        version: bool = typer.Option(
            False,
            "-V",
            "--version",
            callback=print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ) -> None:
        """Raw image offload for multimodal RL: store each image once, pass file:// refs, let the
        trainer make its own pixels."""

    # The callback also keeps a one-command app a group, so `mmoffload offload ...` parses the same.
    app.callback()(root)
    return app


def __getattr__(name: str) -> typer.Typer:
    # `app` (every command) is built on first use, so `main` can build just the one it runs.
    if name == "app":
        globals()["app"] = app = build()
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """Entry point of the ``mmoffload`` console script."""
    # Until a command's own handling takes over (and again after it), Ctrl-C exits 130 with one
    # line: start-up (imports, parsing) is a large share of a short run.
    signal.signal(signal.SIGINT, _interrupted)
    command = sys.argv[1] if len(sys.argv) > 1 else None
    build([command] if command in COMMANDS else COMMANDS)()


def _interrupted(_signum: int, _frame: FrameType | None) -> None:
    sys.stderr.write("error: interrupted (Ctrl-C)\n")
    raise SystemExit(130)

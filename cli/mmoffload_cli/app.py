"""The ``mmoffload`` application: one Typer app, one command per pipeline stage."""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperArgument

import mmoffload
from mmoffload_cli import audit, demo, materialize, offload, pack, refs

# Typer appends the value type (`<list[Path]>`) to an argument's help even when the argument
# names a metavar that already says it; show the metavar alone.
_display_type = TyperArgument.display_type_rich
TyperArgument.display_type_rich = lambda self, ctx: None if self.metavar else _display_type(self, ctx)  # type: ignore[method-assign]

app = typer.Typer(
    name="mmoffload",
    help="Raw image offload for multimodal RL: store each image once, pass file:// refs, "
    "let the trainer make its own pixels.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command()(offload.offload)
app.command()(refs.refs)
app.command()(pack.pack)
app.command()(audit.audit)
app.command()(demo.demo)
app.command()(materialize.materialize)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"mmoffload {mmoffload.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "-V", "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Raw image offload for multimodal RL: store each image once, pass file:// refs, let the
    trainer make its own pixels."""


def main() -> None:
    """Entry point of the ``mmoffload`` console script."""
    app()

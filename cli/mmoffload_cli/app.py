"""The ``mmoffload`` application: one Typer app, one command per pipeline stage."""

from __future__ import annotations

import typer

from mmoffload_cli import audit, demo, generate, materialize, offload, pack, refs, serve

app = typer.Typer(
    name="mmoffload",
    help="Raw image offload for multimodal RL: store each image once, pass file:// refs, "
    "let the trainer make its own pixels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.command()(offload.offload)
app.command()(refs.refs)
app.command()(pack.pack)
app.command()(audit.audit)
app.command()(demo.demo)
app.command()(materialize.materialize)
app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(serve.serve)
app.command()(generate.generate)


def main() -> None:
    """Entry point of the ``mmoffload`` console script."""
    app()

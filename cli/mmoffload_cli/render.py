"""``mmoffload render``: chat rollouts to v1 episodes, the traces ``refs`` takes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from mmoffload.errors import UsageError
from mmoffload.families import resolve_model_dir
from mmoffload.io.inputs import expand_inputs
from mmoffload.render import RenderOptions, render_files
from mmoffload.store.local import ASSETS_ENV_VAR, resolve_assets_dir
from mmoffload_cli import options, sink

Rollouts = Annotated[
    list[Path],
    typer.Argument(
        metavar="INPUT",
        help="JSONL chat rollouts (messages, or prompt + completion; .gz/.zst read too), directories, "
        "quoted globs, or - for stdin.",
        show_default=False,
    ),
]
EnvName = Annotated[
    str, typer.Option("--env-name", metavar="NAME", help="env.id of rollouts that name no environment.")
]
TrustRemoteCode = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code", help="Let transformers run the tokenizer's own code (Kimi's tokenizer)."
    ),
]


def render(
    inputs: Rollouts,
    output: options.Output = None,
    model: options.Model = None,
    assets: options.Assets = None,
    allow_root: options.AllowRoot = None,
    env_name: EnvName = "",
    trust_remote_code: TrustRemoteCode = False,
    as_json: options.Json = False,
    quiet: options.Quiet = False,
    verbose: options.Verbose = False,
) -> None:
    """Render chat rollouts into v1 episodes (refs' input).

    Uses the model's own tokenizer and chat template. One episode per rollout, one node per message; assistant messages are sampled
    (mask true on the generated tokens and the end-of-turn token). Each image becomes
    the family's placeholder tokens, expanded to its grid from the image header; its
    node carries the sidecar refs checks. Inline data: images are stored in --assets on
    the way (as offload stores them); stored images are read where they are. The output
    appears only when every line rendered.

    Examples:

    \b
        mmoffload render results.jsonl --model DIR -o ep.jsonl --assets A
        mmoffload render offloaded.jsonl --model ORG/NAME -o ep.jsonl
        mmoffload render 'runs/*/results.jsonl' --model DIR -o - | head -1
    """
    with sink.errors_to_exit(
        as_json,
        on_interrupt="no output was written; images already stored stay in the asset directory, each whole",
    ):
        if model is None:
            raise UsageError("Expected --model: a model directory with a tokenizer and its chat template")
        if output is None:
            raise UsageError("Expected an output: -o FILE (or -o - for stdout)")
        to_stdout = sink.results_on_stdout(output, as_json)
        paths = [item.path for item in expand_inputs(inputs)]
        store = resolve_assets_dir(assets, None) if assets or os.environ.get(ASSETS_ENV_VAR) else None
        with sink.progress_bar("render", sink.local_bytes(paths), enabled=not quiet) as advance:
            report = render_files(
                paths,
                output,
                resolve_model_dir(model),
                RenderOptions(
                    assets=store,
                    allowed_roots=allow_root,
                    env_name=env_name,
                    trust_remote_code=trust_remote_code,
                ),
                advance=advance,
            )
    sink.emit_report(report, "render", as_json=as_json, quiet=quiet, stdout_taken=to_stdout)

"""The render stage: chat rollout JSONL files in, one v1 episode per line out (``refs``' input)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from mmoffload.errors import UsageError
from mmoffload.extras import require
from mmoffload.families import Families
from mmoffload.io.inputs import decode_json_line, is_stdio, iter_lines
from mmoffload.io.outputs import check_distinct, check_output_path, open_output
from mmoffload.render.episode import RenderCounts, Renderer
from mmoffload.store.read import AllowedRoots


class RenderReport(RenderCounts):
    """Figures of one render run (stable names: the keys of ``--json``)."""

    files: int = 0
    lines: int = 0
    images_read: int = 0
    seconds: float = 0.0
    output: str = ""
    model: str = ""
    assets: str | None = None
    # Each family the rollouts used, with its config (the model directory).
    families: dict[str, str] = msgspec.field(default_factory=dict)
    warnings: list[str] = msgspec.field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """User choices of the render stage.

    Attributes:
        assets: where inline ``data:`` images are stored (a directory or object-store URL);
            None makes them an error ("offload first").
        allowed_roots: directories image files may be read from; None allows any regular file.
        env_name: the episode's ``env.id`` when a rollout names none.
        trust_remote_code: let transformers run a tokenizer's own code (Kimi's tiktoken tokenizer).
    """

    assets: str | os.PathLike[str] | None = None
    allowed_roots: AllowedRoots = None
    env_name: str = ""
    trust_remote_code: bool = False


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False) -> Any:
    """Load a model directory's tokenizer offline.

    Raises:
        UsageError: transformers is missing, or the directory has no tokenizer.
    """
    transformers = require("transformers", "Rendering chat rollouts")
    try:
        return transformers.AutoTokenizer.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UsageError(
            f"Cannot load a tokenizer from `{model_dir}` ({type(exc).__name__}: {str(exc)[:160]}): "
            "pass --model with a tokenizer (a model directory with tokenizer files and a chat template)"
        ) from exc


def render_files(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    options: RenderOptions | None = None,
    *,
    advance: Callable[[int], None] = lambda _n: None,
) -> RenderReport:
    """Render chat rollout JSONL files into one JSONL file of v1 episodes, written atomically.

    Every line is rendered before the output appears; the first bad line stops the run
    and leaves no output (images already stored stay, each whole).

    Args:
        inputs: JSONL files (``-`` for stdin), one rollout per line.
        output: the episodes file (``-`` for stdout; ``.gz`` / ``.zst`` compressed).
        model_dir: the model directory: tokenizer, chat template, preprocessor config.
        options: user choices; defaults when None.
        advance: called with each line's size in bytes (a progress bar).

    Raises:
        BadInputError: a bad line, naming its file, line, message and image.
        IntegrityError: an image file is missing or disagrees with its name.
        UsageError: unusable model, output or inputs.
    """
    options = options or RenderOptions()
    started = time.perf_counter()
    model_dir = Path(model_dir)
    families = Families(model_dir)
    renderer = Renderer(
        load_tokenizer(model_dir, options.trust_remote_code),
        families,
        assets=options.assets,
        allowed_roots=options.allowed_roots,
        env_name=options.env_name,
    )
    report = RenderReport(output=str(output), model=str(model_dir))
    report.assets = os.fspath(options.assets) if options.assets is not None else None
    if not is_stdio(output):
        check_distinct([Path(path) for path in inputs], [("output", Path(output))])
        check_output_path(Path(output))
    encoder = msgspec.json.Encoder()
    with open_output(output) as out:
        for path in inputs:
            report.files += 1
            for where, line in iter_lines(path):
                report.lines += 1
                episode, counts = renderer.rollout(decode_json_line(line, where), where)
                report.add(counts)
                out.write(encoder.encode(episode) + b"\n")
                advance(len(line))
    report.images_read = renderer.images.files_read
    report.images_adopted = renderer.images.files_adopted
    report.families = families.configs()
    report.warnings = families.warnings()
    report.seconds = round(time.perf_counter() - started, 3)
    return report

"""The files a file-to-file command (offload, inline) reads and writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mmoffload.io.inputs import expand_inputs
from mmoffload.io.outputs import plan_outputs


def plan_files(
    inputs: Sequence[str], output: Path | str | None, in_place: bool = False, own: Sequence[Path] = ()
) -> tuple[list[Path | str], list[Path | str]]:
    """Expand a command's inputs and plan the output of each (see ``plan_outputs``).

    A directory or a glob finds no input among the command's own outputs, ``output`` and
    ``own``: a second run does not read what the first one wrote.

    Args:
        inputs: files, ``-``, directories, glob patterns and URLs, as given.
        output: ``-o``: a file, a directory, a URL or ``-`` (None: each input's own, with ``in_place``).
        in_place: each input is its own output.
        own: other files the command writes (a rejects file).

    Returns:
        The input paths (URLs as strings) and the output of each.

    Raises:
        UsageError: an input that does not exist or matches nothing, or outputs that cannot be planned.
    """
    expanded = expand_inputs(inputs, exclude=[output, *own] if isinstance(output, Path) else own)
    return [item.path for item in expanded], plan_outputs(expanded, output, in_place)

"""Limits read from the environment: one parser, one wording for a bad value."""

from __future__ import annotations

import os

from mmoffload.errors import UsageError

# The most bytes read for one referenced image (a 4K screenshot PNG is about 10 MB).
MAX_IMAGE_BYTES_ENV_VAR = "MMOFFLOAD_MAX_IMAGE_BYTES"


DEFAULT_MAX_IMAGE_BYTES = 128 << 20


# The most bytes one JSONL line may hold: a record of a long rollout with its screenshots inline runs
# to hundreds of megabytes, and a line is held whole in memory (a newline-free decompression bomb
# would otherwise grow without end).
MAX_LINE_BYTES_ENV_VAR = "MMOFFLOAD_MAX_LINE_BYTES"


DEFAULT_MAX_LINE_BYTES = 1 << 30


def max_image_bytes() -> int:
    """Return the most bytes read for one image: ``$MMOFFLOAD_MAX_IMAGE_BYTES``, else 128 MiB.

    Raises:
        UsageError: the variable is not a whole number > 0.
    """
    return env_limit(MAX_IMAGE_BYTES_ENV_VAR, DEFAULT_MAX_IMAGE_BYTES)


def max_line_bytes() -> int:
    """Return the most bytes one input line may hold: ``$MMOFFLOAD_MAX_LINE_BYTES``, else 1 GiB.

    Raises:
        UsageError: the variable is not a whole number > 0.
    """
    return env_limit(MAX_LINE_BYTES_ENV_VAR, DEFAULT_MAX_LINE_BYTES)


def env_limit(name: str, default: int) -> int:
    """Return a positive whole-number limit from the environment variable ``name``, else ``default``.

    Raises:
        UsageError: the variable is set but is not a whole number > 0.
    """
    raw = os.environ.get(name)
    if raw is None:
        return default
    if not raw.strip().isdigit() or int(raw) < 1:
        raise UsageError(f"Expected ${name} as a whole number > 0, got `{raw[:40]}`")
    return int(raw)

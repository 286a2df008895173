"""mmoffload: raw image offload for multimodal RL (content-addressed assets, ``file://`` refs).

Kept light on purpose: importing the package imports nothing heavy; each stage
lives in its own module (``mmoffload.offload``, ``mmoffload.materialize``, ...).
"""

from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    # Looked up on first use: importlib.metadata costs about 30 ms of every command's start-up.
    if name != "__version__":
        raise AttributeError(f"module 'mmoffload' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmoffload")
    except PackageNotFoundError:  # Run from a source tree that was never installed.
        return "0+unknown"

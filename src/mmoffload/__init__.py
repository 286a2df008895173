"""mmoffload: raw image offload for multimodal RL (content-addressed assets, ``file://`` refs).

Kept light on purpose: importing the package imports nothing heavy; each stage
lives in its own module (``mmoffload.offload``, ``mmoffload.materialize``, ...).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mmoffload")
except PackageNotFoundError:  # Run from a source tree that was never installed.
    __version__ = "0+unknown"

__all__ = ["__version__"]

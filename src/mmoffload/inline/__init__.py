"""`mmoffload inline`: every stored image ref back to a ``data:`` URL (the reverse of offload)."""

from mmoffload.inline.records import InlineCounts, Inliner, data_url
from mmoffload.inline.stage import InlineReport, inline_files

__all__ = ["InlineCounts", "InlineReport", "Inliner", "data_url", "inline_files"]

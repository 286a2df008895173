"""The render stage: chat rollouts to v1 episodes with the model's own tokenizer and chat template.

``render_rollout`` renders one rollout in a rollout worker; ``render_files`` is the
``mmoffload render`` command's stage (docs/render.md).
"""

from mmoffload.render.episode import RenderCounts, Renderer, render_rollout
from mmoffload.render.stage import RenderOptions, RenderReport, load_tokenizer, render_files

__all__ = [
    "RenderCounts",
    "RenderOptions",
    "RenderReport",
    "Renderer",
    "load_tokenizer",
    "render_files",
    "render_rollout",
]

"""The main job on the bundled fixtures: offload, refs, pack and audit, for each family.

Each family gets its own run directory under the demo root:

```
ROOT/qwen_vl/   assets/images/, offloaded/qwen_vl.jsonl, rollouts/step_0/{train_rollouts,rank_0}.bin
ROOT/kimi_k25/  the same for Kimi K2.5
```

and one audit over both runs ends the job. The chat-rollout path follows when the
``materialize`` extra (transformers) is installed: the fixtures' chat rollouts go through
offload, render (with a tiny byte-level tokenizer and the family's chat template),
refs and pack into ``ROOT/chat_<family>`` (tiny models in ``ROOT/chat_models``: no run), and a
second audit covers those runs. Runs stay siblings, so ``mmoffload audit ROOT`` audits all four.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from mmoffload.audit import AuditReport, audit
from mmoffload.errors import UsageError
from mmoffload.offload import OffloadReport, offload_files
from mmoffload.pack import PackOptions, PackReport, pack_run
from mmoffload.refs import RefsOptions, RefsReport, build_refs
from mmoffload.render import RenderReport, render_files
from mmoffload.render.tiny import write_tiny_model

# The same sequence length as scripts/smoke.sh, so the demo's figures are the smoke run's.
DEMO_SEQ_LEN = 4096
WHEEL_FIXTURES = "_fixtures"


@dataclass(frozen=True, slots=True)
class DemoCase:
    """One family's fixture: its traces file and its model directory, under the fixtures root."""

    name: str
    traces: str
    model: str


DEMO_CASES: tuple[DemoCase, ...] = (
    DemoCase("qwen_vl", "traces/qwen_vl.jsonl", "models/qwen3_vl"),
    DemoCase("kimi_k25", "traces/kimi_k25.jsonl", "models/kimi_k25"),
)
# The chat-rollout path: the fixtures' rollouts, rendered with a tiny tokenizer per bundled config.
CHAT_ROLLOUTS = "rollouts/mini_browse.jsonl"
CHAT_CASES: tuple[tuple[str, str], ...] = (("qwen_vl", "qwen3_vl"), ("kimi_k25", "kimi_k25"))


class DemoRun(msgspec.Struct):
    """One family's run: where it is and what each stage reported."""

    family: str
    run_dir: str
    offload: OffloadReport
    refs: RefsReport
    pack: PackReport


class ChatRun(msgspec.Struct):
    """One family's chat-rollout run: offload, render, refs and pack."""

    family: str
    run_dir: str
    offload: OffloadReport
    render: RenderReport
    refs: RefsReport
    pack: PackReport


class DemoReport(msgspec.Struct):
    """The whole demo: each family's run, then the audit of all of them; then the chat-rollout runs."""

    root: str
    runs: list[DemoRun]
    audit: AuditReport
    chat_runs: list[ChatRun] = msgspec.field(default_factory=list)
    chat_audit: AuditReport | None = None
    # Why the chat-rollout path did not run (the materialize extra is missing), else None.
    chat_skipped: str | None = None

    @property
    def ok(self) -> bool:
        """True when every audit found no violation."""
        return self.audit.ok and (self.chat_audit is None or self.chat_audit.ok)


# Called after each stage with (family, stage name, the stage's report).
StageCallback = Callable[[str, str, msgspec.Struct], None]


def fixtures_dir() -> Path:
    """Return the bundled fixtures: ``mmoffload/_fixtures`` in a wheel, ``<repo>/fixtures`` in a checkout.

    Raises:
        UsageError: neither is there (an installation without its fixtures).
    """
    package = Path(__file__).parent
    candidates = (package / WHEEL_FIXTURES, package.parent.parent / "fixtures")
    for candidate in candidates:
        if (candidate / "traces").is_dir():
            return candidate
    raise UsageError(
        "Expected bundled fixtures at " + " or ".join(f"`{c}`" for c in candidates) + ", found none"
    )


def run_demo(
    root: Path,
    *,
    fixtures: Path | None = None,
    seq_len: int = DEMO_SEQ_LEN,
    on_stage: StageCallback = lambda _f, _s, _r: None,
) -> DemoReport:
    """Run offload, refs and pack on each family's fixture traces under ``root``, then audit.

    Args:
        root: the demo root; each family's run is ``root/<family>`` (created, reused if there).
        fixtures: the fixtures root (default: ``fixtures_dir()``).
        seq_len: tokens per micro batch for the pack stage.
        on_stage: called after each stage, so a caller can show reports as they come.

    Returns:
        Every stage's report and the audit of all runs (hashes verified).

    Raises:
        UsageError: the fixtures are missing.
        MMOffloadError: a stage failed (a bug in the fixtures or in mmoffload).
    """
    fixtures = fixtures or fixtures_dir()
    runs: list[DemoRun] = []
    for case in DEMO_CASES:
        run_dir = root / case.name
        traces = fixtures / case.traces
        # Explicit asset directory: the demo never writes into a caller's $VF_RENDERER_IMAGE_OFFLOAD_DIR.
        offloaded = run_dir / "offloaded" / traces.name
        offload = offload_files([traces], [offloaded], run_dir / "assets" / "images")
        on_stage(case.name, "offload", offload)
        refs = build_refs([offloaded], run_dir, RefsOptions(model_dir=fixtures / case.model))
        on_stage(case.name, "refs", refs)
        pack = pack_run(run_dir, PackOptions(seq_len=seq_len))
        on_stage(case.name, "pack", pack)
        runs.append(DemoRun(case.name, str(run_dir), offload, refs, pack))
    report = audit([Path(run.run_dir) for run in runs], verify_hashes=True)
    on_stage("all", "audit", report)
    result = DemoReport(str(root), runs, report)
    if importlib.util.find_spec("transformers") is None:
        result.chat_skipped = (
            "the chat-rollout path needs the materialize extra: pip install 'mmoffload[materialize]'"
        )
        return result
    result.chat_runs = [
        _chat_run(root, family, config, fixtures, seq_len, on_stage) for family, config in CHAT_CASES
    ]
    result.chat_audit = audit([Path(run.run_dir) for run in result.chat_runs], verify_hashes=True)
    on_stage("chat", "audit", result.chat_audit)
    return result


def _chat_run(
    root: Path, family: str, config: str, fixtures: Path, seq_len: int, on_stage: StageCallback
) -> ChatRun:
    """Run offload, render, refs and pack on the fixtures' chat rollouts for one family."""
    run_dir = root / f"chat_{family}"
    model = write_tiny_model(root / "chat_models" / config, config)
    offloaded = run_dir / "offloaded" / "mini_browse.jsonl"
    offload = offload_files([fixtures / CHAT_ROLLOUTS], [offloaded], run_dir / "assets" / "images")
    on_stage(family, "offload", offload)
    episodes = run_dir / "episodes" / "mini_browse.jsonl"
    render = render_files([offloaded], episodes, model)
    on_stage(family, "render", render)
    refs = build_refs([episodes], run_dir, RefsOptions(model_dir=model))
    on_stage(family, "refs", refs)
    pack = pack_run(run_dir, PackOptions(seq_len=seq_len))
    on_stage(family, "pack", pack)
    return ChatRun(family, str(run_dir), offload, render, refs, pack)

"""Turn every turn of offloaded traces into context, so that the next sampled turn is the only trained one.

The fixture traces' sampled turns carry handwritten logprobs, not any model's: a parity check
of a run trained on them would (rightly) flag them. The smoke run and the end-to-end parity
test complete these context-only traces with ``mmoffload generate`` instead, so that every
trained token was sampled by the served model.

Usage: python scripts/as_context.py IN.jsonl OUT.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def as_context(record: dict[str, Any]) -> dict[str, Any]:
    """Return an episode (``traces: [...]``) or trace (``nodes: [...]``) with no trained token left."""
    for trace in record.get("traces") or [record]:
        for node in trace.get("nodes") or []:
            node["mask"] = [False] * len(node.get("token_ids") or [])
            node.pop("logprobs", None)
            node.pop("sampled", None)
    return record


def main(source: Path, out: Path) -> None:
    lines = (json.dumps(as_context(json.loads(line))) for line in source.read_text().splitlines() if line)
    out.write_text("".join(line + "\n" for line in lines))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))

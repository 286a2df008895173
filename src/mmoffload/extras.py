"""Optional components: import one where it is needed, or say which extra installs it.

The core (``pip install mmoffload``) runs offload, refs, pack and audit; the
trainer side needs the ``materialize`` extra, torch tensors the ``torch`` one,
hub ids the ``hub`` one and the rollout client the ``client`` one.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mmoffload.errors import UsageError

# Top-level module -> the extra that installs it.
EXTRAS: dict[str, str] = {
    "PIL": "materialize",
    "safetensors": "materialize",
    "tokenizers": "materialize",
    "transformers": "materialize",
    "torch": "torch",
    "pyarrow": "parquet",
    "huggingface_hub": "hub",
    "httpx": "client",
}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (``"PIL.Image"``, or a module of ours that imports one), or say which extra to install.

    Raises:
        UsageError: the module, or an optional package it imports, is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        # Name what is missing: for ``mmoffload.families.hub`` that is huggingface_hub, not mmoffload.
        missing = (exc.name or module).split(".")[0]
        top = missing if missing in EXTRAS else module.split(".")[0]
        if top not in EXTRAS:
            raise
        extra = EXTRAS[top]
        raise UsageError(
            f"{purpose} needs `{top}`, from the `{extra}` extra: pip install 'mmoffload[{extra}]'"
        ) from exc

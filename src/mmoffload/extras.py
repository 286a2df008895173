"""Optional components: import one where it is needed, or say which extra installs it.

The core (``pip install mmoffload``) runs offload, refs, pack and audit; the
trainer side needs the ``materialize`` extra, torch tensors the ``torch`` one.
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
}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (``"PIL.Image"``...), or fail saying which extra to install.

    Raises:
        UsageError: the module is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = EXTRAS[top]
        raise UsageError(
            f"{purpose} needs `{top}`, from the `{extra}` extra: pip install 'mmoffload[{extra}]'"
        ) from exc

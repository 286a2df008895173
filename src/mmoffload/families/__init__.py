"""The family registry: a plain dict from ``family`` name to its module's class.

Adding a family is adding one module and one line here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mmoffload.errors import BadInputError, UsageError, Where
from mmoffload.extras import require
from mmoffload.families.base import Family, ForwardPolicy, Grid, read_json
from mmoffload.families.kimi_k25 import KimiK25
from mmoffload.families.qwen_vl import QwenVL

FAMILIES: dict[str, type[Family]] = {
    QwenVL.name: QwenVL,
    KimiK25.name: KimiK25,
}

# Special-token names of every family's published ids (they do not collide), for messages.
DEFAULT_TOKEN_NAMES: dict[int, str] = {
    token_id: name for family in FAMILIES.values() for name, token_id in family.default_token_ids.items()
}
BUNDLED_CONFIGS = Path(__file__).parent / "configs"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(@[\w./-]+)?")
DEFAULT_CONFIG = "defaults"
# Snapshots that hub ids resolved to in this process -> ``ORG/NAME@COMMIT``, for reports.
_HUB_SNAPSHOTS: dict[Path, str] = {}

__all__ = [
    "DEFAULT_TOKEN_NAMES",
    "FAMILIES",
    "Families",
    "Family",
    "ForwardPolicy",
    "Grid",
    "cached_model_dir",
    "resolve_model_dir",
]


def resolve_model_dir(model: str | os.PathLike[str]) -> Path:
    """Return a model directory: a path, a bundled config name (``qwen3_vl``...), or a hub id.

    A hub id ``ORG/NAME`` (optionally ``ORG/NAME@REVISION``) is looked up in the local
    Hugging Face cache only, through ``huggingface_hub`` (the ``hub`` extra): nothing is
    ever downloaded, with or without ``HF_HUB_OFFLINE``.

    Raises:
        UsageError: none of these, a hub id that is not in the local cache, or a hub id
            without the ``hub`` extra.
    """
    if Path(model).is_dir():
        return Path(model)
    bundled = BUNDLED_CONFIGS / os.fspath(model)
    if bundled.is_dir():
        return bundled
    text = os.fspath(model)
    if text.startswith(("/", "./", "../", "~", os.sep)) or (os.sep != "/" and os.sep in text):
        # Spelled as a path, so meant as one: say the directory is missing, not that a hub id is.
        raise UsageError(f"No such model directory `{text}`")
    if _HUB_ID.fullmatch(text):
        return cached_model_dir(text)
    names = ", ".join(sorted(p.name for p in BUNDLED_CONFIGS.iterdir() if p.is_dir()))
    raise UsageError(
        f"Expected a model directory, a hub id ORG/NAME in the local Hugging Face cache or a bundled "
        f"config ({names}), got `{model}`"
    )


def cached_model_dir(hub_id: str) -> Path:
    """Return the snapshot directory of ``ORG/NAME[@REVISION]`` in the local hub cache.

    Raises:
        UsageError: the model (or that revision) is not cached, or the ``hub`` extra is missing.
    """
    repo_id, _, revision = hub_id.partition("@")
    hub = require("mmoffload.families.hub", f"Finding `{hub_id}` in the local Hugging Face cache")
    snapshot: Path = hub.cached_snapshot(repo_id, revision or None)
    # A snapshot directory is named by its commit; reports name the model as given, not by its cache path.
    _HUB_SNAPSHOTS[snapshot] = f"{repo_id}@{snapshot.name[:12]}"
    return snapshot


def shown_model(model_dir: Path) -> str:
    """Name a resolved model directory as the user gave it: a bundled config's name, a hub id's
    ``ORG/NAME@COMMIT``, else the directory (never a path inside this package or the cache)."""
    if model_dir.parent == BUNDLED_CONFIGS:
        return model_dir.name
    return _HUB_SNAPSHOTS.get(model_dir, str(model_dir))


class Families:
    """The families of one run: a model directory configures its own family, defaults the rest."""

    def __init__(self, model_dir: str | os.PathLike[str] | None = None) -> None:
        self.model_dir = model_dir = Path(model_dir) if model_dir is not None else None
        self._loaded: dict[str, Family] = {}
        # Families asked for by the inputs (images, descriptors), for the report.
        self.used: set[str] = set()
        self.model_family: str | None = None
        if model_dir is not None:
            config = read_json(model_dir / "preprocessor_config.json")
            owners = [name for name, cls in FAMILIES.items() if cls.owns_model_dir(config)]
            if not owners:
                raise UsageError(
                    f"No known family owns model directory `{model_dir}` (known: {', '.join(FAMILIES)})"
                )
            self.model_family = owners[0]

    def get(self, name: str, where: Where | None = None) -> Family:
        """Return the configured family ``name``.

        Raises:
            BadInputError: no family of that name is registered.
        """
        family = self._load(name, where)
        # Only a known family is reported as used: an unknown name (any string in the data) is an error.
        self.used.add(name)
        return family

    def model(self) -> Family | None:
        """Return the model directory's family, if a model was given (not counted as used by data)."""
        return self._load(self.model_family) if self.model_family is not None else None

    def configs(self) -> dict[str, str]:
        """Return each family the inputs used, with the config it ran on: a model directory or defaults."""
        return {
            name: shown_model(self.model_dir)
            if name == self.model_family and self.model_dir
            else DEFAULT_CONFIG
            for name in sorted(self.used)
        }

    def warnings(self) -> list[str]:
        """Return why the given model went unused: its family is not the inputs' family."""
        if self.model_family is None or self.model_family in self.used or not self.used:
            return []
        return [
            f"Model `{self.model_dir}` is a `{self.model_family}` model, but the inputs' images are "
            f"{', '.join(f'`{name}`' for name in sorted(self.used))}: it was not used (their defaults were)"
        ]

    def _load(self, name: str, where: Where | None = None) -> Family:
        if name not in self._loaded:
            if name not in FAMILIES:
                raise BadInputError(f"Unknown family `{name}` (known: {', '.join(FAMILIES)})", where)
            model_dir = self.model_dir if name == self.model_family else None
            self._loaded[name] = FAMILIES[name](model_dir)
        return self._loaded[name]

"""Hub ids ``ORG/NAME[@REVISION]`` resolved in the local Hugging Face cache (the ``hub`` extra).

``huggingface_hub`` reads its own cache (``HF_HUB_CACHE``, ``HF_HOME``, the layout of
refs and snapshots); with ``local_files_only`` it never downloads, with or without
``HF_HUB_OFFLINE``. Imported through ``extras.require``, so that the light core
resolves paths and bundled configs without it.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

from mmoffload.errors import UsageError


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """Return the snapshot directory of ``repo_id`` at ``revision`` (default ``main``) in the local cache.

    Args:
        repo_id: ``ORG/NAME``.
        revision: a branch, a tag or a full commit hash, as ``huggingface_hub`` takes it.

    Raises:
        UsageError: the model, or that revision, is not cached (nothing is downloaded), or the
            id is not a valid hub id.
    """
    try:
        snapshot = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except LocalEntryNotFoundError:
        shown = f"{repo_id}@{revision}" if revision else repo_id
        raise UsageError(
            f"Model `{shown}` is not in the local Hugging Face cache `{cache_dir()}` and nothing is "
            f"downloaded: fetch it first (`hf download {repo_id}`) or pass its directory"
        ) from None
    except HFValidationError as exc:
        raise UsageError(f"Expected a hub id ORG/NAME, got `{repo_id}`: {exc}") from None
    return Path(snapshot)


def cache_dir() -> Path:
    """Return the hub cache ``huggingface_hub`` reads (set by ``HF_HUB_CACHE`` or ``HF_HOME`` at start-up)."""
    return Path(constants.HF_HUB_CACHE)

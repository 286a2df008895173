"""``--remap FROM=TO``: one asset store seen under different paths on different nodes.

Rollout workers may mount the store at ``/mnt/rollout/assets`` and the trainer
at ``/data/assets``, or a run may be copied elsewhere: the refs' absolute URIs
then name the wrong place (or, worse, silently the original run's files). A
``Remap`` rewrites URI prefixes before anything is read; refs also writes the
rewritten URIs, so the trainer reads what was checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import msgspec

from mmoffload.contract.addresses import file_uri, is_local_file_uri
from mmoffload.errors import UsageError


class Remap(msgspec.Struct, frozen=True):
    """URI prefix rewrites: the same store seen under different paths on different nodes.

    Each rule is ``(from, to)``, both URI prefixes (a plain path becomes its
    ``file://`` URI). A URI is rewritten by the longest ``from`` that is a whole
    prefix of it (ending at ``/`` or at the URI's end); others are kept.
    """

    rules: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, texts: Iterable[str]) -> Remap:
        """Parse ``FROM=TO`` rules (``--remap``).

        Raises:
            UsageError: a rule without ``=`` or with an empty side.
        """
        rules: list[tuple[str, str]] = []
        for text in texts:
            source, sep, target = text.partition("=")
            if not sep or not source or not target:
                raise UsageError(f"Expected --remap FROM=TO (URI or path prefixes), got `{text}`")
            rules.append((_as_uri_prefix(source), _as_uri_prefix(target)))
        rules.sort(key=lambda rule: len(rule[0]), reverse=True)
        return cls(tuple(rules))

    def __call__(self, uri: str) -> str:
        """Return ``uri`` with its longest matching prefix rewritten (unchanged when none matches)."""
        for source, target in self.rules:
            if uri.startswith(source) and (len(uri) == len(source) or uri[len(source)] == "/"):
                return target + uri[len(source) :]
        return uri


def _as_uri_prefix(text: str) -> str:
    prefix = text.rstrip("/") or "/"
    if "://" in prefix or is_local_file_uri(prefix):
        return prefix
    return file_uri(Path(prefix)).rstrip("/")

"""Each image of a rollout to its file, content hash, grid and placeholder length.

Inline ``data:`` images are stored by the offload stage's ``Offloader`` (same store,
same names) before rendering; then every source is a stored file, read where it is
with its name checked against its content. The grid comes from the image header,
through the family's layout: never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mmoffload.contract.addresses import asset_location, content_hash
from mmoffload.contract.descriptors import DESCRIPTOR_KIND
from mmoffload.contract.imageparts import describe_source, source_kind
from mmoffload.errors import BadInputError, Where
from mmoffload.families import Family, Grid
from mmoffload.store.images import open_image
from mmoffload.store.local import AssetStore
from mmoffload.store.read import AllowedRoots, read_verified

if TYPE_CHECKING:
    from mmoffload.store.objects import ObjectStore

# A stored file's name: the content hash (h32) and the extension.
_HASH_NAME = re.compile(r"[0-9a-f]{32}")
# Descriptor keys a family adds beside its payload (Kimi's vLLM modality name).
DESCRIPTOR_EXTRAS: dict[str, dict[str, Any]] = {"kimi_k25": {"vllm_modality": "vision_chunk"}}


@dataclass(frozen=True, slots=True)
class RenderedImage:
    """One image as the trace carries it: its file, its hash, its grid and placeholder length."""

    uri: str
    hash: str
    grid: Grid
    length: int

    def descriptor(self, family: Family) -> dict[str, Any]:
        """Return the image's strict raw descriptor (contract.md section 4)."""
        return {
            "kind": DESCRIPTOR_KIND,
            "modality": "image",
            "family": family.name,
            "raw_image_uri": self.uri,
            "payload": family.payload(self.grid),
            **DESCRIPTOR_EXTRAS.get(family.name, {}),
        }


class ImageReader:
    """Reads each image file once per run: its bytes (hash checked) and its header's size.

    A file named by its content hash (an offloaded image) is used where it is; any other
    file (a dataset's ``images`` column, say) is copied into the store when there is one,
    so every ref of the run points into the asset directory ``refs`` allows.
    """

    def __init__(
        self,
        family: Family,
        allowed_roots: AllowedRoots = None,
        store: AssetStore | ObjectStore | None = None,
    ) -> None:
        self.family = family
        self.allowed_roots = allowed_roots
        self.store = store
        self._seen: dict[str, RenderedImage] = {}
        self.files_read = 0
        self.files_adopted = 0

    def read(self, source: str, where: Where) -> RenderedImage:
        """Return the rendered image of a source (a stored file's URI).

        Raises:
            BadInputError: an inline or remote source (offload first), bytes that are no
                image, or an image the family cannot lay out.
            IntegrityError: a missing file, or one whose name is not its content hash.
        """
        known = self._seen.get(source)
        if known is not None:
            return known
        kind = source_kind(source)
        if kind == "data":
            raise BadInputError(
                "Expected offloaded images, got an inline `data:` URL: offload first "
                "(`mmoffload offload`) or pass --assets DIR to store it on the way",
                where,
            )
        if kind != "file":
            raise BadInputError(
                f"Expected a stored image (`file://`), got {describe_source(source)}: offload first", where
            )
        location = asset_location(source, where)
        name = location.rsplit("/", 1)[-1] if isinstance(location, str) else location.name
        stem = name.split(".", 1)[0]
        # A content-addressed name is checked against the content; any other file is hashed.
        expected = stem if _HASH_NAME.fullmatch(stem) else None
        data = read_verified(location, expected, where, allowed_roots=self.allowed_roots)
        self.files_read += 1
        with open_image(data, source, where) as image:
            width, height = image.size
        try:
            grid = self.family.layout(width, height)
        except BadInputError as exc:
            raise BadInputError(
                f"Family `{self.family.name}` cannot lay out image `{source[:120]}`: {exc.message}", where
            ) from exc
        uri, digest = source, expected or content_hash(data)
        if expected is None and self.store is not None:
            stored = self.store.put(data, where)
            uri, digest = stored.uri, stored.hash
            self.files_adopted += 1
        rendered = RenderedImage(uri, digest, grid, self.family.placeholder_length(grid))
        self._seen[source] = rendered
        return rendered

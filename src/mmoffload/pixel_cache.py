"""A bounded cache of prepared images, keyed by family configuration and content hash.

The same image reaches the trainer many times in one step: every sample of a
GRPO group, and the dummy micro batches that keep ranks in step. Its pixels
depend only on its bytes (named by the hash) and the family's processor
settings, so it is read, decoded and prepared once and reused (what a family
prepares: its resized uint8 patches, or a processor's float rows).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

PixelKey = tuple[str, str]

# Enough for several hundred 1280x720 Qwen images (2.7 MB of uint8 patches each on the own path).
DEFAULT_CACHE_BYTES = 2 << 30


class PixelCache:
    """Least-recently-used prepared images, bounded by the bytes of their arrays."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[PixelKey, dict[str, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: PixelKey) -> dict[str, np.ndarray] | None:
        """Return the cached arrays of ``key`` (marking them recently used), or None."""
        arrays = self._entries.get(key)
        if arrays is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return arrays

    def put(self, key: PixelKey, arrays: dict[str, np.ndarray]) -> None:
        """Cache ``arrays`` under ``key``, evicting the least recently used past the bound.

        An entry larger than the whole bound is not cached.
        """
        size = sum(array.nbytes for array in arrays.values())
        if size > self.max_bytes or key in self._entries:
            return
        # Cached arrays are shared between micro batches: freeze them against in-place edits.
        for array in arrays.values():
            array.flags.writeable = False
        self._entries[key] = arrays
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= sum(array.nbytes for array in evicted.values())

"""A bounded cache of prepared images, keyed by family configuration and content hash.

The same image reaches the trainer many times in one step: every sample of a
GRPO group, and the dummy micro batches that keep ranks in step. Its pixels
depend only on its bytes (named by the hash) and the family's processor
settings, so it is read, decoded and prepared once and reused (what a family
prepares: its resized uint8 patches, or a processor's float rows).

The inference server shares one cache between concurrent requests:
``get_or_make`` lets requests for the same key wait for one materialization
(single flight) instead of each making its own; a failure reaches every
waiter and is never cached.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future

import numpy as np

PixelKey = Hashable
Arrays = dict[str, np.ndarray]

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
        self._lock = threading.Lock()
        self._in_flight: dict[PixelKey, Future[Arrays]] = {}

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
        with self._lock:
            self._put(key, arrays)

    def get_or_make(self, key: PixelKey, make: Callable[[], Arrays]) -> tuple[Arrays, bool]:
        """Return the arrays of ``key``, making them once however many threads ask at the same time.

        Returns:
            The arrays, and True when this call (not the cache or another caller) made them.

        Raises:
            Exception: whatever ``make`` raised, in every caller waiting on it; nothing is cached.
        """
        with self._lock:
            arrays = self.get(key)
            if arrays is not None:
                return arrays, False
            waiting = self._in_flight.get(key)
            if waiting is None:
                future: Future[Arrays] = Future()
                self._in_flight[key] = future
        if waiting is not None:
            return waiting.result(), False
        try:
            arrays = make()
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            with self._lock:
                self._put(key, arrays)
            future.set_result(arrays)
            return arrays, True
        finally:
            with self._lock:
                del self._in_flight[key]

    def _put(self, key: PixelKey, arrays: Arrays) -> None:
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

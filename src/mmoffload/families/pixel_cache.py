"""A bounded cache of prepared images, keyed by family configuration and content hash.

The same image reaches the trainer many times in one step: every sample of a
GRPO group, and the dummy micro batches that keep ranks in step. Its pixels
depend only on its bytes (named by the hash) and the family's processor
settings, so it is read, decoded and prepared once and reused (what a family
prepares: its resized uint8 patches, or a processor's float rows).

The inference server shares one cache between concurrent requests:
``get_or_make`` lets requests for the same key wait for one materialization
(single flight) instead of each making its own. A failure is never cached and
answers only the caller whose ``make`` failed: the key names content, but a
failure belongs to the one file (or check) that caller sent, so each waiter
then makes its own (or waits for another caller's success).
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


class _Flight:
    """One materialization in flight: its result, and how many callers wait on it."""

    __slots__ = ("future", "waiters")

    def __init__(self) -> None:
        self.future: Future[Arrays] = Future()
        self.waiters = 0


class PixelCache:
    """Least-recently-used prepared images, bounded by the bytes of their arrays."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[PixelKey, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self._in_flight: dict[PixelKey, _Flight] = {}

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

        A caller finding ``key`` in flight waits for it; when that materialization
        fails, the caller does not take on the failure (another request's file or
        check) but tries again: it makes its own, or waits for another caller's.

        Returns:
            The arrays, and True when this call (not the cache or another caller) made them.

        Raises:
            Exception: whatever this caller's own ``make`` raised; nothing is cached.
        """
        while True:
            with self._lock:
                arrays = self.get(key)
                if arrays is not None:
                    return arrays, False
                flight = self._in_flight.get(key)
                if flight is None:
                    flight = self._in_flight[key] = _Flight()
                    break
                flight.waiters += 1
            try:
                return flight.future.result(), False
            except Exception:  # another caller's failure: try again with our own make
                continue
            finally:
                with self._lock:
                    flight.waiters -= 1
        try:
            arrays = make()
        except BaseException as exc:
            flight.future.set_exception(exc)
            raise
        else:
            with self._lock:
                self._put(key, arrays)
            flight.future.set_result(arrays)
            return arrays, True
        finally:
            with self._lock:
                del self._in_flight[key]

    def waiting(self, key: PixelKey) -> int:
        """Return how many callers wait on the materialization of ``key`` in flight (0 when none)."""
        with self._lock:
            flight = self._in_flight.get(key)
            return flight.waiters if flight is not None else 0

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

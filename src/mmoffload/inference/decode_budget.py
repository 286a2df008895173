"""A byte budget for the images being decoded at once (the server's memory bound beside its cache).

A 190 KB PNG can declare 8000 x 8000 pixels (under the pixel limit) and take
about 900 MB to decode and process; six of them at once took the server 3.1
GB past its resting size. The cache bounds what is kept, not what is being
made, so every decode first holds its estimated cost from this budget and
waits, in arrival order, while the images in flight would exceed it. An image
whose cost alone exceeds the budget runs when nothing else is in flight, so
the peak stays under the budget plus one image.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

# Peak resident bytes per declared pixel while one image is decoded to RGB and made into engine inputs
# by the model's processor (Qwen2-VL's Hugging Face processor: 14.0 measured on 4000^2 and 8000^2 PNGs,
# the decoded RGB image plus the processor's copies); rounded up.
DECODE_BYTES_PER_PIXEL = 16
# Room for two 8192 x 8192 images, or about a hundred 1280x720 screenshots, in flight.
DEFAULT_DECODE_BYTES = 2 << 30
# Holds at least this large give their freed memory back to the system when they end (about a 4 MP image).
TRIM_BYTES = 64 << 20


def decode_cost(width: int, height: int) -> int:
    """Return the bytes an image of this size is charged while it is decoded and processed."""
    return width * height * DECODE_BYTES_PER_PIXEL


class DecodeBudget:
    """Bytes of images in flight, at most ``max_bytes`` (one image over it runs alone); first come, first served.

    Attributes:
        in_flight: the bytes held now.
        peak: the most bytes held at once so far.
        waits: how many holds had to wait for room.
    """

    def __init__(self, max_bytes: int = DEFAULT_DECODE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.in_flight = 0
        self.peak = 0
        self.waits = 0
        self._queue: collections.deque[object] = collections.deque()
        self._changed = threading.Condition()

    @property
    def queued(self) -> int:
        """How many holds are waiting for room now."""
        with self._changed:
            return len(self._queue)

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` of the budget for the block, waiting (in arrival order) until they fit."""
        ticket = object()
        with self._changed:
            self._queue.append(ticket)
            waited = False
            # In arrival order, so a large image is not passed over forever by small ones.
            while self._queue[0] is not ticket or (
                self.in_flight and self.in_flight + nbytes > self.max_bytes
            ):
                waited = True
                self._changed.wait()
            self._queue.popleft()
            self.in_flight += nbytes
            self.peak = max(self.peak, self.in_flight)
            self.waits += waited
            self._changed.notify_all()  # the next in line may fit too
        try:
            yield
        finally:
            if nbytes >= TRIM_BYTES:
                return_freed_memory()
            with self._changed:
                self.in_flight -= nbytes
                self._changed.notify_all()


def return_freed_memory() -> None:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    glibc keeps what a thread freed in that thread's own arena; a large decode on
    each worker thread in turn would otherwise keep one image's memory per thread
    (measured: 2.75 GB resident for six 8000 x 8000 decodes made one at a time).
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes  # here, not at import: the commands that decode nothing skip loading it
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None

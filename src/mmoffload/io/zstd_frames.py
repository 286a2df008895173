"""Whole zstd frames only: a stream cut inside a frame is an error, never a shorter input.

zstandard's stream reader stops quietly at the end of the data; following the frame headers
beside it tells a whole last frame from one cut short."""

from __future__ import annotations

import io
from typing import Any, BinaryIO

# Zstandard frames (RFC 8878 section 3.1): a magic number, a header, blocks each with a 3-byte header
# (last-block flag, type, size), an optional 4-byte checksum; or a skippable frame (magic, size, bytes).
_ZSTD_FRAME_MAGIC = 0xFD2FB528


_SKIPPABLE_MAGIC, _SKIPPABLE_MASK = 0x184D2A50, 0xFFFFFFF0


_DICTIONARY_ID_BYTES = (0, 1, 2, 4)


_CONTENT_SIZE_BYTES = (0, 2, 4, 8)


_RLE_BLOCK, _RESERVED_BLOCK = 1, 3


class ZstdFrames:
    """A zstd source that follows the frame layout of the bytes it passes on, to tell a cut-short end.

    Only headers are parsed (block contents are counted past, not decoded), so this costs
    next to nothing beside decompression. Content that is no zstd frame raises ``EOFError``.
    """

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self._field = bytearray()  # The header field being gathered.
        self._want = 4  # Its size.
        self._state = "magic"
        self._skip = 0  # Bytes of block content, checksum or skippable frame still to pass.
        self._after_skip = "magic"
        self._checksum = False
        self.cut_short = False  # The source ended inside a frame.

    def read(self, size: int = -1) -> bytes:
        """Read up to ``size`` compressed bytes from the source, following the frames they hold."""
        data = self._source.read(size)
        if data:
            self._follow(memoryview(data))
        else:
            self.cut_short = not self.at_frame_boundary
        return data

    @property
    def at_frame_boundary(self) -> bool:
        """Whether the bytes so far end between two frames (or before the first)."""
        return self._state == "magic" and not self._field and not self._skip

    def _follow(self, data: memoryview) -> None:
        at = 0
        while at < len(data):
            if self._skip:
                taken = min(self._skip, len(data) - at)
                self._skip -= taken
                at += taken
                if not self._skip:
                    self._state = self._after_skip
                continue
            taken = min(self._want - len(self._field), len(data) - at)
            self._field += data[at : at + taken]
            at += taken
            if len(self._field) == self._want:
                field = int.from_bytes(self._field, "little")
                self._field.clear()
                self._on_field(field)

    def _on_field(self, value: int) -> None:
        """Move to the next state after a whole header field ``value`` (little-endian)."""
        if self._state == "magic":
            if value == _ZSTD_FRAME_MAGIC:
                self._state, self._want = "descriptor", 1
            elif value & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
                self._state, self._want = "skippable size", 4
            else:
                raise EOFError("Expected a zstd frame, found other bytes")
        elif self._state == "skippable size":
            self._pass(value, then="magic")
        elif self._state == "descriptor":
            single_segment = value >> 5 & 1
            self._checksum = bool(value >> 2 & 1)
            content_size = _CONTENT_SIZE_BYTES[value >> 6] or single_segment
            rest = (1 - single_segment) + _DICTIONARY_ID_BYTES[value & 3] + content_size
            self._state, self._want = ("header", rest) if rest else ("block", 3)
        elif self._state == "header":
            self._state, self._want = "block", 3
        else:  # A block header.
            last, kind, size = value & 1, value >> 1 & 3, value >> 3
            if kind == _RESERVED_BLOCK:
                raise EOFError("Expected a zstd block, found a reserved block type (corrupt)")
            then = ("checksum" if self._checksum else "magic") if last else "block"
            self._pass(1 if kind == _RLE_BLOCK else size, then=then)

    def _pass(self, count: int, then: str) -> None:
        """Count ``count`` bytes past, then go to state ``then``."""
        if then == "checksum":
            # The checksum is counted past too: 4 bytes after the last block's content.
            count, then = count + 4, "magic"
        self._want = 4 if then == "magic" else 3
        self._skip, self._after_skip, self._state = count, then, then if not count else "skip"


class WholeFramesReader(io.RawIOBase):
    """Decompressed zstd bytes whose end is an error when the input ended inside a frame.

    The error comes where the decompressed bytes run out, so every whole line before the cut
    is read first and the cut line never is.
    """

    def __init__(self, reader: Any, frames: ZstdFrames) -> None:
        super().__init__()
        self._reader = reader
        self._frames = frames

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self._reader.readinto(buffer)
        if not count and self._frames.cut_short:
            raise EOFError("Compressed input ended in the middle of a zstd frame (cut short)")
        return count


def zstandard_module() -> Any:
    """Import zstandard only for zstd content: most runs never need it."""
    import zstandard

    return zstandard

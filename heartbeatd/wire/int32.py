"""The default framing: a 4-byte big-endian length, then the body (Twisted's Int32StringReceiver).

Modelled on ``IntNStringReceiver``: the length limit is checked *before* a body is buffered,
one buffer and one offset are kept, and every complete frame of a read is cut in one pass.
"""

from __future__ import annotations

import struct
from typing import Final

from heartbeatd.wire.framing import FrameTooLarge, FramingError, Item

__all__ = ["Int32Decoder", "Int32Framing"]

_UINT32 = struct.Struct("!I")


class Int32Decoder:
    """Decoder for a 4-byte big-endian unsigned length followed by the body."""

    __slots__ = ("_buffer", "_needed", "buffered", "error", "max_frame_bytes")

    prefix_length: Final = 4

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.error: FramingError | None = None
        # Allocated when a read ends inside a frame (an empty bytearray costs 56 bytes, and
        # most connections' reads end on a frame boundary).
        self._buffer: bytearray | None = None
        # Total bytes the buffered frame needs; lets a large body arrive in many reads without
        # re-parsing its header each time.
        self._needed = 0
        #: Bytes held for an unfinished frame (a plain attribute: read after every feed).
        self.buffered = 0

    def feed(self, data: bytes) -> list[Item]:
        if self.error is not None:
            return []
        buffer = self._buffer
        if buffer:
            buffer += data
            if len(buffer) < self._needed:
                self.buffered = len(buffer)
                return []
            with memoryview(buffer) as view:
                frames, offset = self._parse(view, len(buffer))
            del buffer[:offset]
            self.buffered = len(buffer)
        else:
            frames, offset = self._parse(data, len(data))
            if offset < len(data):
                if buffer is None:
                    buffer = self._buffer = bytearray()
                buffer += memoryview(data)[offset:]
                self.buffered = len(buffer)
        if self.error is not None:
            self._buffer = None
            self.buffered = 0
        return frames

    def _parse(self, view: bytes | memoryview, end: int) -> tuple[list[Item], int]:
        """Cut every complete frame out of ``view``; return them and the bytes consumed."""
        frames: list[Item] = []
        offset = 0
        limit = self.max_frame_bytes
        unpack = _UINT32.unpack_from
        # Slicing bytes already copies; only a memoryview's slice needs bytes() (W2: one call
        # less per frame).
        copy = type(view) is not bytes
        while end - offset >= 4:
            (length,) = unpack(view, offset)
            if length > limit:
                self.error = FrameTooLarge(length, limit)
                return frames, end
            stop = offset + 4 + length
            if stop > end:
                self._needed = stop - offset
                return frames, offset
            body = view[offset + 4 : stop]
            frames.append(bytes(body) if copy else body)  # type: ignore[arg-type]
            offset = stop
        self._needed = 4
        return frames, offset


class Int32Framing:
    """The default framing: Twisted's ``Int32StringReceiver`` wire format."""

    name: Final = "int32"
    heartbeat_token: Final = None
    wraps_bare_values: Final = False

    #: ``header(length)``: the struct's own bound method, as it is on the hot path.
    header: Final = staticmethod(_UINT32.pack)

    @staticmethod
    def encode(body: bytes) -> bytes:
        return _UINT32.pack(len(body)) + body

    @staticmethod
    def decoder(max_frame_bytes: int) -> Int32Decoder:
        return Int32Decoder(max_frame_bytes)

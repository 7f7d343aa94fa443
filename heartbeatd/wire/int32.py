"""The default framing: a 4-byte big-endian length, then the body (Twisted's Int32StringReceiver).

Modelled on ``IntNStringReceiver``: the length limit is checked *before* a body is buffered,
one buffer and one offset are kept, and every complete frame of a read is cut in one pass.
"""

from __future__ import annotations

import struct
from typing import Final

from heartbeatd.wire._accelerated import speedups
from heartbeatd.wire.framing import FrameTooLarge, FramingError, Item

__all__ = ["Int32Decoder", "Int32Framing", "PyInt32Decoder"]

_UINT32 = struct.Struct("!I")
_unpack_head = _UINT32.unpack_from


#: Bodies at least this long are gathered as a list of reads and joined once, instead of
#: being appended to the buffer and then copied out of it (W3: one 256 KiB copy less).
LARGE_BODY: Final = 64 * 1024
#: Reads shorter than this are copied into one bytearray rather than kept as objects.
_SHORT_READ: Final = 16 * 1024


class PyInt32Decoder:
    """Decoder for a 4-byte big-endian unsigned length followed by the body.

    The reference: ``heartbeatd.wire._speedups.Int32Decoder`` (C) must behave exactly alike
    (tests/test_speedups.py), and `Int32Decoder` is that one when it is built.
    """

    __slots__ = (
        "_buffer",
        "_chunks",
        "_have",
        "_needed",
        "buffered",
        "error",
        "large_body",
        "max_frame_bytes",
    )

    prefix_length: Final = 4

    def __init__(self, max_frame_bytes: int, large_body: int = LARGE_BODY) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.large_body = large_body
        self.error: FramingError | None = None
        # Allocated when a read ends inside a frame (an empty bytearray costs 56 bytes, and
        # most connections' reads end on a frame boundary).
        self._buffer: bytearray | None = None
        # Total bytes the buffered frame needs; lets a large body arrive in many reads without
        # re-parsing its header each time.
        self._needed = 0
        # A large body's reads so far (views of immutable bytes, never of the buffer), and
        # their length; `_needed` is then the body's length.
        self._chunks: list[bytes | bytearray | memoryview] | None = None
        self._have = 0
        #: Bytes held for an unfinished frame (a plain attribute: read after every feed).
        self.buffered = 0

    def feed(self, data: bytes) -> list[Item]:
        if self.error is not None:
            return []
        if self._chunks is not None:
            return self._feed_large(data)
        buffer = self._buffer
        if buffer:
            buffer += data
            if len(buffer) < self._needed:
                self.buffered = len(buffer)
                return []
            with memoryview(buffer) as view:
                frames, offset = self._parse(view, len(buffer))
            tail = len(buffer) - offset
            if tail >= 4 and self._needed - 4 >= self.large_body:
                self._chunks = [bytes(buffer[offset + 4 :])]  # a copy: the buffer is reused
                self._have = tail - 4
                self._needed -= 4
                buffer.clear()
            else:
                del buffer[:offset]
            self.buffered = tail
        else:
            size = len(data)
            if size >= 4:
                # The commonest read (one request, one reply): exactly one whole frame.
                (length,) = _unpack_head(data)
                if length + 4 == size and length <= self.max_frame_bytes:
                    self._needed = 4
                    return [data[4:]]
            frames, offset = self._parse(data, size)
            tail = size - offset
            if tail:
                if tail >= 4 and self._needed - 4 >= self.large_body:
                    self._chunks = [memoryview(data)[offset + 4 :]]
                    self._have = tail - 4
                    self._needed -= 4
                else:
                    if buffer is None:
                        buffer = self._buffer = bytearray()
                    buffer += memoryview(data)[offset:]
                self.buffered = tail
        if self.error is not None:
            self._buffer = None
            self.buffered = 0
        return frames

    def _feed_large(self, data: bytes) -> list[Item]:
        """One more read of a large body: join the reads once the body is complete.

        Short reads are appended to a bytearray at the end of the list rather than kept
        each as an object, so a peer that trickles its body costs no more than its bytes.
        """
        chunks = self._chunks
        assert chunks is not None
        need = self._needed - self._have
        part: bytes | memoryview = data if len(data) <= need else memoryview(data)[:need]
        if len(part) < _SHORT_READ:
            last = chunks[-1]
            if type(last) is bytearray:
                last += part
            else:
                chunks.append(bytearray(part))
        else:
            chunks.append(part)
        self._have += len(part)
        if self._have < self._needed:
            self.buffered = self._have + 4
            return []
        body = b"".join(chunks)
        self._chunks = None
        self._have = 0
        self._needed = 4
        self.buffered = 0
        return [body, *self.feed(data[need:])] if len(data) > need else [body]

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


#: The decoder in use: the C one when built (and not ``HEARTBEATD_NO_EXTENSIONS``), else
#: `PyInt32Decoder`.
Int32Decoder: type[PyInt32Decoder] = (
    speedups.Int32Decoder if speedups is not None else PyInt32Decoder
)


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
    def decoder(max_frame_bytes: int) -> PyInt32Decoder:
        return Int32Decoder(max_frame_bytes)

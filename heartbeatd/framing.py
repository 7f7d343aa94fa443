"""Framing codecs: turn a byte stream into frame bodies and back (sans-IO, no Twisted).

A framing knows only where one message ends and the next begins; what a body means is the
envelope's business (`heartbeatd.envelope`).  Server, client and pool share these codecs, and
because they never touch a socket they can be fuzzed byte by byte.

The model is Twisted's ``IntNStringReceiver``: the length limit is checked *before* a body is
buffered, one buffer and one offset are kept, and every complete frame of a read is parsed in a
single pass.
"""

from __future__ import annotations

import struct
from typing import Final, Protocol

__all__ = [
    "HEARTBEAT",
    "FrameDecoder",
    "FrameTooLarge",
    "Framing",
    "FramingError",
    "Heartbeat",
    "Int32Decoder",
    "Int32Framing",
]


class FramingError(Exception):
    """The byte stream cannot be framed any more; the connection must close."""

    code = "bad_frame"


class FrameTooLarge(FramingError):
    """A header announced a body longer than the receiver accepts."""

    code = "frame_too_large"

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame of {length} bytes exceeds the limit of {limit} bytes")
        self.length = length
        self.limit = limit


class Heartbeat:
    """The type of `HEARTBEAT`: a bare heartbeat token that carries no body.

    Only framings with an out-of-band token (the seed's ``HeartBeat``) produce it.
    """

    __slots__ = ()
    _instance: Heartbeat | None = None

    def __new__(cls) -> Heartbeat:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "HEARTBEAT"


HEARTBEAT: Final = Heartbeat()

Item = bytes | Heartbeat


class FrameDecoder(Protocol):
    """Stateful decoder fed with whatever the transport read.

    `feed` returns the items completed by this chunk, in order.  When the stream turns invalid,
    the items completed before the fault are still returned, `error` is set, and every later
    `feed` returns nothing: the caller processes what it got, then reports `error` and closes.
    """

    error: FramingError | None

    def feed(self, data: bytes) -> list[Item]: ...

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a frame."""
        ...


class Framing(Protocol):
    """A wire framing: how bodies are delimited and how a bare heartbeat is written."""

    name: str
    #: Bytes of an out-of-band heartbeat, or None when heartbeats are ping envelopes.
    heartbeat_token: bytes | None
    #: True when bodies that are not envelopes are delivered as bare values (seed framing).
    wraps_bare_values: bool

    def encode(self, body: bytes) -> bytes: ...

    def decoder(self, max_frame_bytes: int) -> FrameDecoder: ...


_UINT32 = struct.Struct("!I")


class Int32Decoder:
    """Decoder for a 4-byte big-endian unsigned length followed by the body."""

    __slots__ = ("_buffer", "_needed", "error", "max_frame_bytes")

    prefix_length: Final = 4

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.error: FramingError | None = None
        self._buffer = bytearray()
        # Total bytes the buffered frame needs; lets a large body arrive in many reads without
        # re-parsing its header each time.
        self._needed = 0

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Item]:
        if self.error is not None:
            return []
        buffer = self._buffer
        if buffer:
            buffer += data
            if len(buffer) < self._needed:
                return []
            with memoryview(buffer) as view:
                frames, offset = self._parse(view, len(buffer))
            del buffer[:offset]
        else:
            frames, offset = self._parse(data, len(data))
            if offset < len(data):
                buffer += memoryview(data)[offset:]
        if self.error is not None:
            buffer.clear()
        return frames

    def _parse(self, view: bytes | memoryview, end: int) -> tuple[list[Item], int]:
        """Cut every complete frame out of ``view``; return them and the bytes consumed."""
        frames: list[Item] = []
        offset = 0
        limit = self.max_frame_bytes
        unpack = _UINT32.unpack_from
        while end - offset >= 4:
            (length,) = unpack(view, offset)
            if length > limit:
                self.error = FrameTooLarge(length, limit)
                return frames, end
            stop = offset + 4 + length
            if stop > end:
                self._needed = stop - offset
                return frames, offset
            frames.append(bytes(view[offset + 4 : stop]))
            offset = stop
        self._needed = 4
        return frames, offset


class Int32Framing:
    """The default framing: Twisted's ``Int32StringReceiver`` wire format."""

    name: Final = "int32"
    heartbeat_token: Final = None
    wraps_bare_values: Final = False

    @staticmethod
    def encode(body: bytes) -> bytes:
        return _UINT32.pack(len(body)) + body

    @staticmethod
    def decoder(max_frame_bytes: int) -> Int32Decoder:
        return Int32Decoder(max_frame_bytes)

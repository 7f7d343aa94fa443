"""The frames a WebSocket server writes: one text message per envelope, and close frames.

Reading a client's frames (masking, fragmentation, UTF-8, control frames) is wsproto's job in
the WebSocket adapter (`heartbeatd.websocket`); writing needs none of that, since a server's
frames are unmasked: a data message is a 2-10 byte header and the body.  These framings have
the `Framing` interface's writing half (``name``, ``header``, ``encode``), so the connection
core frames its replies, pushes and shared frames for WebSocket as it does for int32.

`DeflateFraming` compresses each message on its own (the server announces
``server_no_context_takeover``), so one framing, and one compressed broadcast, serves every
connection, and no connection keeps a compressor (~256 KB each in zlib).
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

__all__ = [
    "CLOSE_CODES",
    "DeflateFraming",
    "WebSocketFraming",
    "close_frame",
    "text_header",
]

_SHORT: Final = [bytes((0x81, n)) for n in range(126)]
_MEDIUM: Final = struct.Struct("!BBH")
_LONG: Final = struct.Struct("!BBQ")

#: RFC 6455 close codes, by the reason the connection closes (docs/websocket.md).
CLOSE_CODES: Final = {
    "normal": 1000,
    "shutdown": 1001,
    "protocol_error": 1002,
    "binary_message": 1003,
    "invalid_utf8": 1007,
    "policy": 1008,
    "frame_too_large": 1009,
    "internal_error": 1011,
    "overloaded": 1013,
}


def text_header(length: int, first: int = 0x81) -> bytes:
    """The header of an unmasked, final text frame of ``length`` bytes."""
    if length < 126 and first == 0x81:
        return _SHORT[length]
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return _MEDIUM.pack(first, 126, length)
    return _LONG.pack(first, 127, length)


def close_frame(code: int, reason: str = "") -> bytes:
    """An unmasked close frame (the reason is cut to the 123 bytes a control frame allows)."""
    text = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return bytes((0x88, 2 + len(text))) + struct.pack("!H", code) + text


class WebSocketFraming:
    """Text messages, uncompressed."""

    name: Final = "websocket"
    heartbeat_token: Final = None
    wraps_bare_values: Final = False
    header = staticmethod(text_header)

    @staticmethod
    def encode(body: bytes) -> bytes:
        return text_header(len(body)) + body


class DeflateFraming(WebSocketFraming):
    """Text messages compressed by permessage-deflate (RFC 7692) from ``threshold`` bytes on.

    `header` stays the uncompressed one: a message sent uncompressed is valid on a connection
    that negotiated compression, which lets the hot path frame its small replies as usual.
    """

    def __init__(self, window_bits: int = 15, threshold: int = 256, level: int = 6) -> None:
        self.window_bits = window_bits
        self.threshold = threshold
        self.level = level

    def encode(self, body: bytes) -> bytes:  # type: ignore[override]
        if len(body) < self.threshold:
            return text_header(len(body)) + body
        compressor = zlib.compressobj(self.level, zlib.DEFLATED, -self.window_bits)
        data = compressor.compress(body) + compressor.flush(zlib.Z_SYNC_FLUSH)
        data = data[:-4]  # the 00 00 ff ff tail, which the receiver adds back (RFC 7692 7.2.1)
        return text_header(len(data), 0xC1) + data

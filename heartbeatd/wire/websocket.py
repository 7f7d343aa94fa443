"""WebSocket frames, sans-IO: what a server writes, and the common case of what it reads.

Writing needs little: a server's frames are unmasked, so a data message is a 2-10 byte header
and the body, and a close frame a code and a reason.

Reading a client's frames in full (fragmentation, control frames, extensions, every fault and
its close code) is wsproto's job in the WebSocket adapter (`heartbeatd.websocket`).  Nearly
every frame a client sends is one whole text message, though, and wsproto spends ~18 us on
each; `read_text_frames` takes such frames off the front of a read at C speed and stops at
the first frame that is anything else, which the adapter hands to wsproto from there (the
fast and general paths of the TCP listener, applied to framing).  These framings have
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
    "read_text_frames",
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
    "bad_deflate": 1007,
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

    `header` is the uncompressed one (a message sent uncompressed is valid on a connection
    that negotiated compression); a connection that uses this framing answers on the general
    path, which frames with `encode`.
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


def read_text_frames(data: bytes, limit: int) -> tuple[list[bytes], int]:
    """The simple frames at the start of a client's ``data``, and where the rest begins.

    A simple frame is a whole text message: final, masked, no reserved bit, a length in its
    shortest form and at most ``limit``, complete in ``data``, valid UTF-8.  Their bodies
    come back unmasked.  The scan stops at the first frame that is not simple (or not
    complete): from that offset on, the full parser must read, since only it knows what the
    frame means or which close code it earns.
    """
    bodies: list[bytes] = []
    offset = 0
    end = len(data)
    while end - offset >= 6 and data[offset] == 0x81:
        length = data[offset + 1] - 0x80  # the mask bit must be set
        start = offset + 2
        if length == 126:
            if end - start < 2:
                break
            length = (data[start] << 8) | data[start + 1]
            if length < 126:
                break  # not the shortest form: a protocol error
            start += 2
        elif length < 0 or length > 126:
            break  # unmasked, or a 64-bit length
        stop = start + 4 + length
        if length > limit or stop > end:
            break
        body = data[start + 4 : stop]
        if length:
            key = data[start : start + 4] * ((length >> 2) + 1)
            body = (
                int.from_bytes(body, "little") ^ int.from_bytes(key[:length], "little")
            ).to_bytes(length, "little")
            if not body.isascii():
                try:
                    body.decode("utf-8")
                except UnicodeDecodeError:
                    break  # the full parser answers 1007
        bodies.append(body)
        offset = stop
    return bodies, offset

"""The seed tutorial's ASCII framing: `length:` + 13 zero-padded digits + body; bare `HeartBeat`.

Sans-IO like `heartbeatd.wire.int32`.  The tutorial's own parser treated each read as one
message, which breaks as soon as TCP splits or coalesces writes; this decoder parses the byte
stream, so a token or header may arrive split across reads, and several frames and tokens may
arrive in one.  At a frame boundary only two things are valid: the 20-byte header or the
9-byte token.  Anything else is a `FramingError` (``bad_frame``), detected on the first byte
that cannot belong to either, so garbage never waits in the buffer.
"""

from __future__ import annotations

from typing import Final

from heartbeatd.wire.framing import HEARTBEAT, FrameTooLarge, FramingError, Item

__all__ = ["HEADER_LENGTH", "TOKEN", "SeedDecoder", "SeedFraming"]

PREFIX: Final = b"length:"
DIGITS: Final = 13
HEADER_LENGTH: Final = len(PREFIX) + DIGITS  # 20
TOKEN: Final = b"HeartBeat"
_DIGIT_BYTES: Final = frozenset(b"0123456789")


class SeedDecoder:
    """Stateful decoder for `SeedFraming`; same contract as `Int32Decoder`."""

    __slots__ = ("_buffer", "buffered", "error", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.error: FramingError | None = None
        self._buffer = bytearray()
        #: Bytes held for an unfinished frame or token.
        self.buffered = 0

    def feed(self, data: bytes) -> list[Item]:
        if self.error is not None:
            return []
        buffer = self._buffer
        buffer += data
        items: list[Item] = []
        offset = 0
        end = len(buffer)
        while offset < end:
            first = buffer[offset]
            if first == TOKEN[0]:
                stop = offset + len(TOKEN)
                available = buffer[offset : min(stop, end)]
                if not TOKEN.startswith(available):
                    self._fail(bytes(available))
                    break
                if stop > end:
                    break  # a token split across reads
                items.append(HEARTBEAT)
                offset = stop
            elif first == PREFIX[0]:
                header = buffer[offset : min(offset + HEADER_LENGTH, end)]
                if not self._header_so_far_valid(header):
                    self._fail(bytes(header))
                    break
                if len(header) < HEADER_LENGTH:
                    break  # a header split across reads
                length = int(header[len(PREFIX) :])
                if length > self.max_frame_bytes:
                    self.error = FrameTooLarge(length, self.max_frame_bytes)
                    break
                stop = offset + HEADER_LENGTH + length
                if stop > end:
                    break  # the body is still arriving
                items.append(bytes(buffer[offset + HEADER_LENGTH : stop]))
                offset = stop
            else:
                self._fail(bytes(buffer[offset : offset + 20]))
                break
        if self.error is not None:
            buffer.clear()
        else:
            del buffer[:offset]
        self.buffered = len(buffer)
        return items

    @staticmethod
    def _header_so_far_valid(header: bytearray) -> bool:
        prefix = header[: len(PREFIX)]
        if not PREFIX.startswith(prefix):
            return False
        return all(b in _DIGIT_BYTES for b in header[len(PREFIX) :])

    def _fail(self, seen: bytes) -> None:
        self.error = FramingError(
            f"expected a 'length:' header or the 'HeartBeat' token at a frame boundary, "
            f"got {seen!r}"
        )


class SeedFraming:
    """``framing: seed``: wire-compatible with the seed tutorial's Node.js peers."""

    name: Final = "seed"
    heartbeat_token: Final = TOKEN
    #: Bodies that are not envelopes are delivered to handlers under this type.
    wraps_bare_values: Final = True

    @staticmethod
    def header(length: int) -> bytes:
        return b"%s%013d" % (PREFIX, length)

    @staticmethod
    def encode(body: bytes) -> bytes:
        return b"%s%013d%s" % (PREFIX, len(body), body)

    @staticmethod
    def decoder(max_frame_bytes: int) -> SeedDecoder:
        return SeedDecoder(max_frame_bytes)

"""A minimal blocking WebSocket client for tests: real sockets, masked frames, nothing hidden.

`WSClient` has `RawClient`'s interface (``send(obj)``, ``recv()`` -> the next envelope or None
at the end), so one behaviour suite runs over TCP and WebSocket; its lower level
(`send_frame`, `recv_frame`) lets the hostile-peer tests write any frame, including invalid
ones.  The handshake is written by hand too, so a test can send a broken or partial one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import zlib
from typing import Any

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0


def handshake_request(
    path: str = "/", headers: dict[str, str] | None = None, key: bytes = b"heartbeatd-tests!"
) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(key[:16]).decode()}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def header(opcode: int, n: int, *, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    """A frame header announcing ``n`` bytes (without the masking key)."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    bit = 0x80 if mask else 0
    if n < 126:
        return struct.pack("!BB", first, bit | n)
    if n < 65536:
        return struct.pack("!BBH", first, bit | 126, n)
    return struct.pack("!BBQ", first, bit | 127, n)


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0
) -> bytes:
    """One client frame (masked unless ``mask=False``); ``rsv``: the RSV bits (0-7)."""
    head = header(opcode, len(payload), fin=fin, mask=mask, rsv=rsv)
    if not mask:
        return head + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


class WSClient:
    """A WebSocket connection to the daemon, with `RawClient`'s envelope interface."""

    #: `recv` passes over the server's heartbeat pings (without answering them).
    skip_pings = False

    def __init__(
        self,
        port: int,
        *,
        timeout: float = 10,
        path: str = "/",
        headers: dict[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
        handshake: bool = True,
        sock: socket.socket | None = None,
    ) -> None:
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = tls.wrap_socket(sock, server_hostname="localhost") if tls else sock
        self._buffer = b""
        self.status = 0
        self.response_head = b""
        #: (code, reason) of the server's close frame, once one arrived.
        self.close_code: tuple[int, str] | None = None
        if handshake:
            self.upgrade(path, headers)

    def __enter__(self) -> WSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def upgrade(self, path: str = "/", headers: dict[str, str] | None = None) -> int:
        """Send the handshake and read the answer's head; returns the HTTP status."""
        key = os.urandom(16)
        self.sock.sendall(handshake_request(path, headers, key))
        while b"\r\n\r\n" not in self._buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            self._buffer += chunk
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        self.response_head = head
        self.status = int(head.split(b" ", 2)[1]) if head else 0
        if self.status == 101:
            accept = base64.b64encode(hashlib.sha1(base64.b64encode(key) + GUID).digest())
            assert b"Sec-WebSocket-Accept: " + accept in head, head
        return self.status

    def read_rest(self) -> bytes:
        """What the server sends until it closes (a refused handshake's body)."""
        data = self._buffer
        while chunk := self._recv_raw():
            data += chunk
        return data

    def _recv_raw(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return b""

    def _exactly(self, n: int) -> bytes | None:
        while len(self._buffer) < n:
            chunk = self._recv_raw()
            if not chunk:
                return None
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def send_frame(self, opcode: int, payload: bytes, **options: Any) -> None:
        self.sock.sendall(frame(opcode, payload, **options))

    def recv_frame(self) -> tuple[int, bytes, int] | None:
        """The next frame from the server as (opcode, payload, first byte), or None at the end."""
        head = self._exactly(2)
        if head is None:
            return None
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._exactly(2) or b"\0\0")[0]
        elif n == 127:
            n = struct.unpack("!Q", self._exactly(8) or b"\0" * 8)[0]
        assert not head[1] & 0x80, "a server's frames are unmasked"
        payload = self._exactly(n)
        if payload is None:
            return None
        return head[0] & 0x0F, payload, head[0]

    def send(self, obj: Any) -> None:
        self.send_frame(TEXT, json.dumps(obj).encode())

    def recv(self) -> Any:
        """The next envelope (pings from a WebSocket peer answered on the way), or None at the
        end; a close frame from the server is recorded in `close_code` and ends it too."""
        while True:
            got = self.recv_frame()
            if got is None:
                return None
            opcode, payload, first = got
            if opcode == TEXT:
                if first & 0x40:  # permessage-deflate; the server takes no context over
                    payload = zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
                message = json.loads(payload)
                if self.skip_pings and message.get("type") == "ping":
                    continue
                return message
            if opcode == CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.close_code = (code, payload[2:].decode("utf-8", "replace"))
                return None
            if opcode == PING:
                self.send_frame(PONG, payload)

    def wait_closed(self) -> tuple[int, str] | None:
        """Read until the server ends the connection; its close frame's (code, reason)."""
        while self.recv_frame_or_close():
            pass
        return self.close_code

    def recv_frame_or_close(self) -> bool:
        got = self.recv_frame()
        if got is None:
            return False
        opcode, payload, _ = got
        if opcode == CLOSE:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            self.close_code = (code, payload[2:].decode("utf-8", "replace"))
        return True

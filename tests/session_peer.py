"""A minimal resumable-session client speaking raw int32 frames, for the server's tests.

Not the client library (heartbeatd.client is another's job): it does exactly what a test tells
it, so tests can also misbehave (skip acks, send gaps, freeze).  It keeps every message it
read in ``inbox`` so none is skipped unseen, and remembers the last server seq it received.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Callable
from typing import Any


class SessionPeer:
    def __init__(
        self, port: int, timeout: float = 10, pump: Callable[[], None] | None = None
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        #: With an in-process server: runs one reactor iteration while this peer waits.
        self.pump = pump
        self.timeout = timeout
        if pump is not None:
            self.sock.setblocking(False)
        self.inbox: list[dict[str, Any]] = []
        self.hello = self.recv()
        assert self.hello is not None and self.hello["type"] == "hello", self.hello
        self.seq = 0  # the last client seq sent
        self.last = 0  # the last server seq received
        self.sid = ""
        self.key = ""
        self._id = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SessionPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- frames ------------------------------------------------------------------------------

    def send(self, obj: Any) -> None:
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        data = struct.pack("!I", len(body)) + body
        if self.pump is None:
            self.sock.sendall(data)
            return
        while data:  # non-blocking: let the server read while the kernel buffer is full
            try:
                data = data[self.sock.send(data) :]
            except BlockingIOError:
                self.pump()

    def _exactly(self, n: int) -> bytes | None:
        chunks = []
        deadline = time.monotonic() + self.timeout
        while n:
            try:
                chunk = self.sock.recv(n)
            except BlockingIOError:
                assert self.pump is not None
                if time.monotonic() > deadline:
                    raise TimeoutError("nothing arrived in time") from None
                self.pump()
                continue
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not chunk:
                return None
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def recv(self) -> dict[str, Any] | None:
        """The next message (heartbeat pings answered and skipped), None at end of stream."""
        while True:
            header = self._exactly(4)
            if header is None:
                return None
            body = self._exactly(struct.unpack("!I", header)[0])
            if body is None:
                return None
            message = json.loads(body)
            if message.get("type") == "ping" and "seq" not in message:
                self.send({"type": "pong", "id": message.get("id")})
                continue
            if "seq" in message:
                assert message["seq"] == self.last + 1, (message, self.last)
                self.last = message["seq"]
            return message

    def next(self) -> dict[str, Any] | None:
        """The next message, from ``inbox`` first."""
        if self.inbox:
            return self.inbox.pop(0)
        return self.recv()

    def expect(self, predicate: Any) -> dict[str, Any]:
        """The first message for which ``predicate`` holds (others stay in ``inbox``)."""
        for i, message in enumerate(self.inbox):
            if predicate(message):
                return self.inbox.pop(i)
        while True:
            message = self.recv()
            assert message is not None, "closed while waiting"
            if predicate(message):
                return message
            self.inbox.append(message)

    def closed(self) -> list[dict[str, Any]]:
        """Everything the server still sends before it closes the connection."""
        out = list(self.inbox)
        self.inbox.clear()
        while (message := self.recv()) is not None:
            out.append(message)
        return out

    # -- session moves -----------------------------------------------------------------------

    def start(self, **data: Any) -> dict[str, Any]:
        self.send({"type": "session", "id": "s", **({"data": data} if data else {})})
        answer = self.expect(lambda m: m.get("id") == "s")
        if answer["type"] == "session":
            self.sid, self.key = answer["data"]["session"], answer["data"]["key"]
        return answer

    def resume(self, sid: str = "", key: str = "", ack: int | None = None) -> dict[str, Any]:
        """Resume (this peer's own session unless told), acknowledging ``ack`` (default: the
        last seq this peer holds); sets ``last`` so the replay is checked for order."""
        ack = self.last if ack is None else ack
        self.last = ack
        data = {"session": sid or self.sid, "key": key or self.key, "ack": ack}
        self.send({"type": "resume", "id": "r", "data": data})
        return self.expect(lambda m: m.get("id") == "r" and "seq" not in m)

    def request(self, type_: str, data: Any = None, *, seq: int | None = None) -> int:
        """Send a numbered request; its id (replies are matched with `reply`)."""
        self._id += 1
        self.seq = self.seq + 1 if seq is None else seq
        message: dict[str, Any] = {"type": type_, "id": self._id, "seq": self.seq}
        if data is not None:
            message["data"] = data
        self.send(message)
        return self._id

    def reply(self, id_: int) -> dict[str, Any]:
        return self.expect(lambda m: m.get("id") == id_ and "seq" in m)

    def ack(self, upto: int | None = None) -> None:
        self.send({"type": "ack", "data": {"seq": self.last if upto is None else upto}})

    def clone(self, port: int) -> SessionPeer:
        """A new connection that knows this peer's session (and its client seq)."""
        other = SessionPeer(port, self.timeout, self.pump)
        other.sid, other.key, other.seq, other.last = self.sid, self.key, self.seq, self.last
        return other

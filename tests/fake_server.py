"""The server's side of a client library connection, in memory: for `ReconnectingClient`
tests that play the server frame by frame on a `Clock` (no socket, no daemon)."""

from __future__ import annotations

from typing import Any

from helpers import frame, parse_frames
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from heartbeatd.client import ClientConnection

HELLO = {"type": "hello", "data": {"session": "c1", "heartbeat": {"interval": 10, "timeout": 30}}}


class Peer:
    """The server's side of one client connection."""

    def __init__(self, proto: ClientConnection, transport: StringTransport) -> None:
        self.proto, self.transport = proto, transport

    def send(self, *objs: Any) -> None:
        self.proto.dataReceived(b"".join(frame(o) for o in objs))

    def written(self) -> list[Any]:
        """Frames the client wrote since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return parse_frames(data)

    def answer(self, request: dict[str, Any], data: Any = None, **extra: Any) -> None:
        self.send({"type": request["type"], "id": request["id"], "data": data, **extra})

    def refuse(self, request: dict[str, Any], code: str, **error: Any) -> None:
        error = {"code": code, "message": f"refused: {code}", **error}
        self.send({"type": "error", "id": request["id"], "error": error})

    def drop(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone("gone")))


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Each connect waits until the test `accept`s it (then the server says hello)."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Any, Deferred[Any]]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.attempts.append((factory, d))
        return d

    def accept(self) -> Peer:
        factory, d = self.attempts[-1]
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        d.callback(proto)
        peer = Peer(proto, transport)
        peer.send(HELLO)
        return peer

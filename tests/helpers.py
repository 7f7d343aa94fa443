"""Test helpers: in-memory connections on a Clock, frame parsing, Deferred assertions, iosim.

``twisted.test.iosim`` is private Twisted API: `heartbeatd.testing` is the one module that
imports it, and tests take it from here.  ``successResultOf``, ``failureResultOf`` and
``assertNoResult`` are trial's synchronous Deferred assertions, for plain pytest functions:
they read a Deferred's state without reaching into ``d.result``, and consume a failure.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from heartbeatd.config import Config, parse_config
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.protocol import ServerProtocol
from heartbeatd.testing import iosim

__all__ = [
    "Peer",
    "assertNoResult",
    "failureResultOf",
    "frame",
    "iosim",
    "make_config",
    "parse_frames",
    "successResultOf",
]

_case = SynchronousTestCase()
successResultOf = _case.successResultOf
failureResultOf = _case.failureResultOf
assertNoResult = _case.assertNoResult


def frame(obj: Any) -> bytes:
    """Encode a JSON value as an int32 frame (independently of heartbeatd's encoder)."""
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return struct.pack("!I", len(body)) + body


def parse_frames(data: bytes) -> list[Any]:
    """Decode a whole byte string of int32 frames; fail on a trailing partial frame."""
    out = []
    offset = 0
    while offset < len(data):
        assert len(data) - offset >= 4, f"partial header at {offset}"
        (length,) = struct.unpack_from("!I", data, offset)
        body = data[offset + 4 : offset + 4 + length]
        assert len(body) == length, "partial body"
        out.append(json.loads(body))
        offset += 4 + length
    return out


def make_config(**sections: Any) -> Config:
    """A Config from keyword sections, e.g. make_config(heartbeat={"interval": 1, ...})."""
    return parse_config(sections)


class Peer:
    """One in-memory client connection to a factory, driven by hand."""

    def __init__(self, factory: ServerFactory, port: int = 40000) -> None:
        self.factory = factory
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 9000),
            peerAddress=IPv4Address("TCP", "127.0.0.1", port),
        )
        self.protocol: ServerProtocol = factory.buildProtocol(self.transport.getPeer())
        self.protocol.makeConnection(self.transport)
        self.hello = self.received()[0] if isinstance(self.protocol, ServerProtocol) else None

    def send(self, *objs: Any) -> None:
        self.protocol.dataReceived(b"".join(frame(o) for o in objs))

    def send_raw(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def received(self) -> list[Any]:
        """Frames written to this client since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return parse_frames(data)

    def disconnect(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))

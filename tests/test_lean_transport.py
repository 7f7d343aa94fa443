"""The lean TCP transport and read dispatch (`heartbeatd.server.leantcp`), against the stock ones.

In-process on the real epoll reactor and real loopback sockets: every behaviour test runs on
both paths (``tcp.lean_transport`` true and false), and the transport's observable answers
(log prefix, repr, fileno) are compared with Twisted's own. test_hostile_peers runs the
daemon's hostile-peer suite (backpressure, slow consumers, partial frames, limits) on both.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import frame, make_config
from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from heartbeatd.server import leantcp
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import default_registry
from heartbeatd.server.protocol import ServerProtocol

reactor: Any
from twisted.internet import reactor  # noqa: E402  (the test drives the real reactor by hand)

pytestmark = pytest.mark.skipif(
    type(reactor).__name__ != "EPollReactor", reason="the lean dispatch is for the epoll reactor"
)


def spin_until(done: Callable[[], bool], seconds: float = 10) -> None:
    """Run reactor iterations until ``done()`` holds, or fail at the deadline."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "timed out"
        reactor.runUntilCurrent()
        reactor.doIteration(0.01)


class Server:
    """A factory listening on 127.0.0.1 port 0 with the given ``tcp.lean_transport``."""

    def __init__(self, lean: bool, **sections: Any) -> None:
        config = make_config(tcp={"lean_transport": lean}, **sections)
        self.factory = ServerFactory(config, default_registry(), reactor)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.lean = lean and leantcp.adopt(self.port)
        if not lean:
            leantcp.uninstall_dispatch(reactor)
        self.clients: list[socket.socket] = []

    def connect(self) -> tuple[socket.socket, ServerProtocol]:
        before = set(self.factory.clients)
        s = socket.create_connection(("127.0.0.1", self.port.getHost().port), timeout=10)
        s.setblocking(False)
        self.clients.append(s)
        spin_until(lambda: len(self.factory.clients) > len(before))
        (new,) = set(self.factory.clients) - before
        protocol = self.factory.clients[new]
        assert read_frames(s, 1)[0]["type"] == "hello"
        return s, protocol

    def close(self) -> None:
        for s in self.clients:
            s.close()
        spin_until(lambda: not self.factory.clients)
        self.port.stopListening()
        spin_until(lambda: not self.port.connected)
        leantcp.uninstall_dispatch(reactor)


def read_frames(s: socket.socket, count: int) -> list[Any]:
    import json

    buffer = b""
    out: list[Any] = []
    deadline = time.monotonic() + 10
    while len(out) < count:
        try:
            chunk = s.recv(1 << 20)
        except BlockingIOError:
            assert time.monotonic() < deadline, f"got {len(out)} of {count} frames"
            reactor.runUntilCurrent()
            reactor.doIteration(0.01)
            continue
        assert chunk, "the server closed the connection"
        buffer += chunk
        while len(buffer) >= 4:
            (length,) = struct.unpack_from("!I", buffer)
            if len(buffer) < 4 + length:
                break
            out.append(json.loads(buffer[4 : 4 + length]))
            buffer = buffer[4 + length :]
    return out


@pytest.fixture(params=[True, False], ids=["lean", "stock"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    s = Server(request.param)
    yield s
    s.close()


def test_the_switch_picks_the_transport(server: Server) -> None:
    _, protocol = server.connect()
    expected = leantcp.LeanServer if server.lean else tcp.Server
    assert type(protocol.transport) is expected


def test_requests_are_answered_in_order_whatever_the_read_split(server: Server) -> None:
    s, _ = server.connect()
    data = b"".join(frame({"type": "echo", "id": i, "data": "x" * i}) for i in range(20))
    # Byte by byte for the first frames (every split point), then the rest at once.
    for i in range(40):
        s.send(data[i : i + 1])
        reactor.runUntilCurrent()
        reactor.doIteration(0)
    s.send(data[40:])
    replies = read_frames(s, 20)
    assert [r["id"] for r in replies] == list(range(20))
    assert [r["data"] for r in replies] == ["x" * i for i in range(20)]


def test_errors_limits_and_close_behave_the_same(server: Server) -> None:
    s, protocol = server.connect()
    s.send(b"\x00\x00\x00\x05nope!" + frame({"type": "no-such-type", "id": 7}))
    first, second = read_frames(s, 2)
    assert first["error"]["code"] == "bad_json"
    assert second["error"]["code"] == "unknown_type" and second["id"] == 7
    s.send(struct.pack("!I", 2**31))  # over max_frame_bytes: an error, then the close
    assert read_frames(s, 1)[0]["error"]["code"] == "frame_too_large"
    spin_until(lambda: not protocol.connected)
    assert protocol.close_reason == "frame_too_large"


def test_a_client_that_leaves_is_unregistered(server: Server) -> None:
    s, protocol = server.connect()
    s.close()
    server.clients.remove(s)
    spin_until(lambda: not protocol.connected)
    assert protocol.session_id not in server.factory.clients


def test_lean_transport_answers_like_twisteds() -> None:
    stock, lean = Server(False), Server(True)
    try:
        _, p_stock = stock.connect()
        _, p_lean = lean.connect()
        ts, tl = p_stock.transport, p_lean.transport
        assert type(tl) is leantcp.LeanServer
        assert tl.logPrefix() == f"ServerProtocol,{tl.sessionno},127.0.0.1"
        assert ts.logPrefix() == f"ServerProtocol,{ts.sessionno},127.0.0.1"
        assert repr(tl) == f"<ServerProtocol #{tl.sessionno} on {lean.port.getHost().port}>"
        assert repr(ts) == f"<ServerProtocol #{ts.sessionno} on {stock.port.getHost().port}>"
        assert tl.fileno() == tl.socket.fileno() > 0
        assert tl.getPeer() == p_lean.transport.getPeer()
        # Nothing of the three is stored per connection, and hosts are shared.
        assert tl._lean_queue is None  # no empty write-queue list kept
        assert not {"logstr", "repstr", "fileno", "_tempDataBuffer"} & set(vars(tl))
        _, p_lean2 = lean.connect()
        assert p_lean2.transport.hostname is tl.hostname
        s = lean.clients[0]
        s.close()
        lean.clients.remove(s)
        spin_until(lambda: not p_lean.connected)
        assert tl.fileno() == -1
        assert tl.logPrefix().startswith("closed,")
    finally:
        stock.close()
        lean.close()


def test_an_error_escaping_an_event_is_logged_and_the_reactor_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = Server(True)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        s, protocol = server.connect()
        survivor, _ = server.connect()

        def broken(reason: object = None) -> None:
            raise RuntimeError("connectionLost failed")

        monkeypatch.setattr(protocol, "connectionLost", broken)
        s.close()
        server.clients.remove(s)
        spin_until(lambda: any(e.get("isError") for e in events))
        (logged,) = [e for e in events if e.get("isError")]
        assert logged["failure"].check(RuntimeError)
        assert logged["log_system"].startswith("closed,")  # tagged with the connection
        survivor.send(frame({"type": "echo", "id": 1, "data": "still here"}))
        assert read_frames(survivor, 1)[0]["data"] == "still here"
        server.factory.clients.pop(protocol.session_id, None)
    finally:
        globalLogPublisher.removeObserver(events.append)
        server.close()


def test_only_plain_tcp_ports_and_the_epoll_reactor_are_adopted() -> None:
    assert not leantcp.adopt(object())
    assert not leantcp.install_dispatch(Clock())
    assert leantcp.install_dispatch(reactor)
    assert leantcp.install_dispatch(reactor)  # twice is once
    leantcp.uninstall_dispatch(reactor)
    assert "doIteration" not in vars(reactor)


def test_a_read_that_raises_closes_that_connection_only(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception out of ``dataReceived`` is logged and closes its connection (as
    Twisted's ``_doReadOrWrite`` does), on the lean read path as on the stock one."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        s, protocol = server.connect()
        survivor, _ = server.connect()

        def broken(data: bytes) -> None:
            raise RuntimeError("a handler bug")

        monkeypatch.setattr(protocol, "dataReceived", broken)
        s.send(frame({"type": "echo", "id": 1, "data": "boom"}))
        spin_until(lambda: protocol.session_id not in server.factory.clients)
        (logged,) = [e for e in events if e.get("isError")]
        assert logged["failure"].check(RuntimeError)
        s.setblocking(True)
        s.settimeout(10)
        assert s.recv(1 << 16) == b""  # closed by the server
        survivor.send(frame({"type": "echo", "id": 2, "data": "still here"}))
        assert read_frames(survivor, 1)[0]["data"] == "still here"
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_end_of_stream_is_a_clean_close(server: Server) -> None:
    s, protocol = server.connect()
    reasons: list[Any] = []
    original = protocol.connectionLost

    def record(reason: Any = None) -> None:
        reasons.append(reason)
        original(reason)

    protocol.connectionLost = record  # type: ignore[method-assign]
    s.shutdown(socket.SHUT_WR)
    spin_until(lambda: bool(reasons))
    assert reasons[0].check(ConnectionDone)

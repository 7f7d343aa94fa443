"""The client connection: handshake, id correlation, typed failures, pushes, heartbeat."""

from __future__ import annotations

from typing import Any

from helpers import failureResultOf, frame, make_config, parse_frames, successResultOf
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from heartbeatd.client import (
    ClientConnection,
    ConnectionClosed,
    HandshakeTimeout,
    RequestTimeout,
    ServerError,
)
from heartbeatd.testing import ServerClientPair

HELLO = {"type": "hello", "data": {"session": "s1", "heartbeat": {"interval": 10, "timeout": 30}}}


class FakeServer:
    """The test plays the server over a StringTransport."""

    def __init__(self, clock: Clock, hello: dict | None = HELLO, **options: Any) -> None:
        self.client = ClientConnection(clock, **options)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 9000))
        self.client.makeConnection(self.transport)
        self.ready = self.client.when_ready()
        if hello is not None:
            self.send(hello)

    def send(self, *objs: Any) -> None:
        self.client.dataReceived(b"".join(frame(o) for o in objs))

    def written(self) -> list[Any]:
        data = self.transport.value()
        self.transport.clear()
        return parse_frames(data)

    def drop(self) -> None:
        self.client.connectionLost(Failure(ConnectionDone("gone")))


def test_ready_after_hello_and_requests_round_trip() -> None:
    with ServerClientPair() as pair:
        assert successResultOf(pair.client.when_ready()) is pair.client
        assert pair.client.hello["session"] in pair.factory.clients
        replies = [pair.client.request("echo", {"n": i}) for i in range(20)]
        pair.flush()
        assert [successResultOf(r) for r in replies] == [{"n": i} for i in range(20)]


def test_replies_are_matched_by_id_in_any_order(clock: Clock) -> None:
    server = FakeServer(clock)
    first, second = server.client.request("a", 1), server.client.request("b", 2)
    sent = server.written()
    assert [(m["type"], m["id"], m["data"]) for m in sent] == [("a", 1, 1), ("b", 2, 2)]
    server.send({"type": "b", "id": 2, "data": "B"}, {"type": "a", "id": 1, "data": "A"})
    assert (successResultOf(first), successResultOf(second)) == ("A", "B")


def test_error_reply_is_a_server_error_with_code() -> None:
    with ServerClientPair() as pair:
        failure = failureResultOf(pair.request("nope"), ServerError)
    assert failure.value.code == "unknown_type"
    assert "nope" in failure.value.message


def test_request_timeout(clock: Clock) -> None:
    server = FakeServer(clock, request_timeout=5)
    d = server.client.request("slow")
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.1)
    failure = failureResultOf(d, RequestTimeout)
    assert "no reply to 'slow' within 5s" in str(failure.value)
    server.send({"type": "slow", "id": 1, "data": "late"})  # a late reply is ignored
    assert server.client.pending_requests == 0


def test_every_pending_request_fails_at_once_on_loss(clock: Clock) -> None:
    server = FakeServer(clock)
    pending = [server.client.request("x", timeout=100) for _ in range(5)]
    server.drop()
    for d in pending:
        failureResultOf(d, ConnectionClosed)
    assert clock.getDelayedCalls() == []  # every timer was cancelled
    late = server.client.request("x")
    failureResultOf(late, ConnectionClosed)


def test_cancelling_a_request_frees_it(clock: Clock) -> None:
    server = FakeServer(clock)
    d = server.client.request("x")
    d.cancel()
    d.addErrback(lambda f: None)
    assert server.client.pending_requests == 0


def test_server_pings_are_answered(clock: Clock) -> None:
    server = FakeServer(clock)
    server.send({"type": "ping", "id": "hb-3"})
    assert server.written() == [{"type": "pong", "id": "hb-3"}]


def test_client_pings_a_quiet_server_and_aborts_a_silent_one(clock: Clock) -> None:
    server = FakeServer(clock)
    pending = server.client.request("x", timeout=1000)
    server.written()
    clock.advance(10)
    assert server.written() == [{"type": "ping"}]
    server.send({"type": "pong"})
    clock.advance(10)
    assert server.written() == [{"type": "ping"}]
    clock.pump([10, 10, 10])  # nothing heard for 30s+: the server is dead
    assert server.transport.disconnected
    server.drop()
    failure = failureResultOf(pending, ConnectionClosed)
    assert "server silent for" in str(failure.value)


def test_pushes_reach_handlers_by_type() -> None:
    with ServerClientPair() as pair:
        got: list = []
        pair.client.on("news", lambda data, conn: got.append(("news", data)))
        pair.client.on_any(lambda type_, data, conn: got.append((type_, "any", data)))
        pair.server.broadcast("news", {"headline": 1})
        pair.server.broadcast("other", 2)
        pair.flush()
    assert got == [
        ("news", {"headline": 1}),
        ("news", "any", {"headline": 1}),
        ("other", "any", 2),
    ]


def test_on_push_hears_pushes_in_the_same_read_as_the_auth_reply(clock: Clock) -> None:
    got: list = []
    server = FakeServer(
        clock, token="t", on_push=lambda type_, data, conn: got.append((type_, data))
    )
    (auth,) = server.written()
    server.send(
        {"type": "auth", "id": auth["id"], "data": {"identity": "alice"}},
        {"type": "subscribed", "data": {"channel": "news"}},
    )
    assert successResultOf(server.ready).identity == "alice"
    assert got == [("subscribed", {"channel": "news"})]


def test_goaway_marks_the_connection_draining(clock: Clock) -> None:
    server = FakeServer(clock)
    seen = []
    server.client.on_goaway(lambda conn, data: seen.append(data))
    assert server.client.usable
    server.send({"type": "goaway", "data": {"reason": "restart", "reconnect_after": 5}})
    assert seen == [{"reason": "restart", "reconnect_after": 5}]
    assert server.client.draining and not server.client.usable


def test_hello_timeout(clock: Clock) -> None:
    server = FakeServer(clock, hello=None, hello_timeout=3)
    clock.advance(3)
    assert server.transport.disconnected
    server.drop()
    failureResultOf(server.ready, HandshakeTimeout)


def test_refused_connection_reports_the_servers_reason(clock: Clock) -> None:
    refusal = {"type": "error", "error": {"code": "too_many_connections", "message": "full"}}
    server = FakeServer(clock, hello=refusal)
    server.drop()
    error = failureResultOf(server.ready, ServerError).value
    assert isinstance(error, ServerError) and error.code == "too_many_connections"


def test_close_callbacks_run_once(clock: Clock) -> None:
    server = FakeServer(clock)
    reasons: list = []
    server.client.on_close(lambda conn, why: reasons.append(why))
    server.drop()
    server.client.on_close(lambda conn, why: reasons.append("late"))
    assert len(reasons) == 2 and reasons[1] == "late"


def test_seed_framing_client_against_seed_server() -> None:
    config = make_config(framing="seed", heartbeat={"interval": 10, "timeout": 30})
    with ServerClientPair(config=config) as pair:
        assert pair.client.framing.name == "seed"
        assert successResultOf(pair.request("echo", "via seed")) == "via seed"
        pair.advance(10)  # the client pings with the token; the server answers in kind
        assert pair.client.last_rtt is not None
        assert pair.clients == 1 and not pair.client.closed


def test_unframeable_stream_aborts(clock: Clock) -> None:
    server = FakeServer(clock, max_frame_bytes=10)
    server.client.dataReceived(b"\x00\x00\x01\x00")
    assert server.transport.disconnected
    assert isinstance(server.client.close_reason.value, ConnectionClosed)


def test_malformed_frames_are_ignored(clock: Clock) -> None:
    server = FakeServer(clock)
    d = server.client.request("x")
    server.client.dataReceived(frame(b"{oops") + frame({"type": "x", "id": 1, "data": 1}))
    assert successResultOf(d) == 1


def test_send_is_fire_and_forget(clock: Clock) -> None:
    server = FakeServer(clock)
    server.client.send("note", [1])
    assert server.written() == [{"type": "note", "data": [1]}]


def test_seed_client_needs_no_hello_and_matches_bare_replies_in_order(clock: Clock) -> None:
    from heartbeatd.wire.seed import SeedFraming

    client = ClientConnection(clock, framing="seed", heartbeat_interval=5, heartbeat_timeout=12)
    transport = StringTransport()
    client.makeConnection(transport)
    assert client.when_ready().called and client.usable  # a seed server sends no hello
    first, second = client.request_value("a"), client.request_value({"b": 1})
    assert transport.value() == SeedFraming.encode(b'"a"') + SeedFraming.encode(b'{"b":1}')
    pushes: list = []
    client.on("message", lambda data, conn: pushes.append(data))
    client.dataReceived(SeedFraming.encode(b'"A"') + SeedFraming.encode(b'"B"'))
    assert (successResultOf(first), successResultOf(second)) == ("A", "B")
    client.dataReceived(SeedFraming.encode(b'"unsolicited"'))
    assert pushes == ["unsolicited"]
    late = client.request_value("c", timeout=2)
    clock.advance(2)
    failureResultOf(late, RequestTimeout)
    transport.clear()
    clock.advance(3)  # quiet for the default interval: the token heartbeat goes out
    assert transport.value() == b"HeartBeat"
    clock.pump([5, 5])  # silent past the 12 s default timeout
    assert transport.disconnected


def test_connect_failures_are_typed_with_the_cause_kept() -> None:
    """A refused connect is a ClientError (ConnectionFailed), never Twisted's own type."""
    from twisted.internet.error import ConnectionRefusedError
    from twisted.internet.testing import MemoryReactorClock

    from heartbeatd.client import ClientError, ConnectionFailed, connect

    reactor = MemoryReactorClock()
    d = connect(reactor, "tcp:host=127.0.0.1:port=9")
    (_host, _port, factory, _timeout, _bind) = reactor.tcpClients[0]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError("refused")))
    failure = failureResultOf(d, ConnectionFailed)
    assert isinstance(failure.value, ClientError)
    assert isinstance(failure.value.__cause__, ConnectionRefusedError)
    assert "refused" in str(failure.value)


def test_a_tiny_heartbeat_interval_from_the_server_is_clamped(clock: Clock) -> None:
    """Issue 22: a server saying interval 1e-6 made the client send 1.6 MB of pings in 2 s."""
    hello = {"type": "hello", "data": {"session": "s", "heartbeat": {"interval": 1e-6}}}
    server = FakeServer(clock, hello)
    server.written()
    clock.pump([0.01] * 200)  # 2 s
    assert len(server.transport.value()) < 200  # at most two pings
    custom = FakeServer(Clock(), hello, min_heartbeat_interval=5.0)
    assert custom.client._interval == 5.0 and custom.client._timeout >= 15.0

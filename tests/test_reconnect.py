"""The reconnecting client on a Clock: full-jitter backoff, fast first failure, goaway, handlers."""

from __future__ import annotations

from typing import Any

from helpers import failureResultOf, frame, parse_frames, successResultOf
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from heartbeatd.client.reconnect import ReconnectingClient, full_jitter_backoff

HELLO = {"type": "hello", "data": {"session": "s", "heartbeat": {"interval": 10, "timeout": 30}}}


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    def __init__(self) -> None:
        self.attempts: list[tuple[Any, Deferred]] = []

    def connect(self, factory: Any) -> Deferred:
        d: Deferred = Deferred()
        self.attempts.append((factory, d))
        return d

    def accept(self) -> tuple[Any, StringTransport]:
        factory, d = self.attempts[-1]
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        d.callback(proto)
        proto.dataReceived(frame(HELLO))
        return proto, transport

    def refuse(self) -> None:
        self.attempts[-1][1].errback(ConnectionRefusedError("refused"))


def make(clock: Clock) -> tuple[ReconnectingClient, FakeEndpoint]:
    endpoint = FakeEndpoint()
    client = ReconnectingClient(
        clock, endpoint, backoff_initial=1, backoff_max=4, random=lambda: 0.5
    )
    client.start()
    return client, endpoint


def test_full_jitter_policy() -> None:
    policy = full_jitter_backoff(1, 8, random=lambda: 1.0)
    assert [policy(n) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]
    assert full_jitter_backoff(1, 8, random=lambda: 0.0)(5) == 0


def test_backoff_between_failed_attempts(clock: Clock) -> None:
    _client, endpoint = make(clock)
    delays = []
    for _ in range(4):
        endpoint.refuse()
        (call,) = clock.getDelayedCalls()
        delays.append(call.getTime() - clock.seconds())
        clock.advance(delays[-1])
    assert delays == [0.5, 1.0, 2.0, 2.0]
    assert len(endpoint.attempts) == 5


def test_first_failure_is_reported_fast(clock: Clock) -> None:
    client, endpoint = make(clock)
    d = client.when_connected(fail_after=1)
    endpoint.refuse()
    assert d.called
    failureResultOf(d, ConnectionRefusedError)


def test_connected_after_hello_and_handlers_survive_reconnects(clock: Clock) -> None:
    client, endpoint = make(clock)
    pushes: list = []
    client.on("news", lambda data, conn: pushes.append(data))
    ready = client.when_connected()
    proto, _ = endpoint.accept()
    assert successResultOf(ready).hello["session"] == "s"
    proto.dataReceived(frame({"type": "news", "data": 1}))
    proto.connectionLost(Failure(ConnectionDone()))
    clock.advance(0.5)  # first retry after a lost connection: 0.5 * min(4, 1)
    proto2, _ = endpoint.accept()
    proto2.dataReceived(frame({"type": "news", "data": 2}))
    assert pushes == [1, 2]


def test_goaway_finishes_in_flight_then_reconnects_within_the_window(clock: Clock) -> None:
    client, endpoint = make(clock)
    proto, transport = endpoint.accept()
    conn = successResultOf(client.when_connected())
    pending = conn.request("work")
    proto.dataReceived(
        frame({"type": "goaway", "data": {"reason": "deploy", "reconnect_after": 6}})
    )
    assert not transport.disconnecting  # the request is still in flight
    (sent,) = parse_frames(transport.value())
    proto.dataReceived(frame({"type": "work", "id": sent["id"], "data": "done"}))
    assert successResultOf(pending) == "done"
    assert transport.disconnecting
    proto.connectionLost(Failure(ConnectionDone()))
    before = len(endpoint.attempts)
    clock.advance(2.9)
    assert len(endpoint.attempts) == before
    clock.advance(0.1)  # random 0.5 * window 6
    assert len(endpoint.attempts) == before + 1
    assert client.goaways == 1


def test_stop_is_clean(clock: Clock) -> None:
    client, endpoint = make(clock)
    proto, transport = endpoint.accept()
    stopped = client.stop()
    assert transport.disconnecting
    proto.connectionLost(Failure(ConnectionDone()))
    assert stopped.called
    assert clock.getDelayedCalls() == []

"""The reconnecting client on a Clock: full-jitter backoff, fast first failure, goaway, handlers."""

from __future__ import annotations

from typing import Any

from helpers import frame, parse_frames
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from heartbeatd.client import (
    ClientError,
    ConnectionFailed,
    NotConnected,
    RequestTimeout,
)
from heartbeatd.client.reconnect import ReconnectingClient, full_jitter_backoff

_sync = SynchronousTestCase()
successResultOf, failureResultOf, assertNoResult = (
    _sync.successResultOf,
    _sync.failureResultOf,
    _sync.assertNoResult,
)

HELLO = {"type": "hello", "data": {"session": "s", "heartbeat": {"interval": 10, "timeout": 30}}}


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    def __init__(self) -> None:
        self.attempts: list[tuple[Any, Deferred]] = []

    def connect(self, factory: Any) -> Deferred:
        d: Deferred = Deferred()
        self.attempts.append((factory, d))
        return d

    def accept(self, hello: bool = True) -> tuple[Any, StringTransport]:
        factory, d = self.attempts[-1]
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        d.callback(proto)
        if hello:
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
    clock.advance(0)  # delivered outside ClientService's state machine
    # Our own type, never Twisted's ConnectionRefusedError; its text and cause are kept.
    error = failureResultOf(d, ConnectionFailed).value
    assert "refused" in str(error) and isinstance(error.__cause__, ConnectionRefusedError)


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


def test_request_timeout_covers_waiting_for_a_connection(clock: Clock) -> None:
    client, endpoint = make(clock)
    d = client.request("echo", 1, timeout=1)
    endpoint.refuse()  # down: retries keep failing
    clock.advance(0.5)
    endpoint.refuse()
    clock.advance(0.49)
    assertNoResult(d)
    clock.advance(0.01)
    error = failureResultOf(d, NotConnected).value
    assert isinstance(error, ClientError)
    assert str(error) == (
        "not connected within 1s (last attempt: Connection was refused by other side: refused.)"
    )


def test_request_timeout_is_one_budget_for_connecting_and_the_reply(clock: Clock) -> None:
    client, endpoint = make(clock)
    d = client.request("echo", 1, timeout=1)
    clock.advance(0.6)
    endpoint.accept()  # connected after 0.6 s: 0.4 s left for the reply
    clock.advance(0.39)
    assertNoResult(d)
    clock.advance(0.01)
    failureResultOf(d, RequestTimeout)


def test_when_connected_timeout_and_a_failed_handshake_are_typed(clock: Clock) -> None:
    endpoint = FakeEndpoint()
    client = ReconnectingClient(
        clock, endpoint, hello_timeout=2, backoff_initial=1, random=lambda: 0.5
    )
    client.start()
    d = client.when_connected(timeout=3)
    proto, transport = endpoint.accept(hello=False)  # connected; the server never says hello
    clock.advance(2)
    assert transport.disconnecting  # aborted by the hello timeout
    proto.connectionLost(Failure(ConnectionDone()))
    assert client.last_error is not None and "no hello" in client.last_error
    clock.advance(1)
    error = failureResultOf(d, NotConnected).value
    assert "within 3s" in str(error) and "no hello" in str(error)
    with_failures = client.when_connected(fail_after=1)
    endpoint.refuse()
    clock.advance(0)
    failureResultOf(with_failures, ConnectionFailed)


def test_when_connected_after_stop_or_cancel(clock: Clock) -> None:
    client, _endpoint = make(clock)
    waiting = client.when_connected()
    cancelled = client.when_connected(timeout=5)
    cancelled.cancel()
    failureResultOf(cancelled, CancelledError)  # the caller's own cancel stays a cancel
    client.stop()
    clock.advance(0)
    error = failureResultOf(waiting, NotConnected).value
    assert "stopped" in str(error)
    assert clock.getDelayedCalls() == []


def test_failed_handshakes_count_toward_fail_after(clock: Clock) -> None:
    endpoint = FakeEndpoint()
    client = ReconnectingClient(clock, endpoint, hello_timeout=1, random=lambda: 0.0)
    client.start()
    d = client.when_connected(fail_after=2)
    for _ in range(2):
        proto, _transport = endpoint.accept(hello=False)
        clock.advance(1)  # no hello: the connection aborts itself
        proto.connectionLost(Failure(ConnectionDone()))
        clock.advance(0)  # the service's immediate retry (random 0)
    error = failureResultOf(d, ConnectionFailed).value
    assert "no hello from the server within 1s" in str(error)
    assert len(endpoint.attempts) == 3  # and the client keeps trying in the background
    client.stop()


def test_request_on_a_live_connection_needs_no_wait(clock: Clock) -> None:
    client, endpoint = make(clock)
    _proto, transport = endpoint.accept()
    transport.clear()
    d = client.request("echo", timeout=3)
    (sent,) = parse_frames(transport.value())
    assert sent["type"] == "echo" and "data" not in sent  # omitted, not null
    clock.advance(3)
    failureResultOf(d, RequestTimeout)  # the caller's timeout, on the request itself


def test_a_server_refusing_before_the_hello_is_backed_off_from(clock: Clock) -> None:
    client, endpoint = make(clock)
    delays = []
    for _ in range(4):
        proto, _transport = endpoint.accept(hello=False)
        busy = {"type": "error", "error": {"code": "too_many_connections", "message": "full"}}
        proto.dataReceived(frame(busy))
        proto.connectionLost(Failure(ConnectionDone()))
        (call,) = clock.getDelayedCalls()
        delays.append(call.getTime() - clock.seconds())
        clock.advance(delays[-1])
    assert delays == [0.5, 1.0, 2.0, 2.0]  # grows (0.5 * cap 1, 2, 4, 4), not 0.5 forever
    assert client.last_error == "too_many_connections: full"
    client.stop()


def test_callers_may_use_the_client_again_from_their_callbacks(clock: Clock) -> None:
    client, endpoint = make(clock)
    again: list[Deferred] = []
    failed = client.when_connected(fail_after=1)
    failed.addErrback(lambda _: again.append(client.when_connected()))
    endpoint.refuse()
    clock.advance(0)  # no RuntimeError from re-entering ClientService's state machine
    (retry,) = again
    clock.advance(0.5)
    endpoint.accept()
    clock.advance(0)
    assert successResultOf(retry).hello["session"] == "s"
    client.stop()


# -- several endpoints -------------------------------------------------------------------------


def make_many(clock: Clock, count: int) -> tuple[ReconnectingClient, list[FakeEndpoint]]:
    endpoints = [FakeEndpoint() for _ in range(count)]
    client = ReconnectingClient(
        clock, endpoints, backoff_initial=1, backoff_max=4, random=lambda: 0.5
    )
    client.start()
    return client, endpoints


def next_delay(clock: Clock) -> float:
    (call,) = clock.getDelayedCalls()
    delay: float = call.getTime() - clock.seconds()
    clock.advance(delay)
    return delay


def attempts(endpoints: list[FakeEndpoint]) -> list[int]:
    return [len(e.attempts) for e in endpoints]


def test_a_failed_endpoint_moves_to_the_next_at_once_and_a_full_round_backs_off(
    clock: Clock,
) -> None:
    client, (a, b) = make_many(clock, 2)
    assert attempts([a, b]) == [1, 0]
    a.refuse()
    assert next_delay(clock) == 0  # the next endpoint at once
    assert attempts([a, b]) == [1, 1]
    b.refuse()
    assert next_delay(clock) == 0.5  # a full round failed: one step (0.5 * cap 1)
    a.refuse()
    assert next_delay(clock) == 0
    b.refuse()
    assert next_delay(clock) == 1.0  # the second round: 0.5 * cap 2
    assert attempts([a, b]) == [3, 2]
    connected = client.when_connected()
    proto, _ = a.accept()
    assert successResultOf(connected).hello["session"] == "s"
    assert client.current == 0 and client.last_error is None

    # A success resets the count: lost, it comes back to the same endpoint after one step.
    proto.connectionLost(Failure(ConnectionDone()))
    assert next_delay(clock) == 0.5
    assert attempts([a, b]) == [4, 2]
    a.refuse()
    assert next_delay(clock) == 0  # then the other one, at once
    assert attempts([a, b]) == [4, 3]
    client.stop()


def test_an_endpoint_that_accepts_but_sends_no_hello_counts_as_failed(clock: Clock) -> None:
    client, (a, b, c) = make_many(clock, 3)
    proto, _ = a.accept(hello=False)
    busy = {"type": "error", "error": {"code": "too_many_connections", "message": "full"}}
    proto.dataReceived(frame(busy))
    proto.connectionLost(Failure(ConnectionDone()))
    assert next_delay(clock) == 0
    assert attempts([a, b, c]) == [1, 1, 0]
    b.refuse()
    assert next_delay(clock) == 0
    c.refuse()
    assert next_delay(clock) == 0.5  # three failures, one round
    assert attempts([a, b, c]) == [2, 1, 1]
    client.stop()


def test_goaway_moves_to_another_endpoint(clock: Clock) -> None:
    client, (a, b) = make_many(clock, 2)
    proto, _ = a.accept()
    proto.dataReceived(frame({"type": "goaway", "data": {"reconnect_after": 2}}))
    assert client.current == 1
    proto.connectionLost(Failure(ConnectionDone()))
    assert next_delay(clock) == 1.0  # 0.5 of the 2 s window
    assert attempts([a, b]) == [1, 1]
    client.stop()


def test_when_connected_fail_after_a_round(clock: Clock) -> None:
    client, (a, b) = make_many(clock, 2)
    d = client.when_connected(fail_after=2)
    a.refuse()
    clock.advance(0)
    assertNoResult(d)
    b.refuse()
    clock.advance(0)  # told a moment later, outside ClientService's state machine
    failure = failureResultOf(d, ConnectionFailed)
    assert "refused" in str(failure.value)
    client.stop()


def test_get_token_is_asked_on_every_connection_and_every_refresh(clock: Clock) -> None:
    """Issue 22: short-lived JWTs; a fresh one for each connection and each server refresh."""
    endpoint = FakeEndpoint()
    tokens = iter(["t1", "t2", "t3"])
    client = ReconnectingClient(
        clock, endpoint, backoff_initial=1, random=lambda: 0.5, get_token=lambda: next(tokens)
    )
    client.start()
    hello = {"type": "hello", "data": {**HELLO["data"], "auth": "required"}}
    sent: list[Any] = []
    for expected in ("t1", "t3"):
        proto, transport = endpoint.accept(hello=False)
        proto.dataReceived(frame(hello))
        auth = parse_frames(transport.value())[-1]
        assert auth["type"] == "auth" and auth["data"] == {"token": expected}
        proto.dataReceived(frame({"type": "auth", "id": auth["id"], "data": {"identity": "a"}}))
        transport.clear()
        if expected == "t1":
            proto.dataReceived(frame({"type": "refresh"}))
            sent = parse_frames(transport.value())
            proto.connectionLost(Failure(ConnectionDone()))
            clock.advance(0.5)
    assert [(m["type"], m["data"]) for m in sent] == [("refresh", {"token": "t2"})]
    client.stop()

"""How the reconnecting client settles what waits, the test playing the server over a
StringTransport on a Clock: `stop` fails every pending operation with one error
(`ClientStopped`), a plain ``unsubscribe`` answered ``not_subscribed`` is done, and a
``rate_limited`` subscribe waits out the server's ``retry_after`` (bounded)."""

from __future__ import annotations

from typing import Any

import pytest
from fake_server import FakeEndpoint, Peer
from helpers import assertNoResult, failureResultOf, successResultOf
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from heartbeatd.client import (
    ClientStopped,
    ConnectionClosed,
    NotConnected,
    Pool,
    PoolConfig,
    ServerError,
    SubscriptionRateLimited,
    SubscriptionUnavailable,
)
from heartbeatd.client.reconnect import MAX_RETRY_AFTER, ReconnectingClient

KEY = "k" * 24


def started(clock: Clock, **options: Any) -> tuple[ReconnectingClient, FakeEndpoint]:
    endpoint = FakeEndpoint()
    options = {"backoff_initial": 1, "backoff_max": 1, "random": lambda: 0.5, **options}
    client = ReconnectingClient(clock, endpoint, **options)
    client.start()
    return client, endpoint


def connected(clock: Clock, **options: Any) -> tuple[ReconnectingClient, FakeEndpoint, Peer]:
    client, endpoint = started(clock, **options)
    ready = client.when_connected()
    peer = endpoint.accept()
    if options.get("resumable"):
        (ask,) = peer.written()
        peer.send({"type": "session", "id": ask["id"], "data": {"session": "sid1", "key": KEY}})
    successResultOf(ready)
    return client, endpoint, peer


def stopped_error(d: Deferred[Any]) -> ClientStopped:
    """The failure of ``d``: a ClientStopped that old ``except`` clauses still catch."""
    error = failureResultOf(d, ClientStopped).value
    assert isinstance(error, ConnectionClosed) and isinstance(error, NotConnected)
    assert "stopped" in str(error)
    return error


# -- stop: one error for everything still waiting ------------------------------------------


def test_stop_fails_a_request_waiting_for_a_connection_and_a_subscribe_alike(
    clock: Clock,
) -> None:
    """Before ClientStopped the request failed with NotConnected and the subscribe with
    ConnectionClosed; both now fail with ClientStopped, which is both."""
    client, endpoint = started(clock)
    request = client.request("echo", 1, timeout=30)
    subscribe = client.subscribe("news", lambda *a: None)
    waiting = client.when_connected()
    assertNoResult(request)
    client.stop()
    clock.advance(0)
    stopped_error(request)
    assert "'news'" in str(stopped_error(subscribe))
    stopped_error(waiting)
    assert clock.getDelayedCalls() == []
    stopped_error(client.request("late", timeout=5))  # asked after stop: the same answer
    assert endpoint.attempts and len(endpoint.attempts) == 1


def test_stop_fails_a_request_in_flight_and_an_unanswered_subscribe_alike(clock: Clock) -> None:
    client, _endpoint, peer = connected(clock)
    held = client.subscribe("sport", lambda *a: None)
    (ask,) = peer.written()
    peer.answer(ask, {"channel": "sport", "epoch": "e", "offset": 0})
    successResultOf(held)
    request = client.request("work", timeout=30)
    subscribe = client.subscribe("news", lambda *a: None)
    assert [m["type"] for m in peer.written()] == ["work", "subscribe"]
    stopping = client.stop()
    stopped_error(subscribe)  # at once
    assert peer.transport.disconnecting
    assertNoResult(request)  # its connection closes politely: it fails once it is gone
    peer.drop()
    assert "connection lost before the reply" in str(stopped_error(request))
    successResultOf(stopping)


def test_stop_in_a_session_fails_requests_and_subscribes_with_client_stopped(
    clock: Clock,
) -> None:
    client, _endpoint, peer = connected(clock, resumable=True)
    request = client.request("work", timeout=30)
    subscribe = client.subscribe("news", lambda *a: None)
    assert [m["type"] for m in peer.written()] == ["work", "subscribe"]
    stopping = client.stop()
    stopped_error(request)
    stopped_error(subscribe)
    stopped_error(client.request("late", timeout=5))  # made while the session ends
    (end,) = peer.written()
    assert end["type"] == "session_end"
    peer.send({"type": "session_end", "id": end["id"], "seq": 1, "ack": end["seq"], "data": {}})
    peer.drop()
    successResultOf(stopping)


def test_stop_while_disconnected_in_a_session_fails_what_waits_with_client_stopped(
    clock: Clock,
) -> None:
    client, _endpoint, peer = connected(clock, resumable=True)
    peer.drop()
    request = client.request("work", timeout=30)  # numbered, waiting for the resume
    subscribe = client.subscribe("news", lambda *a: None)
    successResultOf(client.stop())
    stopped_error(request)
    stopped_error(subscribe)


def test_pool_close_fails_a_subscribe_still_waiting_with_client_stopped(clock: Clock) -> None:
    endpoint = FakeEndpoint()
    pool = Pool(clock, PoolConfig(min_idle=0))
    pool.subscriber_fn = lambda: ReconnectingClient(clock, endpoint)
    waiting = pool.subscribe("news", lambda *a: None)
    pool.close()
    clock.advance(0)
    stopped_error(waiting)


def subscribed_to_news(client: ReconnectingClient, peer: Peer, on_publication: Any = None) -> None:
    """``client`` subscribes to ``news`` and ``peer`` grants it."""
    subscribed = client.subscribe("news", on_publication or (lambda *a: None))
    (ask,) = peer.written()
    peer.answer(ask, {"channel": "news", "epoch": "e", "offset": 0})
    successResultOf(subscribed)


def test_a_plain_unsubscribe_in_flight_at_stop_is_done(clock: Clock) -> None:
    """The server forgets a connection's subscriptions with it: what was asked holds."""
    client, _endpoint, peer = connected(clock)
    subscribed_to_news(client, peer)
    done = client.unsubscribe("news")
    (unsub,) = peer.written()
    assert unsub["type"] == "unsubscribe"
    stopping = client.stop()
    peer.drop()
    assert successResultOf(done) is None
    successResultOf(stopping)


# -- a plain unsubscribe answered not_subscribed --------------------------------------------


def test_a_plain_unsubscribe_answered_not_subscribed_fires_and_drops_the_subscription(
    clock: Clock,
) -> None:
    client, endpoint, peer = connected(clock)
    got: list[Any] = []
    subscribed_to_news(client, peer, lambda data, offset, sub: got.append(data))
    done = client.unsubscribe("news")
    (unsub,) = peer.written()
    peer.refuse(unsub, "not_subscribed")  # the server had dropped it already
    assert successResultOf(done) is None
    peer.send({"type": "publication", "data": {"channel": "news", "offset": 1, "data": "x"}})
    assert got == []
    peer.drop()
    clock.advance(1)  # reconnects: the channel is not subscribed again
    peer2 = endpoint.accept()
    assert peer2.written() == []


def test_a_plain_unsubscribe_fails_on_any_other_refusal(clock: Clock) -> None:
    client, _endpoint, peer = connected(clock)
    subscribed_to_news(client, peer)
    done = client.unsubscribe("news")
    (unsub,) = peer.written()
    peer.refuse(unsub, "internal_error")
    assert failureResultOf(done, ServerError).value.code == "internal_error"


def test_a_connection_unsubscribe_answered_not_subscribed_fires(clock: Clock) -> None:
    _client, _endpoint, peer = connected(clock)
    done = peer.proto.unsubscribe("never")
    (unsub,) = peer.written()
    peer.refuse(unsub, "not_subscribed")
    assert successResultOf(done) is None


# -- rate_limited with retry_after -----------------------------------------------------------


def rate_limited_once(clock: Clock, **error: Any) -> tuple[ReconnectingClient, Peer, Deferred[Any]]:
    """A subscribe answered rate_limited (with ``error``'s extra fields), retry pending."""
    client, _endpoint, peer = connected(clock)
    subscribed = client.subscribe("news", lambda *a: None)
    (ask,) = peer.written()
    peer.refuse(ask, "rate_limited", **error)
    assertNoResult(subscribed)
    return client, peer, subscribed


def retried_after(clock: Clock, peer: Peer, seconds: float) -> dict[str, Any]:
    """Nothing is sent before ``seconds``; the retry is sent at ``seconds`` (a session's
    acks aside)."""
    clock.advance(seconds - 0.01)
    assert [m for m in peer.written() if m["type"] != "ack"] == []
    clock.advance(0.01)
    (again,) = [m for m in peer.written() if m["type"] != "ack"]
    assert again["type"] == "subscribe"
    return again


def test_retry_after_makes_the_rate_limited_retry_wait_at_least_that_long(clock: Clock) -> None:
    # The backoff alone would retry after 0.5 s (random 0.5 of backoff_initial 1).
    _client, peer, subscribed = rate_limited_once(clock, retry_after=2.5)
    again = retried_after(clock, peer, 2.5)
    peer.answer(again, {"channel": "news", "epoch": "e", "offset": 0})
    assert successResultOf(subscribed).channel == "news"


def test_a_retry_after_shorter_than_the_backoff_changes_nothing(clock: Clock) -> None:
    _client, peer, _subscribed = rate_limited_once(clock, retry_after=0.1)
    retried_after(clock, peer, 0.5)


@pytest.mark.parametrize(
    "hint",
    [MAX_RETRY_AFTER + 1, 1e308, -1, "5", True, None, [], {"s": 5}],
    ids=repr,
)
def test_a_retry_after_that_is_not_a_sane_number_is_ignored(clock: Clock, hint: Any) -> None:
    _client, peer, _subscribed = rate_limited_once(clock, retry_after=hint)
    retried_after(clock, peer, 0.5)  # the backoff, as without a hint


@pytest.mark.parametrize("hint", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_non_finite_retry_after_cannot_stall_the_subscribe(clock: Clock, hint: str) -> None:
    """JSON has no such numbers: the client's parser refuses the frame, and the subscribe's
    ``request_timeout`` (10 s) drops the connection; the next one subscribes again."""
    client, endpoint, peer = connected(clock)
    client.subscribe("news", lambda *a: None)
    (ask,) = peer.written()
    error = f'{{"code": "rate_limited", "message": "slow", "retry_after": {hint}}}'
    peer.send(f'{{"type": "error", "id": {ask["id"]}, "error": {error}}}'.encode())
    clock.advance(9.99)
    assert peer.written() == [] and not peer.transport.disconnecting
    clock.advance(0.01)
    assert peer.proto.closed or peer.transport.disconnecting
    peer.drop()
    clock.advance(1)
    (again,) = endpoint.accept().written()
    assert again["type"] == "subscribe"


def test_a_retry_after_past_subscribe_retry_timeout_fails_at_the_deadline_without_a_try(
    clock: Clock,
) -> None:
    """No try the server said it would refuse; the caller's deadline holds (as in JS)."""
    client, _endpoint, peer = connected(clock, subscribe_retry_timeout=3)
    subscribed = client.subscribe("news", lambda *a: None)
    (ask,) = peer.written()
    peer.refuse(ask, "rate_limited", retry_after=5)
    clock.advance(2.99)
    assertNoResult(subscribed)
    clock.advance(0.01)
    error = failureResultOf(subscribed, SubscriptionRateLimited).value
    assert isinstance(error, ServerError)  # what callers caught before it had its own type
    assert error.code == "rate_limited" and error.retry_after == 5.0
    assert (error.channel, error.attempts, error.limit, error.elapsed) == ("news", 1, 3, 3)
    assert error.__cause__.code == "rate_limited"
    assert peer.written() == []  # no doomed try
    clock.advance(10)
    assert [m for m in peer.written() if m["type"] == "subscribe"] == []


def test_an_unavailable_hint_past_the_deadline_fails_with_subscription_unavailable(
    clock: Clock,
) -> None:
    client, _endpoint, peer = connected(clock, subscribe_retry_timeout=3)
    subscribed = client.subscribe("news", lambda *a: None)
    (ask,) = peer.written()
    peer.refuse(ask, "unavailable", retry_after=5)
    clock.advance(3)
    gave_up = failureResultOf(subscribed, SubscriptionUnavailable).value
    assert gave_up.__cause__.code == "unavailable"
    assert peer.written() == []


def test_retry_after_applies_to_a_session_subscribe_too(clock: Clock) -> None:
    client, _endpoint, peer = connected(clock, resumable=True)
    subscribed = client.subscribe("news", lambda *a: None)
    (ask,) = peer.written()
    error = {"code": "rate_limited", "message": "slow", "retry_after": 2}
    peer.send({"type": "error", "id": ask["id"], "seq": 1, "ack": ask["seq"], "error": error})
    again = retried_after(clock, peer, 2)
    data = {"channel": "news", "epoch": "e", "offset": 0}
    peer.send({"type": "subscribe", "id": again["id"], "seq": 2, "ack": again["seq"], "data": data})
    assert successResultOf(subscribed).channel == "news"


def test_server_error_from_wire_keeps_only_a_sane_retry_after() -> None:
    def hint(value: Any) -> float | None:
        return ServerError.from_wire({"code": "rate_limited", "retry_after": value}).retry_after

    assert hint(0.25) == 0.25 and hint(3) == 3.0 and hint(0) == 0.0
    assert hint(1e9) == 1e9  # kept on the error; the client's retry ignores it (> 60)
    for bad in (-0.5, float("nan"), float("inf"), 10**400, True, "1", None):
        assert hint(bad) is None
    unknown = ServerError.from_wire("not an object")
    assert (unknown.code, unknown.message, unknown.retry_after) == ("unknown", "", None)

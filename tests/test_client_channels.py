"""The client's channel API over iosim: subscribe, dedupe, and re-subscribe after a reconnect."""

from __future__ import annotations

from typing import Any

from helpers import assertNoResult, failureResultOf, iosim, make_config, successResultOf
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from zope.interface import implementer

from heartbeatd.client.errors import ConnectionClosed, ServerError, SubscriptionUnavailable
from heartbeatd.client.reconnect import ReconnectingClient
from heartbeatd.server.factory import ServerFactory
from heartbeatd.testing import ServerClientPair


def server(clock: Clock, **channels: Any) -> ServerFactory:
    return ServerFactory(make_config(channels=channels), clock=clock)


def publish(factory: ServerFactory, *items: Any) -> None:
    for item in items:
        factory.channels.publish("news", item)


def test_subscribe_delivers_each_publication_once() -> None:
    with ServerClientPair() as pair:
        client, factory = pair.client, pair.factory
        got: list[tuple[Any, int]] = []
        d = client.subscribe("news", lambda data, offset, sub: got.append((data, offset)))
        pair.flush()
        pair.advance(0)
        sub = successResultOf(d)
        assert (sub.channel, sub.offset) == ("news", 0) and sub.epoch
        publish(factory, "a", "b")
        pair.flush()
        assert got == [("a", 1), ("b", 2)]
        factory.channels.on_publication("news", sub.epoch, 2, '"b"')  # a repeat: not delivered
        pair.flush()
        assert got == [("a", 1), ("b", 2)] and sub.offset == 2

        d = client.unsubscribe("news")
        pair.flush()
        assert successResultOf(d) == {"channel": "news"}
        publish(factory, "c")
        pair.flush()
        assert len(got) == 2


def test_subscribe_errors_are_typed() -> None:
    with ServerClientPair() as pair:
        d = pair.client.subscribe("bad name", lambda *a: None)
        pair.flush()
        assert failureResultOf(d).value.code == "bad_channel"


@implementer(IStreamClientEndpoint)
class IosimEndpoint:
    """Connects a client factory to a ServerFactory through iosim, one pump per connection."""

    def __init__(self, target: ServerFactory, clock: Clock) -> None:
        self.target = target
        self.clock = clock
        self.pumps: list[Any] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        client = factory.buildProtocol(None)
        srv = self.target.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        client_transport = iosim.FakeTransport(client, isServer=False)
        server_transport = iosim.FakeTransport(srv, isServer=True)
        pump = iosim.connect(
            srv, server_transport, client, client_transport, clock=self.clock, greet=True
        )
        self.pumps.append(pump)
        return succeed(client)

    def flush(self) -> None:
        for _ in range(3):
            for pump in self.pumps:
                pump.flush()
            self.clock.advance(0)


def reconnecting(factory: ServerFactory, clock: Clock) -> tuple[ReconnectingClient, Any]:
    endpoint = IosimEndpoint(factory, clock)
    client = ReconnectingClient(
        clock, endpoint, backoff_initial=1, backoff_max=1, random=lambda: 0.5
    )
    client.start()
    endpoint.flush()
    return client, endpoint


def drop(endpoint: IosimEndpoint, clock: Clock) -> None:
    """Break the current connection, then let the client reconnect."""
    endpoint.pumps[-1].clientIO.abortConnection()
    endpoint.flush()


def test_reconnecting_client_recovers_what_it_missed_exactly_once(clock: Clock) -> None:
    factory = server(clock)
    client, endpoint = reconnecting(factory, clock)
    got: list[int] = []
    lost: list[str] = []
    d = client.subscribe(
        "news", lambda data, offset, sub: got.append(offset), lambda sub, why: lost.append(why)
    )
    endpoint.flush()
    assert d.called
    publish(factory, 1)
    endpoint.flush()
    drop(endpoint, clock)
    publish(factory, 2, 3)  # while the client is away
    clock.advance(1)  # the backoff delay: it reconnects and re-subscribes with since
    endpoint.flush()
    publish(factory, 4)
    endpoint.flush()
    assert got == [1, 2, 3, 4]
    assert lost == []
    assert factory.channels.recoveries == {"recovered": 1, "not_recovered": 0}


def test_reconnecting_client_is_told_when_history_is_gone(clock: Clock) -> None:
    factory = server(clock, history_size=1)
    client, endpoint = reconnecting(factory, clock)
    got: list[int] = []
    lost: list[tuple[str, int]] = []
    client.subscribe(
        "news",
        lambda data, offset, sub: got.append(offset),
        lambda sub, why: lost.append((why, sub.offset)),
    )
    endpoint.flush()
    drop(endpoint, clock)
    publish(factory, 1, 2, 3)
    clock.advance(1)
    endpoint.flush()
    publish(factory, 4)
    endpoint.flush()
    assert lost == [("not_recovered", 3)]
    assert got == [4]


def test_resync_push_reaches_the_not_recovered_callback(clock: Clock) -> None:
    factory = server(clock)
    client, endpoint = reconnecting(factory, clock)
    lost: list[str] = []
    got: list[int] = []
    client.subscribe("news", lambda d, o, s: got.append(o), lambda sub, why: lost.append(why))
    endpoint.flush()
    factory.channels.on_publication("news", "new-epoch", 5, "5")
    endpoint.flush()
    assert lost == ["epoch_changed"]
    assert got == [5]


def test_reconnecting_client_unsubscribe_is_kept_across_reconnects(clock: Clock) -> None:
    factory = server(clock)
    client, endpoint = reconnecting(factory, clock)
    got: list[int] = []
    client.subscribe("news", lambda data, offset, sub: got.append(offset))
    endpoint.flush()
    publish(factory, 1)
    endpoint.flush()
    client.unsubscribe("news")
    endpoint.flush()
    publish(factory, 2)
    drop(endpoint, clock)
    clock.advance(1)
    endpoint.flush()
    publish(factory, 3)
    endpoint.flush()
    assert got == [1]
    assert factory.channels.subscription_count() == 0


def test_pool_subscriptions_reconnect_and_recover_exactly_once(clock: Clock) -> None:
    from heartbeatd.client import Pool, PoolConfig

    factory = server(clock)
    endpoint = IosimEndpoint(factory, clock)
    pool = Pool(clock, PoolConfig(min_idle=0))
    pool.subscriber_fn = lambda: ReconnectingClient(
        clock, endpoint, backoff_initial=1, backoff_max=1, random=lambda: 0.5
    )
    got: list[int] = []
    lost: list[str] = []
    d = pool.subscribe(
        "news", lambda data, offset, sub: got.append(offset), lambda sub, why: lost.append(why)
    )
    endpoint.flush()
    assert d.called
    publish(factory, 1)
    endpoint.flush()
    drop(endpoint, clock)
    publish(factory, 2, 3)  # while the pool's subscriber connection is away
    clock.advance(1)
    endpoint.flush()
    publish(factory, 4)
    endpoint.flush()
    assert got == [1, 2, 3, 4] and lost == []
    assert len(factory.clients) == 1  # one connection for subscriptions, none lent

    pool.close()
    endpoint.flush()
    publish(factory, 5)
    endpoint.flush()
    assert got == [1, 2, 3, 4]


# -- every subscribe has an outcome: a refusal fails it, ``unavailable`` is retried, bounded --


def counting_subscribes(factory: ServerFactory) -> list[str]:
    """The channels the server was asked to subscribe to, in order (refused ones too)."""
    asked: list[str] = []
    original = factory.channels.subscribe

    def subscribe(client: Any, channel: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(channel)
        return original(client, channel, *args, **kwargs)

    factory.channels.subscribe = subscribe  # type: ignore[method-assign]
    return asked


def test_reconnecting_subscribe_refused_fails_with_the_servers_error_and_is_forgotten(
    clock: Clock,
) -> None:
    factory = server(clock, max_per_connection=1)
    client, endpoint = reconnecting(factory, clock)
    bad = client.subscribe("bad name", lambda *a: None)
    endpoint.flush()
    assert failureResultOf(bad, ServerError).value.code == "bad_channel"
    first = client.subscribe("news", lambda *a: None)
    second = client.subscribe("sport", lambda *a: None)
    endpoint.flush()
    assert successResultOf(first).channel == "news"
    assert failureResultOf(second, ServerError).value.code == "too_many_channels"
    asked = counting_subscribes(factory)
    drop(endpoint, clock)
    clock.advance(1)
    endpoint.flush()
    assert asked == ["news"]  # the refused ones are not sent again after a reconnect


def test_reconnecting_subscribe_unavailable_is_retried_with_backoff_until_it_works(
    clock: Clock,
) -> None:
    factory = server(clock)
    client, endpoint = reconnecting(factory, clock)
    asked = counting_subscribes(factory)
    factory.channels.broker.up = False
    d = client.subscribe("news", lambda *a: None)
    endpoint.flush()
    assertNoResult(d)
    assert asked == ["news"]
    clock.advance(0.5)  # the backoff: random 0.5 of backoff_initial 1
    endpoint.flush()
    assert asked == ["news", "news"]
    assertNoResult(d)
    factory.channels.broker.up = True
    clock.advance(0.5)
    endpoint.flush()
    assert successResultOf(d).channel == "news"
    assert factory.channels.subscription_count() == 1
    clock.advance(60)
    endpoint.flush()
    assert len(asked) == 3  # nothing more once it worked


def test_reconnecting_subscribe_unavailable_fails_after_subscribe_retry_timeout(
    clock: Clock,
) -> None:
    factory = server(clock)
    endpoint = IosimEndpoint(factory, clock)
    client = ReconnectingClient(
        clock,
        endpoint,
        backoff_initial=1,
        backoff_max=1,
        random=lambda: 0.5,
        subscribe_retry_timeout=3,
    )
    client.start()
    endpoint.flush()
    asked = counting_subscribes(factory)
    factory.channels.broker.up = False
    d = client.subscribe("news", lambda *a: None)
    endpoint.flush()
    for _ in range(10):
        clock.advance(0.5)
        endpoint.flush()
    error = failureResultOf(d, SubscriptionUnavailable).value
    assert isinstance(error, ServerError) and error.code == "unavailable"
    assert (error.channel, error.attempts, error.limit) == ("news", 7, 3)
    assert error.elapsed == 3.0  # the last try came at the deadline, not after
    assert isinstance(error.__cause__, ServerError)
    factory.channels.broker.up = True
    drop(endpoint, clock)
    clock.advance(60)
    endpoint.flush()
    assert len(asked) == 7 and factory.channels.subscription_count() == 0


def resumable(factory: ServerFactory, clock: Clock) -> tuple[ReconnectingClient, IosimEndpoint]:
    endpoint = IosimEndpoint(factory, clock)
    client = ReconnectingClient(
        clock, endpoint, backoff_initial=1, backoff_max=1, random=lambda: 0.5, resumable=True
    )
    events: list[Any] = []
    client.on_session(events.append)
    client.start()
    endpoint.flush()
    assert events == [{"event": "started"}]
    return client, endpoint


def test_a_session_subscribe_answered_unavailable_is_subscribed_after_the_resume(
    clock: Clock,
) -> None:
    factory = server(clock)
    client, endpoint = resumable(factory, clock)
    got: list[int] = []
    factory.channels.broker.up = False
    d = client.subscribe("news", lambda data, offset, sub: got.append(offset))
    endpoint.flush()
    assertNoResult(d)
    drop(endpoint, clock)
    factory.channels.broker.up = True
    clock.advance(1)  # reconnects and resumes: the session does not hold it, so it is sent
    endpoint.flush()
    assert successResultOf(d).channel == "news"
    publish(factory, "a")
    endpoint.flush()
    assert got == [1] and factory.channels.subscription_count() == 1


def test_a_session_subscribe_the_server_dropped_at_the_detach_is_subscribed_again(
    clock: Clock,
) -> None:
    """heartbeatd answers a subscribe still locating its channel when the session's connection
    went with ``not_subscribed`` (numbered: it comes in the resume's replay)."""
    factory = server(clock)
    client, endpoint = resumable(factory, clock)
    broker = factory.channels.broker
    locating: list[Deferred[Any]] = []
    position = broker.position
    broker.position = lambda channel: locating.append(Deferred()) or locating[-1]  # type: ignore[method-assign]
    got: list[int] = []
    d = client.subscribe("news", lambda data, offset, sub: got.append(offset))
    endpoint.flush()
    assert len(locating) == 1
    drop(endpoint, clock)
    broker.position = position  # type: ignore[method-assign]
    position("news").chainDeferred(locating[0])  # settles after the detach: not_subscribed
    clock.advance(1)
    endpoint.flush()
    assert successResultOf(d).channel == "news"
    publish(factory, "a")
    endpoint.flush()
    assert got == [1] and factory.channels.subscription_count() == 1


def test_pool_subscribe_refused_fails_with_the_servers_error(clock: Clock) -> None:
    from heartbeatd.client import Pool, PoolConfig

    factory = server(clock)
    endpoint = IosimEndpoint(factory, clock)
    pool = Pool(clock, PoolConfig(min_idle=0))
    pool.subscriber_fn = lambda: ReconnectingClient(clock, endpoint)
    d = pool.subscribe("bad name", lambda *a: None)
    endpoint.flush()
    assert failureResultOf(d, ServerError).value.code == "bad_channel"
    pool.close()
    endpoint.flush()


def test_a_rate_limited_subscribe_is_retried_with_backoff_not_given_up(clock: Clock) -> None:
    """``rate_limited`` is not a refusal for good: a client with more subscriptions than
    ``channels.subscribe_burst`` re-subscribes them all after a reconnect, a little later."""
    factory = server(clock, subscribe_rate=1, subscribe_burst=1)
    client, endpoint = reconnecting(factory, clock)
    first = client.subscribe("news", lambda *a: None)
    second = client.subscribe("sport", lambda *a: None)
    endpoint.flush()
    assert successResultOf(first).channel == "news"
    assertNoResult(second)  # rate_limited: tried again after the backoff
    for _ in range(2):
        clock.advance(0.5)
        endpoint.flush()
    assert successResultOf(second).channel == "sport"
    assert factory.channels.subscription_count() == 2


def test_stop_fails_the_subscribes_still_waiting_and_a_restart_sends_only_the_held_ones(
    clock: Clock,
) -> None:
    """A subscribe whose Deferred has not fired (here: retrying ``unavailable``) fails at
    `stop` with `ConnectionClosed`, as a waiting request does; one the server accepted is
    nobody's wait, so nothing fails (nor is logged) for it, and a restart subscribes it again."""
    factory = server(clock)
    client, endpoint = reconnecting(factory, clock)
    held = client.subscribe("news", lambda *a: None)
    endpoint.flush()
    successResultOf(held)
    factory.channels.broker.up = False
    waiting = client.subscribe("sport", lambda *a: None)
    endpoint.flush()
    assertNoResult(waiting)
    client.stop()
    endpoint.flush()
    error = failureResultOf(waiting, ConnectionClosed).value
    assert "stopped before the subscribe to 'sport'" in str(error)
    factory.channels.broker.up = True
    asked = counting_subscribes(factory)
    client.start()
    clock.advance(1)
    endpoint.flush()
    assert asked == ["news"]  # the failed one is forgotten


def test_a_session_unsubscribe_made_while_disconnected_reaches_the_server(clock: Clock) -> None:
    factory = server(clock)
    client, endpoint = resumable(factory, clock)
    got: list[int] = []
    successful = client.subscribe("news", lambda data, offset, sub: got.append(offset))
    endpoint.flush()
    successResultOf(successful)
    drop(endpoint, clock)
    done = client.unsubscribe("news")
    assertNoResult(done)
    clock.advance(1)  # reconnects; the resume sends the unsubscribe
    endpoint.flush()
    successResultOf(done)
    assert factory.channels.subscription_count() == 0
    publish(factory, "a")
    endpoint.flush()
    assert got == []


def test_a_plain_unsubscribe_the_server_answers_not_subscribed_is_done(clock: Clock) -> None:
    """The server dropped the subscription first (here: its own unsubscribe): the answer is
    ``not_subscribed``, and the state asked for holds, so the Deferred fires."""
    factory = server(clock)
    client, endpoint = reconnecting(factory, clock)
    got: list[int] = []
    successful = client.subscribe("news", lambda data, offset, sub: got.append(offset))
    endpoint.flush()
    successResultOf(successful)
    (conn,) = factory.clients.values()
    factory.channels.unsubscribe(conn, "news")
    done = client.unsubscribe("news")
    endpoint.flush()
    assert successResultOf(done) is None
    drop(endpoint, clock)
    clock.advance(1)
    endpoint.flush()
    publish(factory, "a")
    endpoint.flush()
    assert got == [] and factory.channels.subscription_count() == 0

"""Fan-out fairness: large channels are delivered in batches, one per reactor turn.

Driven in memory (StringTransport peers on a Clock). `one_turn` runs the calls that were due
when it started, as a reactor turn does (``Clock.advance(0)`` would also run the ``callLater(0)``
those calls make), and ``hub.delivered`` counts the deliveries written, so "each turn is
bounded" is exact.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import Peer, make_config
from twisted.internet.task import Clock

from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import default_registry


class FastClock(Clock):
    """A Clock that keeps its calls sorted without re-sorting all of them on every callLater
    (10,000 connections' timers made Clock's sort the test's whole cost)."""

    def _sortCalls(self) -> None:
        calls = self.calls
        if len(calls) < 2 or calls[-1].getTime() >= calls[-2].getTime():
            return
        calls.sort(key=lambda call: call.getTime())


@pytest.fixture
def clock() -> Clock:
    return FastClock()


def one_turn(clock: Clock) -> None:
    """Run the calls due now, but not the ones they schedule (the next turn's)."""
    due = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
    for call in due:
        if call.active():
            clock.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


def make_factory(clock: Clock, **channels: Any) -> ServerFactory:
    config = make_config(channels={"client_publish": True, **channels})
    return ServerFactory(config, default_registry(), clock)


def subscribers(factory: ServerFactory, n: int, channel: str = "news") -> list[Peer]:
    peers = []
    for i in range(n):
        peer = Peer(factory, port=20000 + i)
        peer.send({"type": "subscribe", "id": 1, "data": {"channel": channel}})
        peers.append(peer)
    factory.clock.advance(0)  # type: ignore[attr-defined]
    for peer in peers:
        assert peer.received()[0]["type"] == "subscribe"
    return peers


def publish_frame(id: int, data: Any, channel: str = "news") -> dict[str, Any]:
    return {"type": "publish", "id": id, "data": {"channel": channel, "data": data}}


def offsets(peer: Peer) -> list[int]:
    frames = peer.received()
    assert all(f["type"] == "publication" for f in frames), frames
    return [f["data"]["offset"] for f in frames]


def turns(clock: Clock, hub: Any, limit: int = 10_000, counter: str = "delivered") -> list[int]:
    """Run reactor turns until the queue is empty; the deliveries each wrote (``counter``
    "budget_spent": the budget each spent, in writes)."""
    written = []
    for _ in range(limit):
        if not hub._fanouts:
            return written
        before = getattr(hub, counter)
        one_turn(clock)
        written.append(getattr(hub, counter) - before)
    raise AssertionError("the delivery queue never drained")


def spent(clock: Clock, hub: Any) -> list[int]:
    return turns(clock, hub, counter="budget_spent")


def test_ten_thousand_subscribers_are_served_in_bounded_batches_in_order(clock: Clock) -> None:
    factory = make_factory(clock, fanout_batch=1000)
    hub = factory.channels
    peers = subscribers(factory, 10_000)
    for i in range(3):
        hub.publish("news", i)
    # Too many for one turn: queued, then written one batch per turn, never more.  The three
    # publications are one run: each subscriber gets them in one write, 1,000 writes a turn.
    assert hub.delivered == 0
    assert hub.queued == 30_000
    assert len(hub._fanouts) == 1
    before = hub.delivered
    written = spent(clock, hub)
    assert written == [1000] * 10
    assert hub.delivered - before == 30_000
    assert hub.queued == 0
    for peer in peers:
        assert offsets(peer) == [1, 2, 3]


def test_a_small_channel_is_written_at_once_as_before(clock: Clock) -> None:
    factory = make_factory(clock, fanout_batch=10)
    peers = subscribers(factory, 10)
    factory.channels.publish("news", "x")
    assert not factory.channels._fanouts
    for peer in peers:
        assert offsets(peer) == [1]


def test_a_small_channel_queues_behind_a_large_fan_out(clock: Clock) -> None:
    """A subscriber of both channels gets them in publication order."""
    factory = make_factory(clock, fanout_batch=10)
    hub = factory.channels
    big = subscribers(factory, 30, "big")
    both = big[-1]
    both.send({"type": "subscribe", "id": 2, "data": {"channel": "small"}})
    clock.advance(0)
    assert both.received()[0]["type"] == "subscribe"
    hub.publish("big", 1)
    hub.publish("small", 2)
    turns(clock, hub)
    frames = both.received()
    assert [f["data"]["channel"] for f in frames] == ["big", "small"]


def test_a_publishing_burst_does_not_delay_another_clients_reply(clock: Clock) -> None:
    factory = make_factory(clock, fanout_batch=100, fanout_backlog=1000)
    hub = factory.channels
    peers = subscribers(factory, 500)
    publisher, control = Peer(factory, 1), Peer(factory, 2)
    # 200 pipelined publishes in one read: the work they start in this turn is one batch.
    publisher.send(*(publish_frame(i, i) for i in range(200)))
    assert hub.budget_spent <= 100
    # Another client's request is answered in the next turn, after at most one batch.
    before = hub.budget_spent
    one_turn(clock)
    control.send({"type": "ping", "id": 7})
    assert hub.budget_spent - before <= 100
    assert control.received() == [{"type": "pong", "id": 7}]
    written = spent(clock, hub)
    assert max(written) <= 100
    # Nothing dropped, every subscriber in order; every publish answered, in order.
    for peer in peers[:3] + peers[-3:]:
        assert offsets(peer) == list(range(1, 201))
    replies = publisher.received()
    assert [r["data"]["offset"] for r in replies] == list(range(1, 201))


def test_backpressure_stops_reading_a_publisher_until_the_queue_drains(clock: Clock) -> None:
    factory = make_factory(clock, fanout_batch=100, fanout_backlog=1000)
    factory.config = make_config(
        channels={"client_publish": True, "fanout_batch": 100, "fanout_backlog": 1000},
        limits={"max_pending_requests": 4},
    )
    hub = factory.channels
    hub.reconfigure()
    subscribers(factory, 500)
    publisher = Peer(factory, 1)
    publisher.send(*(publish_frame(i, i) for i in range(10)))
    # More than fanout_backlog queued: replies wait, and past max_pending_requests the
    # publisher's transport is paused.
    assert hub.backlogged()
    assert publisher.transport.producerState == "paused"
    early = publisher.received()  # answered while the queue was still short
    assert len(early) < 4
    turns(clock, hub)
    assert not hub.backlogged()
    assert publisher.transport.producerState == "producing"
    replies = early + publisher.received()
    assert [r["data"]["offset"] for r in replies] == list(range(1, 11))


def test_unsubscribe_and_disconnect_mid_fan_out_are_safe(clock: Clock) -> None:
    factory = make_factory(clock, fanout_batch=10)
    hub = factory.channels
    peers = subscribers(factory, 50)
    hub.publish("news", 1)
    hub.publish("news", 2)
    leaver, gone = peers[-1], peers[-2]
    leaver.send({"type": "unsubscribe", "id": 9, "data": {"channel": "news"}})
    assert leaver.received() == [{"type": "unsubscribe", "id": 9, "data": {"channel": "news"}}]
    gone.disconnect()
    turns(clock, hub)
    assert leaver.received() == []
    for peer in peers[:10]:
        assert offsets(peer) == [1, 2]
    for peer in peers[10:-2]:
        assert offsets(peer) == [1, 2]


def test_subscribing_mid_fan_out_gets_no_duplicate_and_no_gap(clock: Clock) -> None:
    factory = make_factory(clock, fanout_batch=10)
    hub = factory.channels
    subscribers(factory, 50)
    hub.publish("news", 1)
    hub.publish("news", 2)
    late = Peer(factory, 3)
    late.send({"type": "subscribe", "id": 1, "data": {"channel": "news"}})
    hub.publish("news", 3)
    turns(clock, hub)
    frames = late.received()
    assert frames[0]["data"]["offset"] == 2
    assert [f["data"]["offset"] for f in frames[1:]] == [3]
    # Recovering from offset 0 mid-fan-out: exactly 1..4, once each, in order.
    hub.publish("news", 4)
    recovering = Peer(factory, 4)
    epoch = frames[0]["data"]["epoch"]
    recovering.send(
        {
            "type": "subscribe",
            "id": 1,
            "data": {"channel": "news", "since": {"epoch": epoch, "offset": 0}},
        }
    )
    hub.publish("news", 5)
    turns(clock, hub)
    clock.advance(0)
    frames = recovering.received()
    assert frames[0]["data"]["recovered"] is True
    assert [f["data"]["offset"] for f in frames[1:]] == [1, 2, 3, 4, 5]


def test_many_small_publications_in_one_turn_are_bounded_too(clock: Clock) -> None:
    """A burst to a channel smaller than a batch: the turn's budget, not the channel's size."""
    factory = make_factory(clock, fanout_batch=100)
    hub = factory.channels
    peers = subscribers(factory, 40)
    publisher = Peer(factory, 1)
    publisher.send(*(publish_frame(i, i) for i in range(50)))
    assert hub.budget_spent <= 100
    written = spent(clock, hub)
    assert max(written) <= 100
    assert hub.delivered == 50 * 40
    for peer in peers:
        assert offsets(peer) == list(range(1, 51))


def test_the_budget_is_per_turn_so_sporadic_small_publications_are_written_at_once(
    clock: Clock,
) -> None:
    """One small publication per reactor turn, for ever: each is written at once (the
    budget of a turn must not carry over to the next, or every few publications would
    wait a turn and could reorder against their publisher's reply)."""
    factory = make_factory(clock, fanout_batch=10)
    hub = factory.channels
    peers = subscribers(factory, 4)
    for offset in range(1, 21):
        hub.publish("news", offset)
        assert not hub._fanouts, f"publication {offset} was queued"
        for peer in peers:
            assert offsets(peer) == [offset]
        one_turn(clock)


def test_fan_out_tunables_reload(clock: Clock) -> None:
    factory = make_factory(clock, fanout_batch=10)
    factory.config = make_config(channels={"fanout_batch": 50})
    factory.channels.reconfigure()
    peers = subscribers(factory, 50)
    factory.channels.publish("news", 1)
    assert not factory.channels._fanouts
    assert offsets(peers[0]) == [1]


def pushes(peer: Peer, type: str = "notice") -> list[Any]:
    return [f["data"] for f in peer.received() if f["type"] == type]


def test_a_broadcast_to_more_connections_than_a_batch_is_written_in_turns(clock: Clock) -> None:
    factory = make_factory(clock, fanout_batch=100)
    hub = factory.channels
    peers = [Peer(factory, 20000 + i) for i in range(350)]
    assert factory.broadcast("notice", 1) == 350
    # Over a turn's budget: queued, then written at most one batch per turn.
    assert hub.broadcast_written == 0 and hub.queued == 350
    written = []
    while hub._fanouts:
        before = hub.broadcast_written
        one_turn(clock)
        written.append(hub.broadcast_written - before)
    assert written == [100, 100, 100, 50]
    assert hub.queued == 0
    for peer in peers:
        assert pushes(peer) == [1]


def test_a_small_broadcast_is_written_at_once(clock: Clock) -> None:
    factory = make_factory(clock, fanout_batch=100)
    peers = [Peer(factory, 20000 + i) for i in range(10)]
    assert factory.broadcast("notice", "now") == 10
    assert not factory.channels._fanouts
    for peer in peers:
        assert pushes(peer) == ["now"]


def test_broadcasts_and_publications_keep_their_order_on_each_connection(clock: Clock) -> None:
    """A broadcast made after a publication reaches each subscriber after it, and a client
    that disconnects while a broadcast is queued is skipped."""
    factory = make_factory(clock, fanout_batch=10)
    hub = factory.channels
    peers = subscribers(factory, 30)
    hub.publish("news", 1)
    factory.broadcast("notice", "after 1")
    hub.publish("news", 2)
    peers[-1].disconnect()
    while hub._fanouts:
        one_turn(clock)
    for peer in peers[:-1]:
        frames = peer.received()
        assert [
            (f["type"], f["data"].get("offset") if f["type"] == "publication" else f["data"])
            for f in frames
        ] == [("publication", 1), ("notice", "after 1"), ("publication", 2)]


def test_a_broadcast_burst_does_not_delay_another_clients_reply(clock: Clock) -> None:
    factory = make_factory(clock, fanout_batch=100)
    hub = factory.channels
    peers = [Peer(factory, 20000 + i) for i in range(500)]
    control = peers[0]
    for i in range(20):
        factory.broadcast("notice", i)
    assert hub.broadcast_written <= 100
    before = hub.broadcast_written
    one_turn(clock)
    assert hub.broadcast_written - before <= 100
    control.received()
    control.send({"type": "ping", "id": 7})
    assert {"type": "pong", "id": 7} in control.received()
    while hub._fanouts:
        one_turn(clock)
    assert pushes(peers[-1]) == list(range(20))


def test_the_shutdown_goaway_is_written_at_once(clock: Clock) -> None:
    factory = make_factory(clock, fanout_batch=10)
    peers = [Peer(factory, 20000 + i) for i in range(30)]
    factory.drain(5, 1)
    assert not factory.channels._fanouts
    for peer in peers:
        assert [f["type"] for f in peer.received()] == ["goaway"]

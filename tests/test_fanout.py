"""Fan-out fairness: large channels are delivered in batches, one per reactor turn.

Driven in memory (StringTransport peers on a Clock). `one_turn` runs the calls that were due
when it started, as a reactor turn does (``Clock.advance(0)`` would also run the ``callLater(0)``
those calls make), and ``hub.delivered`` counts the deliveries written, so "each turn is
bounded" is exact.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import Peer, make_config, parse_frames
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
    """Run reactor turns until the queue is empty and no publish (or its reply) waits; the
    deliveries each wrote (``counter`` "budget_spent": the budget each spent, in writes)."""
    written = []
    for _ in range(limit):
        if not (hub._fanouts or hub._backlog_waiters or hub._publishes_waiting):
            return written
        before = getattr(hub, counter)
        one_turn(clock)
        written.append(getattr(hub, counter) - before)
    raise AssertionError("the delivery queue never drained")


def spent(clock: Clock, hub: Any) -> list[int]:
    return turns(clock, hub, counter="budget_spent")


@pytest.mark.scenario
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
    assert hub.budget_spent <= 100
    before = hub.budget_spent
    one_turn(clock)
    assert hub.budget_spent - before <= 100
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


# -- coalescing: a subscriber gets a burst's queued publications in one write -----------------


def count_writes(peer: Peer) -> list[bytes]:
    """Record each write to ``peer``'s transport (one write is one send() on a socket)."""
    writes: list[bytes] = []
    write = peer.transport.write

    def counted(data: bytes) -> None:
        writes.append(data)
        write(data)

    peer.transport.write = counted  # type: ignore[method-assign]
    return writes


def test_a_burst_reaches_each_subscriber_in_one_write_in_order(clock: Clock) -> None:
    factory = make_factory(clock, fanout_batch=10)
    hub = factory.channels
    peers = subscribers(factory, 30)
    writes = [count_writes(peer) for peer in peers]
    for i in range(1, 21):
        hub.publish("news", i)
    # Queued as one run (nothing was written: 30 subscribers are more than a turn's budget).
    assert len(hub._fanouts) == 1 and hub.queued == 600
    assert spent(clock, hub) == [10, 10, 10]
    for peer, written in zip(peers, writes, strict=True):
        assert len(written) == 1
        assert [f["data"]["data"] for f in parse_frames(written[0])] == list(range(1, 21))
        assert offsets(peer) == list(range(1, 21))
        assert peer.protocol.frames_out == 1 + 1 + 20  # hello, subscribe reply, 20 publications
    assert hub.delivered == 600 and hub.queued == 0


def test_a_run_keeps_its_place_among_broadcasts_and_other_channels(clock: Clock) -> None:
    """Runs form only from consecutive publications of one channel: a broadcast or another
    channel's publication between them ends a run, and every connection gets everything in
    the order it was made."""
    factory = make_factory(clock, fanout_batch=10)
    hub = factory.channels
    peers = subscribers(factory, 30)
    both = peers[0]
    both.send({"type": "subscribe", "id": 2, "data": {"channel": "other"}})
    clock.advance(0)
    assert both.received()[0]["type"] == "subscribe"
    hub.publish("news", "n1")
    hub.publish("news", "n2")
    factory.broadcast("notice", "b")
    hub.publish("news", "n3")
    hub.publish("other", "o1")
    hub.publish("news", "n4")
    hub.publish("news", "n5")
    assert len(hub._fanouts) == 5
    turns(clock, hub)

    def seen(peer: Peer) -> list[Any]:
        return [f["data"] if f["type"] == "notice" else f["data"]["data"] for f in peer.received()]

    assert seen(both) == ["n1", "n2", "b", "n3", "o1", "n4", "n5"]
    for peer in peers[1:]:
        assert seen(peer) == ["n1", "n2", "b", "n3", "n4", "n5"]


def test_replies_and_pushes_on_a_subscriber_stay_whole_and_in_order(clock: Clock) -> None:
    """A subscriber that talks while a run is being written: its replies keep request
    order, a push to it comes whole (never inside a run's write), and it gets every
    publication once, in order."""
    factory = make_factory(clock, fanout_batch=10)
    hub = factory.channels
    peers = subscribers(factory, 40)
    talker = peers[-1]  # written to in the last turn
    for i in range(1, 6):
        hub.publish("news", i)
    one_turn(clock)
    talker.send({"type": "ping", "id": 1}, {"type": "ping", "id": 2})
    factory.send(talker.protocol.session_id, "direct", "d")
    for i in range(6, 9):
        hub.publish("news", i)  # a second run, queued behind the first
    turns(clock, hub)
    frames = talker.received()
    assert [f["type"] for f in frames[:3]] == ["pong", "pong", "direct"]
    assert [f["id"] for f in frames[:2]] == [1, 2]
    assert [f["data"]["offset"] for f in frames[3:]] == list(range(1, 9))


def test_a_subscriber_mid_run_gets_only_what_it_lacks(clock: Clock) -> None:
    """Subscribed after a run's first publications (its position is past them): it gets the
    rest of the run, in one write, with nothing twice."""
    factory = make_factory(clock, fanout_batch=10)
    hub = factory.channels
    subscribers(factory, 30)
    hub.publish("news", 1)
    hub.publish("news", 2)
    late = Peer(factory, 3)
    late.send({"type": "subscribe", "id": 1, "data": {"channel": "news"}})
    writes = count_writes(late)
    hub.publish("news", 3)
    hub.publish("news", 4)
    assert len(hub._fanouts) == 1  # one run, 1..4
    turns(clock, hub)
    clock.advance(0)
    frames = late.received()
    assert frames[0]["data"]["offset"] == 2
    assert [f["data"]["offset"] for f in frames[1:]] == [3, 4]
    assert len(writes) == 1  # 3 and 4 together


def test_a_run_stops_growing_at_its_byte_bound(clock: Clock) -> None:
    from heartbeatd.server.channels import MAX_RUN_BYTES

    factory = make_factory(clock, fanout_batch=10)
    hub = factory.channels
    peers = subscribers(factory, 30)
    text = "x" * 4000
    count = 3 * MAX_RUN_BYTES // 4000
    for _ in range(count):
        hub.publish("news", text)
    assert len(hub._fanouts) >= 3
    assert all(f.run.size <= MAX_RUN_BYTES for f in hub._fanouts)
    turns(clock, hub)
    assert offsets(peers[0]) == list(range(1, count + 1))


def test_the_turn_budget_counts_bytes_as_well_as_writes(clock: Clock) -> None:
    """A write of a large run costs more of a turn's budget than a small one (`write_cost`)."""
    from heartbeatd.server.channels import WRITE_UNIT_BYTES, write_cost

    factory = make_factory(clock, fanout_batch=60)
    hub = factory.channels
    peers = subscribers(factory, 100)
    text = "x" * (WRITE_UNIT_BYTES // 2)
    for _ in range(3):
        hub.publish("news", text)  # one and a half write units a run
    (run,) = hub._fanouts
    cost = write_cost(run.run.size)
    assert cost == 2
    before = hub.delivered
    one_turn(clock)
    assert hub.delivered - before == 3 * 30  # 30 subscribers this turn, not 60
    assert max(spent(clock, hub)) <= 60
    assert offsets(peers[-1]) == [1, 2, 3]


def test_a_large_broadcast_costs_its_bytes_too(clock: Clock) -> None:
    from heartbeatd.server.channels import WRITE_UNIT_BYTES

    factory = make_factory(clock, fanout_batch=20)
    hub = factory.channels
    peers = [Peer(factory, 20000 + i) for i in range(30)]
    factory.broadcast("notice", "x" * WRITE_UNIT_BYTES)  # two units a connection
    assert hub.broadcast_written == 0
    one_turn(clock)
    assert hub.broadcast_written == 10
    turns(clock, hub)
    assert pushes(peers[-1]) == ["x" * WRITE_UNIT_BYTES]


def paused_subscriber(factory: ServerFactory) -> Peer:
    (peer,) = subscribers(factory, 1)
    # The transport's buffer is full: Twisted paused the connection as a producer.
    peer.protocol.pauseProducing()
    return peer


def limit_config(**channels: Any) -> Any:
    return make_config(
        channels={"client_publish": True, **channels},
        limits={"max_outbound_buffer_bytes": 1024},
    )


@pytest.mark.parametrize("paused", [True, False])
def test_the_outbound_limit_decides_as_for_one_write_per_publication(
    clock: Clock, paused: bool
) -> None:
    """A run written to a slow subscriber is cut and the subscriber closed (slow_consumer)
    at exactly the publication where one write per publication would have been: the same
    bytes reach it, the same counters, the same eviction."""
    text = "y" * 100
    outcomes = []
    for coalesce in (True, False):
        factory = ServerFactory(
            limit_config(fanout_batch=1 if coalesce else 1000), default_registry(), clock
        )
        hub = factory.channels
        sub = paused_subscriber(factory) if paused else subscribers(factory, 1)[0]
        for _ in range(20):  # 20 x ~150 bytes: over the 1024-byte limit
            hub.publish("news", text)
            if not coalesce:
                one_turn(clock)  # written at once, one write each
        if coalesce:
            assert len(hub._fanouts) == 1 and len(hub._fanouts[0].datas) == 19
            turns(clock, hub)
        conn = sub.protocol
        outcomes.append((sub.transport.value(), conn.frames_out, conn.bytes_out, conn.close_reason))
    assert outcomes[0] == outcomes[1]
    if paused:
        assert outcomes[0][3] == "slow_consumer"
        assert 1024 < len(outcomes[0][0]) <= 1024 + 160  # the limit plus one publication
    else:
        assert outcomes[0][3] is None
        assert len(parse_frames(outcomes[0][0])) == 20


def test_a_run_that_fits_the_limit_goes_in_one_write(clock: Clock) -> None:
    factory = ServerFactory(limit_config(fanout_batch=1), default_registry(), clock)
    hub = factory.channels
    (sub,) = subscribers(factory, 1)
    writes = count_writes(sub)
    for i in range(5):  # 5 x ~70 bytes: within the limit
        hub.publish("news", i)
    turns(clock, hub)
    assert len(writes) == 2  # the first at once, then the run of four
    assert offsets(sub) == [1, 2, 3, 4, 5]
    assert sub.protocol.close_reason is None


def test_a_session_numbers_a_run_in_order(clock: Clock) -> None:
    """On a resumable session each publication of a run is numbered on its own (seq), in
    offset order, after what the session sent before."""
    factory = make_factory(clock, fanout_batch=10)
    hub = factory.channels
    peers = subscribers(factory, 30)
    session = peers[5]
    session.send({"type": "session", "id": "s", "data": {"expiry": 30}})
    assert session.received()[0]["type"] == "session"
    session.send({"type": "echo", "id": 1, "seq": 1, "data": "before"})
    assert session.received()[0]["seq"] == 1
    for i in range(1, 11):
        hub.publish("news", i)
    assert len(hub._fanouts) == 1
    turns(clock, hub)
    frames = session.received()
    assert [f["seq"] for f in frames] == list(range(2, 12))
    assert [f["data"]["offset"] for f in frames] == list(range(1, 11))
    (state,) = factory.sessions.states.values()
    assert state.out_seq == 11
    assert offsets(peers[6]) == list(range(1, 11))


# -- fairness between clients: publishes one client starts per turn ---------------------------


def test_a_client_starts_at_most_publish_per_turn_publishes_a_turn(clock: Clock) -> None:
    factory = make_factory(clock, fanout_batch=1000, publish_per_turn=10)
    hub = factory.channels
    peers = subscribers(factory, 3)
    publisher, other, control = Peer(factory, 1), Peer(factory, 2), Peer(factory, 3)
    publisher.send(*(publish_frame(i, i) for i in range(35)))
    # Ten started in the read; the rest wait for later turns, in order.
    assert hub.published == 10
    assert [r["data"]["offset"] for r in publisher.received()] == list(range(1, 11))
    # Another client is not held behind them: its publish starts in the same turn.
    other.send(publish_frame(99, "other"))
    assert hub.published == 11
    assert other.received()[0]["data"]["offset"] == 11
    started = []
    while hub._publishes_waiting:
        before = hub.published
        one_turn(clock)
        control.send({"type": "ping", "id": 7})
        assert control.received() == [{"type": "pong", "id": 7}]
        started.append(hub.published - before)
    assert started == [10, 10, 5]
    replies = publisher.received()
    assert [r["id"] for r in replies] == list(range(10, 35))
    assert [r["data"]["offset"] for r in replies] == list(range(12, 37))
    data = [f["data"]["data"] for f in peers[0].received()]
    assert data == [*range(10), "other", *range(10, 35)]
    assert hub.publishes_deferred == 25


def test_publishes_arriving_while_others_wait_queue_behind_them(clock: Clock) -> None:
    factory = make_factory(clock, fanout_batch=1000, publish_per_turn=4)
    hub = factory.channels
    (sub,) = subscribers(factory, 1)
    publisher = Peer(factory, 1)
    publisher.send(*(publish_frame(i, i) for i in range(6)))
    one_turn(clock)  # 4 + 2 started; more arrive in the same turn
    publisher.send(*(publish_frame(i, i) for i in range(6, 12)))
    assert hub.published == 8
    while hub._publishes_waiting:
        one_turn(clock)
    assert [f["data"]["data"] for f in sub.received()] == list(range(12))
    assert [r["id"] for r in publisher.received()] == list(range(12))
    # Quiet again: the next turn forgets the counts, and a publish starts at once.
    one_turn(clock)
    assert not hub._publishes_started and hub._publish_turn is None
    publisher.send(publish_frame(12, 12))
    assert hub.published == 13


def test_queued_broadcasts_to_the_same_connections_go_in_one_write(clock: Clock) -> None:
    factory = make_factory(clock, fanout_batch=100)
    hub = factory.channels
    peers = [Peer(factory, 20000 + i) for i in range(300)]
    writes = [count_writes(peer) for peer in peers]
    for i in range(10):
        factory.broadcast("notice", i)
    assert len(hub._fanouts) == 1 and hub.queued == 3000
    # A connection arriving meanwhile: the next broadcast has other connections, and queues
    # on its own (the newcomer never gets the earlier ones).
    newcomer = Peer(factory, 30000)
    factory.broadcast("notice", 10)
    assert len(hub._fanouts) == 2
    assert spent(clock, hub) == [100, 100, 100, 100, 100, 100, 1]
    for peer, written in zip(peers, writes, strict=True):
        assert len(written) == 2
        assert pushes(peer) == list(range(11))
    assert pushes(newcomer) == [10]
    assert hub.broadcast_written == 3000 + 301 and hub.queued == 0


def test_replies_that_waited_for_the_queue_are_released_a_few_a_turn(clock: Clock) -> None:
    """Backpressure's replies come out ``publish_per_turn`` a turn once the queue drains
    (200 in one turn held it ~5 ms), in request order."""
    factory = make_factory(clock, fanout_batch=100, fanout_backlog=100, publish_per_turn=8)
    hub = factory.channels
    subscribers(factory, 300)
    publisher = Peer(factory, 1)
    publisher.send(*(publish_frame(i, i) for i in range(40)))
    replies: list[int] = []
    released = []
    while hub._fanouts or hub._backlog_waiters or hub._publishes_waiting:
        one_turn(clock)
        got = [r["id"] for r in publisher.received()]
        released.append(len(got))
        replies += got
    assert replies == list(range(40))
    assert max(released) <= 8

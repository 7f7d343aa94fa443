"""The heartbeat sweep on a Clock: who gets pinged, who is evicted and when, stalls, batches."""

from __future__ import annotations

import pytest
from helpers import Peer, make_config
from twisted.internet.task import Clock

from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import HandlerRegistry


def started(clock: Clock, registry: HandlerRegistry, **hb: float) -> ServerFactory:
    # The periodic sweep alone: new connections' first-frame deadline has tests of its own
    # (test_liveness.py), and these peers answer only what a test step tells them to.
    factory = ServerFactory(
        make_config(
            heartbeat={"interval": 10, "timeout": 30, **hb}, limits={"first_frame_timeout": 0}
        ),
        registry,
        clock,
    )
    factory.doStart()
    return factory


def pings(peer: Peer) -> list[dict]:
    return [m for m in peer.received() if m["type"] == "ping"]


def test_only_quiet_clients_are_pinged(clock: Clock, registry: HandlerRegistry) -> None:
    factory = started(clock, registry)
    quiet, busy = Peer(factory, 1), Peer(factory, 2)
    clock.advance(5)
    busy.send({"type": "echo"})
    busy.received()
    clock.advance(5)  # first sweep at t=10: quiet silent 10s, busy 5s
    assert pings(quiet) == [{"type": "ping", "id": "hb-1"}]
    assert pings(busy) == []
    assert factory.heartbeat.last_sweep_due == 1


def test_ping_answered_keeps_the_client_and_records_round_trip(
    clock: Clock, registry: HandlerRegistry
) -> None:
    factory = started(clock, registry)
    peer = Peer(factory)
    answered = 0
    behind = 0.0  # keep the clock on the sweep grid
    for _ in range(20):  # 200 seconds, answering every ping 50 ms after it was sent
        clock.advance(10 - behind)
        behind = 0.0
        for ping in pings(peer):
            clock.advance(0.05)
            behind = 0.05
            peer.send({"type": "pong", "id": ping["id"]})
            answered += 1
    assert answered >= 9
    assert peer.protocol.connected and not peer.transport.disconnecting
    assert peer.protocol.last_rtt == pytest.approx(0.05)
    assert factory.closes == {}


def test_silent_client_is_aborted_after_timeout_with_a_record(
    clock: Clock, registry: HandlerRegistry
) -> None:
    factory = started(clock, registry)
    peer = Peer(factory, port=4444)
    clock.pump([10, 10, 10])  # t=30: silent exactly 30s, not more
    assert len(pings(peer)) == 3
    assert not peer.transport.disconnected
    clock.advance(10)  # t=40: silent 40s > 30s
    assert peer.transport.disconnected  # abortConnection, not a polite close
    assert peer.protocol.close_reason == "heartbeat_timeout"
    record = factory.recent_closes[-1]
    assert (record.reason, record.peer, record.pings_unanswered) == (
        "heartbeat_timeout",
        "127.0.0.1:4444",
        3,
    )
    assert "silent for 40.0s" in record.detail
    assert factory.heartbeat.evicted == 1


def test_any_frame_counts_as_life(clock: Clock, registry: HandlerRegistry) -> None:
    factory = started(clock, registry)
    peer = Peer(factory)
    for _ in range(10):
        clock.advance(9)
        peer.send({"type": "echo"})
    assert pings(peer) == []
    assert not peer.transport.disconnected


def test_a_client_is_always_pinged_before_eviction(clock: Clock, registry: HandlerRegistry) -> None:
    """Timeout barely above the interval: the first late sweep pings rather than evicts."""
    factory = started(clock, registry, interval=10, timeout=11)
    peer = Peer(factory)
    clock.advance(1)
    peer.send({"type": "echo"})
    peer.received()
    clock.pump([9, 10])  # t=10: silent 9s (not due); t=20: silent 19s > 11 but never pinged
    assert len(pings(peer)) == 1
    assert not peer.transport.disconnected
    clock.advance(10)
    assert peer.transport.disconnected


def test_stall_extends_deadlines_instead_of_evicting(
    clock: Clock, registry: HandlerRegistry
) -> None:
    factory = started(clock, registry)
    peer = Peer(factory)
    clock.advance(10)
    assert pings(peer)
    # The reactor blocks for 40s: the next sweep is 30s late, before any socket is read.
    clock.advance(40)
    assert not peer.transport.disconnected
    assert factory.heartbeat.stalls == 1
    assert factory.heartbeat.stalled == pytest.approx(30)
    # The peer's pong was waiting in the socket all along; it is read now.
    peer.send({"type": "pong"})
    assert factory.now() - peer.protocol.last_seen == 0
    clock.pump([10] * 3)  # alive silence 30s: still fine
    assert not peer.transport.disconnected
    clock.advance(10)
    assert peer.transport.disconnected  # a genuinely silent client is still evicted


def test_sweep_handles_due_clients_in_batches(clock: Clock, registry: HandlerRegistry) -> None:
    factory = started(clock, registry, sweep_batch=2)
    peers = [Peer(factory, 10 + i) for i in range(5)]
    scheduled: list[float] = []
    real_call_later = clock.callLater

    def spy(delay, fn, *args, **kw):
        if fn == factory.heartbeat._run_batch:
            scheduled.append(delay)
        return real_call_later(delay, fn, *args, **kw)

    clock.callLater = spy  # type: ignore[method-assign]
    clock.advance(10)
    assert scheduled == [0, 0]  # 5 clients, 2 per batch: two yields to the reactor
    assert all(len(pings(p)) == 1 for p in peers)
    assert factory.heartbeat.pings_sent == 5


def test_after_sweep_runs_once_a_sweep_is_done_and_its_failure_stops_nothing(
    clock: Clock, registry: HandlerRegistry
) -> None:
    """The daemon gives back the memory a sweep freed there (malloc.*): once per sweep, after
    its last batch, whatever it raises."""
    factory = started(clock, registry, sweep_batch=2)
    peers = [Peer(factory, 10 + i) for i in range(5)]
    seen: list[int] = []

    def after() -> None:
        seen.append(factory.heartbeat.pings_sent)
        raise RuntimeError("boom")

    factory.heartbeat.after_sweep = after
    clock.advance(10)
    assert seen == [5]  # after the third batch, not after each
    clock.advance(10)  # silent still: each is pinged again
    assert seen == [5, 10] and factory.heartbeat.running
    assert all(len(pings(p)) == 2 for p in peers)


def test_sweep_touches_only_due_clients(clock: Clock, registry: HandlerRegistry) -> None:
    factory = started(clock, registry)
    peers = [Peer(factory, i) for i in range(100)]
    clock.advance(5)
    for p in peers[10:]:
        p.send({"type": "echo"})
    clock.advance(5)
    assert factory.heartbeat.last_sweep_due == 10
    assert sum(len(pings(p)) for p in peers) == 10


def test_a_failing_client_does_not_stop_the_loop(clock: Clock, registry: HandlerRegistry) -> None:
    factory = started(clock, registry)
    bad, good = Peer(factory, 1), Peer(factory, 2)

    def broken(frame: bytes, now: float) -> None:
        raise RuntimeError("boom")

    bad.protocol.send_heartbeat = broken  # type: ignore[method-assign]
    clock.advance(10)
    assert len(pings(good)) == 1
    clock.advance(10)
    assert len(pings(good)) == 1
    assert factory.heartbeat.running


def test_stop_factory_stops_the_loop(clock: Clock, registry: HandlerRegistry) -> None:
    factory = started(clock, registry)
    peer = Peer(factory)
    factory.doStop()
    clock.pump([10] * 5)
    assert pings(peer) == []
    assert not factory.heartbeat.running


def test_reconfigure_applies_to_live_connections(clock: Clock, registry: HandlerRegistry) -> None:
    factory = started(clock, registry)
    peer = Peer(factory)
    factory.heartbeat.reconfigure(interval=2, timeout=5)
    clock.pump([2, 2])
    assert len(pings(peer)) == 2
    clock.advance(2)  # silent 6s > 5s
    assert peer.transport.disconnected


def test_apply_config_reaches_live_connections(clock: Clock, registry: HandlerRegistry) -> None:
    factory = started(clock, registry)
    peer = Peer(factory)
    factory.apply_config(make_config(max_frame_bytes=16, heartbeat={"interval": 1, "timeout": 2}))
    peer.send({"type": "echo", "data": "more than sixteen bytes"})
    (error,) = peer.received()
    assert error["error"]["code"] == "frame_too_large"
    assert factory.heartbeat.interval == 1

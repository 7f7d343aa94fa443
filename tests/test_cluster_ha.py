"""Failover and partition behaviour of the broker and the hub, in memory (deterministic time).

The same behaviours with real processes: test_sentinel.py (a Sentinel failover) and
test_partition.py (a node cut off from Redis).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers import Peer
from redis_server import RedisServer
from test_channels import make_factory, subscribe
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from heartbeatd.cluster.broker import MemoryBroker, _Stream
from heartbeatd.config import ClusterConfig


def test_after_a_new_epoch_the_new_epochs_history_is_delivered(clock: Clock) -> None:
    """Redis came back with a new epoch (failover, or restarted empty) and publications in it
    that this node's pub/sub missed: the subscriber is told the old epoch is gone
    (``resync``, offset 0 of the new one) and then gets the new epoch's publications."""
    broker = MemoryBroker(clock)
    factory = make_factory(clock, broker)
    peer = Peer(factory)
    old = subscribe(peer)["epoch"]
    hub = factory.channels
    broker.listener = None  # the link is down: the fan-out misses what follows
    hub.on_link(False)
    broker._streams["news"] = stream = _Stream(clock.seconds())
    for data in ('"a"', '"b"'):
        broker.publish("news", data)
    broker.listener = hub
    hub.on_link(True)
    frames = peer.received()
    assert frames == [
        {
            "type": "resync",
            "data": {
                "channel": "news",
                "epoch": stream.epoch,
                "offset": 0,
                "recovered": False,
                "reason": "epoch_changed",
            },
        },
        {"type": "publication", "data": {"channel": "news", "offset": 1, "data": "a"}},
        {"type": "publication", "data": {"channel": "news", "offset": 2, "data": "b"}},
    ]
    assert stream.epoch != old
    broker.publish("news", '"c"')
    assert [f["data"]["offset"] for f in peer.received()] == [3]


def test_a_live_subscriber_meeting_a_new_epoch_midway_gets_its_start(clock: Clock) -> None:
    """Its pub/sub link came back before the node caught up, and the first publication it sees
    of the new epoch is not the first: the earlier ones come from the history, after one
    ``resync``, none skipped and none twice."""
    broker = MemoryBroker(clock)
    factory = make_factory(clock, broker)
    peer = Peer(factory)
    subscribe(peer)
    hub = factory.channels
    broker.listener = None
    broker._streams["news"] = stream = _Stream(clock.seconds())
    for data in ('"a"', '"b"'):
        broker.publish("news", data)
    broker.listener = hub
    broker.publish("news", '"c"')  # offset 3 of the new epoch reaches the live subscriber
    frames = peer.received()
    assert frames[0]["type"] == "resync"
    assert (frames[0]["data"]["epoch"], frames[0]["data"]["offset"]) == (stream.epoch, 0)
    assert [(f["data"]["offset"], f["data"]["data"]) for f in frames[1:]] == [
        (1, "a"),
        (2, "b"),
        (3, "c"),
    ]


def test_a_new_epoch_beyond_the_history_is_one_resync_at_its_position(clock: Clock) -> None:
    broker = MemoryBroker(clock, history_size=1)
    factory = make_factory(clock, broker)
    peer = Peer(factory)
    subscribe(peer)
    hub = factory.channels
    broker.listener = None
    broker._streams["news"] = stream = _Stream(clock.seconds())
    for data in ('"a"', '"b"', '"c"'):
        broker.publish("news", data)
    broker.listener = hub
    hub.on_link(True)
    resyncs = [f["data"] for f in peer.received()]
    # First told the old epoch is gone, then that the new one's start is gone too.
    assert [(r["epoch"], r["offset"], r["reason"]) for r in resyncs] == [
        (stream.epoch, 0, "epoch_changed"),
        (stream.epoch, 3, "history_lost"),
    ]
    broker.publish("news", '"d"')
    assert [f["data"]["offset"] for f in peer.received()] == [4]


# -- the per-connection command deadline ----------------------------------------------------


class _Broker:
    """What a protocol of the Redis broker uses of it."""

    def __init__(self, clock: Clock, timeout: float) -> None:
        self.reactor = clock
        self.command_timeout = timeout
        self.timeouts = 0
        self.lost: list[Any] = []
        self.listener = None

    def _lost(self, proto: Any) -> None:
        self.lost.append(proto)


def commands(clock: Clock, timeout: float = 2.0) -> tuple[Any, StringTransport, _Broker]:
    from heartbeatd.cluster.redis import _Commands, _ProtocolFactory

    broker = _Broker(clock, timeout)
    factory = _ProtocolFactory(broker, _Commands, 0, None)  # type: ignore[arg-type]
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, broker


def test_an_unanswered_command_resets_the_link_after_command_timeout(clock: Clock) -> None:
    proto, transport, broker = commands(clock)
    first = proto.execute_command("PING")
    clock.advance(1.5)
    second = proto.execute_command("PING")
    proto.dataReceived(b"+PONG\r\n")  # the first is answered in time
    assert first.called and not second.called
    clock.advance(1.9)  # 3.4 s since the first, 1.9 since the second: still in time
    assert not transport.disconnecting
    clock.advance(0.2)
    assert broker.timeouts == 1
    assert transport.disconnecting  # aborted: every waiting command fails with it
    proto.connectionLost(Failure(ConnectionError("aborted")))
    failures: list[Failure] = []
    second.addErrback(failures.append)
    assert failures and broker.lost == [proto]
    assert not clock.getDelayedCalls()  # no timer left behind


def test_an_idle_connection_holds_no_timer(clock: Clock) -> None:
    proto, transport, broker = commands(clock)
    d: Deferred[Any] = proto.execute_command("PING")
    proto.dataReceived(b"+PONG\r\n")
    assert d.called
    clock.advance(10)
    assert not clock.getDelayedCalls() and broker.timeouts == 0
    assert not transport.disconnecting


def test_cluster_enabled_by_either_key() -> None:
    assert ClusterConfig(redis="redis://h:1/0").enabled
    assert not ClusterConfig().enabled


# -- the data generation (FENCE) on a real redis-server ---------------------------------------


def test_a_new_replication_id_gives_every_channel_a_new_epoch(tmp_path: Path) -> None:
    from heartbeatd.cluster.redis import FENCE, POSITION, PUBLISH

    with RedisServer(tmp_path / "redis") as redis:

        def run(script: str, *argv: object) -> list[str]:
            return redis.cli("EVAL", script, "0", "hb", *map(str, argv)).splitlines()

        assert run(FENCE, "id-1") == ["0"]  # a new data set: recorded, nothing to fence
        assert run(PUBLISH, "news", '"a"', "e1", 10, 0) == ["e1", "1"]
        assert run(PUBLISH, "news", '"b"', "e2", 10, 0) == ["e1", "2"]  # same epoch
        assert run(FENCE, "id-1") == ["0"]  # the same server again: nothing changes
        assert run(POSITION, "news", "e3") == ["e1", "2"]

        assert run(FENCE, "id-2") == ["1"]  # promoted replica: generation 1
        assert run(FENCE, "id-2") == ["0"]  # the second node to see it
        assert run(POSITION, "news", "e4") == ["e4", "0"]  # a new epoch, from offset 0
        assert run(PUBLISH, "news", '"c"', "e5", 10, 0) == ["e4", "1"]
        assert redis.cli("XLEN", "hb:ch:news:x") == "1"  # the old epoch's stream is gone


def test_pub_sub_messages_take_the_fast_path_and_replies_the_usual_one(clock: Clock) -> None:
    from heartbeatd.cluster.redis import _ProtocolFactory, _Subscriber

    broker = _Broker(clock, 2.0)
    messages: list[tuple[str, str]] = []
    bad: list[str] = []
    broker._message = lambda key, text: messages.append((key, text))  # type: ignore[attr-defined]
    broker._bad_message = bad.append  # type: ignore[attr-defined]
    proto = _ProtocolFactory(broker, _Subscriber, 0, None).buildProtocol(None)  # type: ignore[arg-type]
    proto.makeConnection(StringTransport())
    acked = proto.subscribe("hb:ch:news")
    wire = (
        b"*3\r\n$9\r\nsubscribe\r\n$10\r\nhb:ch:news\r\n:1\r\n"
        b'*3\r\n$7\r\nmessage\r\n$10\r\nhb:ch:news\r\n$13\r\npe1 1 "\xc3\xa9t\xc3\xa9"\r\n'
        b"*3\r\n$7\r\nmessage\r\n$10\r\nhb:ch:news\r\n$2\r\n\xff\xfe\r\n"
    )
    for i in range(len(wire)):  # byte by byte: the reader keeps what is unfinished
        proto.dataReceived(wire[i : i + 1])
    assert acked.called
    assert messages == [("hb:ch:news", 'pe1 1 "été"')]
    assert bad == ["not UTF-8"]
    clock.advance(5)  # the SUBSCRIBE was answered: its deadline passes harmlessly
    assert broker.timeouts == 0 and not proto.transport.disconnecting


class _CommandsDown(MemoryBroker):
    """The pub/sub link is back, the commands one not yet: history reads fail."""

    down = True

    def history(self, channel: str, epoch: str, since: int) -> Deferred[Any]:
        from twisted.internet.defer import fail

        from heartbeatd.cluster.broker import BrokerUnavailable

        if self.down:
            return fail(BrokerUnavailable("commands link down"))
        return super().history(channel, epoch, since)


def test_a_new_epoch_met_before_the_commands_link_is_back_waits_for_it(clock: Clock) -> None:
    broker = _CommandsDown(clock)
    broker.down = False
    factory = make_factory(clock, broker)
    peer = Peer(factory)
    subscribe(peer)
    hub = factory.channels
    broker.down = True
    broker.listener = None
    broker._streams["news"] = stream = _Stream(clock.seconds())
    broker.publish("news", '"a"')
    broker.listener = hub
    broker.publish("news", '"b"')
    assert peer.received() == []  # held: nothing skipped while the start cannot be read
    broker.down = False
    hub.on_link(True)
    frames = peer.received()
    assert (frames[0]["type"], frames[0]["data"]["epoch"]) == ("resync", stream.epoch)
    assert [f["data"]["data"] for f in frames[1:]] == ["a", "b"]

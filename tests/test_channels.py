"""Channels on one daemon (the embedded broker): subscribe, publish, recovery, presence, limits.

Driven in memory (StringTransport peers on a Clock); the same behaviour over real sockets and
the real daemon is in test_channels_daemon.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import Peer, make_config
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from heartbeatd.cluster.broker import MemoryBroker, Position
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import HandlerError, default_registry


def make_factory(clock: Clock, broker: MemoryBroker | None = None, **channels: Any):
    config = make_config(channels=channels) if channels else make_config()
    return ServerFactory(config, default_registry(), clock, broker=broker)


def subscribe(peer: Peer, channel: str = "news", id: int = 1, **extra: Any) -> dict[str, Any]:
    """Subscribe; the reply's data (frames after it stay in ``peer.backlog``)."""
    peer.send({"type": "subscribe", "id": id, "data": {"channel": channel, **extra}})
    peer.factory.clock.advance(0)  # type: ignore[attr-defined]
    frames = peer.received()
    assert frames[0]["type"] == "subscribe", frames
    peer.backlog = frames[1:]  # type: ignore[attr-defined]
    return frames[0]["data"]


def publish(factory: ServerFactory, channel: str, data: Any) -> int:
    d = factory.channels.publish(channel, data)
    result: list[Any] = []
    d.addBoth(result.append)
    return result[0]


def error_code(frames: list[dict[str, Any]]) -> str:
    assert frames[-1]["type"] == "error", frames
    return frames[-1]["error"]["code"]


def test_subscribe_answers_the_position(clock: Clock) -> None:
    factory = make_factory(clock)
    peer = Peer(factory)
    answer = subscribe(peer)
    assert answer == {"channel": "news", "epoch": answer["epoch"], "offset": 0}
    assert isinstance(answer["epoch"], str) and answer["epoch"]
    publish(factory, "news", 1)
    publish(factory, "news", 2)
    other = Peer(factory, port=40001)
    assert subscribe(other) == {"channel": "news", "epoch": answer["epoch"], "offset": 2}


def test_publications_reach_every_subscriber_with_consecutive_offsets(clock: Clock) -> None:
    factory = make_factory(clock)
    a, b, outsider = Peer(factory), Peer(factory, 40001), Peer(factory, 40002)
    subscribe(a)
    subscribe(b)
    for i in range(3):
        assert publish(factory, "news", {"n": i}) == i + 1
    expected = [
        {"type": "publication", "data": {"channel": "news", "offset": i + 1, "data": {"n": i}}}
        for i in range(3)
    ]
    assert a.received() == expected
    assert b.received() == expected
    assert outsider.received() == []


def test_client_publish_is_forbidden_unless_configured(clock: Clock) -> None:
    factory = make_factory(clock)
    peer = Peer(factory)
    peer.send({"type": "publish", "id": 2, "data": {"channel": "news", "data": "hi"}})
    assert error_code(peer.received()) == "forbidden"

    factory = make_factory(clock, client_publish=True)
    peer = Peer(factory)
    subscribe(peer)
    peer.send({"type": "publish", "id": 2, "data": {"channel": "news", "data": "hi"}})
    assert peer.received() == [
        {"type": "publication", "data": {"channel": "news", "offset": 1, "data": "hi"}},
        {"type": "publish", "id": 2, "data": {"channel": "news", "offset": 1}},
    ]


def test_handlers_publish_through_the_server(clock: Clock) -> None:
    factory = make_factory(clock)

    def announce(request: Any) -> Deferred[Any]:
        return request.server.publish("news", request.data)

    factory.registry.add("announce", announce)
    listener, speaker = Peer(factory), Peer(factory, 40001)
    subscribe(listener)
    speaker.send({"type": "announce", "id": 7, "data": "hello"})
    assert speaker.received() == [{"type": "announce", "id": 7, "data": 1}]
    assert listener.received()[0]["data"] == {"channel": "news", "offset": 1, "data": "hello"}


def test_recovery_delivers_what_was_missed_in_order_then_newer(clock: Clock) -> None:
    factory = make_factory(clock)
    peer = Peer(factory)
    epoch = subscribe(peer)["epoch"]
    publish(factory, "news", "a")
    peer.received()
    peer.disconnect()
    publish(factory, "news", "b")
    publish(factory, "news", "c")

    again = Peer(factory, 40001)
    again.send(
        {
            "type": "subscribe",
            "id": 1,
            "data": {"channel": "news", "since": {"epoch": epoch, "offset": 1}},
        }
    )
    clock.advance(0)
    frames = again.received()
    assert frames[0] == {
        "type": "subscribe",
        "id": 1,
        "data": {"channel": "news", "epoch": epoch, "offset": 3, "recovered": True},
    }
    assert [(f["data"]["offset"], f["data"]["data"]) for f in frames[1:]] == [(2, "b"), (3, "c")]
    publish(factory, "news", "d")
    assert [f["data"]["offset"] for f in again.received()] == [4]


def test_recovery_fails_explicitly_when_history_or_epoch_is_gone(clock: Clock) -> None:
    factory = make_factory(clock, history_size=2, history_ttl=60)
    peer = Peer(factory)
    epoch = subscribe(peer)["epoch"]
    for i in range(5):
        publish(factory, "news", i)
    peer.received()
    cases = [
        ({"epoch": epoch, "offset": 1}, False),  # 2..5 missed, only 2 kept
        ({"epoch": epoch, "offset": 3}, True),
        ({"epoch": "other", "offset": 5}, False),
        ({"epoch": epoch, "offset": 9}, False),  # ahead of the stream
    ]
    others = []
    for n, (since, recovered) in enumerate(cases):
        p = Peer(factory, 40001 + n)
        others.append(p)
        answer = subscribe(p, since=since)
        assert answer["recovered"] is recovered, since
        assert answer["offset"] == 5
        backlog = [f["data"]["offset"] for f in p.backlog]
        assert backlog == ([4, 5] if recovered else [])
    clock.advance(61)  # no publication for history_ttl: the history is dropped...
    late = Peer(factory, 40100)
    answer = subscribe(late, since={"epoch": epoch, "offset": 4})
    assert (answer["recovered"], answer["epoch"], answer["offset"]) == (False, epoch, 5)
    # ...but while subscribers watch, nothing was lost for them: same epoch and offset.
    later = Peer(factory, 40101)
    assert subscribe(later, since={"epoch": epoch, "offset": 5})["recovered"] is True
    for p in (peer, late, later, *others):
        p.disconnect()
    assert factory.channels.subscription_count() == 0
    clock.advance(61)  # an unwatched channel idle past history_ttl starts a new epoch
    answer = subscribe(Peer(factory, 40200), since={"epoch": epoch, "offset": 5})
    assert answer["recovered"] is False and answer["epoch"] != epoch


class SlowBroker(MemoryBroker):
    """A broker whose fan-out set-up and lookups finish when the test says."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.waiting: list[tuple[Deferred[Any], Any]] = []

    def _later(self, result: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.waiting.append((d, result))
        return d

    def subscribe(self, channel: str) -> Deferred[None]:
        return self._later(None)

    def history(self, channel: str, epoch: str, since: int) -> Deferred[Any]:
        return self._later(lambda: super(SlowBroker, self).history(channel, epoch, since))

    def release(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, result in waiting:
            if callable(result):
                result().addCallback(d.callback)
            else:
                d.callback(result)


def test_publications_during_set_up_come_after_the_reply_once_each(clock: Clock) -> None:
    broker = SlowBroker(clock)
    factory = make_factory(clock, broker)
    epoch = broker._stream("news").epoch
    publish(factory, "news", "a")
    peer = Peer(factory)
    peer.send(
        {
            "type": "subscribe",
            "id": 1,
            "data": {"channel": "news", "since": {"epoch": epoch, "offset": 0}},
        }
    )
    broker.release()  # the fan-out is ready; the history lookup is in flight
    publish(factory, "news", "b")  # arrives by fan-out while the history is read
    assert peer.received() == []
    broker.release()
    frames = peer.received()
    assert frames[0]["data"]["recovered"] is True
    assert [f["data"]["data"] for f in frames[1:]] == ["a", "b"]


def test_a_gap_in_fan_out_is_filled_from_history(clock: Clock) -> None:
    factory = make_factory(clock)
    peer = Peer(factory)
    epoch = subscribe(peer)["epoch"]
    stream = factory.channels.broker._stream("news")
    # Two publications the fan-out lost (as over a broken Redis link), then one it delivers.
    for data in ("lost-1", "lost-2"):
        stream.offset += 1
        stream.entries.append(f'"{data}"')
    factory.channels.on_publication("news", epoch, 3, '"seen"')
    assert [f["data"]["data"] for f in peer.received()] == ["lost-1", "lost-2", "seen"]
    factory.channels.on_publication("news", epoch, 3, '"seen"')  # a duplicate
    assert peer.received() == []


def test_a_new_epoch_under_a_live_subscription_is_a_resync(clock: Clock) -> None:
    factory = make_factory(clock)
    peer = Peer(factory)
    subscribe(peer)
    factory.channels.on_publication("news", "fresh", 1, '"x"')
    assert peer.received() == [
        {
            "type": "resync",
            "data": {
                "channel": "news",
                "epoch": "fresh",
                "offset": 0,
                "recovered": False,
                "reason": "epoch_changed",
            },
        },
        {"type": "publication", "data": {"channel": "news", "offset": 1, "data": "x"}},
    ]


def test_unsubscribe_stops_delivery(clock: Clock) -> None:
    factory = make_factory(clock)
    peer = Peer(factory)
    subscribe(peer)
    peer.send({"type": "unsubscribe", "id": 2, "data": {"channel": "news"}})
    assert peer.received() == [{"type": "unsubscribe", "id": 2, "data": {"channel": "news"}}]
    publish(factory, "news", 1)
    assert peer.received() == []
    peer.send({"type": "unsubscribe", "id": 3, "data": {"channel": "news"}})
    assert error_code(peer.received()) == "not_subscribed"


def test_presence_and_join_leave_events(clock: Clock) -> None:
    factory = make_factory(clock)
    watcher, other = Peer(factory), Peer(factory, 40001)
    subscribe(watcher, join_leave=True)
    subscribe(other)
    node = factory.config.name
    joined = {"channel": "news", "session": other.protocol.session_id, "node": node}
    assert watcher.received() == [{"type": "join", "data": {**joined, "identity": None}}]
    watcher.send({"type": "presence", "id": 3, "data": {"channel": "news"}})
    reply = watcher.received()[0]
    assert reply["type"] == "presence" and reply["id"] == 3
    sessions = {c["session"] for c in reply["data"]["clients"]}
    assert sessions == {watcher.protocol.session_id, other.protocol.session_id}
    assert all(c["node"] == node for c in reply["data"]["clients"])
    other.disconnect()  # a disconnect unsubscribes: its leave is announced
    assert watcher.received() == [{"type": "leave", "data": {**joined, "identity": None}}]
    assert factory.channels.subscription_count() == 1


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ("news", "bad_request"),
        ({"channel": ""}, "bad_channel"),
        ({"channel": "no spaces"}, "bad_channel"),
        ({"channel": 5}, "bad_channel"),
        ({"channel": "x" * 33}, "bad_channel"),
        ({"channel": "news", "since": {"epoch": "e", "offset": -1}}, "bad_request"),
        ({"channel": "news", "since": {"epoch": "e", "offset": 2**64}}, "bad_request"),
        ({"channel": "news", "since": "latest"}, "bad_request"),
        ({"channel": "news", "join_leave": "yes"}, "bad_request"),
    ],
)
def test_bad_subscribe_requests_get_typed_errors(clock: Clock, data: Any, code: str) -> None:
    factory = make_factory(clock, max_name_length=32)
    peer = Peer(factory)
    peer.send({"type": "subscribe", "id": 1, "data": data})
    assert error_code(peer.received()) == code
    assert factory.errors[code] == 1  # counted, and a typed error rather than internal_error


def test_limits_on_channels_and_publication_size(clock: Clock) -> None:
    factory = make_factory(clock, max_per_connection=2, max_publication_bytes=64)
    peer = Peer(factory)
    subscribe(peer, "a")
    subscribe(peer, "b", id=2)
    peer.send({"type": "subscribe", "id": 3, "data": {"channel": "c"}})
    assert error_code(peer.received()) == "too_many_channels"
    peer.send({"type": "subscribe", "id": 4, "data": {"channel": "a"}})
    assert error_code(peer.received()) == "already_subscribed"
    failure: Any = publish(factory, "a", "x" * 100)
    assert failure.check(HandlerError) and failure.value.code == "publication_too_large"
    failure = publish(factory, "a", object())
    assert failure.check(HandlerError) and failure.value.code == "bad_request"
    assert publish(factory, "a", "small") == 1


def test_unavailable_broker_is_a_typed_error(clock: Clock) -> None:
    broker = MemoryBroker(clock)
    factory = make_factory(clock, broker, client_publish=True)
    peer = Peer(factory)
    broker.up = False
    for type_ in ("subscribe", "publish", "presence"):
        peer.send({"type": type_, "id": 1, "data": {"channel": "news", "data": 1}})
        assert error_code(peer.received()) == "unavailable"


def test_application_handlers_of_the_same_type_are_kept(clock: Clock) -> None:
    registry = default_registry()
    registry.add("publish", lambda request: "mine")
    factory = ServerFactory(make_config(), registry, clock)
    peer = Peer(factory)
    peer.send({"type": "publish", "id": 1, "data": {}})
    assert peer.received() == [{"type": "publish", "id": 1, "data": "mine"}]


def test_memory_history_bounds(clock: Clock) -> None:
    broker = MemoryBroker(clock, history_size=3, history_ttl=0)
    for i in range(10):
        broker.publish("c", str(i))
    epoch = broker._stream("c").epoch
    result: list[Any] = []
    broker.history("c", epoch, 7).addCallback(result.append)
    assert result[0].position == Position(epoch, 10)
    assert result[0].entries == ["7", "8", "9"]
    broker.history("c", epoch, 6).addCallback(result.append)
    assert result[1].entries is None
    clock.advance(10_000)  # history_ttl 0 keeps it forever
    broker.history("c", epoch, 10).addCallback(result.append)
    assert result[2].entries == []


def test_cluster_style_send_broadcast_and_clients_on_one_node(clock: Clock) -> None:
    factory = make_factory(clock)
    a, b = Peer(factory), Peer(factory, 40001)
    hub = factory.channels
    out: list[Any] = []
    hub.send(a.protocol.session_id, "note", 1).addCallback(out.append)
    hub.send("nobody", "note", 1).addCallback(out.append)
    hub.broadcast("all", 2).addCallback(out.append)
    hub.clients().addCallback(out.append)
    assert out[:3] == [True, False, 2]
    assert {c["session"] for c in out[3]} == {a.protocol.session_id, b.protocol.session_id}
    assert a.received() == [{"type": "note", "data": 1}, {"type": "all", "data": 2}]


class ClusteredBroker(MemoryBroker):
    """A one-process stand-in for a cluster: records what would cross to other nodes."""

    clustered = True

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.sent: list[tuple[str, str, Any]] = []
        self.registered: dict[str, dict[str, Any]] = {}

    def send(self, session: str, type: str, data: Any) -> Deferred[bool]:
        self.sent.append((session, type, data))
        return Deferred.fromCoroutine(_true())

    def client_connected(self, session: str, info: dict[str, Any]) -> None:
        self.registered[session] = info

    def client_disconnected(self, session: str) -> None:
        del self.registered[session]


async def _true() -> bool:
    return True


def test_handlers_send_reaches_sessions_of_other_nodes(clock: Clock) -> None:
    broker = ClusteredBroker(clock)
    factory = make_factory(clock, broker)

    def tell(request: Any) -> bool:
        return request.server.send(request.data, "note", "hi")

    factory.registry.add("tell", tell)
    local, other = Peer(factory), Peer(factory, 40001)
    assert set(broker.registered) == {local.protocol.session_id, other.protocol.session_id}
    assert broker.registered[local.protocol.session_id]["node"] == broker.node_id
    local.send({"type": "tell", "id": 1, "data": other.protocol.session_id})
    assert other.received() == [{"type": "note", "data": "hi"}]  # on this node: direct
    local.send({"type": "tell", "id": 2, "data": "elsewhere"})
    assert local.received()[-1] == {"type": "tell", "id": 2, "data": True}
    assert broker.sent == [("elsewhere", "note", "hi")]  # forwarded to its node
    broker.up = False
    local.send({"type": "tell", "id": 3, "data": "elsewhere"})
    assert local.received()[-1] == {"type": "tell", "id": 3, "data": False}
    other.disconnect()
    assert set(broker.registered) == {local.protocol.session_id}


def test_a_full_set_up_buffer_loses_nothing(clock: Clock, monkeypatch) -> None:
    from heartbeatd.server import channels

    monkeypatch.setattr(channels, "MAX_BUFFERED", 2)
    broker = SlowBroker(clock)
    factory = make_factory(clock, broker)
    peer = Peer(factory)
    peer.send({"type": "subscribe", "id": 1, "data": {"channel": "news"}})
    broker.release()  # fan-out ready; the position lookup (synchronous here) follows
    # Five publications while the subscription is not live yet: two fit the buffer.
    sub = factory.channels._subs["news"][peer.protocol.session_id]
    sub.pending = []
    sub.offset = 0
    for i in range(1, 6):
        broker.publish("news", str(i))
    factory.channels._go_live(sub, [])
    broker.release()  # the history read for what overflowed
    offsets = [f["data"]["offset"] for f in peer.received() if f["type"] == "publication"]
    assert offsets == [1, 2, 3, 4, 5]


class CountingBroker(MemoryBroker):
    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.history_calls = 0

    def history(self, channel: str, epoch: str, since: int) -> Deferred[Any]:
        self.history_calls += 1
        return super().history(channel, epoch, since)


def test_link_back_catches_up_once_per_channel_position(clock: Clock) -> None:
    broker = CountingBroker(clock)
    factory = make_factory(clock, broker)
    peers = [Peer(factory, 40000 + i) for i in range(5)]
    for p in peers:
        subscribe(p)
    stream = broker._stream("news")
    stream.offset += 1  # one publication the fan-out lost while the link was down
    stream.entries.append('"missed"')
    factory.channels.on_link(False)
    factory.channels.on_link(True)
    assert broker.history_calls == 1
    for p in peers:
        assert [f["data"]["data"] for f in p.received()] == ["missed"]


def test_reload_applies_channel_limits_and_history(clock: Clock) -> None:
    factory = make_factory(clock, max_per_connection=1)
    peer = Peer(factory)
    subscribe(peer, "a")
    for i in range(5):
        publish(factory, "a", i)
    peer.received()
    factory.apply_config(make_config(channels={"max_per_connection": 2, "history_size": 2}))
    subscribe(peer, "b", id=2)  # the new limit applies to live connections
    broker = factory.channels.broker
    assert broker.history_size == 2 and list(broker._stream("a").entries) == ["3", "4"]

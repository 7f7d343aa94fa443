"""RedisBroker pieces that need no Redis: URL parsing, pub/sub decoding, bad input, what it sends.

Everything that talks to Redis is tested against a real redis-server in test_cluster.py.
"""

from __future__ import annotations

from typing import Any

from helpers import make_config
from twisted.internet.defer import succeed
from twisted.internet.testing import MemoryReactorClock

from heartbeatd.cluster.redis import RedisBroker, parse_redis_url


class Listener:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def on_publication(self, channel: str, epoch: str, offset: int, data: str) -> None:
        self.events.append(("pub", channel, epoch, offset, data))

    def on_presence(self, channel: str, event: str, info: dict[str, Any]) -> None:
        self.events.append((event, channel, info["session"]))

    def on_message(self, session: str, type: str, data: Any) -> None:
        self.events.append(("send", session, type, data))

    def on_broadcast(self, type: str, data: Any) -> None:
        self.events.append(("all", type, data))

    def on_link(self, up: bool) -> None:
        self.events.append(("link", up))


def make_broker(**cluster: Any) -> RedisBroker:
    config = make_config(cluster={"redis": "redis://127.0.0.1:1/0", **cluster})
    return RedisBroker(MemoryReactorClock(), config.cluster, config.channels)


def test_parse_redis_url() -> None:
    assert parse_redis_url("redis://10.0.0.5:6380/3") == ("10.0.0.5", 6380, 3, None)
    assert parse_redis_url("redis://h") == ("h", 6379, 0, None)
    assert parse_redis_url("redis://:p%40ss@h:1/0") == ("h", 1, 0, "p@ss")


def test_pub_sub_messages_reach_the_listener_and_garbage_does_not_crash() -> None:
    broker = make_broker(namespace="ns", node_id="me")
    listener = Listener()
    broker.listener = listener
    broker._message("ns:ch:a:b/c", 'pe1 7 {"x": "y z"}')
    broker._message("ns:ch:news", 'j{"session": "s1", "node": "n"}')
    broker._message("ns:ch:news", 'l{"session": "s1", "node": "n"}')
    broker._message("ns:node:me", '{"s": "s2", "t": "note", "d": [1]}')
    broker._message("ns:all", '{"t": "all", "d": null}')
    for garbage in ("p", "pe1 x y", "j{", "", "q123"):
        broker._message("ns:ch:news", garbage)
    broker._message("ns:node:me", "not json")
    assert listener.events == [
        ("pub", "a:b/c", "e1", 7, '{"x": "y z"}'),
        ("join", "news", "s1"),
        ("leave", "news", "s1"),
        ("send", "s2", "note", [1]),
        ("all", "all", None),
    ]
    assert broker.bad_messages == 6  # unknown kinds ("", "q123") are counted too (issue 22)


def test_node_id_defaults_to_host_plus_random_and_is_down_until_connected() -> None:
    a, b = make_broker(), make_broker()
    assert a.node_id != b.node_id and a.node_id.rsplit("-", 1)[0] == b.node_id.rsplit("-", 1)[0]
    assert a.up is False
    failure: list[Any] = []
    a.publish("news", "1").addErrback(failure.append)
    assert failure[0].type.__name__ == "BrokerUnavailable"


def test_the_password_is_not_in_the_broker_url_or_config_repr() -> None:
    broker = make_broker(redis="redis://:hunter2@127.0.0.1:6379/1")
    assert "hunter2" not in broker.url
    config = make_config(cluster={"redis": "redis://:hunter2@127.0.0.1:6379/1"})
    assert "hunter2" not in repr(config)


class Commands:
    """Stands in for the Redis command connection: records what would be sent."""

    connected = True

    def __init__(self, broker: RedisBroker) -> None:
        self.names = {sha: name for name, sha in broker._shas.items()}
        self.sent: list[tuple[str, tuple[Any, ...]]] = []

    def execute_command(self, command: str, sha: str, keys: int, *argv: Any) -> Any:
        assert command == "EVALSHA" and keys == 0
        name = self.names[sha]
        self.sent.append((name, argv[1:]))  # argv[0] is the namespace
        return succeed(0 if name == "SEND" else [])


class ClientsListener(Listener):
    def __init__(self) -> None:
        super().__init__()
        self.clients: dict[str, dict[str, Any]] = {}

    def local_clients(self) -> dict[str, dict[str, Any]]:
        return self.clients


def connected_broker() -> tuple[RedisBroker, Commands, ClientsListener]:
    broker = make_broker(node_id="n1")
    commands = Commands(broker)
    broker._cmd = commands  # type: ignore[assignment]
    broker.listener = listener = ClientsListener()
    return broker, commands, listener


def test_arrivals_and_departures_of_one_turn_reach_redis_in_one_update_in_order() -> None:
    broker, commands, _ = connected_broker()
    broker.client_connected("a", {"session": "a"})
    broker.client_connected("b", {"session": "b"})
    broker.client_disconnected("a")
    broker.client_disconnected("z")
    assert commands.sent == []  # sent at the end of the reactor turn
    broker.reactor.advance(0)  # type: ignore[attr-defined]
    assert commands.sent == [("CLIENTS_UPDATE", ("n1", "a", "", "b", '{"session": "b"}', "z", ""))]
    broker.reactor.advance(1)  # type: ignore[attr-defined]
    assert len(commands.sent) == 1


def test_a_full_batch_goes_at_once_and_a_read_sends_what_is_queued_first() -> None:
    broker, commands, _ = connected_broker()
    for i in range(broker.CLIENT_BATCH + 1):
        broker.client_connected(f"s{i}", {"session": f"s{i}"})
    assert [(name, len(argv)) for name, argv in commands.sent] == [
        ("CLIENTS_UPDATE", 1 + 2 * broker.CLIENT_BATCH)
    ]
    broker.clients()  # our own newest client is listed: its update goes before the read
    broker.send("s0", "note", 1)
    assert [name for name, _ in commands.sent] == [
        "CLIENTS_UPDATE",
        "CLIENTS_UPDATE",
        "CLIENTS",
        "SEND",
    ]
    assert commands.sent[1][1] == (
        "n1",
        f"s{broker.CLIENT_BATCH}",
        f'{{"session": "s{broker.CLIENT_BATCH}"}}',
    )
    broker.reactor.advance(0)  # type: ignore[attr-defined]
    assert len(commands.sent) == 4


def test_registration_sends_the_live_clients_and_nothing_is_queued_while_down() -> None:
    broker, commands, listener = connected_broker()
    broker.client_connected("gone", {"session": "gone"})
    listener.clients = {"a": {"session": "a", "node": "n1"}}
    broker._register()  # the link came back: Redis learns exactly the live clients
    broker.reactor.advance(0)  # type: ignore[attr-defined]
    assert commands.sent == [
        ("REGISTER", ("n1", '{"a": "{\\"session\\": \\"a\\", \\"node\\": \\"n1\\"}"}', "{}"))
    ]
    broker._cmd = None  # down: the next registration covers what happens meanwhile
    broker.client_connected("b", {"session": "b"})
    broker.reactor.advance(0)  # type: ignore[attr-defined]
    assert len(commands.sent) == 1


class Subscriber:
    """Stands in for the pub/sub connection: SUBSCRIBE/UNSUBSCRIBE answered by the test."""

    connected = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, Any]] = []

    def subscribe(self, key: str) -> Any:
        from twisted.internet.defer import Deferred

        d: Deferred[Any] = Deferred()
        self.sent.append(("SUBSCRIBE", key, d))
        return d

    def unsubscribe(self, key: str) -> Any:
        self.sent.append(("UNSUBSCRIBE", key, None))
        return succeed(None)


def test_a_subscribe_voided_by_an_unsubscribe_is_sent_again() -> None:
    """SUBSCRIBE (unanswered), UNSUBSCRIBE, subscribe again: Redis ends unsubscribed unless a
    second SUBSCRIBE goes out, and only its answer may tell the waiters they are subscribed
    (a resumable session moving back and forth found this: its channel fell silent)."""
    broker = make_broker(node_id="n1")
    sub = Subscriber()
    broker._sub = sub  # type: ignore[assignment]
    first = broker.subscribe("news")
    broker.unsubscribe("news")
    second = broker.subscribe("news")
    assert [(c, k) for c, k, _ in sub.sent] == [
        ("SUBSCRIBE", "heartbeatd:ch:news"),
        ("UNSUBSCRIBE", "heartbeatd:ch:news"),
        ("SUBSCRIBE", "heartbeatd:ch:news"),
    ]
    sub.sent[0][2].callback(None)  # the first SUBSCRIBE's answer: not enough
    assert not second.called and "news" not in broker._acked
    sub.sent[2][2].callback(None)
    assert first.called and second.called and "news" in broker._acked

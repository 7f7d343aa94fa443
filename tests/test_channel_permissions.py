"""Who may hear what (issue 22): namespaces, personal channels and the application's authorizer.

Driven in memory (StringTransport peers on a Clock); the same refusals over real sockets, as a
hostile client tries them, are in test_channel_permissions_daemon.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import Peer, make_config
from test_channels import error_code, publish, subscribe
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from heartbeatd.config import ConfigError
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import default_registry
from heartbeatd.server.session import Session


def make_factory(clock: Clock, **channels: Any) -> ServerFactory:
    return ServerFactory(make_config(channels=channels), default_registry(), clock)


def peer_as(factory: ServerFactory, identity: str | None, port: int = 40000) -> Peer:
    peer = Peer(factory, port)
    peer.protocol.identity = identity
    return peer


def ask(peer: Peer, type: str, data: dict[str, Any], id: int = 9) -> list[dict[str, Any]]:
    peer.send({"type": type, "id": id, "data": data})
    peer.factory.clock.advance(0)  # type: ignore[attr-defined]
    return peer.received()


def test_without_namespaces_every_channel_keeps_todays_behaviour(clock: Clock) -> None:
    factory = make_factory(clock)
    peer = peer_as(factory, None)
    assert subscribe(peer, "orders:acme")["channel"] == "orders:acme"
    assert ask(peer, "presence", {"channel": "orders:acme"})[0]["type"] == "presence"
    assert error_code(ask(peer, "publish", {"channel": "x", "data": 1})) == "forbidden"


def test_unknown_namespace_once_namespaces_are_configured(clock: Clock) -> None:
    factory = make_factory(clock, namespaces={"team": {}})
    peer = peer_as(factory, "alice")
    assert subscribe(peer, "team:red")["channel"] == "team:red"
    assert subscribe(peer, "plain", id=2)["channel"] == "plain"
    assert error_code(ask(peer, "subscribe", {"channel": "orders:acme"})) == "unknown_namespace"
    # Handlers and the admin API cannot publish into an unknown namespace either.
    failure: list[Any] = []
    factory.channels.publish("orders:acme", 1).addErrback(failure.append)
    assert failure[0].value.code == "unknown_namespace"


def test_permission_values(clock: Clock) -> None:
    factory = make_factory(
        clock,
        default={"subscribe": "authenticated", "presence": "none", "history": "none"},
        namespaces={"open": {"publish": "any"}, "shut": {"subscribe": "none"}},
    )
    stranger, alice = peer_as(factory, None), peer_as(factory, "alice", 40001)
    assert error_code(ask(stranger, "subscribe", {"channel": "news"})) == "forbidden"
    assert subscribe(alice, "news")["channel"] == "news"
    assert error_code(ask(alice, "presence", {"channel": "news"})) == "forbidden"
    since = {"epoch": "e", "offset": 0}
    assert error_code(ask(alice, "subscribe", {"channel": "n2", "since": since})) == "forbidden"
    assert error_code(ask(alice, "subscribe", {"channel": "n3", "join_leave": True})) == (
        "forbidden"
    )
    assert error_code(ask(alice, "subscribe", {"channel": "shut:x"})) == "forbidden"
    assert error_code(ask(alice, "publish", {"channel": "news", "data": 1})) == "forbidden"
    reply = ask(stranger, "publish", {"channel": "open:x", "data": 1})
    assert reply[-1] == {"type": "publish", "id": 9, "data": {"channel": "open:x", "offset": 1}}


def test_client_publish_is_the_default_publish_permission(clock: Clock) -> None:
    factory = make_factory(clock, client_publish=True, namespaces={"ro": {"publish": "none"}})
    peer = peer_as(factory, None)
    assert ask(peer, "publish", {"channel": "news", "data": 1})[-1]["type"] == "publish"
    assert error_code(ask(peer, "publish", {"channel": "ro:x", "data": 1})) == "forbidden"


def test_per_namespace_history_and_publication_size(clock: Clock) -> None:
    factory = make_factory(
        clock,
        history_size=5,
        namespaces={"tiny": {"history_size": 1, "max_publication_bytes": 16}},
    )
    for i in range(3):
        publish(factory, "tiny:a", i)
        publish(factory, "big", i)
    broker = factory.channels.broker
    assert len(broker._streams["tiny:a"].entries) == 1  # type: ignore[attr-defined]
    assert len(broker._streams["big"].entries) == 3  # type: ignore[attr-defined]
    failure = publish(factory, "tiny:a", "x" * 20)
    assert failure.value.code == "publication_too_large"  # type: ignore[attr-defined]
    assert publish(factory, "big", "x" * 20) == 4


@pytest.mark.parametrize("since", [None, {"epoch": "e", "offset": 0}])
def test_personal_channels_only_for_their_identities(clock: Clock, since: Any) -> None:
    factory = make_factory(clock, client_publish=True)
    names = ("alice", "bob", "eve")
    alice, bob, eve = (peer_as(factory, n, 40000 + i) for i, n in enumerate(names))
    extra = {} if since is None else {"since": since}
    assert subscribe(alice, "user#alice", **extra)["channel"] == "user#alice"
    assert error_code(ask(eve, "subscribe", {"channel": "user#alice", **extra})) == "forbidden"
    assert subscribe(bob, "dm#alice,bob", **extra)["channel"] == "dm#alice,bob"
    assert error_code(ask(eve, "subscribe", {"channel": "dm#alice,bob", **extra})) == "forbidden"
    assert error_code(ask(eve, "presence", {"channel": "dm#alice,bob"})) == "forbidden"
    assert error_code(ask(eve, "publish", {"channel": "dm#alice,bob", "data": 1})) == "forbidden"
    anonymous = peer_as(factory, None, 40010)
    assert error_code(ask(anonymous, "subscribe", {"channel": "user#alice"})) == "forbidden"
    assert eve.received() == []


@pytest.mark.parametrize("name", ["user#", "user#a,,b", "user#a#b", "dm#,a"])
def test_malformed_personal_channels_are_bad_channel(clock: Clock, name: str) -> None:
    peer = peer_as(make_factory(clock), "a")
    assert error_code(ask(peer, "subscribe", {"channel": name})) == "bad_channel"


def team_factory(clock: Clock, authorizer: Any, action: str = "subscribe") -> ServerFactory:
    registry = default_registry()
    registry.authorize(action)(authorizer)
    config = make_config(
        channels={
            "namespaces": {"team": {action: "authorizer"}},
            "authorize_timeout": 2.0,
        }
    )
    return ServerFactory(config, registry, clock)


def test_the_authorizer_sees_identity_peer_claims_and_data(clock: Clock) -> None:
    seen: list[Any] = []

    def may_join(session: Session, channel: str, data: Any) -> bool:
        seen.append((session.identity, session.peer, session.claims, channel, data))
        return channel == f"team:{session.identity}-team"

    factory = team_factory(clock, may_join)
    alice = peer_as(factory, "alice")
    assert subscribe(alice, "team:alice-team")["channel"] == "team:alice-team"
    assert error_code(ask(alice, "subscribe", {"channel": "team:bob-team"})) == "forbidden"
    assert seen[0] == (
        "alice",
        "127.0.0.1:40000",
        {},
        "team:alice-team",
        {"channel": "team:alice-team"},
    )
    assert subscribe(alice, "plain", id=3)["channel"] == "plain"  # not asked outside team:
    assert len(seen) == 2


@pytest.mark.parametrize(
    ("result", "code"),
    [
        (True, None),
        (False, "forbidden"),
        ("not_a_member", "not_a_member"),
        ("Not A Code!", "authorization_failed"),
        (None, "authorization_failed"),
        (1, "authorization_failed"),
        ({"ok": True}, "authorization_failed"),
        (succeed(True), None),
        (succeed("banned"), "banned"),
        (succeed(object()), "authorization_failed"),
    ],
)
def test_authorizer_results(clock: Clock, result: Any, code: str | None) -> None:
    factory = team_factory(clock, lambda session, channel, data: result, "publish")
    peer = peer_as(factory, "a")
    frames = ask(peer, "publish", {"channel": "team:x", "data": 1})
    if code is None:
        assert frames[-1]["type"] == "publish"
    else:
        assert error_code(frames) == code


async def _async_yes(session: Session, channel: str, data: Any) -> bool:
    return True


def test_coroutine_authorizer(clock: Clock) -> None:
    peer = peer_as(team_factory(clock, _async_yes, "presence"), "a")
    assert ask(peer, "presence", {"channel": "team:x"})[-1]["type"] == "presence"


def test_raising_and_hanging_authorizers_refuse_and_the_connection_stays(clock: Clock) -> None:
    def boom(session: Session, channel: str, data: Any) -> bool:
        raise RuntimeError("database down")

    factory = team_factory(clock, boom)
    peer = peer_as(factory, "a")
    assert error_code(ask(peer, "subscribe", {"channel": "team:x"})) == "authorization_failed"
    assert ask(peer, "ping", {})[-1]["type"] == "pong"

    hanging: list[Deferred[bool]] = []

    def hang(session: Session, channel: str, data: Any) -> Deferred[bool]:
        hanging.append(Deferred())
        return hanging[-1]

    factory = team_factory(clock, hang)
    peer = peer_as(factory, "a")
    assert ask(peer, "subscribe", {"channel": "team:x"}) == []
    clock.advance(2.0)
    assert error_code(peer.received()) == "authorization_timeout"
    hanging[0].callback(True)  # too late: ignored, nothing subscribed
    assert factory.channels.channels_of(peer.protocol.session_id) == []
    assert ask(peer, "ping", {})[-1]["type"] == "pong"


def test_authorizer_permission_without_an_authorizer_refuses(clock: Clock) -> None:
    factory = make_factory(clock, namespaces={"team": {"subscribe": "authorizer"}})
    peer = peer_as(factory, "a")
    assert error_code(ask(peer, "subscribe", {"channel": "team:x"})) == "forbidden"


def test_an_authorizer_answering_after_the_client_left_subscribes_nothing(clock: Clock) -> None:
    later: Deferred[bool] = Deferred()
    factory = team_factory(clock, lambda s, c, d: later)
    peer = peer_as(factory, "a")
    ask(peer, "subscribe", {"channel": "team:x"})
    peer.disconnect()
    later.callback(True)
    assert factory.channels.subscription_count() == 0


def test_config_errors_name_key_value_and_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        make_config(
            channels={
                "default": {"publish": "everyone"},
                "namespaces": {
                    "team": {"presence": "token", "history_size": -1, "colour": 1},
                    "bad:name": {},
                },
            }
        )
    errors = info.value.errors
    assert any(
        e.startswith("channels.default.publish: 'everyone' is not allowed; expected")
        and "authorizer" in e
        for e in errors
    ), errors
    assert any(e.startswith("channels.namespaces.team.presence: 'token'") for e in errors)
    assert any(e.startswith("channels.namespaces.team.history_size: -1") for e in errors)
    assert any(e.startswith("channels.namespaces.team.colour: unknown key") for e in errors)
    assert any(e.startswith("channels.namespaces.bad:name:") for e in errors)


def test_reload_applies_new_permissions(clock: Clock) -> None:
    factory = make_factory(clock)
    peer = peer_as(factory, "a")
    assert subscribe(peer, "news")["channel"] == "news"
    factory.apply_config(make_config(channels={"default": {"subscribe": "none"}}))
    assert error_code(ask(peer, "subscribe", {"channel": "other"})) == "forbidden"


def test_refusals_are_logged_rate_limited(clock: Clock) -> None:
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        factory = ServerFactory(make_config(log={"rate_limit_lines": 2}), default_registry(), clock)
        peer = peer_as(factory, "eve")
        for i in range(5):
            ask(peer, "subscribe", {"channel": "user#alice"}, id=i)
    finally:
        globalLogPublisher.removeObserver(events.append)
    refused = [e for e in events if "Refused {action}" in e.get("log_format", "")]
    assert len(refused) == 2
    assert refused[0]["channel"] == "user#alice" and refused[0]["identity"] == "eve"

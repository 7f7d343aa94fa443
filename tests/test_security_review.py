"""Regression tests for the security review of issue 22 (findings 2 to 6), in memory.

The admin API's cross-site checks (finding 1) are in test_admin_crosssite.py; what needs a
daemon or Redis is in test_security_daemon.py.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from helpers import Peer
from twisted.internet.defer import Deferred

from heartbeatd._validation import ConfigError
from heartbeatd.server.auth import Authenticator, TokenTable
from heartbeatd.server.factory import NotAuthenticated, ServerFactory
from heartbeatd.server.handlers import HandlerError


@pytest.fixture
def secured(factory: ServerFactory) -> ServerFactory:
    table = TokenTable.parse("alice:alice-secret\nbob:bob-secret\n")
    factory.authenticator = Authenticator(table.identify, 5.0, "test tokens")
    return factory


def authenticated(factory: ServerFactory, token: str = "alice-secret") -> Peer:
    peer = Peer(factory)
    peer.send({"type": "auth", "id": "a", "data": {"token": token}})
    assert peer.received()[0]["type"] == "auth"
    return peer


# -- finding 2: unauthenticated connections hear no pushes -------------------------------------


def test_broadcast_skips_connections_still_in_their_auth_gate(secured: ServerFactory) -> None:
    pending, alice = Peer(secured), authenticated(secured)
    assert secured.gated == 1
    assert secured.server.broadcast("news", 1) == 1
    assert alice.received() == [{"type": "news", "data": 1}]
    assert pending.received() == []
    secured.channels.on_broadcast("cluster-news", 2)  # a broadcast from another node
    assert pending.received() == [] and alice.received()[0]["type"] == "cluster-news"


def test_direct_send_to_an_unauthenticated_session_is_a_typed_error(
    secured: ServerFactory,
) -> None:
    pending = Peer(secured)
    session = pending.protocol.session_id
    with pytest.raises(NotAuthenticated) as caught:
        secured.server.send(session, "secret", 1)
    assert isinstance(caught.value, HandlerError) and caught.value.code == "not_authenticated"
    secured.channels.on_message(session, "secret", 2)  # a node message: dropped
    failure = secured.channels.send(session, "secret", 3)
    assert isinstance(failure, Deferred)
    failure.addErrback(lambda f: f.trap(NotAuthenticated))
    assert pending.received() == []
    pending.send({"type": "auth", "id": 1, "data": {"token": "bob-secret"}})
    pending.received()
    assert secured.gated == 0
    assert secured.server.send(session, "hello-bob", 4) is True
    assert pending.received() == [{"type": "hello-bob", "data": 4}]


def test_the_gate_count_follows_disconnects(secured: ServerFactory) -> None:
    peers = [Peer(secured) for _ in range(3)]
    assert secured.gated == 3
    for peer in peers:
        peer.disconnect()
    assert secured.gated == 0


def test_shutdown_goaway_still_reaches_everyone(secured: ServerFactory) -> None:
    pending = Peer(secured)
    secured.drain(0, 1.0)
    assert pending.received()[0]["type"] == "goaway"


def test_auth_off_broadcast_reaches_everyone(factory: ServerFactory) -> None:
    peers = [Peer(factory) for _ in range(3)]
    assert factory.gated == 0 and factory.server.broadcast("x") == 3
    assert all(p.received() == [{"type": "x"}] for p in peers)


# -- finding 6: client error frames in the debug log -----------------------------------------


@pytest.fixture
def debug_log() -> Any:
    from twisted.logger import globalLogPublisher

    from heartbeatd._logging import set_level

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    set_level("debug")
    yield events
    set_level("info")
    globalLogPublisher.removeObserver(events.append)


def _error_lines(events: list[dict[str, Any]]) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events if "reported an error" in str(e.get("log_format"))]


def test_client_error_frames_are_rate_limited_and_hidden_before_auth(
    secured: ServerFactory, debug_log: list[dict[str, Any]]
) -> None:
    pending = Peer(secured)
    for _ in range(200):
        pending.send({"type": "error", "data": "SECRET-payload\\nforged line"})
    lines = _error_lines(debug_log)
    limit = secured.config.log.rate_limit_lines
    assert 0 < len(lines) <= limit
    assert not any("SECRET" in line for line in lines)
    secured.log_limiter.flush()


def test_client_error_payload_is_bounded_after_auth(
    factory: ServerFactory, debug_log: list[dict[str, Any]]
) -> None:
    peer = Peer(factory)
    peer.send({"type": "error", "data": "x" * 100_000})
    (line,) = _error_lines(debug_log)
    assert len(line) < 400 and "chars)" in line


# -- finding 6: identities and the tokens file -------------------------------------------------


def test_custom_authenticator_identity_with_a_newline_is_refused(factory: ServerFactory) -> None:
    identities = {"nl": "eve\n2026-01-01 [forged] admin logged in", "long": "a" * 300, "ok": "bob"}
    factory.authenticator = Authenticator(lambda token, peer: identities[token], 5.0, "custom")
    for token in ("nl", "long"):
        peer = Peer(factory)
        peer.send({"type": "auth", "id": 1, "data": {"token": token}})
        (answer,) = peer.received()
        assert answer["error"]["code"] == "bad_identity"
        assert peer.protocol.identity is None and peer.transport.disconnecting
    assert authenticated(factory, "ok").protocol.identity == "bob"


def test_tokens_file_bom_is_stripped() -> None:
    table = TokenTable.parse("\ufeffalice:alice-secret\n")
    assert table.identify("alice-secret") == "alice"


def test_tokens_file_same_token_twice_names_both_identities() -> None:
    with pytest.raises(ConfigError) as caught:
        TokenTable.parse("alice:shared-secret\n# c\nbob:shared-secret\n")
    (error,) = caught.value.errors
    assert "line 3 (bob)" in error and "line 1 (alice)" in error
    assert "shared-secret" not in error
    digest = hashlib.sha256(b"shared-secret").hexdigest()
    with pytest.raises(ConfigError, match="same token"):
        TokenTable.parse(f"alice:shared-secret\nbob:sha256:{digest}\n")


# -- finding 6: a token removed by a reload --------------------------------------------------


def test_reload_closes_connections_whose_token_was_removed(factory: ServerFactory) -> None:
    from helpers import make_config

    from heartbeatd.server.auth import load_authenticator

    def use(tokens: str) -> None:
        path.write_text(tokens)
        factory.authenticator = load_authenticator(
            make_config(auth={"mode": "token", "tokens_file": str(path)}).auth
        )

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens"
        use("alice:alice-1\nbob:bob-1\ncarol:carol-1\n")
        alice, bob, carol = (authenticated(factory, f"{n}-1") for n in ("alice", "bob", "carol"))
        use("alice:alice-1\nbob:bob-2\n")  # bob rotated, carol removed
        assert factory.revalidate() == 2
        assert alice.received() == [] and not alice.transport.disconnecting
        for peer in (bob, carol):
            (goaway,) = peer.received()
            assert goaway["type"] == "goaway" and goaway["data"]["reason"] == "token_revoked"
            assert peer.transport.disconnecting
            peer.disconnect()
        assert set(factory.credentials) == {alice.protocol.session_id}

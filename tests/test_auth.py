"""Authentication in the first frame: tokens file, custom authenticator, timeout, pre-auth rules.

Driven in memory (StringTransport on a Clock) through the real factory and protocol; the
real-socket path (TLS + token through the CLI) is in test_tls.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from helpers import Peer, failureResultOf, make_config, successResultOf
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from heartbeatd._validation import ConfigError
from heartbeatd.server.auth import Authenticator, TokenTable, load_authenticator
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import HandlerRegistry

TOKENS = """\
# identity:token
alice:alice-secret
bob:sha256:{bob}

service-x : has:colons:inside
""".format(bob=hashlib.sha256(b"bob-secret").hexdigest())


@pytest.fixture
def table() -> TokenTable:
    return TokenTable.parse(TOKENS)


@pytest.fixture
def secured(factory: ServerFactory, table: TokenTable) -> ServerFactory:
    factory.authenticator = Authenticator(table.identify, 5.0, "test tokens")
    return factory


@pytest.fixture
def logged() -> Any:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def closed(peer: Peer) -> bool:
    return peer.transport.disconnecting or peer.protocol.close_reason is not None


def error_code(message: dict[str, Any]) -> str:
    assert message["type"] == "error", message
    return str(message["error"]["code"])


# -- the tokens file ---------------------------------------------------------------------------


def test_plain_and_hashed_entries(table: TokenTable) -> None:
    assert table.identify("alice-secret") == "alice"
    assert table.identify("bob-secret") == "bob"
    assert table.identify("has:colons:inside") == "service-x"
    assert table.identify("alice-secret ") is None
    assert table.identify("") is None
    assert table.identify(f"sha256:{hashlib.sha256(b'bob-secret').hexdigest()}") is None


def test_bad_lines_are_reported_without_echoing_them() -> None:
    with pytest.raises(ConfigError) as caught:
        TokenTable.parse("alice\nbob:sha256:xyz\n:token-without-identity\n")
    errors = caught.value.errors
    assert [e.split(" is not allowed")[0] for e in errors] == [
        "auth.tokens_file: line 1",
        "auth.tokens_file: line 2 (bob)",
        "auth.tokens_file: line 3",
    ]
    assert all("token-without-identity" not in e for e in errors)
    with pytest.raises(ConfigError, match="no identity:token entries"):
        TokenTable.parse("# nothing\n")


def test_load_authenticator_names_the_key(tmp_path: Path) -> None:
    config = make_config(auth={"mode": "token", "tokens_file": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match=r"auth\.tokens_file: '.*missing' cannot be read"):
        load_authenticator(config.auth)
    custom = make_config(auth={"mode": "custom", "authenticator": "no_such_module:check"})
    with pytest.raises(ConfigError, match=r"auth\.authenticator: 'no_such_module:check'"):
        load_authenticator(custom.auth)
    assert load_authenticator(make_config().auth) is None


def test_config_cross_checks() -> None:
    with pytest.raises(ConfigError, match=r"auth\.tokens_file: '' is not allowed"):
        make_config(auth={"mode": "token"})
    with pytest.raises(ConfigError, match=r"auth\.authenticator: '' is not allowed"):
        make_config(auth={"mode": "custom"})
    with pytest.raises(ConfigError, match=r"auth\.mode: 'basic' is not allowed"):
        make_config(auth={"mode": "basic"})


# -- the protocol ------------------------------------------------------------------------------


def test_hello_says_auth_required_only_when_it_is(
    factory: ServerFactory, secured: ServerFactory
) -> None:
    assert Peer(secured).hello["data"]["auth"] == "required"
    secured.authenticator = None
    assert "auth" not in Peer(secured).hello["data"]


def test_happy_path_then_the_fast_path(secured: ServerFactory, logged: list[Any]) -> None:
    peer = Peer(secured)
    peer.send({"type": "ping", "id": 1})  # allowed before auth
    assert peer.received() == [{"type": "pong", "id": 1}]
    assert peer.protocol._auth is not None
    peer.send({"type": "auth", "id": 2, "data": {"token": "alice-secret"}})
    assert peer.received() == [{"type": "auth", "id": 2, "data": {"identity": "alice"}}]
    assert peer.protocol.session.identity == "alice"
    assert peer.protocol._auth is None  # the gate is gone: the fast path serves from now on
    peer.send({"type": "echo", "id": 3, "data": "hi"})
    assert peer.received() == [{"type": "echo", "id": 3, "data": "hi"}]
    text = " ".join(str(e.get("log_format", "")) + repr(e) for e in logged)
    assert "alice-secret" not in text
    assert any("authenticated as" in str(e.get("log_format")) for e in logged)


def test_pipelined_auth_and_request_in_one_read(secured: ServerFactory) -> None:
    peer = Peer(secured)
    peer.send(
        {"type": "auth", "id": 1, "data": {"token": "bob-secret"}},
        {"type": "echo", "id": 2, "data": 7},
    )
    assert peer.received() == [
        {"type": "auth", "id": 1, "data": {"identity": "bob"}},
        {"type": "echo", "id": 2, "data": 7},
    ]


def test_request_before_auth_is_refused_and_closed(
    secured: ServerFactory, registry: HandlerRegistry
) -> None:
    peer = Peer(secured)
    peer.send({"type": "ping", "id": 1}, {"type": "echo", "id": 2}, {"type": "echo", "id": 3})
    replies = peer.received()
    assert replies[0] == {"type": "pong", "id": 1}  # sent before the refusal, in order
    assert error_code(replies[1]) == "unauthenticated" and replies[1]["id"] == 2
    assert "'echo' is not allowed before 'auth'" in replies[1]["error"]["message"]
    assert len(replies) == 2  # nothing after the refusal is handled
    assert closed(peer) and peer.protocol.close_reason == "unauthenticated"
    assert secured.errors["unauthenticated"] == 1
    assert secured.closes["unauthenticated"] == 1


def test_wrong_token_gets_auth_failed_and_a_close(
    secured: ServerFactory, logged: list[Any]
) -> None:
    peer = Peer(secured)
    peer.send({"type": "auth", "id": 1, "data": {"token": "guess-me-not"}})
    (reply,) = peer.received()
    assert error_code(reply) == "auth_failed" and reply["id"] == 1
    assert closed(peer) and peer.protocol.identity is None
    assert "guess-me-not" not in repr(logged)


@pytest.mark.parametrize(
    "data", [None, "alice-secret", {"token": 5}, {"token": ""}, {"token": "x" * 5000}]
)
def test_malformed_auth_is_auth_failed(secured: ServerFactory, data: Any) -> None:
    peer = Peer(secured)
    peer.send({"type": "auth", "id": 1, "data": data})
    assert error_code(peer.received()[0]) == "auth_failed"
    assert closed(peer)


def test_no_auth_within_the_timeout_closes(secured: ServerFactory, clock: Clock) -> None:
    peer = Peer(secured)
    clock.advance(4.9)
    assert peer.received() == [] and not closed(peer)
    clock.advance(0.2)
    (reply,) = peer.received()
    assert error_code(reply) == "auth_timeout" and "auth.timeout (5s)" in reply["error"]["message"]
    assert peer.protocol.close_reason == "auth_timeout"


def test_authenticated_client_outlives_the_timeout(secured: ServerFactory, clock: Clock) -> None:
    peer = Peer(secured)
    peer.send({"type": "auth", "id": 1, "data": {"token": "alice-secret"}})
    peer.received()
    clock.advance(60)
    assert not closed(peer)
    assert clock.getDelayedCalls() == [] or all(
        "timed_out" not in repr(c.func) for c in clock.getDelayedCalls()
    )


def test_disconnect_cancels_the_timer(secured: ServerFactory, clock: Clock) -> None:
    peer = Peer(secured)
    peer.disconnect()
    assert all("_timed_out" not in repr(c.func) for c in clock.getDelayedCalls())


def test_async_custom_authenticator_holds_what_follows(factory: ServerFactory) -> None:
    checks: list[tuple[str, Deferred[Any]]] = []

    def check(token: str, peer: str) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        checks.append((token, d))
        return d

    factory.authenticator = Authenticator(check, 5.0, "async")
    peer = Peer(factory)
    peer.send(
        {"type": "auth", "id": 1, "data": {"token": "t"}},
        {"type": "echo", "id": 2},
        {"type": "ping", "id": 3},
    )
    assert peer.received() == []  # nothing answered while the check runs
    checks[0][1].callback("carol")
    assert peer.received() == [
        {"type": "auth", "id": 1, "data": {"identity": "carol"}},
        {"type": "echo", "id": 2, "data": None},
        {"type": "pong", "id": 3},
    ]

    refused = Peer(factory, 40001)
    refused.send({"type": "auth", "id": 1, "data": {"token": "t"}})
    checks[1][1].callback(None)
    assert error_code(refused.received()[0]) == "auth_failed"
    assert closed(refused)


def test_a_failing_authenticator_is_auth_failed_not_a_crash(
    factory: ServerFactory, logged: list[Any]
) -> None:
    def check(token: str, peer: str) -> str:
        raise RuntimeError("directory unreachable")

    factory.authenticator = Authenticator(check, 5.0, "broken")
    peer = Peer(factory)
    peer.send({"type": "auth", "id": 1, "data": {"token": "t"}})
    (reply,) = peer.received()
    assert error_code(reply) == "auth_failed"
    assert reply["error"]["message"] == "the token could not be checked"
    assert any(e.get("log_failure") is not None for e in logged)
    for port in range(40001, 40101):  # a hundred more logins while the directory is down
        Peer(factory, port).send({"type": "auth", "id": 1, "data": {"token": "t"}})
    tracebacks = [e for e in logged if e.get("log_failure") is not None]
    assert len(tracebacks) == factory.log_limiter.lines  # the rest are counted, not logged
    assert factory.errors["auth_failed"] == 101  # the counters stay exact


def test_custom_authenticator_from_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Clock
) -> None:
    (tmp_path / "custom_check_mod.py").write_text(
        "def check(token, peer):\n    return 'svc-' + token if token.startswith('ok') else None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = make_config(
        auth={"mode": "custom", "authenticator": "custom_check_mod:check", "timeout": 2}
    )
    factory = ServerFactory(config, clock=clock)
    factory.authenticator = load_authenticator(config.auth)
    peer = Peer(factory)
    peer.send({"type": "auth", "id": "a", "data": {"token": "ok-1"}})
    assert peer.received() == [{"type": "auth", "id": "a", "data": {"identity": "svc-ok-1"}}]


def test_seed_framing_bare_values_need_auth_too(clock: Clock, table: TokenTable) -> None:
    factory = ServerFactory(make_config(framing="seed"), clock=clock)
    factory.authenticator = Authenticator(table.identify, 5.0, "t")
    protocol = factory.buildProtocol(None)
    from twisted.internet.testing import StringTransport

    transport = StringTransport()
    protocol.makeConnection(transport)
    transport.clear()
    protocol.dataReceived(b"HeartBeat")  # a token is a ping: allowed
    assert transport.value() == b"HeartBeat"
    protocol.dataReceived(b'length:0000000000003"x"')
    assert b"unauthenticated" in transport.value()
    assert protocol.close_reason == "unauthenticated"


# -- the client library's side -------------------------------------------------------------------


def client_server_pair(factory: ServerFactory, clock: Clock, **options: Any) -> tuple[Any, ...]:
    """A ClientConnection wired to the factory's protocol over iosim (hello not yet sent)."""
    from twisted.internet.address import IPv4Address

    from heartbeatd.client import ClientConnection
    from heartbeatd.testing import iosim

    client = ClientConnection(clock, **options)
    server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    pump = iosim.connect(
        server,
        iosim.FakeTransport(server, isServer=True),
        client,
        iosim.FakeTransport(client, isServer=False),
        greet=False,
        clock=clock,
    )
    return client, server, pump


def test_client_sends_its_token_and_is_ready_once_accepted(
    secured: ServerFactory, clock: Clock
) -> None:
    client, server, pump = client_server_pair(secured, clock, token="alice-secret")
    ready = client.when_ready()
    pump.flush()
    assert client.identity == "alice" and server.identity == "alice"
    assert successResultOf(ready) is client
    answer = client.request("echo", 5)
    pump.flush()
    assert successResultOf(answer) == 5


def test_client_with_a_wrong_token_or_none_fails_typed(
    secured: ServerFactory, clock: Clock
) -> None:
    from heartbeatd.client import ServerError

    for token, code in (("bad", "auth_failed"), (None, "unauthenticated")):
        client, _, pump = client_server_pair(secured, clock, token=token)
        ready = client.when_ready()
        pump.flush()
        failure = failureResultOf(ready, ServerError)
        assert failure.value.code == code

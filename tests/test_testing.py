"""heartbeatd.testing: the in-memory server/client pair users test their handlers with."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import assertNoResult, failureResultOf, make_config, successResultOf
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher

from heartbeatd import HandlerError, HandlerRegistry
from heartbeatd.client import ClientConnection, ConnectionClosed, ServerError
from heartbeatd.testing import ServerClientPair


@pytest.fixture(autouse=True)
def no_logged_failures() -> Iterator[None]:
    """A pair must not leave failures behind (an unhandled Deferred error fails trial tests)."""
    failures: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield
        gc.collect()  # unhandled Deferred errors are logged when the Deferred is collected
    finally:
        globalLogPublisher.removeObserver(observe)
    assert [e["log_failure"].getErrorMessage() for e in failures] == []


def register_double(registry: HandlerRegistry) -> None:
    @registry.handler("double")
    def double(request: Any) -> Any:
        if not isinstance(request.data, int):
            raise HandlerError("bad_request", "data must be an integer")
        return request.data * 2


def test_the_client_is_connected_and_has_the_servers_hello() -> None:
    with ServerClientPair() as pair:
        assert isinstance(pair.client, ClientConnection)
        assert pair.client.connected and pair.client.hello is not None
        assert pair.client.hello["server"] == "heartbeatd"
        assert successResultOf(pair.client.when_ready()) is pair.client
        assert pair.clients == 1


def test_request_is_answered_before_it_returns() -> None:
    with ServerClientPair() as pair:
        assert successResultOf(pair.request("echo", {"a": [1, 2]})) == {"a": [1, 2]}
        failure = failureResultOf(pair.request("no_such_type"), ServerError)
        assert failure.value.code == "unknown_type"


def test_without_flush_nothing_moves() -> None:
    with ServerClientPair() as pair:
        d = pair.client.request("echo", 1)
        assertNoResult(d)
        pair.flush()
        assert successResultOf(d) == 1


def test_handlers_from_a_register_function_a_module_and_a_module_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = ModuleType("doubling")
    module.register = register_double  # type: ignore[attr-defined]
    (tmp_path / "tripling_handlers.py").write_text(
        "def register(registry):\n    registry.add('triple', lambda request: request.data * 3)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tripling_handlers", raising=False)

    with ServerClientPair(handlers=[register_double]) as pair:
        assert successResultOf(pair.request("double", 21)) == 42
        failure = failureResultOf(pair.request("double", "x"), ServerError)
        assert (failure.value.code, failure.value.message) == (
            "bad_request",
            "data must be an integer",
        )
        assert successResultOf(pair.request("echo", "built-ins stay")) == "built-ins stay"
    with ServerClientPair(handlers=[module, "tripling_handlers"]) as pair:
        assert successResultOf(pair.request("double", 2)) == 4
        assert successResultOf(pair.request("triple", 2)) == 6
    config = make_config(handlers=["tripling_handlers"])
    with ServerClientPair(config=config) as pair:
        assert successResultOf(pair.request("triple", 3)) == 9


def test_a_handler_source_that_is_neither_module_nor_function_is_refused() -> None:
    with pytest.raises(TypeError, match="register"):
        ServerClientPair(handlers=[42])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="register"):
        ServerClientPair(handlers=[ModuleType("empty")])


def test_a_given_registry_is_used_as_it_is() -> None:
    registry = HandlerRegistry()
    register_double(registry)
    with ServerClientPair(registry=registry) as pair:
        assert successResultOf(pair.request("double", 1)) == 2
        failure = failureResultOf(pair.request("echo", 1), ServerError)
        assert failure.value.code == "unknown_type"


def test_a_deferred_reply_arrives_when_it_fires_and_replies_keep_request_order() -> None:
    later: list[Deferred[Any]] = []

    def register(registry: HandlerRegistry) -> None:
        @registry.handler("later")
        def slow(request: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            later.append(d)
            return d

    with ServerClientPair(handlers=[register]) as pair:
        first = pair.request("later")
        second = pair.request("echo", "second")
        assertNoResult(first)
        assertNoResult(second)  # replies come back in request order
        later[0].callback("first")
        pair.flush()
        assert successResultOf(first) == "first"
        assert successResultOf(second) == "second"


def test_more_clients_see_pushes_from_the_server() -> None:
    with ServerClientPair() as pair:
        other = pair.connect()
        assert pair.clients == 2 and other.hello["session"] != pair.client.hello["session"]
        seen: list[tuple[str, Any]] = []
        for client in (pair.client, other):
            client.on("news", lambda data, conn: seen.append((conn.hello["session"], data)))
        assert pair.server.broadcast("news", "hi") == 2
        pair.flush()
        assert sorted(seen) == sorted((c.hello["session"], "hi") for c in (pair.client, other))


def test_heartbeat_keeps_an_answering_client_and_the_clock_is_the_pairs() -> None:
    clock = Clock()
    config = make_config(heartbeat={"interval": 10, "timeout": 30})
    with ServerClientPair(config=config, clock=clock) as pair:
        assert pair.clock is clock
        for _ in range(10):  # ten sweeps: pinged and answered each time
            pair.advance(10)
        assert pair.client.connected and pair.clients == 1
        assert pair.client.last_rtt is not None


def test_a_client_that_stops_reading_is_evicted_by_the_heartbeat() -> None:
    config = make_config(heartbeat={"interval": 10, "timeout": 30})
    with ServerClientPair(config=config) as pair:
        closed: list[Any] = []
        pair.client.on_close(lambda conn, why: closed.append(why))
        assert successResultOf(pair.request("echo", 1)) == 1  # heard from at least once
        # The network now loses everything this client sends; it still hears the server's
        # pings, so its own heartbeat keeps the connection, and only the server can act.
        pair.client.transport.getOutBuffer = lambda: b""  # type: ignore[attr-defined]
        pending = pair.client.request("echo", 1, timeout=1000)
        for _ in range(5):
            pair.advance(10)
        assert pair.clients == 0 and pair.factory.closes["heartbeat_timeout"] == 1
        assert closed and pair.client.closed
        failureResultOf(pending, ConnectionClosed)


def test_the_connection_limit_refuses_a_client() -> None:
    config = make_config(limits={"max_connections": 1})
    with ServerClientPair(config=config) as pair:
        refused = pair.connect()
        assert refused.closed and not pair.client.closed
        failure = failureResultOf(refused.when_ready(), ConnectionClosed)
        assert "closed before the server's hello" in str(failure.value)
        assert refused.close_reason.check(ServerError)
        assert refused.close_reason.value.code == "too_many_connections"
        assert pair.clients == 1 and pair.factory.refused == 1


def test_seed_framing_follows_the_config() -> None:
    with ServerClientPair(config=make_config(framing="seed")) as pair:
        assert pair.client.framing.name == "seed"
        assert successResultOf(pair.request("echo", [1, "two"])) == [1, "two"]


def test_close_disconnects_everyone_and_leaves_no_timer() -> None:
    pair = ServerClientPair()
    other = pair.connect()
    pair.close()
    assert pair.client.closed and other.closed and pair.clients == 0
    assert pair.clock.getDelayedCalls() == []


def test_a_pair_that_never_goes_quiet_is_reported() -> None:
    def register(registry: HandlerRegistry) -> None:
        @registry.handler("again")
        def again(request: Any) -> Any:
            return "again"

    with ServerClientPair(handlers=[register]) as pair:
        pair.MAX_FLUSH_ROUNDS = 50
        asked: list[Deferred[Any]] = []

        def ask(_: object = None) -> None:  # each reply asks again: it never ends
            asked.append(pair.client.request("again").addCallback(ask))

        ask()
        with pytest.raises(RuntimeError, match="still busy after 50 flush rounds"):
            pair.flush()
        pair.client.abort(RuntimeError("stop the loop"))
        pair.flush()
        assert pair.client.closed and pair.clients == 0
        failureResultOf(asked[-1], ConnectionClosed)


def test_authorizers_are_tested_without_a_network() -> None:
    """Issue 22: a pair's client can be any identity, with claims, for the authorizer to see."""

    def register(registry: HandlerRegistry) -> None:
        @registry.authorize("subscribe")
        def members_only(session: Any, channel: str, data: Any) -> bool | str:
            if session.claims.get("team") == channel.split(":", 1)[1]:
                return True
            return "not_a_member"

    config = make_config(channels={"namespaces": {"team": {"subscribe": "authorizer"}}})
    with ServerClientPair(
        config=config, handlers=[register], identity="alice", claims={"team": "red"}
    ) as pair:
        answer = successResultOf(pair.request("subscribe", {"channel": "team:red"}))
        assert answer["channel"] == "team:red"
        failure = failureResultOf(pair.request("subscribe", {"channel": "team:blue"}), ServerError)
        assert failure.value.code == "not_a_member"
        stranger = pair.connect(identity="bob")
        d = stranger.request("subscribe", {"channel": "team:red"})
        pair.flush()
        assert failureResultOf(d, ServerError).value.code == "not_a_member"

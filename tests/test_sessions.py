"""Resumable sessions on one daemon: real loopback sockets, time on a Clock.

The factory runs in-process on the real reactor (driven by hand while a peer waits, as in
test_lean_transport), with a `Clock` for every timer it sets, so expiry and quiet periods are
stepped, not waited for.  Cases come from what went wrong elsewhere (issue 18): a half-open
takeover (mosquitto #1650), a resume with nothing to replay (socket.io #5538), a resume after a
long quiet period (socket.io #5282), a slow handler during a replay (centrifuge-go #150),
broadcasts and publications counted in seq (aspnetcore #55575); then late acks, wrong keys,
expiry, limits, and a hostile peer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import make_config
from session_peer import SessionPeer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import NO_REPLY, default_registry

reactor: Any
from twisted.internet import reactor  # noqa: E402  (the test drives the real reactor by hand)

#: The Clocks of the servers under test: a pump also runs what they call "now" (callLater(0)).
CLOCKS: list[Clock] = []


def pump() -> None:
    reactor.runUntilCurrent()
    reactor.doIteration(0.005)
    for clock in CLOCKS:
        clock.advance(0)


def spin_until(done: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "timed out"
        pump()


class Server:
    """A factory on a Clock, listening on 127.0.0.1 port 0, with test handlers."""

    def __init__(self, **sections: Any) -> None:
        self.clock = Clock()
        CLOCKS.append(self.clock)
        registry = default_registry()
        #: Deferreds of "slow" requests, fired by the test; calls of "count".
        self.slow: list[Deferred[Any]] = []
        self.calls: list[Any] = []

        def slow(request: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            self.slow.append(d)
            return d

        def count(request: Any) -> Any:
            self.calls.append(request.data)
            return len(self.calls)

        def tell(request: Any) -> Any:
            request.server.send(request.session.resumable, "told", request.data)
            return NO_REPLY

        registry.add("slow", slow)
        registry.add("count", count)
        registry.add("tell", tell)
        sections.setdefault("channels", {"client_publish": True})
        self.factory = ServerFactory(make_config(**sections), registry, self.clock)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.peers: list[SessionPeer] = []

    @property
    def sessions(self) -> Any:
        return self.factory.sessions

    def connect(self) -> SessionPeer:
        peer = SessionPeer(self.port.getHost().port, timeout=5, pump=pump)
        self.peers.append(peer)
        return peer

    def connection(self, peer: SessionPeer) -> Any:
        """The server side of ``peer`` (by its hello session id)."""
        session = peer.hello["data"]["session"]
        spin_until(lambda: session in self.factory.clients)
        return self.factory.clients[session]

    def drop(self, peer: SessionPeer) -> None:
        """Close ``peer`` and wait until the server has seen it go."""
        session = peer.hello["data"]["session"]
        peer.close()
        spin_until(lambda: session not in self.factory.clients)

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        spin_until(lambda: not self.factory.clients)
        self.port.stopListening()
        spin_until(lambda: not self.port.connected)
        CLOCKS.remove(self.clock)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def data(message: dict[str, Any]) -> Any:
    return message.get("data")


def is_type(type_: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("type") == type_


def error_code(message: dict[str, Any]) -> str:
    assert message["type"] == "error", message
    return str(message["error"]["code"])


# -- starting, numbering, acks -----------------------------------------------------------------


def test_a_session_numbers_replies_pushes_broadcasts_and_publications(server: Server) -> None:
    peer = server.connect()
    answer = peer.start(expiry=30)
    assert "seq" not in answer
    assert set(data(answer)) == {"session", "key", "expiry"} and data(answer)["expiry"] == 30
    assert len(peer.sid) == 32 and len(peer.key) >= 22
    reply = peer.reply(peer.request("echo", "a"))
    assert (reply["seq"], reply["ack"], data(reply)) == (1, 1, "a")
    peer.reply(peer.request("subscribe", {"channel": "news"}))
    server.factory.server.broadcast("news-flash", 1)
    server.factory.channels.publish("news", "p1")
    peer.request("tell", "t")
    got = [peer.next() for _ in range(3)]
    assert [(m["type"], m["seq"]) for m in got] == [
        ("news-flash", 3),
        ("publication", 4),
        ("told", 5),
    ]
    assert all("ack" not in m for m in got)  # pushes answer no request
    # Unnumbered messages on a session connection are handled as before: no seq, not kept.
    peer.send({"type": "echo", "id": "plain", "data": 1})
    assert peer.expect(lambda m: m.get("id") == "plain") == {
        "type": "echo",
        "id": "plain",
        "data": 1,
    }
    state = server.sessions.states[peer.sid]
    assert state.out_seq == 5 and len(state.unacked) == 5
    peer.ack(4)
    spin_until(lambda: state.acked == 4)
    assert [seq for seq, _ in state.unacked] == [5]


def test_a_duplicate_request_is_not_run_again(server: Server) -> None:
    peer = server.connect()
    peer.start()
    assert data(peer.reply(peer.request("count", "x"))) == 1
    peer.request("count", "x", seq=1)  # the same seq again (a resend)
    assert data(peer.reply(peer.request("count", "y"))) == 2
    assert server.calls == ["x", "y"]
    assert server.sessions.counts["duplicates"] == 1


def test_a_late_ack_is_ignored_and_an_ack_past_the_last_seq_is_refused(server: Server) -> None:
    peer = server.connect()
    peer.start()
    for i in range(3):
        peer.reply(peer.request("echo", i))
    state = server.sessions.states[peer.sid]
    peer.ack(3)
    peer.ack(1)  # late (reordered by the client): ignored
    spin_until(lambda: server.sessions.counts["late_acks"] == 1)
    assert state.acked == 3 and not state.unacked
    peer.ack(9)
    assert error_code(peer.expect(is_type("error"))) == "bad_request"
    assert data(peer.reply(peer.request("echo", "still open"))) == "still open"


# -- resume ----------------------------------------------------------------------------------


def test_resume_with_nothing_to_replay(server: Server) -> None:
    peer = server.connect()
    peer.start()
    peer.reply(peer.request("echo", 1))
    peer.ack()
    spin_until(lambda: server.sessions.states[peer.sid].acked == 1)
    server.drop(peer)
    again = peer.clone(server.port.getHost().port)
    server.peers.append(again)
    assert data(again.resume()) == {
        "resumed": True,
        "session": peer.sid,
        "ack": 1,
        "replay": 0,
        "expiry": 120,
    }
    # The next message is seq 2: nothing replayed, nothing skipped.
    assert again.reply(again.request("echo", 2))["seq"] == 2


def test_what_was_sent_while_detached_is_replayed_in_order(server: Server) -> None:
    peer = server.connect()
    peer.start()
    peer.reply(peer.request("subscribe", {"channel": "news"}))
    server.drop(peer)
    server.factory.server.broadcast("b", 1)
    server.factory.channels.publish("news", "p")
    server.factory.server.send(peer.sid, "direct", 2)  # addressed to the session's id
    again = peer.clone(server.port.getHost().port)
    server.peers.append(again)
    answer = data(again.resume())
    assert (answer["resumed"], answer["replay"]) == (True, 2)
    # Pushes were kept; the channel's publication comes from its history after the replay
    # (a detached session records where its subscriptions stood, it does not buffer them).
    replay = [again.next() for _ in range(3)]
    assert [(m["type"], m["seq"]) for m in replay] == [
        ("b", 2),
        ("direct", 3),
        ("publication", 4),
    ]
    # The subscription is the session's: it goes on without a subscribe.
    server.factory.channels.publish("news", "q")
    assert data(again.expect(is_type("publication")))["data"] == "q"


def test_subscriptions_recover_publications_missed_while_detached(server: Server) -> None:
    peer = server.connect()
    peer.start()
    peer.reply(peer.request("subscribe", {"channel": "news"}))
    server.factory.channels.publish("news", "seen")
    assert data(peer.expect(is_type("publication")))["data"] == "seen"
    server.drop(peer)
    state = server.sessions.states[peer.sid]
    assert list(state.subs) == ["news"]
    # A publication while detached: in the channel's history, not in the session's buffer.
    server.factory.channels.publish("news", "missed")
    again = peer.clone(server.port.getHost().port)
    server.peers.append(again)
    assert data(again.resume())["replay"] == 0
    missed = again.expect(is_type("publication"))
    assert (data(missed)["data"], data(missed)["offset"]) == ("missed", 2)


def test_a_subscription_to_a_quiet_channel_resumes_without_resync(server: Server) -> None:
    # Detached longer than the channel's history_ttl (300 s), with nothing published: the
    # broker keeps the channel's epoch for the session, so nothing is reported lost.
    peer = server.connect()
    peer.start(expiry=600)
    assert data(peer.reply(peer.request("subscribe", {"channel": "quiet"})))["offset"] == 0
    server.drop(peer)
    server.clock.advance(400)
    again = peer.clone(server.port.getHost().port)
    server.peers.append(again)
    assert data(again.resume())["resumed"] is True
    assert data(again.reply(again.request("echo", "after"))) == "after"
    server.factory.channels.publish("quiet", "first")
    assert data(again.expect(is_type("publication")))["offset"] == 1
    assert [m for m in again.inbox if m["type"] == "resync"] == []


def test_a_resume_after_a_long_quiet_period(server: Server) -> None:
    peer = server.connect()
    peer.start(expiry=60)
    peer.reply(peer.request("echo", 1))
    # Attached, a session never expires, however quiet (socket.io #5282).
    server.clock.advance(10 * 24 * 3600)
    assert peer.reply(peer.request("echo", 2))["seq"] == 2
    server.drop(peer)
    server.clock.advance(59)  # quiet again, just within its expiry once detached
    again = peer.clone(server.port.getHost().port)
    server.peers.append(again)
    answer = data(again.resume(ack=0))  # as if it had not received them
    assert (answer["resumed"], answer["replay"]) == (True, 2)


def test_expiry_ends_a_detached_session(server: Server) -> None:
    peer = server.connect()
    peer.start(expiry=5)
    server.drop(peer)
    server.clock.advance(5)
    assert peer.sid not in server.sessions.states
    again = peer.clone(server.port.getHost().port)
    server.peers.append(again)
    assert data(again.resume()) == {"resumed": False, "reason": "expired"}
    # The connection stays usable, with a new session.
    assert again.start()["type"] == "session"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"key": "A" * 32}, "bad_key"),
        ({"sid": "0" * 32}, "unknown_session"),
    ],
)
def test_a_resume_that_fails_says_why_and_the_connection_goes_on(
    server: Server, change: dict[str, str], reason: str, log_events: list[dict[str, Any]]
) -> None:
    peer = server.connect()
    peer.start()
    server.drop(peer)
    again = peer.clone(server.port.getHost().port)
    server.peers.append(again)
    assert data(again.resume(**change)) == {"resumed": False, "reason": reason}
    assert data(again.reply(again.request("echo", "ok")) if False else {"data": 1}) == 1
    again.send({"type": "echo", "id": "x", "data": "usable"})
    assert data(again.expect(lambda m: m.get("id") == "x")) == "usable"
    # The real session is untouched, and no log line shows a key.
    assert peer.sid in server.sessions.states
    text = " ".join(str(e) for e in log_events)
    assert peer.key not in text and "A" * 32 not in text


def test_another_identity_may_not_resume_a_session(server: Server) -> None:
    peer = server.connect()
    server.connection(peer).identity = "alice"
    peer.start()
    server.drop(peer)
    mallory = peer.clone(server.port.getHost().port)
    server.peers.append(mallory)
    server.connection(mallory).identity = "mallory"
    assert data(mallory.resume()) == {"resumed": False, "reason": "forbidden"}


def test_half_open_takeover_the_old_connection_gets_nothing_more(server: Server) -> None:
    old = server.connect()
    old.start()
    old.reply(old.request("echo", 1))
    old_conn = server.connection(old)
    # The old connection is frozen (half-open): the client resumes on a new one.
    new = old.clone(server.port.getHost().port)
    server.peers.append(new)
    answer = data(new.resume(ack=0))  # the reply was lost with the old connection
    assert (answer["resumed"], answer["replay"]) == (True, 1)
    assert new.next()["seq"] == 1
    assert server.sessions.takeovers == 1
    server.factory.server.broadcast("after", 1)  # both connections are still registered
    old_conn.send("direct", 1)  # addressed to the old connection: dropped, as it closes
    assert new.reply(new.request("echo", 2))["seq"] == 3
    assert [(m["type"], m["seq"]) for m in new.inbox] == [("after", 2)]
    rest = old.closed()
    assert [error_code(m) for m in rest] == ["session_taken_over"]


def test_a_slow_handler_while_a_replay_is_in_progress(server: Server) -> None:
    peer = server.connect()
    peer.start()
    slow_id = peer.request("slow")
    peer.request("echo", "behind the slow one")
    spin_until(lambda: len(server.slow) == 1)
    server.factory.server.broadcast("push", 1)  # not held behind the slow reply
    assert peer.next()["seq"] == 1
    server.drop(peer)
    server.factory.server.broadcast("push", 2)
    again = peer.clone(server.port.getHost().port)
    server.peers.append(again)
    answer = data(again.resume())
    assert (answer["ack"], answer["replay"]) == (2, 1)  # both requests were received
    assert data(again.next()) == 2
    server.slow[0].callback("done at last")
    replies = [again.next(), again.next()]
    assert [(m.get("id"), m["seq"], m["ack"]) for m in replies] == [
        (slow_id, 3, 2),
        (slow_id + 1, 4, 2),
    ]


def test_replies_finished_while_detached_are_in_the_replay(server: Server) -> None:
    peer = server.connect()
    peer.start()
    slow_id = peer.request("slow")
    spin_until(lambda: len(server.slow) == 1)
    server.drop(peer)
    server.slow[0].callback("finished while away")
    again = peer.clone(server.port.getHost().port)
    server.peers.append(again)
    assert data(again.resume())["replay"] == 1
    reply = again.next()
    assert (reply["id"], data(reply), reply["seq"]) == (slow_id, "finished while away", 1)


def test_session_end_answers_then_the_connection_goes_on_without(server: Server) -> None:
    peer = server.connect()
    peer.start()
    end = peer.reply(peer.request("session_end"))
    assert (end["type"], data(end)) == ("session_end", {"ended": True})
    assert peer.sid not in server.sessions.states
    peer.send({"type": "echo", "id": "after", "data": 1})
    assert peer.expect(lambda m: m.get("id") == "after") == {
        "type": "echo",
        "id": "after",
        "data": 1,
    }
    other = server.connect()
    assert data(other.resume(peer.sid, peer.key, 0))["reason"] == "unknown_session"


# -- limits and a hostile peer ----------------------------------------------------------------


def test_unacked_bound_is_backpressure_on_requests_not_on_pushes() -> None:
    server = Server(sessions={"max_unacked_messages": 4})
    try:
        peer = server.connect()
        peer.start()
        for i in range(8):
            peer.request("echo", i)
        got = [peer.next() for _ in range(4)]
        assert [data(m) for m in got] == [0, 1, 2, 3]
        state = server.sessions.states[peer.sid]
        spin_until(lambda: len(state.held) == 4)
        server.factory.server.broadcast("push", "still goes out")
        assert data(peer.next()) == "still goes out"
        peer.ack()
        got = [peer.next() for _ in range(4)]
        assert [data(m) for m in got] == [4, 5, 6, 7]
    finally:
        server.close()


def test_a_detached_session_past_its_bound_ends_overflow() -> None:
    server = Server(sessions={"max_unacked_messages": 3})
    try:
        peer = server.connect()
        peer.start()
        server.drop(peer)
        for i in range(4):
            server.factory.server.broadcast("push", i)
        assert peer.sid not in server.sessions.states
        again = peer.clone(server.port.getHost().port)
        server.peers.append(again)
        assert data(again.resume()) == {"resumed": False, "reason": "overflow"}
    finally:
        server.close()


def test_a_client_that_never_acks_pushes_ends_its_session_at_twice_the_bound() -> None:
    server = Server(sessions={"max_unacked_messages": 3})
    try:
        peer = server.connect()
        peer.start()
        for i in range(6):
            server.factory.server.broadcast("push", i)
        rest = peer.closed()
        assert [m.get("seq") for m in rest[:5]] == [1, 2, 3, 4, 5]
        assert error_code(rest[-1]) == "session_overflow"
    finally:
        server.close()


def test_session_limits_and_switches() -> None:
    server = Server(sessions={"max_per_identity": 1, "max_sessions": 2})
    try:
        a = server.connect()
        server.connection(a).identity = "alice"
        assert a.start()["type"] == "session"
        assert error_code(a.start()) == "session_exists"
        b = server.connect()
        server.connection(b).identity = "alice"
        assert error_code(b.start()) == "too_many_sessions"
        c, d = server.connect(), server.connect()
        assert c.start()["type"] == "session"
        assert error_code(d.start()) == "too_many_sessions"
        assert error_code(d.start(expiry="soon")) == "bad_request"
    finally:
        server.close()
    off = Server(sessions={"enabled": False})
    try:
        peer = off.connect()
        assert error_code(peer.start()) == "sessions_disabled"
        assert data(peer.resume("0" * 32, "k", 0)) == {
            "resumed": False,
            "reason": "sessions_disabled",
        }
    finally:
        off.close()


@pytest.mark.parametrize("seq", [0, -1, 2**53, 2**64, "1", 1.5, True, None])
def test_a_bad_seq_is_a_typed_error_and_the_session_stays_resumable(
    server: Server, seq: Any
) -> None:
    peer = server.connect()
    peer.start()
    message: dict[str, Any] = {"type": "echo", "id": 1, "seq": seq, "data": 1}
    if seq is None:
        message["seq"] = 5  # a gap: 1 was expected
    peer.send(message)
    rest = peer.closed()
    assert [error_code(m) for m in rest] == ["bad_seq"], rest
    again = peer.clone(server.port.getHost().port)
    server.peers.append(again)
    assert data(again.resume())["resumed"] is True


def test_a_hostile_peer_gets_typed_errors_and_bounded_memory() -> None:
    server = Server(limits={"max_pending_requests": 8}, sessions={"max_unacked_messages": 4})
    try:
        peer = server.connect()
        peer.start()
        state = server.sessions.states[peer.sid]
        conn = server.connection(peer)
        for bad in ({"seq": "x"}, {}, None, {"seq": -3}):
            peer.send({"type": "ack", "data": bad} if bad is not None else {"type": "ack"})
            assert error_code(peer.expect(is_type("error"))) == "bad_request"
        # Never acknowledges, and floods numbered requests: held up to the read bound, then
        # the connection is no longer read (memory bounded; nothing dropped).
        for _ in range(200):
            peer.request("echo", "x" * 100)
        rest = peer.closed()
        assert error_code(rest[-1]) == "rate_limited"
        assert len(state.held) <= 16 and len(state.unacked) <= 4
        assert conn.close_reason == "rate_limited"
        # A resume flood on another connection is refused past its bound.
        flood = server.connect()
        for _ in range(17):
            flood.send({"type": "resume", "id": "r", "data": {"session": "0" * 32, "key": "k"}})
        answers = [flood.expect(lambda m: m.get("id") == "r") for _ in range(17)]
        assert [data(m)["reason"] for m in answers[:16]] == ["unknown_session"] * 16
        assert error_code(answers[16]) == "rate_limited"
        for bad in ({"session": "not hex", "key": "k"}, [], {"session": "0" * 32, "key": 5}):
            flood.send({"type": "resume", "id": "b", "data": bad})
        # (past the attempt bound these are refused before they are read)
        assert error_code(flood.expect(lambda m: m.get("id") == "b")) == "rate_limited"
    finally:
        server.close()


def test_bad_resume_fields_are_bad_request(server: Server) -> None:
    peer = server.connect()
    for bad in ({"session": "not hex", "key": "k"}, [], {"session": "0" * 32, "key": 5}):
        peer.send({"type": "resume", "id": "b", "data": bad})
        assert error_code(peer.expect(lambda m: m.get("id") == "b")) == "bad_request"
    peer.send({"type": "resume", "id": "b", "data": {"session": "0" * 32, "key": "k", "ack": -1}})
    assert error_code(peer.expect(lambda m: m.get("id") == "b")) == "bad_request"
    peer.send({"type": "session_end", "id": "e"})
    assert error_code(peer.expect(lambda m: m.get("id") == "e")) == "no_session"


def test_session_metrics(server: Server) -> None:
    from prometheus_client import generate_latest

    from heartbeatd.daemon.metrics import registry_for

    peer = server.connect()
    peer.start()
    peer.reply(peer.request("echo", 1))
    server.drop(peer)
    again = peer.clone(server.port.getHost().port)
    server.peers.append(again)
    again.resume(ack=0)
    text = generate_latest(registry_for(server.factory)).decode()
    for line in (
        'heartbeatd_sessions{state="attached"} 1.0',
        'heartbeatd_sessions{state="detached"} 0.0',
        "heartbeatd_sessions_started_total 1.0",
        'heartbeatd_session_resumes_total{outcome="resumed"} 1.0',
        'heartbeatd_session_resumes_total{outcome="bad_key"} 0.0',
        "heartbeatd_session_replayed_messages_total 1.0",
        "heartbeatd_session_takeovers_total 0.0",
        'heartbeatd_sessions_ended_total{reason="expired"} 0.0',
        "heartbeatd_session_unacked_messages 1.0",
        "heartbeatd_session_detached_bytes 0.0",
    ):
        assert line in text, line


def test_numbered_requests_pipelined_behind_the_session_request_are_numbered(
    server: Server,
) -> None:
    peer = server.connect()
    frames = [
        {"type": "session", "id": "s"},
        {"type": "echo", "id": 1, "seq": 1, "data": "a"},
        {"type": "echo", "id": 2, "seq": 2, "data": "b"},
    ]
    import json
    import struct

    peer.sock.sendall(
        b"".join(struct.pack("!I", len(b)) + b for b in (json.dumps(f).encode() for f in frames))
    )
    assert peer.next()["type"] == "session"
    replies = [peer.next(), peer.next()]
    assert [(m["id"], m["seq"], m["ack"]) for m in replies] == [(1, 1, 1), (2, 2, 2)]


def test_sessions_without_identity_count_by_address_and_behind_a_proxy_by_its_client() -> None:
    from types import SimpleNamespace

    from twisted.internet.address import IPv4Address, IPv6Address

    from heartbeatd.server.resumable import bucket_of

    limits = SimpleNamespace(ipv6_prefix_per_address=64)
    factory = SimpleNamespace(config=SimpleNamespace(limits=limits))

    def conn(peer: Any, forwarded: str | None = None, identity: str | None = None) -> Any:
        transport = SimpleNamespace(getPeer=lambda: peer)
        return SimpleNamespace(
            identity=identity, forwarded_client=forwarded, transport=transport, factory=factory
        )

    v4 = IPv4Address("TCP", "192.0.2.5", 4000)
    assert bucket_of(conn(v4, identity="alice")) == "u:alice"
    assert bucket_of(conn(v4)) == "a:192.0.2.5"
    assert bucket_of(conn(IPv6Address("TCP", "2001:db8::1:2", 1))) == "a:2001:db8::/64"
    assert bucket_of(conn(IPv6Address("TCP", "::ffff:192.0.2.9", 1))) == "a:192.0.2.9"
    proxied = conn(IPv4Address("TCP", "127.0.0.1", 1), "198.51.100.7")
    assert bucket_of(proxied) == "a:198.51.100.7"
    assert bucket_of(conn(SimpleNamespace(name="/run/hb.sock"))) is None

"""Resumable sessions, client side, without a server: the sans-IO numbers (`SessionState`),
the session on one connection over a StringTransport, and the reconnecting client resuming
on a Clock (resend, replay dedupe, acks, subscriptions, session_lost, takeover)."""

from __future__ import annotations

from typing import Any

from fake_server import HELLO, FakeEndpoint, Peer
from helpers import frame, parse_frames
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from heartbeatd.client import (
    ClientConnection,
    ClientError,
    ClientStopped,
    ConnectionClosed,
    NotConnected,
    RequestTimeout,
    ServerError,
    SessionLost,
    SessionUnavailable,
)
from heartbeatd.client.reconnect import ReconnectingClient
from heartbeatd.client.session import ClientSession
from heartbeatd.client.session_state import DUPLICATE, GAP, NEW, SessionState
from heartbeatd.wire.envelope import decode_json

_sync = SynchronousTestCase()
successResultOf, failureResultOf, assertNoResult = (
    _sync.successResultOf,
    _sync.failureResultOf,
    _sync.assertNoResult,
)

KEY = "k" * 24


# -- SessionState: the numbers alone -------------------------------------------------------------


def test_requests_are_numbered_from_one_with_the_seq_as_id() -> None:
    state = SessionState()
    bodies = [state.number("echo", {"n": i}) for i in range(3)]
    assert [seq for seq, _ in bodies] == [1, 2, 3]
    assert [decode_json(body) for _, body in bodies][1] == {
        "type": "echo",
        "id": 2,
        "seq": 2,
        "data": {"n": 1},
    }
    assert list(state.unacked) == [1, 2, 3]
    assert "data" not in decode_json(state.number("ping_me")[1])


def test_server_acks_trim_the_resend_buffer_cumulatively() -> None:
    state = SessionState()
    for _ in range(5):
        state.number("x")
    state.server_acked(2)
    assert list(state.unacked) == [3, 4, 5]
    state.server_acked(1)  # lower than before: ignored
    state.server_acked(True)  # not a seq
    state.server_acked("4")
    assert list(state.unacked) == [3, 4, 5] and state.server_ack == 2
    state.server_acked(99)  # past what we sent: everything we sent
    assert state.unacked == {} and state.server_ack == 5


def test_resend_is_what_the_server_lacks_in_order_unchanged() -> None:
    state = SessionState()
    sent = [state.number("x", i)[1] for i in range(4)]
    assert state.to_resend(1) == sent[1:]
    assert state.to_resend(0) == sent[1:]  # a lower ack changes nothing
    assert state.to_resend(4) == []


def test_inbound_verdicts_new_duplicate_gap() -> None:
    state = SessionState()
    assert [state.accept(s) for s in (1, 2, 2, 1, 4, 3)] == [
        NEW,
        NEW,
        DUPLICATE,
        DUPLICATE,
        GAP,
        NEW,
    ]
    assert state.delivered == 3


def test_acks_taken_once_and_resume_acks_everything() -> None:
    state = SessionState()
    assert state.take_ack() is None
    for seq in (1, 2, 3):
        state.accept(seq)
    assert state.ack_pending == 3
    assert state.take_ack() == 3 and state.take_ack() is None
    state.accept(4)
    assert state.resuming() == 4 and state.ack_pending == 0


def test_lose_forgets_and_start_keeps_requests_numbered_meanwhile() -> None:
    state = SessionState()
    state.start("sid", KEY, 120)
    state.number("a")
    state.accept(1)
    assert state.lose() == [1]
    assert not state.active and state.next_seq == 1 and state.delivered == 0
    state.number("b")  # numbered while there is no session: the next one's first
    state.start("sid2", KEY, None)
    assert list(state.unacked) == [1] and state.active


def test_dropping_a_request_that_never_left_moves_the_later_ones_down() -> None:
    state = SessionState()
    for name in "abcd":
        state.number(name, {"name": name})
    state.drop_unsent(2)
    assert list(state.unacked) == [1, 2, 3] and state.next_seq == 4
    assert [decode_json(body) for body in state.unacked.values()] == [
        {"type": t, "id": i, "seq": i, "data": {"name": t}}
        for i, t in [(1, "a"), (2, "c"), (3, "d")]
    ]
    state.drop_unsent(3)  # the last one: nothing moves
    assert list(state.unacked) == [1, 2] and state.next_seq == 3
    state.drop_unsent(7)  # not held: nothing changes
    assert state.next_seq == 3 and state.number("e")[0] == 3


# -- one connection with a session, the test playing the server ---------------------------------


class Server:
    """The test plays the server of one connection over a StringTransport."""

    def __init__(self, clock: Clock, session: ClientSession, **options: Any) -> None:
        self.client = ClientConnection(clock, session=session, **options)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.ready = self.client.when_ready()
        self.send(HELLO)

    def send(self, *objs: Any) -> None:
        self.client.dataReceived(b"".join(frame(o) for o in objs))

    def written(self) -> list[Any]:
        data = self.transport.value()
        self.transport.clear()
        return parse_frames(data)

    def grant(self, sid: str = "a1b2c3d4e5f60718") -> None:
        (ask,) = self.written()
        assert ask["type"] == "session" and "seq" not in ask
        self.send({"type": "session", "id": ask["id"], "data": {"session": sid, "key": KEY}})

    def drop(self) -> None:
        self.client.connectionLost(Failure(ConnectionDone("gone")))


def started(clock: Clock, **options: Any) -> tuple[Server, ClientSession, list]:
    session = ClientSession(clock, **options)
    events: list = []
    session.on_session(events.append)
    server = Server(clock, session)
    assertNoResult(server.ready)  # ready waits for the session
    server.grant()
    assert successResultOf(server.ready).session_outcome == "started"
    assert events == [{"event": "started"}]
    return server, session, events


def test_session_asked_with_expiry_then_requests_are_numbered(clock: Clock) -> None:
    session = ClientSession(clock, expiry=300)
    server = Server(clock, session)
    (ask,) = server.written()
    assert ask["data"] == {"expiry": 300}
    server.send({"type": "session", "id": ask["id"], "data": {"session": "s1", "key": KEY}})
    replies = [server.client.request("echo", i) for i in range(3)]
    assert [(m["seq"], m["id"]) for m in server.written()] == [(1, 1), (2, 2), (3, 3)]
    server.send(
        {"type": "echo", "id": 2, "seq": 1, "ack": 3, "data": 1},
        {"type": "echo", "id": 1, "seq": 2, "ack": 3, "data": 0},
    )
    assert successResultOf(replies[0]) == 0 and successResultOf(replies[1]) == 1
    assert session.state.unacked == {}  # the piggybacked ack trimmed them all
    assertNoResult(replies[2])


def test_acks_are_batched_by_count_or_delay(clock: Clock) -> None:
    server, _session, _ = started(clock)
    pushes: list = []
    server.client.on("news", lambda data, conn: pushes.append(data))
    for seq in range(1, 32):
        server.send({"type": "news", "seq": seq, "data": seq})
    assert server.written() == []  # 31: not yet
    server.send({"type": "news", "seq": 32, "data": 32})
    assert server.written() == [{"type": "ack", "data": {"seq": 32}}]
    server.send({"type": "news", "seq": 33, "data": 33})
    clock.advance(0.19)
    assert server.written() == []
    clock.advance(0.01)
    assert server.written() == [{"type": "ack", "data": {"seq": 33}}]
    clock.advance(1)
    assert server.written() == []  # nothing new: no ack
    assert pushes == list(range(1, 34))


def test_a_clean_close_acks_first(clock: Clock) -> None:
    server, _, _ = started(clock)
    server.send({"type": "news", "seq": 1, "data": 1})
    server.client.close()
    assert server.written() == [{"type": "ack", "data": {"seq": 1}}]
    assert server.transport.disconnecting


def test_duplicates_are_dropped_and_a_gap_drops_the_connection(clock: Clock) -> None:
    server, session, _ = started(clock)
    pushes: list = []
    server.client.on("news", lambda data, conn: pushes.append(data))
    server.send(*({"type": "news", "seq": s, "data": s} for s in (1, 2, 1, 2, 3)))
    assert pushes == [1, 2, 3] and session.duplicates == 2
    server.send({"type": "news", "seq": 5, "data": 5})
    assert pushes == [1, 2, 3] and server.transport.disconnecting  # aborted
    assert server.client.close_reason is not None
    assert "skipped from seq 3 to 5" in server.client.close_reason.getErrorMessage()


def test_unnumbered_and_connection_level_messages_pass_through(clock: Clock) -> None:
    server, session, _ = started(clock)
    pushes: list = []
    server.client.on("news", lambda data, conn: pushes.append(data))
    server.client.request("x")
    server.written()
    server.send({"type": "ack", "data": {"seq": 1}}, {"type": "news", "data": "plain"})
    assert session.state.unacked == {} and pushes == ["plain"]
    server.send({"type": "ping", "id": 7})
    assert server.written() == [{"type": "pong", "id": 7}]
    assert session.state.delivered == 0


def test_error_replies_and_late_replies(clock: Clock) -> None:
    server, session, _ = started(clock)
    pushes: list = []
    server.client.on_any(lambda t, data, conn: pushes.append(t))
    failing = server.client.request("nope")
    late = server.client.request("slow", timeout=1)
    clock.advance(1)
    failureResultOf(late, RequestTimeout)
    assert 2 in session.state.unacked  # its copy stays until acked
    server.send(
        {"type": "error", "id": 1, "seq": 1, "error": {"code": "unknown_type", "message": "m"}},
        {"type": "slow", "id": 2, "seq": 2, "ack": 2, "data": "too late"},
    )
    assert failureResultOf(failing, ServerError).value.code == "unknown_type"
    assert pushes == [] and session.state.delivered == 2  # the late reply: nobody's push


def test_a_refused_session_leaves_the_connection_usable_without_one(clock: Clock) -> None:
    session = ClientSession(clock)
    events: list = []
    session.on_session(events.append)
    server = Server(clock, session)
    (ask,) = server.written()
    server.send({"type": "error", "id": ask["id"], "error": {"code": "sessions_disabled"}})
    conn = successResultOf(server.ready)
    assert conn.session_outcome is None and events[-1]["reason"] == "sessions_disabled"
    conn.request("echo")
    assert "seq" not in server.written()[0]


def test_bad_seq_values_drop_the_connection(clock: Clock) -> None:
    server, _, _ = started(clock)
    server.send({"type": "news", "seq": "1"})
    assert "bad seq" in server.client.close_reason.getErrorMessage()


# -- the reconnecting client: resume, resend, replay, lost, takeover -----------------------------


def make_client(clock: Clock) -> tuple[ReconnectingClient, FakeEndpoint, list]:
    endpoint = FakeEndpoint()
    client = ReconnectingClient(
        clock, endpoint, backoff_initial=1, backoff_max=1, random=lambda: 0.5, resumable=True
    )
    events: list = []
    client.on_session(events.append)
    client.start()
    return client, endpoint, events


def first_connection(clock: Clock) -> tuple[ReconnectingClient, FakeEndpoint, list, Peer]:
    client, endpoint, events = make_client(clock)
    ready = client.when_connected()
    peer = endpoint.accept()
    (ask,) = peer.written()
    peer.send({"type": "session", "id": ask["id"], "data": {"session": "sid1", "key": KEY}})
    successResultOf(ready)
    return client, endpoint, events, peer


def reconnect(clock: Clock, endpoint: FakeEndpoint, peer: Peer) -> Peer:
    peer.drop()
    clock.advance(0.5)
    return endpoint.accept()


def test_resume_resends_unacked_requests_and_replays_exactly_once(clock: Clock) -> None:
    client, endpoint, events, peer = first_connection(clock)
    pushes: list = []
    client.on("news", lambda data, conn: pushes.append(data))
    first, second = client.request("a", timeout=30), client.request("b", timeout=30)
    assert [m["seq"] for m in peer.written()] == [1, 2]
    # The server received 1 (acks it) and pushes; the connection drops before more.
    peer.send({"type": "news", "seq": 1, "ack": 1, "data": "n1"})
    peer2 = reconnect(clock, endpoint, peer)
    third = client.request("c", timeout=30)  # while resuming: waits behind the resend
    (resume,) = peer2.written()
    assert resume["type"] == "resume" and "seq" not in resume
    assert resume["data"] == {"session": "sid1", "key": KEY, "ack": 1}
    # Server: it has seq 1 (and answered it: the reply is replayed), lacks 2.
    peer2.send(
        {"type": "resume", "id": resume["id"], "data": {"resumed": True, "ack": 1, "replay": 2}},
        {"type": "news", "seq": 1, "data": "n1"},  # already delivered: dropped
        {"type": "a", "id": 1, "seq": 2, "ack": 1, "data": "A"},
    )
    resent = peer2.written()
    assert [(m["type"], m["seq"], m["id"]) for m in resent] == [("b", 2, 2), ("c", 3, 3)]
    assert successResultOf(first) == "A"
    peer2.send(
        {"type": "b", "id": 2, "seq": 3, "ack": 3, "data": "B"},
        {"type": "news", "seq": 4, "data": "n2"},
        {"type": "c", "id": 3, "seq": 5, "ack": 3, "data": "C"},
    )
    assert (successResultOf(second), successResultOf(third)) == ("B", "C")
    assert pushes == ["n1", "n2"]
    assert events == [{"event": "started"}, {"event": "resumed", "replayed": 2}]
    assert client.session.state.unacked == {}


def test_a_request_made_between_connections_waits_for_the_resume(clock: Clock) -> None:
    client, endpoint, _, peer = first_connection(clock)
    peer.drop()
    pending = client.request("later", timeout=5)
    clock.advance(0.5)
    peer2 = endpoint.accept()
    (resume,) = peer2.written()
    peer2.send({"type": "resume", "id": resume["id"], "data": {"resumed": True, "ack": 0}})
    (sent,) = peer2.written()
    assert (sent["type"], sent["seq"]) == ("later", 1)
    peer2.send({"type": "later", "id": 1, "seq": 1, "ack": 1, "data": "ok"})
    assert successResultOf(pending) == "ok"


def test_a_pending_request_keeps_its_own_timeout_across_reconnects(clock: Clock) -> None:
    client, _endpoint, _, peer = first_connection(clock)
    pending = client.request("slow", timeout=3)
    peer.drop()
    assertNoResult(pending)  # not ConnectionClosed
    clock.advance(3)
    failureResultOf(pending, RequestTimeout)


def test_resumed_false_fails_pending_tells_the_app_and_starts_afresh(clock: Clock) -> None:
    client, endpoint, events, peer = first_connection(clock)
    pubs: list = []
    subscribed = client.subscribe("news", lambda data, offset, sub: pubs.append(data))
    (sub_req,) = peer.written()
    assert sub_req["seq"] == 1
    peer.send(
        {"type": "subscribe", "id": 1, "seq": 1, "ack": 1, "data": {"epoch": "e", "offset": 4}},
        {"type": "publication", "seq": 2, "data": {"channel": "news", "offset": 5, "data": "p5"}},
    )
    successResultOf(subscribed)
    pending = client.request("work", timeout=30)
    peer2 = reconnect(clock, endpoint, peer)
    (resume,) = peer2.written()
    peer2.send(
        {"type": "resume", "id": resume["id"], "data": {"resumed": False, "reason": "expired"}}
    )
    failure = failureResultOf(pending, SessionLost)
    assert failure.value.reason == "expired" and isinstance(failure.value, ConnectionClosed)
    assert events[-1] == {"event": "session_lost", "reason": "expired"}
    (ask,) = peer2.written()
    assert ask["type"] == "session"
    peer2.send({"type": "session", "id": ask["id"], "data": {"session": "sid2", "key": KEY}})
    assert events[-1] == {"event": "started"}
    (again,) = peer2.written()  # subscribed again, from where it was, numbered from 1
    assert again["type"] == "subscribe" and again["seq"] == 1
    assert again["data"]["since"] == {"epoch": "e", "offset": 5}
    assert pubs == ["p5"]


def test_a_resumed_session_does_not_subscribe_again(clock: Clock) -> None:
    client, endpoint, _, peer = first_connection(clock)
    pubs: list = []
    client.subscribe("news", lambda data, offset, sub: pubs.append(offset))
    peer.written()
    peer.send(
        {"type": "subscribe", "id": 1, "seq": 1, "ack": 1, "data": {"epoch": "e", "offset": 0}},
        {"type": "publication", "seq": 2, "data": {"channel": "news", "offset": 1, "data": 1}},
    )
    peer2 = reconnect(clock, endpoint, peer)
    (resume,) = peer2.written()
    assert resume["data"]["ack"] == 2
    peer2.send(
        {"type": "resume", "id": resume["id"], "data": {"resumed": True, "ack": 1, "replay": 0}},
        {"type": "publication", "seq": 3, "data": {"channel": "news", "offset": 2, "data": 2}},
    )
    assert peer2.written() == []  # no subscribe sent
    assert pubs == [1, 2]


def test_takeover_reports_session_lost_and_never_resumes_it(clock: Clock) -> None:
    client, endpoint, events, peer = first_connection(clock)
    pending = client.request("work", timeout=30)
    peer.send({"type": "error", "error": {"code": "session_taken_over", "message": "elsewhere"}})
    assert failureResultOf(pending, SessionLost).value.reason == "session_taken_over"
    assert events[-1] == {"event": "session_lost", "reason": "session_taken_over"}
    peer2 = reconnect(clock, endpoint, peer)
    (ask,) = peer2.written()
    assert ask["type"] == "session"  # a fresh one, not a resume


def test_stop_acks_fails_what_waits_and_ends_the_session(clock: Clock) -> None:
    client, _endpoint, events, peer = first_connection(clock)
    peer.send({"type": "news", "seq": 1, "data": 1})
    pending = client.request("work", timeout=30)
    peer.written()
    stopped = client.stop()
    assert peer.written() == [
        {"type": "ack", "data": {"seq": 1}},
        {"type": "session_end", "id": 2, "seq": 2},  # numbered, after what it sent before
    ]
    failureResultOf(pending, ConnectionClosed)
    failureResultOf(client.request("late", timeout=5), ConnectionClosed)  # not numbered
    assertNoResult(stopped)  # it waits for the answer (the connection is still up)
    assert not peer.transport.disconnecting
    peer.send({"type": "session_end", "id": 2, "seq": 2, "ack": 2, "data": {}})
    assert peer.transport.disconnecting  # answered: the client closes
    assert not client.session.state.active and client.session.state.unacked == {}
    assert [e["event"] for e in events] == ["started"]  # a stop is no session_lost
    peer.drop()
    successResultOf(stopped)


def test_stop_waits_for_session_end_at_most_its_timeout(clock: Clock) -> None:
    client, _endpoint, _, peer = first_connection(clock)
    stopped = client.stop()
    (end,) = peer.written()
    assert end["type"] == "session_end"
    clock.advance(1.9)
    assertNoResult(stopped)
    clock.advance(0.1)  # session_end_timeout (2 s by default)
    assert peer.transport.disconnecting and not client.session.state.active
    peer.drop()
    successResultOf(stopped)


def test_stop_ends_at_once_when_the_connection_goes_first(clock: Clock) -> None:
    client, _endpoint, _, peer = first_connection(clock)
    stopped = client.stop()
    assertNoResult(stopped)
    peer.drop()
    successResultOf(stopped)
    assert not client.session.state.active


def test_stop_while_detached_ends_at_once_and_a_restart_starts_a_new_session(
    clock: Clock,
) -> None:
    client, endpoint, _events, peer = first_connection(clock)
    peer.drop()
    successResultOf(client.stop())  # no connection: nothing to send, nothing to wait for
    client.start()
    clock.advance(0)
    peer2 = endpoint.accept()
    (ask,) = peer2.written()
    assert ask["type"] == "session"  # the old one is forgotten: not resumed


def test_requests_before_the_first_session_keep_their_order(clock: Clock) -> None:
    client, endpoint, _ = make_client(clock)
    first, second = client.request("a", timeout=5), client.request("b", timeout=5)
    peer = endpoint.accept()
    (ask,) = peer.written()
    peer.send({"type": "session", "id": ask["id"], "data": {"session": "sid1", "key": KEY}})
    third = client.request("c", timeout=5)
    assert [(m["type"], m["seq"]) for m in peer.written()] == [("a", 1), ("b", 2), ("c", 3)]
    peer.send(
        *(
            {"type": t, "id": i, "seq": i, "ack": 3, "data": t}
            for i, t in [(1, "a"), (2, "b"), (3, "c")]
        )
    )
    assert [successResultOf(d) for d in (first, second, third)] == ["a", "b", "c"]


def test_a_request_never_sent_times_out_as_not_connected(clock: Clock) -> None:
    client, _endpoint, _, peer = first_connection(clock)
    sent = client.request("sent", timeout=2)
    peer.drop()
    unsent = client.request("unsent", timeout=2)
    clock.advance(2)
    failureResultOf(sent, RequestTimeout)
    failureResultOf(unsent, NotConnected)


def test_a_request_that_failed_not_connected_is_never_sent(clock: Clock) -> None:
    """The application was told it failed (it may retry): no later connection sends it,
    and the requests numbered after it keep consecutive seqs."""
    client, endpoint, _ = make_client(clock)
    doomed = client.request("transfer", {"amount": 100}, timeout=1)
    later = client.request("later", timeout=5)
    clock.advance(1)
    failureResultOf(doomed, NotConnected)
    peer = endpoint.accept()
    (ask,) = peer.written()
    peer.send({"type": "session", "id": ask["id"], "data": {"session": "sid1", "key": KEY}})
    assert [(m["type"], m["id"], m["seq"]) for m in peer.written()] == [("later", 1, 1)]
    peer.send({"type": "later", "id": 1, "seq": 1, "ack": 1, "data": "ok"})
    assert successResultOf(later) == "ok"


def test_after_a_drop_written_requests_keep_their_seq_and_unsent_ones_that_failed_go(
    clock: Clock,
) -> None:
    client, endpoint, _, peer = first_connection(clock)
    written = client.request("written", timeout=1)
    assert [m["seq"] for m in peer.written()] == [1]
    peer.drop()
    doomed = client.request("doomed", timeout=1)  # seq 2, never sent
    later = client.request("later", timeout=30)  # seq 3 -> 2
    cancelled = client.request("cancelled", timeout=30)  # seq 4 -> 3, then dropped
    cancelled.cancel()
    failureResultOf(cancelled)
    clock.advance(1)
    failureResultOf(written, RequestTimeout)  # it left: the server may run it
    failureResultOf(doomed, NotConnected)
    peer2 = endpoint.accept()
    (resume,) = peer2.written()
    peer2.send({"type": "resume", "id": resume["id"], "data": {"resumed": True, "ack": 0}})
    assert [(m["type"], m["seq"]) for m in peer2.written()] == [("written", 1), ("later", 2)]
    assert [m["seq"] for m in [decode_json(b) for b in client.session.state.unacked.values()]] == [
        1,
        2,
    ]
    following = client.request("following", timeout=30)
    assert [(m["type"], m["seq"]) for m in peer2.written()] == [("following", 3)]
    peer2.send(
        {"type": "written", "id": 1, "seq": 1, "ack": 3, "data": "late"},  # nobody waits
        {"type": "later", "id": 2, "seq": 2, "data": "L"},
        {"type": "following", "id": 3, "seq": 3, "data": "F"},
    )
    assert successResultOf(later) == "L" and successResultOf(following) == "F"
    assert client.session.pending_requests == 0


def test_an_unanswered_resume_drops_the_connection_and_the_next_one_resumes(clock: Clock) -> None:
    client, endpoint, events, peer = first_connection(clock)
    pending = client.request("work", timeout=30)
    peer2 = reconnect(clock, endpoint, peer)
    (_resume,) = peer2.written()
    clock.advance(10)  # hello_timeout: no answer (the server may have resumed it anyway)
    assert peer2.transport.disconnecting
    assert not client.session.state.delivered and client.session.state.active
    peer3 = reconnect(clock, endpoint, peer2)
    (again,) = peer3.written()
    assert again["type"] == "resume" and again["data"]["session"] == "sid1"
    peer3.send({"type": "resume", "id": again["id"], "data": {"resumed": True, "ack": 1}})
    peer3.send({"type": "work", "id": 1, "seq": 1, "ack": 1, "data": "done"})
    assert successResultOf(pending) == "done"
    assert [e["event"] for e in events] == ["started", "resumed"]


def test_after_a_takeover_requests_wait_for_the_next_session(clock: Clock) -> None:
    client, endpoint, _, peer = first_connection(clock)
    peer.send({"type": "error", "error": {"code": "session_taken_over", "message": "m"}})
    later = client.request("later", timeout=30)  # the old connection is not used
    assert peer.written() == []
    peer2 = reconnect(clock, endpoint, peer)
    (ask,) = peer2.written()
    peer2.send({"type": "session", "id": ask["id"], "data": {"session": "sid2", "key": KEY}})
    (sent,) = peer2.written()
    assert (sent["type"], sent["seq"]) == ("later", 1)
    peer2.send({"type": "later", "id": 1, "seq": 1, "data": "ok"})
    assert successResultOf(later) == "ok"


def test_goaway_waits_for_the_sessions_pending_requests_before_closing(clock: Clock) -> None:
    """A draining daemon still answers what it was sent: closing before the replies came
    would turn them into `SessionLost` when that daemon restarts without a cluster."""
    client, _endpoint, _events, peer = first_connection(clock)
    pending = client.request("work", timeout=30)
    (sent,) = peer.written()
    peer.send({"type": "goaway", "data": {"reason": "shutdown", "reconnect_after": 5}})
    assert not peer.transport.disconnecting  # the numbered request is still in flight
    peer.send({"type": "work", "id": sent["id"], "seq": 1, "ack": 1, "data": "done"})
    assert successResultOf(pending) == "done"
    assert peer.transport.disconnecting


def test_pool_config_resumable_gives_the_subscription_connection_a_session(clock: Clock) -> None:
    from heartbeatd import ConfigError
    from heartbeatd.client import Pool, PoolConfig, parse_pool_config

    assert PoolConfig().resumable is False
    config = parse_pool_config({"resumable": True, "min_idle": 0})
    assert config.resumable is True
    assert Pool(clock, config).subscriber_fn().session is not None
    assert Pool(clock, config, resumable=False).subscriber_fn().session is None  # it wins
    assert Pool(clock, PoolConfig(min_idle=0)).subscriber_fn().session is None
    assert Pool(clock, PoolConfig(min_idle=0), resumable=True).subscriber_fn().session
    try:
        parse_pool_config({"resumable": "yes"})
    except ConfigError as e:
        assert "pool.resumable" in str(e)
    else:
        raise AssertionError("pool.resumable: 'yes' was accepted")


# -- session subscribes: held only once answered, sent again when not, bounded per connection --


def answer_subscribe(peer: Peer, request: dict, seq: int, offset: int = 0) -> None:
    data = {"channel": request["data"]["channel"], "epoch": "e", "offset": offset}
    peer.send(
        {"type": "subscribe", "id": request["id"], "seq": seq, "ack": request["seq"], "data": data}
    )


def resume(peer: Peer, ack: int, *replay: dict) -> None:
    (ask,) = peer.written()
    assert ask["type"] == "resume"
    answer = {"resumed": True, "ack": ack, "replay": len(replay)}
    peer.send({"type": "resume", "id": ask["id"], "data": answer}, *replay)


def test_a_session_subscribe_answered_unavailable_is_sent_again_after_a_resume(
    clock: Clock,
) -> None:
    client, endpoint, _, peer = first_connection(clock)
    subscribed = client.subscribe("news", lambda *a: None)
    (ask,) = peer.written()
    error = {"code": "unavailable", "message": "the broker is down"}
    peer.send({"type": "error", "id": ask["id"], "seq": 1, "ack": 1, "error": error})
    assertNoResult(subscribed)
    peer2 = reconnect(clock, endpoint, peer)  # the retry's timer finds no connection
    resume(peer2, ack=1)
    (again,) = peer2.written()  # the resumed session does not hold it: subscribed again
    assert (again["type"], again["data"]["channel"], again["seq"]) == ("subscribe", "news", 2)
    answer_subscribe(peer2, again, seq=2)
    assert successResultOf(subscribed).epoch == "e"
    clock.advance(60)
    assert [m["type"] for m in peer2.written()] == ["ack"]  # no subscribe


def test_a_session_subscribe_refused_fails_and_is_not_sent_after_a_resume(clock: Clock) -> None:
    client, endpoint, _, peer = first_connection(clock)
    subscribed = client.subscribe("news", lambda *a: None)
    (ask,) = peer.written()
    error = {"code": "too_many_channels", "message": "at most 0"}
    peer.send({"type": "error", "id": ask["id"], "seq": 1, "ack": 1, "error": error})
    assert failureResultOf(subscribed, ServerError).value.code == "too_many_channels"
    peer2 = reconnect(clock, endpoint, peer)
    resume(peer2, ack=1)
    assert peer2.written() == []


def test_a_session_subscribe_dropped_unsettled_at_the_detach_is_sent_again(clock: Clock) -> None:
    client, endpoint, _, peer = first_connection(clock)
    subscribed = client.subscribe("news", lambda *a: None)
    (ask,) = peer.written()
    peer2 = reconnect(clock, endpoint, peer)  # the connection went before the answer
    # heartbeatd answers the subscribe it dropped, unsettled, with not_subscribed, replayed.
    error = {"code": "not_subscribed", "message": "unsubscribed meanwhile"}
    resume(peer2, 1, {"type": "error", "id": ask["id"], "seq": 1, "ack": 1, "error": error})
    (again,) = peer2.written()
    assert (again["type"], again["data"]["channel"], again["seq"]) == ("subscribe", "news", 2)
    assertNoResult(subscribed)
    answer_subscribe(peer2, again, seq=2)
    assert successResultOf(subscribed).channel == "news"


def test_a_session_subscribe_in_flight_at_a_resume_is_not_sent_twice(clock: Clock) -> None:
    client, endpoint, _, peer = first_connection(clock)
    pubs: list = []
    subscribed = client.subscribe("news", lambda data, offset, sub: pubs.append(offset))
    (ask,) = peer.written()
    peer2 = reconnect(clock, endpoint, peer)
    resume(peer2, 0)  # the server never got it: the session resends the same copy
    (resent,) = peer2.written()
    assert (resent["type"], resent["seq"], resent["id"]) == ("subscribe", 1, ask["id"])
    answer_subscribe(peer2, resent, seq=1)
    peer2.send({"type": "publication", "seq": 2, "data": {"channel": "news", "offset": 1}})
    assert successResultOf(subscribed).channel == "news" and pubs == [1]
    peer3 = reconnect(clock, endpoint, peer2)
    resume(peer3, 1)
    assert peer3.written() == []  # held by the session now: not sent again


def test_a_session_subscribe_deadline_counts_only_while_connected(clock: Clock) -> None:
    client, endpoint, _, peer = first_connection(clock)  # request_timeout: 10 s
    subscribed = client.subscribe("news", lambda *a: None)
    peer.written()
    clock.advance(6)
    peer.drop()
    clock.advance(20)  # a long outage: the server is down
    peer2 = endpoint.accept()
    resume(peer2, 0)
    (resent,) = peer2.written()
    clock.advance(9)  # 35 s since it was sent, 9 s on this connection
    assertNoResult(subscribed)
    answer_subscribe(peer2, resent, seq=1)
    assert successResultOf(subscribed).channel == "news"


def test_a_session_subscribe_unanswered_on_a_connection_unsubscribes_and_subscribes_again(
    clock: Clock,
) -> None:
    client, endpoint, _, peer = first_connection(clock)
    subscribed = client.subscribe("news", lambda *a: None)
    peer.written()
    peer.send({"type": "ack", "data": {"seq": 1}})  # the server has it, and no answer comes
    clock.advance(10)  # request_timeout on this connection: the client drops it
    assert peer.transport.disconnecting
    assert "no answer to the subscribe" in peer.proto.close_reason.getErrorMessage()
    peer2 = reconnect(clock, endpoint, peer)
    resume(peer2, 1)
    unsub, again = peer2.written()  # the server may hold it: unsubscribe first
    assert (unsub["type"], unsub["data"], unsub["seq"]) == ("unsubscribe", {"channel": "news"}, 2)
    assert (again["type"], again["data"]["channel"], again["seq"]) == ("subscribe", "news", 3)
    peer2.send({"type": "unsubscribe", "id": unsub["id"], "seq": 1, "ack": 2, "data": {}})
    answer_subscribe(peer2, again, seq=2)
    assert successResultOf(subscribed).channel == "news"


def test_a_subscription_the_resume_could_not_restore_is_subscribed_again(clock: Clock) -> None:
    client, endpoint, _, peer = first_connection(clock)
    subscribed = client.subscribe("news", lambda *a: None)
    (ask,) = peer.written()
    answer_subscribe(peer, ask, seq=1, offset=7)
    successResultOf(subscribed)
    peer2 = reconnect(clock, endpoint, peer)
    resume(peer2, 1)
    assert peer2.written() == []  # held by the session
    lost = {"channel": "news", "reason": "unavailable"}
    peer2.send({"type": "subscription_lost", "seq": 2, "data": lost})
    (again,) = peer2.written()
    assert again["type"] == "subscribe" and again["seq"] == 2
    assert again["data"] == {"channel": "news", "since": {"epoch": "e", "offset": 7}}


def test_a_plain_subscribe_unanswered_drops_the_connection_and_the_next_one_subscribes(
    clock: Clock,
) -> None:
    endpoint = FakeEndpoint()
    client = ReconnectingClient(
        clock, endpoint, backoff_initial=1, backoff_max=1, random=lambda: 0.5
    )
    client.start()
    peer = endpoint.accept()
    subscribed = client.subscribe("news", lambda *a: None)
    (ask,) = peer.written()
    assert "seq" not in ask
    clock.advance(10)  # request_timeout: a late answer would leave the server subscribed
    assert peer.transport.disconnecting
    peer2 = reconnect(clock, endpoint, peer)
    (again,) = peer2.written()
    assert again["type"] == "subscribe" and again["data"] == {"channel": "news"}
    peer2.send({"type": "subscribe", "id": again["id"], "data": {"epoch": "e", "offset": 0}})
    assert successResultOf(subscribed).channel == "news"


# -- stop and unsubscribe settle what waits; an unsubscribe reaches a session's server ---------


def test_stop_fails_a_session_subscribe_still_waiting_for_its_answer(clock: Clock) -> None:
    client, _endpoint, _, peer = first_connection(clock)
    held = client.subscribe("news", lambda *a: None)
    (ask,) = peer.written()
    answer_subscribe(peer, ask, seq=1)
    successResultOf(held)
    waiting = client.subscribe("sport", lambda *a: None)
    peer.written()
    stopped = client.stop()
    error = failureResultOf(waiting, ConnectionClosed).value
    assert "stopped before the subscribe to 'sport'" in str(error)
    peer.drop()
    successResultOf(stopped)


def test_stop_fails_a_subscribe_made_while_disconnected(clock: Clock) -> None:
    client, _endpoint, _, peer = first_connection(clock)
    peer.drop()
    waiting = client.subscribe("news", lambda *a: None)
    assertNoResult(waiting)
    successResultOf(client.stop())
    failureResultOf(waiting, ConnectionClosed)


def held_subscription(clock: Clock) -> tuple[ReconnectingClient, FakeEndpoint, list, list]:
    """A session client subscribed to news (offset 0), its connection just dropped."""
    client, endpoint, events, peer = first_connection(clock)
    pubs: list = []
    subscribed = client.subscribe("news", lambda data, offset, sub: pubs.append(offset))
    (ask,) = peer.written()
    answer_subscribe(peer, ask, seq=1)
    successResultOf(subscribed)
    peer.drop()
    return client, endpoint, events, pubs


def reconnect_accept(clock: Clock, endpoint: FakeEndpoint) -> Peer:
    clock.advance(0.5)  # the backoff
    return endpoint.accept()


def test_an_unsubscribe_while_disconnected_is_sent_by_the_resume(clock: Clock) -> None:
    client, endpoint, _, pubs = held_subscription(clock)
    done = client.unsubscribe("news")
    assertNoResult(done)  # the resumed session would still hold it: the server must hear it
    clock.advance(20)  # a long outage does not time it out: its deadline runs while connected
    peer2 = endpoint.accept()
    resume(peer2, ack=1)
    (unsub,) = peer2.written()
    assert (unsub["type"], unsub["data"], unsub["seq"]) == ("unsubscribe", {"channel": "news"}, 2)
    # Published before the server handled it: not delivered, it is unsubscribed here.
    peer2.send({"type": "publication", "seq": 2, "data": {"channel": "news", "offset": 1}})
    assertNoResult(done)
    peer2.send({"type": "unsubscribe", "id": unsub["id"], "seq": 3, "ack": 2, "data": {}})
    assert successResultOf(done) == {}
    assert pubs == []


def test_an_unsubscribe_then_a_subscribe_while_disconnected_reach_the_server_in_order(
    clock: Clock,
) -> None:
    client, endpoint, _, _pubs = held_subscription(clock)
    done = client.unsubscribe("news")
    again = client.subscribe("news", lambda *a: None)
    peer2 = reconnect_accept(clock, endpoint)
    resume(peer2, ack=1)
    unsub, sub = peer2.written()
    assert [(m["type"], m["seq"]) for m in (unsub, sub)] == [("unsubscribe", 2), ("subscribe", 3)]
    peer2.send({"type": "unsubscribe", "id": unsub["id"], "seq": 2, "ack": 2, "data": {}})
    answer_subscribe(peer2, sub, seq=3)
    assert successResultOf(done) == {} and successResultOf(again).channel == "news"


def test_an_unsubscribe_waiting_for_a_lost_session_fires_the_server_forgot_it(
    clock: Clock,
) -> None:
    client, endpoint, events, _pubs = held_subscription(clock)
    done = client.unsubscribe("news")
    peer2 = reconnect_accept(clock, endpoint)
    (ask,) = peer2.written()
    peer2.send({"type": "resume", "id": ask["id"], "data": {"resumed": False, "reason": "expired"}})
    assert successResultOf(done) is None
    assert events[-1] == {"event": "session_lost", "reason": "expired"}
    (start,) = peer2.written()
    assert start["type"] == "session"  # and nothing for news in the new session
    peer2.send({"type": "session", "id": start["id"], "data": {"session": "sid2", "key": KEY}})
    assert peer2.written() == []


def test_an_unsubscribe_waiting_at_stop_fires(clock: Clock) -> None:
    client, _endpoint, _, _pubs = held_subscription(clock)
    done = client.unsubscribe("news")
    successResultOf(client.stop())  # the session ends: the server no longer holds news for us
    assert successResultOf(done) is None


def test_an_unsubscribe_unanswered_on_a_connection_fails_with_request_timeout(
    clock: Clock,
) -> None:
    client, endpoint, _, _pubs = held_subscription(clock)
    done = client.unsubscribe("news")
    peer2 = reconnect_accept(clock, endpoint)
    resume(peer2, ack=1)
    peer2.written()
    clock.advance(10)  # request_timeout on this connection
    failureResultOf(done, RequestTimeout)


def test_an_unsubscribe_fails_the_subscribe_still_waiting_for_its_answer(clock: Clock) -> None:
    client, _endpoint, _ = make_client(clock)  # never connected
    waiting = client.subscribe("news", lambda *a: None)
    assert successResultOf(client.unsubscribe("news")) is None
    error = failureResultOf(waiting, ClientError).value
    assert "unsubscribed from 'news'" in str(error)


# -- resume and start answered unavailable: retried for session_retry_timeout -----------------

UNAVAILABLE_RESUME = {"resumed": False, "reason": "unavailable"}


def unavailable_client(
    clock: Clock, **options: Any
) -> tuple[ReconnectingClient, FakeEndpoint, list]:
    """A session client whose backoff is ``random() * min(2^(n-1), 100)`` with random 1.0:
    the retries after answers ``unavailable`` come 1, 2, 4... seconds apart."""
    endpoint = FakeEndpoint()
    options = {"backoff_initial": 1, "backoff_max": 100, "random": lambda: 1.0, **options}
    client = ReconnectingClient(clock, endpoint, resumable=True, **options)
    events: list = []
    client.on_session(events.append)
    client.start()
    return client, endpoint, events


def grant(peer: Peer, sid: str = "sid1") -> None:
    (ask,) = peer.written()
    assert ask["type"] == "session"
    peer.send({"type": "session", "id": ask["id"], "data": {"session": sid, "key": KEY}})


def refuse_resume(peer: Peer, as_error: bool = False) -> None:
    """Answer the resume ``unavailable``: as ``resumed: false`` (heartbeatd) or an error."""
    (ask,) = peer.written()
    assert ask["type"] == "resume"
    assert ask["data"]["session"] == "sid1" and ask["data"]["key"] == KEY  # the same session
    if as_error:
        peer.refuse(ask, "unavailable")
    else:
        peer.answer(ask, UNAVAILABLE_RESUME)
    assert peer.transport.disconnecting  # this connection is dropped; the next one asks again
    peer.drop()


def next_peer(clock: Clock, endpoint: FakeEndpoint, after: float) -> Peer:
    """The next connect comes exactly ``after`` seconds later (the capped backoff)."""
    attempts = len(endpoint.attempts)
    clock.advance(after - 0.001)
    assert len(endpoint.attempts) == attempts
    clock.advance(0.001)
    assert len(endpoint.attempts) == attempts + 1
    return endpoint.accept()


def test_a_resume_answered_unavailable_is_retried_and_the_session_resumes_whole(
    clock: Clock,
) -> None:
    """The server kept the session (a Redis failover): answered unavailable three times,
    the fourth resume continues it: no session_lost, the request the server lacked is resent
    once, the one made meanwhile follows, the held subscription is not sent again."""
    client, endpoint, events = unavailable_client(clock)
    ready = client.when_connected()
    peer = endpoint.accept()
    grant(peer)
    successResultOf(ready)
    subscribed = client.subscribe("news", lambda data, offset, sub: None)
    (sub_req,) = peer.written()
    answer_subscribe(peer, sub_req, seq=1)
    successResultOf(subscribed)
    first = client.request("work", {"n": 1}, timeout=60)
    (sent,) = peer.written()
    assert (sent["type"], sent["seq"]) == ("work", 2)
    peer.drop()
    peer = next_peer(clock, endpoint, 1)  # the backoff after a connection that worked
    refuse_resume(peer)
    peer = next_peer(clock, endpoint, 1)
    refuse_resume(peer, as_error=True)
    second = client.request("more", timeout=60)  # waits, numbered after the first
    peer = next_peer(clock, endpoint, 2)
    refuse_resume(peer)
    assert client.session.unavailable_attempts == 3 and client.session.state.sid == "sid1"
    assertNoResult(first)
    assertNoResult(second)
    peer = next_peer(clock, endpoint, 4)
    (ask,) = peer.written()
    assert ask["data"] == {"session": "sid1", "key": KEY, "ack": 1}
    peer.answer(ask, {"resumed": True, "ack": 1, "replay": 0})  # it lacks seq 2
    resent = peer.written()
    assert [(m["type"], m["seq"]) for m in resent] == [("work", 2), ("more", 3)]
    peer.send(
        {"type": "work", "id": 2, "seq": 2, "ack": 3, "data": "W"},
        {"type": "more", "id": 3, "seq": 3, "data": "M"},
    )
    assert (successResultOf(first), successResultOf(second)) == ("W", "M")
    assert events == [{"event": "started"}, {"event": "resumed", "replayed": 0}]
    assert client.session.unavailable_since is None and client.session.unavailable == 3
    assert client.session.lost == 0
    clock.advance(60)
    assert [m["type"] for m in peer.written()] == ["ack"]  # nothing subscribed again


def test_a_resume_unavailable_until_the_deadline_loses_the_session_typed(clock: Clock) -> None:
    """The last try comes at the deadline (not a backoff step after it); its answer gives
    up: session_lost (reason unavailable), SessionUnavailable for what waited, which old
    ``except SessionLost`` and ``except ConnectionClosed`` clauses catch; then a new session."""
    client, endpoint, events = unavailable_client(clock, session_retry_timeout=2.5)
    ready = client.when_connected()
    peer = endpoint.accept()
    grant(peer)
    successResultOf(ready)
    pending = client.request("work", timeout=600)
    peer.written()
    peer.drop()
    peer = next_peer(clock, endpoint, 1)
    refuse_resume(peer)  # t=1: the spell starts
    peer = next_peer(clock, endpoint, 1)
    refuse_resume(peer)  # t=2
    assert client.session.retry_deadline == 3.5
    peer = next_peer(clock, endpoint, 1.5)  # backoff 4, capped: t=3.5, the deadline
    assertNoResult(pending)
    refuse_resume(peer)
    error = failureResultOf(pending, SessionUnavailable).value
    assert isinstance(error, SessionLost) and isinstance(error, ConnectionClosed)
    assert (error.reason, error.elapsed, error.attempts, error.limit) == (
        "unavailable",
        2.5,
        3,
        2.5,
    )
    assert "session_retry_timeout is 2.5s" in str(error)
    assert events == [{"event": "started"}, {"event": "session_lost", "reason": "unavailable"}]
    assert not client.session.state.active and client.session.retry_deadline is None
    peer = next_peer(clock, endpoint, 4)  # the backoff goes on, no longer capped
    grant(peer, "sid2")  # a new session, not a resume
    assert events[-1] == {"event": "started"}


def test_stop_during_the_retries_fails_what_waits_with_client_stopped(clock: Clock) -> None:
    client, endpoint, events = unavailable_client(clock)
    ready = client.when_connected()
    peer = endpoint.accept()
    grant(peer)
    successResultOf(ready)
    pending = client.request("work", timeout=600)
    peer.drop()
    peer = next_peer(clock, endpoint, 1)
    refuse_resume(peer)
    waiting = client.when_connected()
    later = client.request("later", timeout=600)
    successResultOf(client.stop())
    clock.advance(0)  # when_connected hears ClientService's answer a moment later
    for d in (pending, waiting, later):
        assert "stopped" in str(failureResultOf(d, ClientStopped).value)
    assert events == [{"event": "started"}]  # it asked for this: no session_lost
    assert client.session.retry_deadline is None
    clock.advance(120)
    assert len(endpoint.attempts) == 2  # no more attempts


def test_a_session_start_answered_unavailable_is_retried_not_given_up(clock: Clock) -> None:
    """Not a connection without a session (today's refusals): the next connection asks
    again, and requests made meanwhile are the new session's first ones."""
    client, endpoint, events = unavailable_client(clock)
    ready = client.when_connected(timeout=30)
    early = client.request("early", timeout=30)
    peer = endpoint.accept()
    (ask,) = peer.written()
    assert ask["type"] == "session"
    peer.refuse(ask, "unavailable")
    assert peer.transport.disconnecting
    peer.drop()
    assertNoResult(ready)
    assert "unavailable to session" in client.last_error
    peer = next_peer(clock, endpoint, 1)
    (ask,) = peer.written()
    peer.refuse(ask, "unavailable")
    peer.drop()
    peer = next_peer(clock, endpoint, 2)
    grant(peer)
    assert successResultOf(ready).session_outcome == "started"
    (sent,) = peer.written()
    assert (sent["type"], sent["seq"]) == ("early", 1)
    peer.send({"type": "early", "id": 1, "seq": 1, "data": "E"})
    assert successResultOf(early) == "E"
    assert events == [{"event": "started"}]


def test_a_session_start_unavailable_until_the_deadline_fails_what_waits(clock: Clock) -> None:
    client, endpoint, events = unavailable_client(clock, session_retry_timeout=1)
    early = client.request("early", timeout=600)
    for after in (0, 1):  # t=0, then t=1: the deadline
        peer = next_peer(clock, endpoint, after) if after else endpoint.accept()
        (ask,) = peer.written()
        peer.refuse(ask, "unavailable")
        peer.drop()
    error = failureResultOf(early, SessionUnavailable).value
    assert (error.elapsed, error.attempts) == (1, 2)
    assert events == [{"event": "session_lost", "reason": "unavailable"}]
    peer = next_peer(clock, endpoint, 2)
    grant(peer)  # the store is back: the session starts, without the failed request
    assert peer.written() == [] and events[-1] == {"event": "started"}


def test_session_retry_timeout_is_checked_and_reaches_the_pool(clock: Clock) -> None:
    import math

    import pytest

    from heartbeatd import ConfigError
    from heartbeatd.client import Pool, PoolConfig, parse_pool_config
    from heartbeatd.client.reconnect import DEFAULT_SESSION_RETRY_TIMEOUT

    for bad in (0, -1, math.nan):
        with pytest.raises(ValueError, match="session_retry_timeout must be a positive"):
            ReconnectingClient(clock, FakeEndpoint(), session_retry_timeout=bad)
    forever, endpoint, events = unavailable_client(
        clock, session_retry_timeout=math.inf, backoff_max=1
    )
    peer = endpoint.accept()
    grant(peer)
    pending = forever.request("work", timeout=10**8)
    peer.drop()
    for _ in range(3):  # a million seconds apart: never gives up
        clock.advance(10**6)
        peer = endpoint.accept()
        refuse_resume(peer)
    assertNoResult(pending)
    assert events == [{"event": "started"}] and forever.session.state.sid == "sid1"
    assert PoolConfig().session_retry_timeout == DEFAULT_SESSION_RETRY_TIMEOUT == 60
    config = parse_pool_config({"session_retry_timeout": 2.5, "resumable": True, "min_idle": 0})
    assert Pool(clock, config).subscriber_fn().session.retry_timeout == 2.5
    inf = parse_pool_config({"session_retry_timeout": math.inf, "resumable": True})
    assert Pool(clock, inf).subscriber_fn().session.retry_timeout == math.inf
    for bad in (0, -1, math.nan, "60", True, None):
        with pytest.raises(ConfigError, match=r"pool\.session_retry_timeout: .* is not allowed"):
            parse_pool_config({"session_retry_timeout": bad})

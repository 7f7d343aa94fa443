"""Resumable sessions across nodes: real daemons, a real redis-server, raw session peers.

Built from what went wrong elsewhere: a session that dies with its node (emqx #2032), a
half-open takeover across nodes (mosquitto #1650) and messages lost through a backplane
(aspnetcore #55575).  The guarantee under test is docs/protocol.md's, "Sessions".  The
last test runs a session over the WebSocket listener of a real (single) daemon.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon import Daemon
from redis_server import RedisServer
from session_peer import SessionPeer
from test_cluster import LINK_UP, NODE_TIMEOUT, Node

HANDLERS = """
from twisted.internet import reactor
from twisted.internet.task import deferLater

def register(registry):
    @registry.handler("slow")
    def slow(request):
        # Answers after data seconds (at once when run again); says if it is a redelivery.
        delay = 0 if request.redelivered else request.data
        return deferLater(reactor, delay, lambda: {"redelivered": request.redelivered})

    @registry.handler("tell")
    def tell(request):
        # A push to the session itself (its id outlives the connection).
        request.server.send(request.session.resumable, "told", request.data)
        return "ok"

    @registry.handler("push_to")
    def push_to(request):
        # A push to another session, wherever it is.
        return request.server.send(request.data["to"], "told", request.data["text"])

    @registry.handler("shout")
    def shout(request):
        # A broadcast of this node (its clients, and the sessions it held last).
        return request.server.broadcast("shout", request.data)
"""


@contextlib.contextmanager
def nodes(
    tmp_path: Path,
    redis: RedisServer,
    count: int,
    node_timeout: float = NODE_TIMEOUT,
    **sections: Any,
) -> Iterator[list[Node]]:
    (tmp_path / "sess_handlers.py").write_text(HANDLERS)
    with contextlib.ExitStack() as stack:
        found = []
        for i in range(count):
            directory = tmp_path / f"node{i}"
            directory.mkdir()
            config = {
                "name": f"node{i}",
                "handlers": ["sess_handlers"],
                "admin": {"listen": "tcp:0:interface=127.0.0.1"},
                "channels": {"client_publish": True, "history_size": 50},
                "cluster": {
                    "redis": redis.url,
                    "node_id": f"node{i}",
                    "node_timeout": node_timeout,
                },
                **sections,
            }
            daemon = Daemon(directory, config, env={"PYTHONPATH": str(tmp_path)})
            found.append(Node(stack.enter_context(daemon)))
        for node in found:
            node.daemon.wait_for(LINK_UP)
        yield found


def data_of(message: dict[str, Any]) -> Any:
    return message.get("data")


def test_kill_9_of_the_node_holding_the_session_loses_nothing(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis, nodes(tmp_path, redis, 2) as (a, b):
        with SessionPeer(a.port) as peer:
            peer.start()
            assert data_of(peer.reply(peer.request("echo", "one"))) == "one"
            sub = data_of(peer.reply(peer.request("subscribe", {"channel": "news"})))
            assert sub["offset"] == 0
            b.publish("news", "p1")  # published through the other node, counted in seq
            assert data_of(peer.expect(lambda m: m["type"] == "publication"))["data"] == "p1"
            # A request the node starts but never answers; then one whose push (not held
            # behind the slow reply, unlike replies) proves the node received both.
            slow_id = peer.request("slow", 30)
            peer.request("tell", "alive")
            assert data_of(peer.expect(lambda m: m["type"] == "told")) == "alive"
            hwm, last_seen = peer.seq, peer.last
            a.daemon.process.send_signal(signal.SIGKILL)
            a.daemon.process.wait(10)

        b.publish("news", "p2")  # missed while between connections
        with SessionPeer(b.port) as moved:
            moved.sid, moved.key, moved.last = peer.sid, peer.key, last_seen
            answer = data_of(moved.resume())
            # Everything the client was sent is known; both requests were received.
            assert answer == {
                "resumed": True,
                "session": peer.sid,
                "ack": hwm,
                "replay": 0,
                "expiry": 120,
            }
            # Received but never answered: they run again here, flagged, replies in order
            # (the push of the redelivered "tell" comes again too: at-least-once for them).
            slow = moved.expect(lambda m: m.get("id") == slow_id)
            assert slow["data"] == {"redelivered": True}
            assert slow["ack"] == hwm
            tell = moved.expect(lambda m: m.get("type") == "tell")
            assert tell["seq"] > slow["seq"]
            # The subscription came back with what it missed, without a re-subscribe.
            pub = moved.expect(lambda m: m["type"] == "publication")
            assert data_of(pub)["data"] == "p2"
            b.publish("news", "p3")
            assert data_of(moved.expect(lambda m: m["type"] == "publication"))["data"] == "p3"


def test_takeover_across_nodes_fences_the_old_connection(tmp_path: Path) -> None:
    with (
        RedisServer(tmp_path / "redis") as redis,
        nodes(tmp_path, redis, 2) as (a, b),
        SessionPeer(a.port) as old,
    ):
        old.start()
        assert data_of(old.reply(old.request("echo", 1))) == 1
        old.ack()
        # The old connection is frozen (half-open: it reads nothing more); the client
        # resumes on the other node.
        with SessionPeer(b.port) as new:
            new.sid, new.key, new.seq, new.last = old.sid, old.key, old.seq, old.last
            answer = data_of(new.resume())
            assert answer == {
                "resumed": True,
                "session": old.sid,
                "ack": 1,
                "replay": 0,
                "expiry": 120,
            }
            # The old one is told, and gets nothing more of the session.
            rest = old.closed()
            assert [m["error"]["code"] for m in rest] == ["session_taken_over"], rest
            assert all("seq" not in m for m in rest)
            new.request("tell", "x")
            assert data_of(new.expect(lambda m: m["type"] == "told")) == "x"
            assert data_of(new.expect(lambda m: m.get("type") == "tell")) == "ok"


def test_refusals_come_from_redis_and_the_key_is_not_stored(tmp_path: Path) -> None:
    with (
        RedisServer(tmp_path / "redis") as redis,
        nodes(tmp_path, redis, 2) as (a, b),
        SessionPeer(a.port) as peer,
    ):
        peer.start(expiry=30)
        peer.reply(peer.request("echo", 1))
        stored = redis.cli("HGETALL", f"heartbeatd:s:{peer.sid}")
        assert peer.key not in stored and "30" in stored
        with SessionPeer(b.port) as other:
            assert data_of(other.resume(peer.sid, "A" * 32, 0)) == {
                "resumed": False,
                "reason": "bad_key",
            }
            assert data_of(other.resume("0" * 32, peer.key, 0))["reason"] == "unknown_session"
            # The refused connection goes on, and the session was not disturbed.
            assert data_of(peer.reply(peer.request("echo", 2))) == 2
        for node in (a, b):
            assert node.daemon.stop() == 0
            assert peer.key not in node.daemon.log


def test_a_session_over_websocket_resumes_on_a_new_websocket(tmp_path: Path) -> None:
    from wsclient import WSClient

    config = {"websocket": {"listen": "tcp:0:interface=127.0.0.1"}}
    with Daemon(tmp_path, config) as daemon:

        def connect() -> WSClient:
            client = WSClient(daemon.ws_port)
            assert client.recv()["type"] == "hello"
            return client

        with connect() as first:
            first.send({"type": "session", "id": "s"})
            session = first.recv()["data"]
            first.send({"type": "echo", "id": 1, "seq": 1, "data": "over ws"})
            assert first.recv() == {"seq": 1, "ack": 1, "type": "echo", "id": 1, "data": "over ws"}
        with connect() as second:
            second.send(
                {
                    "type": "resume",
                    "id": "r",
                    "data": {"session": session["session"], "key": session["key"], "ack": 0},
                }
            )
            answer = second.recv()["data"]
            assert (answer["resumed"], answer["replay"], answer["ack"]) == (True, 1, 1)
            assert second.recv()["seq"] == 1
            second.send({"type": "echo", "id": 2, "seq": 2, "data": "again"})
            assert second.recv()["seq"] == 2


def wait_detached(redis: RedisServer, sid: str) -> None:
    """Until the node that lost the connection has recorded the session detached in Redis
    (``c`` cleared: its presence leaves, sent before on the same link, are applied too)."""
    deadline = time.monotonic() + 10
    while redis.cli("HGET", f"heartbeatd:s:{sid}", "c") != "":
        assert time.monotonic() < deadline, "the session was not detached in time"


def test_a_subscription_to_an_empty_channel_resumes_elsewhere_without_resync(
    tmp_path: Path,
) -> None:
    # Found by the JS client: the channel's record went with its last member (the detached
    # session's), so the node resuming it found a new epoch and said history_lost at 0.
    with RedisServer(tmp_path / "redis") as redis, nodes(tmp_path, redis, 2) as (a, b):
        with SessionPeer(b.port) as peer:
            peer.start()
            sub = data_of(peer.reply(peer.request("subscribe", {"channel": "still-empty"})))
            assert sub["offset"] == 0
            peer.ack()
        wait_detached(redis, peer.sid)
        with peer.clone(a.port) as moved:
            assert data_of(moved.resume())["resumed"] is True
            # A round trip after the restore: anything it sent came before the echo's reply.
            assert data_of(moved.reply(moved.request("echo", "after"))) == "after"
            a.publish("still-empty", "first")
            pub = moved.expect(lambda m: m["type"] == "publication")
            assert data_of(pub)["offset"] == 1
            assert [m for m in moved.inbox if m["type"] == "resync"] == []


def test_pushes_and_broadcasts_reach_a_session_on_any_node_or_in_redis(tmp_path: Path) -> None:
    # aspnetcore #55575: a push through the backplane to a client between connections was lost.
    with (
        RedisServer(tmp_path / "redis") as redis,
        nodes(tmp_path, redis, 2) as (a, b),
        SessionPeer(a.port) as other,
    ):
        other.start()
        with SessionPeer(b.port) as peer:
            peer.start()
            # (Its reply is written once Redis has it, so the session is in Redis now.)
            assert data_of(peer.reply(peer.request("echo", 0))) == 0
            # Attached on the other node: forwarded there, numbered by it.
            assert data_of(other.reply(other.request("push_to", {"to": peer.sid, "text": "1"})))
            told = peer.expect(lambda m: m["type"] == "told")
            assert (told["seq"], told["data"]) == (2, "1")
            peer.ack()
        wait_detached(redis, peer.sid)
        # Detached, on no node: numbered into Redis for its replay.
        assert data_of(other.reply(other.request("push_to", {"to": peer.sid, "text": "2"})))
        status, answer = a.http("POST", "/broadcast", {"type": "notice", "data": "all"})
        assert status == 200, answer
        with SessionPeer(b.port) as third:  # node b's own broadcast: b held the session last
            third.start()
            assert third.reply(third.request("shout", "b only"))
        # The admin API's send reaches it too (and says so), and an unknown id is a 404.
        status, answer = a.http("POST", f"/clients/{peer.sid}/send", {"type": "told", "data": "3"})
        assert (status, answer) == (200, {"sent": 1})
        status, _ = a.http("POST", f"/clients/{'0' * 32}/send", {"type": "told", "data": "x"})
        assert status == 404
        deadline = time.monotonic() + 10
        while redis.cli("HGET", f"heartbeatd:s:{peer.sid}", "o") != "6":
            assert time.monotonic() < deadline, redis.cli("HGETALL", f"heartbeatd:s:{peer.sid}")
        with peer.clone(a.port) as moved:
            answer = data_of(moved.resume())
            assert (answer["resumed"], answer["replay"]) == (True, 4)
            replay = [moved.next() for _ in range(4)]  # seq 3..6, checked consecutive
            assert [m["seq"] for m in replay] == [3, 4, 5, 6]
            assert sorted((m["type"], m["data"]) for m in replay) == [
                ("notice", "all"),
                ("shout", "b only"),
                ("told", "2"),
                ("told", "3"),
            ]
            # Attached again (on a): a push from b is forwarded here, after the replay.
            assert third_push(b, peer.sid, "4")
            assert data_of(moved.expect(lambda m: m["type"] == "told")) == "4"


def third_push(node: Node, sid: str, text: str) -> bool:
    with SessionPeer(node.port) as pusher:
        pusher.start()
        return bool(data_of(pusher.reply(pusher.request("push_to", {"to": sid, "text": text}))))


def test_a_detached_session_past_its_bound_in_redis_ends_overflow(tmp_path: Path) -> None:
    bound = {"max_unacked_messages": 3}
    with (
        RedisServer(tmp_path / "redis") as redis,
        nodes(tmp_path, redis, 2, sessions=bound) as (a, b),
    ):
        with SessionPeer(b.port) as peer:
            peer.start()
        wait_detached(redis, peer.sid)
        for n in range(3):
            status, _ = a.http("POST", "/broadcast", {"type": "notice", "data": n})
            assert status == 200
        deadline = time.monotonic() + 10
        while redis.cli("HGET", f"heartbeatd:s:{peer.sid}", "o") != "3":
            assert time.monotonic() < deadline
        with peer.clone(a.port) as moved:  # at the bound: still whole
            assert data_of(moved.resume(ack=0))["replay"] == 3
        wait_detached(redis, peer.sid)
        for n in range(4):
            status, _ = a.http("POST", "/broadcast", {"type": "notice", "data": n})
            assert status == 200
        deadline = time.monotonic() + 10
        while redis.cli("EXISTS", f"heartbeatd:s:{peer.sid}") != "0":
            assert time.monotonic() < deadline
        with peer.clone(b.port) as late:
            assert data_of(late.resume(ack=0)) == {"resumed": False, "reason": "overflow"}


def test_a_push_to_a_session_whose_node_was_killed_waits_in_redis(tmp_path: Path) -> None:
    # emqx #2032: the session died with its node; here a push meanwhile is kept for it.
    with RedisServer(tmp_path / "redis") as redis, nodes(tmp_path, redis, 2) as (a, b):
        with SessionPeer(b.port) as peer:
            peer.start()
            assert data_of(peer.reply(peer.request("echo", 1))) == 1
            b.daemon.process.send_signal(signal.SIGKILL)
            b.daemon.process.wait(10)
        # Once b's lease ran out (a no longer lists its clients), a numbers pushes in Redis,
        # even before the reaper marks the session detached, and broadcasts reach it too.
        deadline = time.monotonic() + 10
        while a.http("GET", "/clients")[1]["count"] != 0:
            assert time.monotonic() < deadline
        assert third_push(a, peer.sid, "while b is dead")
        status, _ = a.http("POST", "/broadcast", {"type": "notice", "data": "all"})
        assert status == 200
        deadline = time.monotonic() + 10
        while redis.cli("HGET", f"heartbeatd:s:{peer.sid}", "o") != "3":
            assert time.monotonic() < deadline, redis.cli("HGETALL", f"heartbeatd:s:{peer.sid}")
        with peer.clone(a.port) as moved:
            assert data_of(moved.resume())["replay"] == 2
            replay = [moved.next(), moved.next()]
            assert sorted(m["type"] for m in replay) == ["notice", "told"]


def test_a_session_whose_keys_redis_expired_answers_expired(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis, nodes(tmp_path, redis, 2) as (a, b):
        with SessionPeer(a.port) as peer:
            peer.start(expiry=1)
        wait_detached(redis, peer.sid)
        deadline = time.monotonic() + 10  # Redis's own clock expires it (1 s)
        while redis.cli("EXISTS", f"heartbeatd:s:{peer.sid}") != "0":
            assert time.monotonic() < deadline
        # A tombstone outlives it, bounded (sessions.max_expiry after the keys).
        ttl = int(redis.cli("TTL", f"heartbeatd:s:{peer.sid}:g"))
        assert 3500 < ttl <= 3601
        with SessionPeer(b.port) as late:
            assert data_of(late.resume(peer.sid, peer.key, 0)) == {
                "resumed": False,
                "reason": "expired",
            }
            # An ended one is forgotten: unknown_session, as on one daemon.
            late.start()
            late.reply(late.request("echo", 1))
            late.reply(late.request("session_end"))
        with SessionPeer(a.port) as again:
            assert data_of(again.resume(late.sid, late.key, 0))["reason"] == "unknown_session"


def test_max_per_identity_is_counted_across_the_cluster(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text("alice:alice-1\nbob:bob-1\n")
    auth = {"mode": "token", "tokens_file": str(tmp_path / "tokens")}
    with (
        RedisServer(tmp_path / "redis") as redis,
        nodes(tmp_path, redis, 2, auth=auth, sessions={"max_per_identity": 2}) as (a, b),
        contextlib.ExitStack() as stack,
    ):

        def authed(node: Node, token: str) -> SessionPeer:
            peer = stack.enter_context(SessionPeer(node.port))
            peer.send({"type": "auth", "id": "a", "data": {"token": token}})
            assert peer.expect(lambda m: m.get("id") == "a")["type"] == "auth"
            return peer

        first, second = authed(a, "alice-1"), authed(b, "alice-1")
        assert first.start()["type"] == second.start()["type"] == "session"
        third = authed(a, "alice-1")
        # Refused (one on each node: neither node alone is at the bound); numbered requests
        # sent right behind the refused request are run as on a connection without one.
        third.send({"type": "session", "id": "s"})
        third.send({"type": "echo", "id": 9, "seq": 1, "data": "still served"})
        refusal = third.expect(lambda m: m.get("id") == "s")
        assert refusal["error"]["code"] == "too_many_sessions", refusal
        assert "in the cluster" in refusal["error"]["message"]
        assert third.expect(lambda m: m.get("id") == 9) == {
            "type": "echo",
            "id": 9,
            "data": "still served",
        }
        assert authed(b, "bob-1").start()["type"] == "session"  # another identity
        # One ends: room again, on either node.
        second.reply(second.request("session_end"))
        assert third.start()["type"] == "session"


def test_sessions_without_identity_are_counted_by_address_across_the_cluster(
    tmp_path: Path,
) -> None:
    with (
        RedisServer(tmp_path / "redis") as redis,
        nodes(tmp_path, redis, 2, sessions={"max_per_identity": 1}) as (a, b),
        contextlib.ExitStack() as stack,
    ):
        first = stack.enter_context(SessionPeer(a.port))
        assert first.start()["type"] == "session"
        second = stack.enter_context(SessionPeer(b.port))  # same address, other node
        refusal = second.start()
        assert refusal["error"]["code"] == "too_many_sessions", refusal
        assert "address 127.0.0.1" in refusal["error"]["message"]
        first.reply(first.request("session_end"))  # room again
        assert second.start()["type"] == "session"
        assert redis.cli("SMEMBERS", "heartbeatd:s:a:127.0.0.1").split() == [second.sid]


def test_max_sessions_is_counted_across_the_cluster_and_expired_ones_stop_counting(
    tmp_path: Path,
) -> None:
    limits = {"max_sessions": 2, "max_per_identity": 0}
    with (
        RedisServer(tmp_path / "redis") as redis,
        nodes(tmp_path, redis, 2, sessions=limits) as (a, b),
        contextlib.ExitStack() as stack,
    ):
        first = stack.enter_context(SessionPeer(a.port))
        assert first.start()["type"] == "session"
        with SessionPeer(b.port) as brief:
            assert brief.start(expiry=1)["type"] == "session"
        # Detached (in Redis only) it still counts, on either node.
        third = stack.enter_context(SessionPeer(a.port))
        refusal = third.start()
        assert refusal["error"]["code"] == "too_many_sessions", refusal
        assert "sessions.max_sessions" in refusal["error"]["message"]
        assert int(redis.cli("ZCARD", "heartbeatd:s:all")) == 2
        # Once its keys expire it stops counting.
        gone = f"heartbeatd:s:{brief.sid}"
        _until(lambda: redis.cli("EXISTS", gone).strip() == "0")
        assert third.start()["type"] == "session"
        assert int(redis.cli("ZCARD", "heartbeatd:s:all")) == 2  # the expired one trimmed
        first.reply(first.request("session_end"))
        _until(lambda: int(redis.cli("ZCARD", "heartbeatd:s:all")) == 1)


def _until(done: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "timed out"


def restart(node: Node, stack: contextlib.ExitStack) -> Node:
    """Node ``node``'s daemon again (same config, so the same node_id) after it was killed."""
    old = node.daemon
    config = yaml.safe_load(old.config_path.read_text())
    daemon = stack.enter_context(Daemon(old.config_path.parent, config, env=old.env))
    daemon.wait_for(LINK_UP)
    return Node(daemon)


@pytest.mark.parametrize("resume_on", ["other", "restarted"])
def test_a_node_restarted_with_its_node_id_does_not_inherit_its_sessions(
    tmp_path: Path, resume_on: str
) -> None:
    # Found by the JS client: the new process renewed its predecessor's lease, so the reaper
    # never detached the killed process's sessions, and a push to one was forwarded to the
    # new process, which does not hold it: dropped, though the sender was told it went out.
    # A lease of 5 s: the new process renews it before it runs out.
    with (
        RedisServer(tmp_path / "redis") as redis,
        nodes(tmp_path, redis, 2, node_timeout=10) as (a, b),
        contextlib.ExitStack() as stack,
    ):
        with SessionPeer(a.port) as peer:
            peer.start()
            assert data_of(peer.reply(peer.request("echo", 1))) == 1
            a.daemon.process.send_signal(signal.SIGKILL)
            a.daemon.process.wait(10)
        again = restart(a, stack)
        again.daemon.wait_for(r"replaces an earlier one .*; 1 resumable sessions it held")
        lease = float(redis.cli("ZSCORE", "heartbeatd:nodes", "node0"))
        assert lease > float(redis.cli("TIME").split()[0]) * 1000  # never lapsed
        # The new process holds none of its predecessor's sessions: this one waits in Redis.
        assert third_push(b, peer.sid, "after the restart")
        status, _ = b.http("POST", "/broadcast", {"type": "notice", "data": "all"})
        assert status == 200
        _until(lambda: redis.cli("HGET", f"heartbeatd:s:{peer.sid}", "o") == "3")
        with peer.clone((b if resume_on == "other" else again).port) as moved:
            answer = data_of(moved.resume())
            assert (answer["resumed"], answer["replay"]) == (True, 2), answer
            replay = [moved.next(), moved.next()]  # seq 2, 3: checked consecutive
            assert sorted((m["type"], m["data"]) for m in replay) == [
                ("notice", "all"),
                ("told", "after the restart"),
            ]
            # Attached again: a push now is numbered by its node, once, after the replay.
            assert third_push(b if resume_on == "restarted" else again, peer.sid, "live")
            told = moved.expect(lambda m: m["type"] == "told")
            assert (told["seq"], told["data"]) == (4, "live")
            assert data_of(moved.reply(moved.request("echo", 2))) == 2
            assert [m for m in moved.inbox if m.get("type") in ("told", "notice")] == []


def test_two_live_processes_with_one_node_id_are_logged_and_fenced(tmp_path: Path) -> None:
    # A configuration mistake: the second process takes the node id over (the first one's
    # sessions are detached in Redis), the first logs it; neither doubles what it writes.
    with (
        RedisServer(tmp_path / "redis") as redis,
        nodes(tmp_path, redis, 2) as (a, b),
        contextlib.ExitStack() as stack,
        SessionPeer(a.port) as peer,
    ):
        peer.start()
        assert data_of(peer.reply(peer.request("echo", 1))) == 1
        twin = restart(a, stack)  # a still runs
        twin.daemon.wait_for(r"replaces an earlier one .*; 1 resumable sessions it held")
        a.daemon.wait_for(r"node id node0 is used by another live process too")
        assert redis.cli("HGET", f"heartbeatd:s:{peer.sid}", "c") == ""
        # a still carries the connection and numbers for it while nothing else did...
        assert data_of(peer.reply(peer.request("echo", 2))) == 2
        # ...but a push numbered in Redis meanwhile fences it: its next write is refused, its
        # connection is told (unavailable: nobody took the session over, it is to be
        # resumed) and closed, and the session resumes elsewhere with that push.
        assert third_push(b, peer.sid, "to the detached copy")
        _until(lambda: redis.cli("HGET", f"heartbeatd:s:{peer.sid}", "o") == "3")
        peer.request("echo", 3)
        rest = peer.closed()
        assert [m.get("error", {}).get("code") for m in rest] == ["unavailable"], rest
        a.daemon.stop()
        assert a.daemon.log.count("is used by another live process too") == 1
        with peer.clone(b.port) as moved:
            answer = data_of(moved.resume())
            assert (answer["resumed"], answer["replay"]) == (True, 1), answer
            assert data_of(moved.next()) == "to the detached copy"
            echo = moved.expect(lambda m: m.get("type") == "echo")
            assert echo["data"] == 3


def test_a_node_counted_out_while_it_stalled_takes_its_sessions_back(tmp_path: Path) -> None:
    # Its reactor stalls past its lease (as in a Sentinel failover, or a partition): another
    # node reaps it, which detaches its sessions in Redis though its connections still carry
    # them.  When it comes back it writes them back as its own (pushes reach them live
    # again), except one Redis numbered a push into meanwhile: that connection is closed
    # `unavailable` at once, though its client is idle (nobody took the session over), and
    # the session resumes with the push.
    with RedisServer(tmp_path / "redis") as redis, nodes(tmp_path, redis, 2) as (a, b):
        with SessionPeer(b.port) as kept, SessionPeer(b.port) as written:
            for peer in (kept, written):
                peer.start()
                assert data_of(peer.reply(peer.request("echo", 1))) == 1
            process = b.daemon.process
            assert process is not None
            process.send_signal(signal.SIGSTOP)
            try:
                a.daemon.wait_for(r"Cluster nodes gone .*'node1'")
                assert redis.cli("HGET", f"heartbeatd:s:{kept.sid}", "c") == ""
                assert third_push(a, written.sid, "while b stalled")  # kept in Redis
                assert redis.cli("HGET", f"heartbeatd:s:{written.sid}", "o") == "2"
            finally:
                process.send_signal(signal.SIGCONT)
            b.daemon.wait_for(r"Cluster node node1 registered", count=2)
            _until(lambda: redis.cli("HGET", f"heartbeatd:s:{kept.sid}", "c") != "")
            assert redis.cli("HGET", f"heartbeatd:s:{written.sid}", "c") == ""
            assert third_push(a, kept.sid, "live again")  # forwarded to b, numbered there
            assert data_of(kept.expect(lambda m: m["type"] == "told")) == "live again"
            assert data_of(kept.reply(kept.request("echo", 2))) == 2
            rest = written.closed()
            assert [m.get("error", {}).get("code") for m in rest] == ["unavailable"], rest
        with written.clone(a.port) as moved:
            answer = data_of(moved.resume())
            assert (answer["resumed"], answer["ack"], answer["replay"]) == (True, 1, 1), answer
            assert data_of(moved.next()) == "while b stalled"
            assert data_of(moved.reply(moved.request("echo", 2))) == 2


def test_a_resume_past_what_redis_kept_is_refused(tmp_path: Path) -> None:
    # An asynchronous failover can lose the last writes (docs/cluster.md, "What a failover
    # costs"): here the reply the client read is gone from Redis, as if never replicated.
    with RedisServer(tmp_path / "redis") as redis, nodes(tmp_path, redis, 2) as (a, b):
        with SessionPeer(a.port) as peer:
            peer.start()
            assert data_of(peer.reply(peer.request("echo", 1))) == 1
        wait_detached(redis, peer.sid)
        key = f"heartbeatd:s:{peer.sid}"
        redis.cli("HSET", key, "o", "0", "b", "0")
        redis.cli("DEL", f"{key}:o")
        with peer.clone(b.port) as moved:
            refused = moved.resume()  # ack 1: past the session's last message
            assert (refused["type"], refused["error"]["code"]) == ("error", "bad_request")


# -- Redis refusing writes, or restarted empty (a hostile review's findings) ---------------


def evalsha_calls(redis: RedisServer) -> int:
    stats = redis.cli("INFO", "commandstats")
    return int(stats.split("cmdstat_evalsha:calls=", 1)[1].split(",", 1)[0])


def test_redis_refusing_writes_costs_each_failing_session_its_own_detach(tmp_path: Path) -> None:
    # Out of memory (a failed save, BUSY: the same), the link up: each session whose write
    # fails is closed `unavailable` and detached once.  Each used to send again the detach of
    # every session refused before it: Redis calls grew with the square of the sessions.
    with (
        RedisServer(tmp_path / "redis") as redis,
        nodes(tmp_path, redis, 1) as (a,),
        contextlib.ExitStack() as stack,
    ):
        peers = [stack.enter_context(SessionPeer(a.port)) for _ in range(12)]
        for peer in peers:
            peer.start()
        assert redis.cli("CONFIG", "SET", "maxmemory", "1") == "OK"
        costs = []
        for peer in peers:  # one client at a time writes, and is closed
            before = evalsha_calls(redis)
            peer.request("echo", 1)
            rest = peer.closed()
            assert rest[-1]["error"]["code"] == "unavailable", rest
            costs.append(evalsha_calls(redis) - before)
        assert max(costs) <= 3, costs  # its write, its detach (and one refresh at most)
    # Every command failed alike: the log said so a few times, not once a command.
    assert 0 < a.daemon.log.count("Redis refused a command") <= 10


def test_a_session_redis_lost_is_not_said_taken_over(tmp_path: Path) -> None:
    # Redis restarted empty (or a failover to a replica without the key): nobody resumed
    # the session, so its connection is closed `unavailable`, and its resume learns the rest.
    with RedisServer(tmp_path / "redis") as redis, nodes(tmp_path, redis, 1) as (a,):
        with SessionPeer(a.port) as peer:
            peer.start()
            sid, key = peer.sid, peer.key
            assert data_of(peer.reply(peer.request("echo", 1))) == 1
            redis.stop()
            redis.start()  # no SAVE: Redis comes back empty
            rest = peer.closed()
            codes = [m.get("error", {}).get("code") for m in rest]
            assert codes[-1:] == ["unavailable"] and "session_taken_over" not in codes, rest
            assert "no longer has this session" in rest[-1]["error"]["message"]
        with SessionPeer(a.port) as again:
            answer = again.resume(sid, key, ack=1)
            assert answer["data"]["resumed"] is False, answer
            assert answer["data"]["reason"] == "unknown_session", answer

"""Identity-wide controls (issue 22): a per-identity connection limit, GET /clients?identity=,
DELETE /identities/{identity} and ``heartbeat kick --identity``, on one daemon and across a
cluster (two daemons on one redis-server)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from daemon import Daemon, RawClient
from helpers import Peer, make_config
from redis_server import RedisServer
from test_admin import ADMIN, http
from test_cluster import LINK_UP
from twisted.internet.task import Clock

from heartbeatd.daemon.admin_routes import _segments
from heartbeatd.server.auth import Authenticator
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import default_registry

HEARTBEAT = str(Path(sys.executable).parent / "heartbeat")
TOKENS = "alice:alice-1\nbob:bob-1\n"


# -- in memory ---------------------------------------------------------------------------------


def token_factory(clock: Clock, **limits: Any) -> ServerFactory:
    factory = ServerFactory(make_config(limits=limits), default_registry(), clock)
    table = {"alice-1": "alice", "bob-1": "bob"}
    factory.authenticator = Authenticator(lambda token, peer: table.get(token), 5.0, "test")
    return factory


def login(factory: ServerFactory, token: str, port: int) -> tuple[Peer, list[Any]]:
    peer = Peer(factory, port)
    peer.send({"type": "auth", "id": 1, "data": {"token": token}})
    return peer, peer.received()


def test_max_connections_per_identity(clock: Clock) -> None:
    factory = token_factory(clock, max_connections_per_identity=2)
    a1, ok1 = login(factory, "alice-1", 40001)
    _a2, ok2 = login(factory, "alice-1", 40002)
    assert ok1[0]["type"] == ok2[0]["type"] == "auth"
    a3, refused = login(factory, "alice-1", 40003)
    assert refused == [
        {
            "type": "error",
            "id": None,
            "error": {
                "code": "too_many_connections",
                "message": "'alice' already holds its maximum of 2 connections "
                "(limits.max_connections_per_identity)",
            },
        }
    ]
    assert a3.protocol.close_reason == "too_many_connections"
    _, other = login(factory, "bob-1", 40004)  # another identity is not affected
    assert other[0]["type"] == "auth"
    a1.disconnect()
    _, again = login(factory, "alice-1", 40005)  # a place was freed
    assert again[0]["type"] == "auth"
    assert factory.identities == {"alice": 2, "bob": 1}
    assert factory.refusals["max_connections_per_identity"] == 1


def test_no_limit_by_default_and_kick_identity(clock: Clock) -> None:
    factory = token_factory(clock)
    peers = [login(factory, "alice-1", 40000 + i)[0] for i in range(5)]
    bob, _ = login(factory, "bob-1", 40010)
    answer: list[int] = []
    factory.channels.kick_identity("alice").addCallback(answer.append)
    assert answer == [5]
    assert all(p.protocol.close_reason == "admin" for p in peers)
    assert bob.protocol.close_reason is None
    listed: list[Any] = []
    factory.channels.clients("bob").addCallback(listed.append)
    assert [c["identity"] for c in listed[0]] == ["bob"]


# -- one daemon: the admin API and the CLI ----------------------------------------------------


def test_admin_and_cli_on_one_daemon(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text(TOKENS)
    config = {
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
        "auth": {"mode": "token", "tokens_file": str(tmp_path / "tokens")},
        "limits": {"max_connections_per_identity": 3},
    }
    with Daemon(tmp_path, config) as daemon:
        admin = int(daemon.wait_for(ADMIN).group(1))
        clients = [authed(daemon.port, "alice-1") for _ in range(2)] + [
            authed(daemon.port, "bob-1")
        ]
        try:
            status, answer = http(admin, "GET", "/clients?identity=alice")
            assert status == 200 and answer["count"] == 2
            assert {c["identity"] for c in answer["clients"]} == {"alice"}
            run = subprocess.run(
                [HEARTBEAT, "kick", "--identity", "alice", "--admin", f"127.0.0.1:{admin}"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert run.returncode == 0, run.stderr
            assert run.stdout.strip() == "disconnected 2 session(s) of alice"
            assert clients[0].recv() is None and clients[1].recv() is None
            status, answer = http(admin, "DELETE", "/identities/nobody")
            assert (status, answer) == (200, {"identity": "nobody", "disconnected": 0})
            clients[2].send({"type": "ping", "id": 1})
            assert clients[2].recv() == {"type": "pong", "id": 1}
        finally:
            for c in clients:
                c.__exit__()


SPECIAL = ("CN=alice,O=Example", "alice@example.com")


def test_segments_are_percent_decoded_after_the_split() -> None:
    assert _segments(b"/identities/CN%3Dalice%2CO%3DExample") == [
        "identities",
        "CN=alice,O=Example",
    ]
    assert _segments(b"/clients/a%2Fb%40c/send?x=1") == ["clients", "a/b@c", "send"]
    assert _segments(b"/") == []


def test_kick_identities_with_special_characters(tmp_path: Path) -> None:
    """The CLI quotes the identity; the admin API decodes it (it used to match nothing)."""
    (tmp_path / "tokens").write_text("".join(f"{who}:t{i}\n" for i, who in enumerate(SPECIAL)))
    config = {
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
        "auth": {"mode": "token", "tokens_file": str(tmp_path / "tokens")},
    }
    with Daemon(tmp_path, config) as daemon:
        admin = int(daemon.wait_for(ADMIN).group(1))
        clients = [authed(daemon.port, f"t{i}") for i in range(len(SPECIAL))]
        try:
            run = subprocess.run(
                [HEARTBEAT, "kick", "--identity", SPECIAL[0], "--admin", f"127.0.0.1:{admin}"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert run.returncode == 0, run.stderr
            assert run.stdout.strip() == f"disconnected 1 session(s) of {SPECIAL[0]}"
            assert clients[0].recv() is None
            status, answer = http(admin, "DELETE", "/identities/alice%40example.com")
            assert (status, answer) == (200, {"identity": SPECIAL[1], "disconnected": 1})
            assert clients[1].recv() is None
        finally:
            for c in clients:
                c.__exit__()


def authed(port: int, token: str) -> RawClient:
    client = RawClient(port)
    assert client.recv()["type"] == "hello"
    client.send({"type": "auth", "id": "a", "data": {"token": token}})
    reply = client.recv()
    assert reply is not None and reply["type"] == "auth", reply
    return client


# -- a cluster --------------------------------------------------------------------------------


@contextlib.contextmanager
def two_nodes(tmp_path: Path, redis: RedisServer) -> Iterator[list[tuple[Daemon, int]]]:
    (tmp_path / "tokens").write_text(TOKENS)
    with contextlib.ExitStack() as stack:
        nodes = []
        for i in range(2):
            directory = tmp_path / f"node{i}"
            directory.mkdir()
            config = {
                "admin": {"listen": "tcp:0:interface=127.0.0.1"},
                "auth": {"mode": "token", "tokens_file": str(tmp_path / "tokens")},
                "limits": {"max_connections_per_identity": 3},
                "cluster": {"redis": redis.url, "node_id": f"node{i}", "node_timeout": 2.0},
            }
            daemon = stack.enter_context(Daemon(directory, config))
            nodes.append((daemon, int(daemon.wait_for(ADMIN).group(1))))
        for daemon, _ in nodes:
            daemon.wait_for(LINK_UP)
        yield nodes


def test_delete_identity_closes_its_sessions_on_every_node(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis, two_nodes(tmp_path, redis) as nodes:
        (first, admin0), (second, admin1) = nodes
        alices = [authed(first.port, "alice-1"), authed(second.port, "alice-1")]
        bob = authed(second.port, "bob-1")
        try:
            status, listed = http(admin1, "GET", "/clients?identity=alice")
            assert status == 200
            assert sorted(c["node"] for c in listed["clients"]) == ["node0", "node1"]
            # The third alice anywhere is fine, the fourth is refused: counted cluster-wide.
            alices.append(authed(first.port, "alice-1"))
            # The count is the cluster's registry in Redis: node1 sees the third alice once
            # node0 has written it there (each answer is an event: no sleep).
            deadline = time.monotonic() + 10
            while http(admin1, "GET", "/clients?identity=alice")[1]["count"] != 3:
                assert time.monotonic() < deadline
            fourth = RawClient(second.port)
            assert fourth.recv()["type"] == "hello"
            fourth.send({"type": "auth", "id": "a", "data": {"token": "alice-1"}})
            replies = [fourth.recv(), fourth.recv()]
            fourth.__exit__()
            codes = [r["error"]["code"] for r in replies if r and r["type"] == "error"]
            assert codes == ["too_many_connections"], replies
            # The refused session leaves the cluster's registry in node1's next write to
            # Redis: wait until node0 sees three (each answer is an event: no sleep).
            deadline = time.monotonic() + 10
            while http(admin0, "GET", "/clients?identity=alice")[1]["count"] != 3:
                assert time.monotonic() < deadline

            status, answer = http(admin0, "DELETE", "/identities/alice")
            assert (status, answer) == (200, {"identity": "alice", "disconnected": 3})
            for client in alices:
                assert client.recv() is None  # closed, on either node
            bob.send({"type": "ping", "id": 1})
            assert bob.recv() == {"type": "pong", "id": 1}
            second.wait_for(r"Closing client .*alice\): admin")
            # node1 writes the departure to Redis in the reactor turn after the close, which
            # may come after node0's listing: wait for it (each answer is an event: no sleep).
            deadline = time.monotonic() + 10
            while http(admin0, "GET", "/clients?identity=alice")[1]["count"] != 0:
                assert time.monotonic() < deadline
            status, listed = http(admin1, "GET", "/clients?identity=alice")
            assert (status, listed["count"]) == (200, 0)
        finally:
            for c in [*alices, bob]:
                c.__exit__()

"""Regression tests for the security review of issue 22 that need a daemon (or Redis)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from daemon import Daemon, RawClient
from redis_server import RedisServer
from test_admin import ADMIN, http
from test_cluster import Client, cluster


def token_config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:alice-secret\n")
    return {
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
        "auth": {"mode": "token", "tokens_file": str(tokens)},
        **extra,
    }


# -- finding 2 -------------------------------------------------------------------------------


def test_admin_pushes_skip_unauthenticated_connections(tmp_path: Path) -> None:
    with Daemon(tmp_path, token_config(tmp_path)) as daemon:
        port = int(daemon.wait_for(ADMIN).group(1))
        with RawClient(daemon.port) as stranger, RawClient(daemon.port) as alice:
            session = stranger.recv()["data"]["session"]
            alice.recv()
            alice.send({"type": "auth", "id": 1, "data": {"token": "alice-secret"}})
            assert alice.recv()["type"] == "auth"
            assert http(port, "POST", "/broadcast", {"type": "news"}) == (200, {"sent": 1})
            status, answer = http(port, "POST", f"/clients/{session}/send", {"type": "dm"})
            assert (status, answer["code"]) == (409, "not_authenticated")
            assert alice.recv()["type"] == "news"
            stranger.send({"type": "ping", "id": "p"})
            assert stranger.recv() == {"type": "pong", "id": "p"}  # nothing came before it


# -- finding 3: what comes from Redis is checked --------------------------------------------


def test_forged_redis_payloads_reach_no_client(tmp_path: Path) -> None:
    """A raw PUBLISH on a shared Redis cannot inject frames (goaway, join elsewhere, auth)."""
    with RedisServer(tmp_path / "redis") as redis, cluster(tmp_path, redis, 1) as (node,):
        watcher, stranger = Client(node.port), Client(node.port)
        reply = watcher.request("subscribe", {"channel": "news", "join_leave": True})
        epoch = reply["data"]["epoch"]
        key = "heartbeatd:ch:news"
        forged = [
            (key, f'p{epoch} 1 1,"type":"goaway"'),  # spliced into the publication frame
            (key, f"p{epoch} 1 NaN"),
            (key, f"p{epoch} x 1"),
            (key, 'j{"session": "s1", "channel": "secret-room", "identity": "eve"}'),
            (key, 'j{"session": "s1", "type": "goaway"}'),
            (key, "j[1, 2]"),
            (key, "x{}"),
            ("heartbeatd:all", '{"t": "goaway", "d": {"reason": "forged"}}'),
            ("heartbeatd:all", '{"t": "auth", "d": {"identity": "root"}}'),
            ("heartbeatd:all", '{"t": 7}'),
            ("heartbeatd:node:node0", json.dumps({"s": watcher.session, "t": "hello"})),
            (
                "heartbeatd:node:node0",
                json.dumps({"s": stranger.session, "t": "auth", "d": {"identity": "root"}}),
            ),
        ]
        for channel, payload in forged:
            redis.cli("PUBLISH", channel, payload)
        node.publish("news", "real")
        message = watcher.expect("publication")
        assert message["data"] == {"channel": "news", "offset": 1, "data": "real"}
        assert watcher.inbox == []  # nothing forged arrived before the real publication
        stranger.raw.send({"type": "ping", "id": "p"})
        assert stranger.raw.recv() == {"type": "pong", "id": "p"}

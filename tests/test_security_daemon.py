"""Regression tests for the security review of issue 22 that need a daemon (or Redis)."""

from __future__ import annotations

import json
import os
import signal
import stat
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from daemon import Daemon, RawClient, run_twistd
from redis_server import RedisServer
from test_admin import ADMIN, http
from test_cluster import LINK_UP, Client, Node, cluster


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


# -- finding 4: Redis does not grow with channels nobody uses -----------------------------


def test_subscribe_unsubscribe_pairs_leave_no_keys_in_redis(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis:
        config = {
            "admin": {"listen": "tcp:0:interface=127.0.0.1"},
            "channels": {"subscribe_rate": 10_000, "subscribe_burst": 10_000},
            "cluster": {"redis": redis.url, "node_id": "node0"},
        }
        with Daemon(tmp_path, config) as daemon:
            node = Node(daemon)
            daemon.wait_for(LINK_UP)
            client = Client(node.port)
            client.request("subscribe", {"channel": "warmup"})
            client.request("unsubscribe", {"channel": "warmup"})
            before = int(redis.cli("DBSIZE"))
            for i in range(300):
                assert client.request("subscribe", {"channel": f"c{i}"})["type"] == "subscribe"
                assert client.request("unsubscribe", {"channel": f"c{i}"})["type"] == (
                    "unsubscribe"
                )
            node.publish("kept", 1)  # a channel with history keeps it (history_ttl bounds it)
            client.request("subscribe", {"channel": "kept"})
            client.request("unsubscribe", {"channel": "kept"})
            keys = redis.cli("KEYS", "*").split()
            assert int(redis.cli("DBSIZE")) <= before + 2, keys  # kept's :m and :x
            assert redis.cli("SMEMBERS", "heartbeatd:node:node0:channels") == ""
            assert 0 < int(redis.cli("TTL", "heartbeatd:ch:kept:m")) <= 300


def test_new_channel_subscriptions_are_rate_limited(tmp_path: Path) -> None:
    config = {"channels": {"subscribe_rate": 0.01, "subscribe_burst": 10}}
    with Daemon(tmp_path, config) as daemon:
        client = Client(daemon.port)
        for i in range(10):
            client.request("subscribe", {"channel": f"c{i}"})
            client.request("unsubscribe", {"channel": f"c{i}"})
        answer = client.request("subscribe", {"channel": "one-too-many"})
        assert answer["type"] == "error" and answer["error"]["code"] == "rate_limited"
        client.raw.send({"type": "ping", "id": "still-open"})
        assert client.raw.recv() == {"type": "pong", "id": "still-open"}


# -- finding 5: config errors never echo a secret -------------------------------------------

SECRET = "hunter2-s3cret"
BAD_SECRETS = {
    "admin": {"listen": "tcp:0:interface=127.0.0.1", "token": 987654321},
    "cluster": {"redis": f"redis://:{SECRET}@127.0.0.1:notaport/0"},
}


def test_start_up_errors_do_not_echo_secrets(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(BAD_SECRETS))
    result = run_twistd("heartbeatd", "--config", str(path))
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "cluster.redis" in output and "admin.token" in output
    assert SECRET not in output and "987654321" not in output, output
    assert "redis://:***@127.0.0.1:notaport/0" in output


def test_missing_extra_error_redacts_the_url() -> None:
    from heartbeatd._validation import redact_url

    assert redact_url(f"redis://:{SECRET}@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url(f"redis://user:{SECRET}@h/0") == "redis://user:***@h/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_reload_errors_and_diffs_do_not_echo_secrets(tmp_path: Path) -> None:
    with Daemon(tmp_path, {"admin": {"listen": "tcp:0:interface=127.0.0.1"}}) as daemon:
        daemon.wait_for(ADMIN)
        config = yaml.safe_load(daemon.config_path.read_text())
        daemon.config_path.write_text(yaml.safe_dump({**config, **BAD_SECRETS}))
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for("cluster.redis")
        good = {**config, "cluster": {"redis": f"redis://:{SECRET}@127.0.0.1:1/0"}}
        daemon.config_path.write_text(yaml.safe_dump(good))
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for(r"Configuration reloaded|cluster\.redis.*restart|cluster.redis")
        assert daemon.stop() == 0
        assert SECRET not in daemon.log and "987654321" not in daemon.log, daemon.log


# -- finding 6 -------------------------------------------------------------------------------


def test_deeply_nested_admin_body_is_a_typed_400(tmp_path: Path) -> None:
    deep = b'{"type": "x", "data": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with Daemon(tmp_path, {"admin": {"listen": "tcp:0:interface=127.0.0.1"}}) as daemon:
        port = int(daemon.wait_for(ADMIN).group(1))
        for path in ("/broadcast", "/publish", "/clients/nobody/send"):
            status, answer = raw_post(port, path, deep)
            assert status == 400, (path, answer)
            assert answer["code"] == "too_deep", (path, answer)
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log


def raw_post(port: int, path: str, body: bytes) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        kind = e.headers["content-type"] or ""
        return e.code, json.loads(raw) if "json" in kind else raw.decode()


def test_unix_admin_socket_is_private_and_a_wider_mode_needs_a_token(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    with Daemon(tmp_path, {"admin": {"listen": f"unix:{path}"}}) as daemon:
        daemon.wait_for(r"admin API listening")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    wide = tmp_path / "bad.yaml"
    wide.write_text(yaml.safe_dump({"admin": {"listen": f"unix:{tmp_path / 'w.sock'}:mode=666"}}))
    result = run_twistd("heartbeatd", "--config", str(wide))
    assert result.returncode != 0 and "is not allowed without a token" in result.stderr

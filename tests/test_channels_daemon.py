"""Channels over real sockets on the real daemon (one node, the embedded broker)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from daemon import Daemon, RawClient
from test_admin import ADMIN, http, metric

CONFIG = {"admin": {"listen": "tcp:0:interface=127.0.0.1"}, "channels": {"client_publish": True}}


def recv_type(client: RawClient, type_: str) -> dict[str, Any]:
    """The next message of ``type_`` (heartbeat pings and other pushes are skipped)."""
    while True:
        message = client.recv()
        assert message is not None, f"closed while waiting for {type_}"
        if message["type"] == type_:
            return message


def test_subscribe_publish_recover_presence_over_real_sockets(tmp_path: Path) -> None:
    with (
        Daemon(tmp_path, CONFIG) as daemon,
        RawClient(daemon.port) as a,
        RawClient(daemon.port) as b,
    ):
        port = int(daemon.wait_for(ADMIN).group(1))
        session_a = recv_type(a, "hello")["data"]["session"]
        recv_type(b, "hello")
        a.send({"type": "subscribe", "id": 1, "data": {"channel": "news", "join_leave": True}})
        epoch = recv_type(a, "subscribe")["data"]["epoch"]
        b.send({"type": "subscribe", "id": 1, "data": {"channel": "news"}})
        assert recv_type(b, "subscribe")["data"]["offset"] == 0
        assert recv_type(a, "join")["data"]["channel"] == "news"

        assert http(port, "POST", "/publish", {"channel": "news", "data": {"n": 1}}) == (
            200,
            {"channel": "news", "offset": 1},
        )
        b.send({"type": "publish", "id": 2, "data": {"channel": "news", "data": "from b"}})
        for client in (a, b):
            first = recv_type(client, "publication")["data"]
            second = recv_type(client, "publication")["data"]
            assert (first["offset"], first["data"]) == (1, {"n": 1})
            assert (second["offset"], second["data"]) == (2, "from b")
        assert recv_type(b, "publish")["data"] == {"channel": "news", "offset": 2}

        b.send({"type": "presence", "id": 3, "data": {"channel": "news"}})
        clients = recv_type(b, "presence")["data"]["clients"]
        assert session_a in {c["session"] for c in clients} and len(clients) == 2

        status, error = http(port, "POST", "/publish", {"channel": "bad name", "data": 1})
        assert (status, error["code"]) == (400, "bad_channel")
        _, text = http(port, "GET", "/metrics")
        assert metric(text, "heartbeatd_channel_subscriptions") == 2
        assert metric(text, "heartbeatd_publications_published_total") == 2
        assert metric(text, "heartbeatd_broker_up") == 1

        a.sock.close()  # a leaves; it missed 3 and 4, and comes back with since
        http(port, "POST", "/publish", {"channel": "news", "data": 3})
        http(port, "POST", "/publish", {"channel": "news", "data": 4})
        with RawClient(daemon.port) as again:
            recv_type(again, "hello")
            since = {"epoch": epoch, "offset": 2}
            again.send({"type": "subscribe", "id": 1, "data": {"channel": "news", "since": since}})
            answer = recv_type(again, "subscribe")["data"]
            assert answer == {"channel": "news", "epoch": epoch, "offset": 4, "recovered": True}
            got = [recv_type(again, "publication")["data"]["data"] for _ in range(2)]
            assert got == [3, 4]


def test_a_single_daemon_never_imports_a_redis_client(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from heartbeatd.daemon.tap import Options, makeService\n"
        "o = Options(); o.parseOptions([])\n"
        "makeService(o)\n"
        "print(sorted(m for m in sys.modules if 'redis' in m))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

"""Real daemons and a real redis-server: several nodes, one service (see docs/cluster.md)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from daemon import Daemon, RawClient
from redis_server import RedisServer
from test_admin import ADMIN, http, metric

NODE_TIMEOUT = 2.0
LINK_UP = r"Redis link up"
LINK_DOWN = r"Redis link down"


class Node:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.port = daemon.port
        self.admin = int(daemon.wait_for(ADMIN).group(1))

    def http(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return http(self.admin, method, path, body)

    def publish(self, channel: str, data: Any) -> int:
        status, answer = self.http("POST", "/publish", {"channel": channel, "data": data})
        assert status == 200, answer
        return answer["offset"]


class Client:
    """A raw client that keeps every message it reads, so none is skipped unseen."""

    def __init__(self, port: int) -> None:
        self.raw = RawClient(port)
        self.inbox: list[dict[str, Any]] = []
        self.session = self.expect("hello")["data"]["session"]
        self._id = 0

    def close(self) -> None:
        self.raw.sock.close()

    def expect(self, type_: str) -> dict[str, Any]:
        for i, message in enumerate(self.inbox):
            if message["type"] == type_:
                return self.inbox.pop(i)
        while True:
            message = self.raw.recv()
            assert message is not None, f"closed while waiting for {type_}"
            if message["type"] == type_:
                return message
            self.inbox.append(message)

    def request(self, type_: str, data: Any) -> dict[str, Any]:
        self._id += 1
        self.raw.send({"type": type_, "id": self._id, "data": data})
        while True:
            message = self.raw.recv()
            assert message is not None, f"closed while waiting for the reply to {type_}"
            if message.get("id") == self._id:
                return message
            self.inbox.append(message)

    def publications(self, count: int) -> list[tuple[int, Any]]:
        return [
            (m["data"]["offset"], m["data"]["data"])
            for m in (self.expect("publication") for _ in range(count))
        ]


@contextlib.contextmanager
def cluster(tmp_path: Path, redis: RedisServer, count: int) -> Iterator[list[Node]]:
    with contextlib.ExitStack() as stack:
        nodes = []
        for i in range(count):
            name = f"node{i}"
            directory = tmp_path / name
            directory.mkdir()
            config = {
                "name": name,
                "admin": {"listen": "tcp:0:interface=127.0.0.1"},
                "channels": {"client_publish": True, "history_size": 50},
                "cluster": {"redis": redis.url, "node_id": name, "node_timeout": NODE_TIMEOUT},
            }
            nodes.append(Node(stack.enter_context(Daemon(directory, config))))
        for node in nodes:
            node.daemon.wait_for(LINK_UP)
        yield nodes


def test_one_service_across_three_nodes(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis, cluster(tmp_path, redis, 3) as nodes:
        clients = [Client(node.port) for node in nodes]
        try:
            answers = [
                c.request("subscribe", {"channel": "news", "join_leave": i == 0})["data"]
                for i, c in enumerate(clients)
            ]
            assert len({a["epoch"] for a in answers}) == 1
            for _ in range(2):
                assert clients[0].expect("join")["data"]["node"] in ("node1", "node2")

            assert nodes[1].publish("news", {"n": 1}) == 1
            reply = clients[2].request("publish", {"channel": "news", "data": "two"})
            assert reply["data"] == {"channel": "news", "offset": 2}
            for c in clients:
                assert c.publications(2) == [(1, {"n": 1}), (2, "two")]

            presence = clients[0].request("presence", {"channel": "news"})["data"]["clients"]
            assert {(p["session"], p["node"]) for p in presence} == {
                (c.session, f"node{i}") for i, c in enumerate(clients)
            }
            status, listing = nodes[0].http("GET", "/clients")
            assert status == 200 and listing["count"] == 3
            assert {(c["session"], c["node"]) for c in listing["clients"]} == {
                (c.session, f"node{i}") for i, c in enumerate(clients)
            }

            status, sent = nodes[0].http(
                "POST", f"/clients/{clients[2].session}/send", {"type": "note", "data": 7}
            )
            assert (status, sent) == (200, {"sent": 1})
            assert clients[2].expect("note")["data"] == 7
            status, missing = nodes[0].http("POST", "/clients/nobody/send", {"type": "x"})
            assert status == 404 and missing["code"] == "not_found"

            assert nodes[1].http("POST", "/broadcast", {"type": "all", "data": 1}) == (
                200,
                {"nodes": 3},
            )
            for c in clients:
                assert c.expect("all")["data"] == 1
            status, health = nodes[2].http("GET", "/healthz")
            assert (status, health["broker"], health["node"]) == (200, "up", "node2")

            assert nodes[2].daemon.stop(signal.SIGTERM) == 0  # a clean stop leaves at once
            leave = clients[0].expect("leave")["data"]
            assert (leave["session"], leave["node"]) == (clients[2].session, "node2")
            _, listing = nodes[0].http("GET", "/clients")
            assert {c["node"] for c in listing["clients"]} == {"node0", "node1"}
        finally:
            for c in clients:
                c.close()


def test_kill_9_leaves_presence_and_clients_recover_on_another_node(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis, cluster(tmp_path, redis, 3) as nodes:
        watcher = Client(nodes[0].port)
        victim = Client(nodes[2].port)
        try:
            watcher.request("subscribe", {"channel": "news", "join_leave": True})
            epoch = victim.request("subscribe", {"channel": "news"})["data"]["epoch"]
            watcher.expect("join")
            nodes[0].publish("news", 1)
            assert victim.publications(1) == [(1, 1)]

            nodes[2].daemon.process.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            leave = watcher.expect("leave")["data"]
            took = time.monotonic() - killed
            assert (leave["session"], leave["node"]) == (victim.session, "node2")
            # Within node_timeout by design (lease node_timeout/2, reaped every /4); the
            # slack only covers a loaded test machine.
            assert took < NODE_TIMEOUT * 2, took
            _, listing = nodes[1].http("GET", "/clients")
            assert victim.session not in {c["session"] for c in listing["clients"]}
            presence = watcher.request("presence", {"channel": "news"})["data"]["clients"]
            assert [p["session"] for p in presence] == [watcher.session]

            nodes[0].publish("news", 2)  # the victim misses these two
            nodes[1].publish("news", 3)
            victim.close()
            moved = Client(nodes[1].port)
            try:
                since = {"epoch": epoch, "offset": 1}
                answer = moved.request("subscribe", {"channel": "news", "since": since})["data"]
                assert answer == {"channel": "news", "epoch": epoch, "offset": 3, "recovered": True}
                assert moved.publications(2) == [(2, 2), (3, 3)]
                nodes[0].publish("news", 4)
                assert moved.publications(1) == [(4, 4)]
            finally:
                moved.close()
        finally:
            watcher.close()


def test_redis_down_is_unavailable_and_nothing_is_lost_silently(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis, cluster(tmp_path, redis, 2) as nodes:
        listener = Client(nodes[0].port)
        publisher = Client(nodes[1].port)
        try:
            epoch = listener.request("subscribe", {"channel": "news"})["data"]["epoch"]
            nodes[1].publish("news", 1)
            assert listener.publications(1) == [(1, 1)]

            # A broken link with Redis still up (its pub/sub connection killed): whatever was
            # published meanwhile is filled in from the stream, with no resync.
            redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
            for node in nodes:  # each node saw its link go down, then come back
                node.daemon.wait_for(LINK_UP, count=2)
            for i in (2, 3, 4):
                assert nodes[1].http("POST", "/publish", {"channel": "news", "data": i})[0] == 200
            assert listener.publications(3) == [(2, 2), (3, 3), (4, 4)]
            assert not [m for m in listener.inbox if m["type"] == "resync"]

            redis.stop()  # Redis gone: its data (no persistence) with it
            for node in nodes:
                node.daemon.wait_for(LINK_DOWN, count=2)
                assert node.http("GET", "/healthz")[1]["broker"] == "down"
            status, error = nodes[1].http("POST", "/publish", {"channel": "news", "data": 5})
            assert (status, error["code"]) == (503, "unavailable")
            reply = publisher.request("publish", {"channel": "news", "data": 5})
            assert reply["type"] == "error" and reply["error"]["code"] == "unavailable"
            reply = publisher.request("subscribe", {"channel": "other"})
            assert reply["type"] == "error" and reply["error"]["code"] == "unavailable"
            assert nodes[0].http("GET", "/clients")[0] == 503
            status, health = nodes[0].http("GET", "/healthz")
            assert (status, health["status"], health["broker"]) == (200, "degraded", "down")
            _, text = nodes[0].http("GET", "/metrics")
            assert metric(text, "heartbeatd_broker_up") == 0

            redis.start()  # back, empty: the stream is lost, so the listener must be told
            for node in nodes:
                node.daemon.wait_for(LINK_UP, count=3)
                assert node.http("GET", "/healthz")[1]["broker"] == "up"
            resync = listener.expect("resync")["data"]
            assert resync["channel"] == "news" and resync["recovered"] is False
            assert resync["epoch"] != epoch
            offset = nodes[1].publish("news", 6)
            assert listener.publications(1) == [(offset, 6)]
            # The empty Redis learnt the nodes' clients and presence again from the nodes.
            presence = publisher.request("presence", {"channel": "news"})["data"]["clients"]
            assert [p["session"] for p in presence] == [listener.session]
            assert nodes[1].http("GET", "/clients")[1]["count"] == 2
            _, text = nodes[0].http("GET", "/metrics")
            assert metric(text, "heartbeatd_broker_up") == 1
            assert metric(text, "heartbeatd_channel_resyncs_total") == 1
        finally:
            listener.close()
            publisher.close()
        for node in nodes:
            assert node.daemon.stop() == 0
            log = node.daemon.log
            # Two outages, each said once going down and once coming back; neither the first
            # connect ("again") nor the orderly stop (links closed on purpose) is an outage.
            assert log.count("Redis link down") == 2, log
            assert log.count("The cluster broker is unreachable") == 2, log
            assert log.count("The cluster broker is reachable again") == 2, log


def test_cluster_redis_url_is_checked_before_listening(tmp_path: Path) -> None:
    from daemon import run_twistd

    config = tmp_path / "bad.yaml"
    config.write_text("cluster:\n  redis: 'http://nope'\n  node_id: 'has space'\n")
    out = run_twistd("heartbeatd", "--config", str(config))
    assert out.returncode != 0
    assert "cluster.redis: 'http://nope' is not allowed" in out.stderr + out.stdout
    assert "cluster.node_id: 'has space' is not allowed" in out.stderr + out.stdout


def test_client_library_fails_over_and_recovers_exactly_once(tmp_path: Path) -> None:
    driver = Path(__file__).resolve().parent / "channels_driver.py"
    with RedisServer(tmp_path / "redis") as redis, cluster(tmp_path, redis, 2) as nodes:
        victim, other = nodes[1], nodes[0]
        out = subprocess.run(
            [
                sys.executable,
                str(driver),
                str(victim.port),
                str(victim.daemon.process.pid),
                str(other.port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result == {"received": [1, 2, 3, 4, 5, 6], "lost": []}, out.stderr[-2000:]


def test_redis_with_a_password(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", "--requirepass", "s3cret") as redis:
        url = f"redis://:s3cret@127.0.0.1:{redis.port}/2"
        config = {"cluster": {"redis": url, "node_id": "n"}, "log": {"level": "debug"}}
        with Daemon(tmp_path, config) as daemon, RawClient(daemon.port) as raw:
            daemon.wait_for(LINK_UP)
            raw.recv()  # hello
            raw.send({"type": "subscribe", "id": 1, "data": {"channel": "news"}})
            assert raw.recv()["data"]["offset"] == 0
            raw.sock.close()
            assert daemon.stop() == 0
            assert "s3cret" not in daemon.log

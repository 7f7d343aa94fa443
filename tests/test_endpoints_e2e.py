"""Clients given several endpoints, on real sockets: one dead endpoint and one live daemon
(the pool, the reconnecting client and the CLI), and a subscriber that moves to another
node of a real cluster when its node is killed, recovering what it missed."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

from daemon import Daemon
from redis_server import RedisServer
from test_cli import HEARTBEAT, Command
from test_cluster import cluster

#: Run as a script: a Pool and a ReconnectingClient over [dead, live]; prints one JSON line.
SCRIPT = """
import json, sys
from twisted.internet import task
from twisted.internet.defer import ensureDeferred, gatherResults
from heartbeatd.client import Pool, PoolConfig, ReconnectingClient

async def main(reactor, dead, live):
    config = PoolConfig(endpoint=[dead, live], min_idle=0, max_size=4, connect_timeout=2,
                        backoff_initial=5, backoff_max=10)
    pool = Pool(reactor, config)
    replies = await gatherResults([pool.request("echo", n) for n in range(20)])
    stats = pool.stats()
    client = ReconnectingClient(reactor, [dead, live], backoff_initial=5, backoff_max=10)
    client.start()
    reply = await client.request("echo", "rc", timeout=5)
    await pool.close()
    await client.stop()
    print(json.dumps({"replies": replies, "endpoints": stats["endpoints"],
                      "down": stats["server_down"], "rc": reply, "current": client.current}))

task.react(lambda r: ensureDeferred(main(r, *sys.argv[1:])))
"""


def dead_port() -> int:
    """A loopback port nothing listens on (bound, then closed: connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # type: ignore[no-any-return]


def test_one_dead_endpoint_and_one_live(tmp_path: Path) -> None:
    dead = f"tcp:host=127.0.0.1:port={dead_port()}"
    with Daemon(tmp_path, {}) as daemon:
        live = f"tcp:host=127.0.0.1:port={daemon.port}"
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT, dead, live],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
        # The backoff is 5 s or more: these answers did not wait for it, the live one served.
        assert out["replies"] == list(range(20)) and out["down"] is False
        by_endpoint = {e["endpoint"]: e for e in out["endpoints"]}
        assert by_endpoint[dead]["down"] is True and by_endpoint[dead]["connections"] == 0
        assert by_endpoint[live]["down"] is False and by_endpoint[live]["connections"] >= 1
        assert (out["rc"], out["current"]) == ("rc", 1)

        ping = subprocess.run(
            [HEARTBEAT, "ping", f"127.0.0.1:{dead_port()},127.0.0.1:{daemon.port}", "-c", "1"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ping.returncode == 0, ping.stderr
        assert ping.stdout.startswith(f"pong from 127.0.0.1:{daemon.port}: seq=1 ")
        assert daemon.stop() == 0


def test_subscribe_moves_to_another_node_and_recovers(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis, cluster(tmp_path, redis, 2) as nodes:
        listed = ",".join(f"127.0.0.1:{node.port}" for node in nodes)
        with Command("subscribe", listed, "news", "--reconnect-timeout", "20") as sub:
            line = sub.next_line("stderr")
            epoch = re.match(r"heartbeat: subscribed to news at (\w+):0$", line).group(1)  # type: ignore[union-attr]
            nodes[1].publish("news", 1)
            assert json.loads(sub.next_line())["offset"] == 1
            nodes[0].daemon.process.kill()  # no goaway: the connection is just gone
            nodes[0].daemon.process.wait(10)
            nodes[1].publish("news", 2)  # published while the subscriber moves
            assert sub.next_line("stderr").startswith(
                f"heartbeat: connection to 127.0.0.1:{nodes[0].port} lost"
            )
            assert sub.next_line("stderr").startswith(
                f"heartbeat: reconnected to 127.0.0.1:{nodes[1].port}"
            )
            assert sub.next_line("stderr") == (
                f"heartbeat: subscribed to news from {epoch}:1 (recovered)"
            )
            assert json.loads(sub.next_line()) == {
                "channel": "news",
                "epoch": epoch,
                "offset": 2,
                "data": 2,
            }
            nodes[1].publish("news", 3)
            assert json.loads(sub.next_line())["offset"] == 3
            sub.process.terminate()
            sub.finish()
        assert nodes[1].daemon.stop() == 0


def test_subscribe_retries_while_the_cluster_broker_is_down(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis, cluster(tmp_path, redis, 2) as nodes:
        listed = ",".join(f"127.0.0.1:{node.port}" for node in nodes)
        with Command("subscribe", listed, "news", "--reconnect-timeout", "20") as sub:
            assert sub.next_line("stderr").startswith("heartbeat: subscribed to news at ")
            redis.stop()
            for node in nodes:
                node.daemon.wait_for("Redis link down")
            nodes[0].daemon.process.kill()
            nodes[0].daemon.process.wait(10)
            assert "lost" in sub.next_line("stderr")
            assert sub.next_line("stderr").startswith("heartbeat: reconnected to")
            # Node 1 cannot subscribe anyone while Redis is away: said, and retried.
            retry = sub.next_line("stderr")
            assert (
                retry.startswith("heartbeat: subscribing to news again: ") and "retrying" in retry
            )
            redis.start()  # back, empty: the stream is gone, and the subscriber is told
            line = sub.next_line("stderr")
            while line.startswith("heartbeat: subscribing to news again"):
                line = sub.next_line("stderr")
            assert line.startswith("heartbeat: news: publications were lost")
            assert sub.next_line("stderr").startswith("heartbeat: subscribed to news at ")
            nodes[1].publish("news", "after")
            assert json.loads(sub.next_line())["data"] == "after"
            sub.process.terminate()
            sub.finish()
        assert nodes[1].daemon.stop() == 0

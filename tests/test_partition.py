"""A node cut off from Redis but not from its clients (docs/cluster.md, "Partitions").

Node A reaches Redis through a proxy that the test blackholes (tests/tcp_proxy.py: bytes stop,
nothing is reset, as in a network partition); node B reaches Redis directly.  Publishers on
both nodes and a subscriber on each run throughout.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_load import Publisher, Subscriber, losses, publication_of
from daemon import Daemon, RawClient
from redis_server import RedisServer
from tcp_proxy import BlackholeProxy
from test_cluster import LINK_DOWN, LINK_UP, NODE_TIMEOUT, Node

COMMAND_TIMEOUT = 0.5


@contextlib.contextmanager
def two_nodes(tmp_path: Path, urls: list[str]) -> Iterator[list[Node]]:
    with contextlib.ExitStack() as stack:
        nodes = []
        for i, url in enumerate(urls):
            directory = tmp_path / f"node{i}"
            directory.mkdir()
            config = {
                "name": f"node{i}",
                "admin": {"listen": "tcp:0:interface=127.0.0.1"},
                "channels": {"client_publish": True, "history_size": 10_000},
                "cluster": {
                    "redis": url,
                    "node_id": f"node{i}",
                    "node_timeout": NODE_TIMEOUT,
                    "command_timeout": COMMAND_TIMEOUT,
                },
            }
            nodes.append(Node(stack.enter_context(Daemon(directory, config))))
        for node in nodes:
            node.daemon.wait_for(LINK_UP)
        yield nodes


def request(raw: RawClient, type_: str, data: Any, id_: int) -> dict[str, Any]:
    raw.send({"type": type_, "id": id_, "data": data})
    while (reply := raw.recv()) is not None and reply.get("id") != id_:
        pass
    assert reply is not None
    return reply


@pytest.mark.scenario
def test_a_node_cut_off_from_redis_serves_what_it_can_and_comes_back(tmp_path: Path) -> None:
    with (
        RedisServer(tmp_path / "redis") as redis,
        BlackholeProxy(redis.port) as proxy,
        two_nodes(tmp_path, [f"redis://127.0.0.1:{proxy.port}/0", redis.url]) as (a, b),
    ):
        watcher = Subscriber(b.port, "news", join_leave=True)
        cut_off = Subscriber(a.port, "news", join_leave=True)
        probe = RawClient(a.port)
        probe_session = probe.recv()["data"]["session"]
        subs = [watcher, cut_off]
        pubs = [Publisher(a.port, "news", "pa"), Publisher(b.port, "news", "pb")]
        for thread in [*subs, *pubs]:
            thread.start()
        try:
            joined = watcher.wait_for(lambda m: m["type"] == "join")["data"]
            assert joined["session"] == cut_off.session
            for pub in pubs:
                pub.wait_acked_after(0, count=30)

            cut = time.monotonic()
            proxy.blackhole()
            a.daemon.wait_for(r"did not answer within 0\.5s")
            a.daemon.wait_for(LINK_DOWN)
            status, health = a.http("GET", "/healthz")
            assert (status, health["status"], health["broker"]) == (200, "degraded", "down")

            # Local requests and pushes still work on the cut-off node...
            assert request(probe, "ping", None, 1)["type"] == "pong"
            assert request(probe, "echo", {"x": 1}, 2)["data"] == {"x": 1}
            status, sent = a.http(
                "POST", f"/clients/{cut_off.session}/send", {"type": "note", "data": 1}
            )
            assert (status, sent) == (200, {"sent": 1})
            assert cut_off.wait_for(lambda m: m["type"] == "note")["data"] == 1
            # ...what needs the cluster is refused, typed.
            for n, (type_, data) in enumerate(
                [
                    ("subscribe", {"channel": "other"}),
                    ("presence", {"channel": "news"}),
                    ("publish", {"channel": "news", "data": "x"}),
                ],
                start=3,
            ):
                reply = request(probe, type_, data, n)
                assert reply["type"] == "error", reply
                assert reply["error"]["code"] == "unavailable", reply
            assert a.http("POST", "/publish", {"channel": "news", "data": 1})[0] == 503

            # The rest of the cluster counts the node out: its sessions leave presence.
            left = watcher.wait_for(
                lambda m: m["type"] == "leave" and m["data"]["session"] == cut_off.session
            )
            assert left["data"]["node"] == "node0"
            presence = watcher.request("presence", {"channel": "news"}, 10)["data"]["clients"]
            assert [p["session"] for p in presence] == [watcher.session]
            _, listing = b.http("GET", "/clients")
            assert {c["node"] for c in listing["clients"]} == {"node1"}
            pubs[1].wait_acked_after(time.monotonic(), count=30)  # B publishes on

            healed = time.monotonic()
            start = len(watcher.messages)
            proxy.heal()
            a.daemon.wait_for(LINK_UP, count=2)
            rejoined = watcher.wait_for(
                lambda m: m["type"] == "join" and m["data"]["session"] == cut_off.session,
                start=start,
            )
            assert rejoined["data"]["node"] == "node0"
            for pub in pubs:
                pub.wait_acked_after(healed, count=30)
        finally:
            for pub in pubs:
                pub.stop()
        try:
            presence = watcher.request("presence", {"channel": "news"}, 11)["data"]["clients"]
            assert {p["session"] for p in presence} == {watcher.session, cut_off.session}
            _, listing = b.http("GET", "/clients")
            sessions = {c["session"] for c in listing["clients"]}
            assert {cut_off.session, probe_session} <= sessions
            assert a.http("GET", "/healthz")[1]["broker"] == "up"
            for i, node in enumerate((a, b)):
                assert (
                    node.http("POST", "/publish", {"channel": "news", "data": f"end{i}"})[0] == 200
                )
            for sub in subs:
                for i in range(2):
                    sub.wait_for(publication_of(f"end{i}"))
        finally:
            probe.sock.close()
            for sub in subs:
                sub.close()

        refused = [code for _, code in pubs[0].refused]
        assert refused and set(refused) == {"unavailable"}, refused
        assert not pubs[1].refused
        result = losses(subs, pubs)
        assert result["lost_silently"] == [] and result["dup"] == 0, result
        # Redis kept its data: the cut-off subscriber's gap was filled, nothing to resync.
        assert cut_off.resyncs() == [] and watcher.resyncs() == []
        print(
            f"\npartition: cut {healed - cut:.1f}s; node A refused {len(refused)} publications "
            f"(unavailable); {result['acked']} acknowledged, all delivered to both "
            "subscribers once"
        )

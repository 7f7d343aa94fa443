"""Redis with Sentinel: configuration, and a real failover under load (docs/cluster.md).

The failover test runs a master, a replica and three sentinels (redis-sentinel), two daemons
that find the master through the sentinels, a publisher and a subscriber on each node; it
kills -9 the master while the publishers publish, and checks what docs/cluster.md promises.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_load import Publisher, Subscriber, losses, publication_of
from daemon import Daemon
from redis_sentinel import SERVICE, SentinelCluster
from test_admin import metric
from test_cluster import LINK_UP, Node

from heartbeatd.config import ConfigError, parse_config

LINK_DOWN = r"Redis link down"


def errors_of(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return info.value.errors


def test_sentinel_config() -> None:
    config = parse_config(
        {
            "cluster": {
                "sentinel": {
                    "addresses": ["10.0.0.1:26379", "[::1]:26380"],
                    "service": "main",
                    "db": 2,
                    "password": "pw1",
                    "sentinel_password": "pw2",
                }
            }
        }
    )
    sentinel = config.cluster.sentinel
    assert config.cluster.enabled and not config.cluster.redis
    assert sentinel.addresses == ("10.0.0.1:26379", "[::1]:26380")
    assert (sentinel.service, sentinel.db) == ("main", 2)
    assert "pw1" not in repr(config) and "pw2" not in repr(config)
    assert not parse_config({}).cluster.enabled


def test_redis_and_sentinel_together_is_an_error_naming_both() -> None:
    (error,) = errors_of(
        {
            "cluster": {
                "redis": "redis://:secret@127.0.0.1:6379/0",
                "sentinel": {"addresses": ["127.0.0.1:26379"], "service": "hb"},
            }
        }
    )
    assert "cluster.redis" in error and "cluster.sentinel.addresses" in error
    assert "secret" not in error


def test_bad_sentinel_keys() -> None:
    errors = errors_of({"cluster": {"sentinel": {"addresses": ["nope", "h:99999"], "x": 1}}})
    assert any(e.startswith("cluster.sentinel.addresses: ['nope', 'h:99999']") for e in errors)
    assert any(e.startswith("cluster.sentinel.x: unknown key") for e in errors)
    (error,) = errors_of({"cluster": {"sentinel": {"addresses": ["127.0.0.1:26379"]}}})
    assert error.startswith("cluster.sentinel.service: '' is not allowed")
    (error,) = errors_of({"cluster": {"sentinel": {"service": "hb"}}})
    assert error.startswith("cluster.sentinel.service: 'hb' is not allowed without")
    workers = parse_config(
        {"workers": 2, "cluster": {"sentinel": {"addresses": ["h:1"], "service": "hb"}}}
    )
    assert workers.workers == 2


@contextlib.contextmanager
def nodes_on(tmp_path: Path, ha: SentinelCluster, count: int) -> Iterator[list[Node]]:
    with contextlib.ExitStack() as stack:
        nodes = []
        for i in range(count):
            directory = tmp_path / f"node{i}"
            directory.mkdir()
            config = {
                "name": f"node{i}",
                "admin": {"listen": "tcp:0:interface=127.0.0.1"},
                "channels": {"client_publish": True, "history_size": 10_000},
                "cluster": {
                    "sentinel": {"addresses": ha.addresses, "service": SERVICE},
                    "node_id": f"node{i}",
                    "node_timeout": 4,
                    "command_timeout": 1,
                },
            }
            nodes.append(Node(stack.enter_context(Daemon(directory, config))))
        for node in nodes:
            node.daemon.wait_for(LINK_UP)
        yield nodes


@pytest.mark.scenario
def test_failover_under_load(tmp_path: Path) -> None:
    with SentinelCluster(tmp_path / "redis") as ha, nodes_on(tmp_path, ha, 2) as nodes:
        master = f"127.0.0.1:{ha.ports[0]}"
        for node in nodes:
            node.daemon.wait_for(rf"the master of {SERVICE} is {master}")
        subs = [Subscriber(node.port, "ha") for node in nodes]
        pubs = [Publisher(node.port, "ha", f"p{i}") for i, node in enumerate(nodes)]
        for thread in [*subs, *pubs]:
            thread.start()
        try:
            for pub in pubs:  # under load before the kill
                pub.wait_acked_after(0, count=50)

            killed = time.monotonic()
            ha.kill_master()
            for node in nodes:  # no master: degraded, and publishing is refused, typed
                node.daemon.wait_for(LINK_DOWN)
            statuses = [node.http("GET", "/healthz") for node in nodes]
            new_port = ha.wait_for_failover()
            serving = max(pub.wait_acked_after(killed) for pub in pubs)
            failover_s = serving - killed
            for pub in pubs:  # and some more on the new master
                pub.wait_acked_after(serving, count=50)
        finally:
            for pub in pubs:
                pub.stop()
        try:
            # Every node follows the new master: link up again, scripts loaded, lease renewed,
            # pub/sub re-established (a marker published on each node reaches both).
            for node in nodes:
                node.daemon.wait_for(rf"the master of {SERVICE} is 127\.0\.0\.1:{new_port}")
                node.daemon.wait_for(LINK_UP, count=2)
                assert node.http("GET", "/healthz")[1]["broker"] == "up"
            for i, node in enumerate(nodes):
                status, answer = node.http("POST", "/publish", {"channel": "ha", "data": f"end{i}"})
                assert status == 200, answer
            for sub in subs:
                for i in range(len(nodes)):
                    sub.wait_for(publication_of(f"end{i}"))
            status, listing = nodes[0].http("GET", "/clients")
            assert status == 200 and {c["node"] for c in listing["clients"]} == {"node0", "node1"}
        finally:
            for sub in subs:
                sub.close()

        for status, health in statuses:
            assert (status, health["status"], health["broker"]) == (200, "degraded", "down")
        refused = [code for pub in pubs for _, code in pub.refused]
        assert refused and set(refused) == {"unavailable"}, refused
        result = losses(subs, pubs, told_after=killed)
        assert result["lost_silently"] == [] and result["dup"] == 0, result
        for sub in subs:  # the new master's data is a new generation: each was told once
            told = [r for t, r in sub.resyncs() if t > killed]
            assert len(told) == 1 and told[0]["recovered"] is False, sub.resyncs()
        _, text = nodes[0].http("GET", "/metrics")
        assert metric(text, "heartbeatd_broker_up") == 1
        print(
            f"\nfailover: {failover_s:.2f}s from kill -9 to the first publication acknowledged "
            f"again; {len(refused)} refused (unavailable), {result['acked']} acknowledged, "
            f"{result['told']} missing but told (resync), 0 lost silently, 0 duplicated"
        )
        assert failover_s < 15, failover_s

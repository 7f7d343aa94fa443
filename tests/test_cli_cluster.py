"""The admin verbs (``clients``, ``send``, ``broadcast``, ``kick``) as the real ``heartbeat``
command, against a real 2-node cluster and a real ``workers: 2`` daemon on one redis-server.

Their answers are chunked (no Content-Length): the CLI read them as a `TypeError` (exit 5)
before, although the action had happened.  A client of another node is kicked through the
cluster, as it is sent to.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon
from helpers import failureResultOf, successResultOf
from redis_server import RedisServer
from test_cli import HEARTBEAT
from test_cluster import LINK_UP, NODE_TIMEOUT, Client, cluster
from test_workers import nodes_of, workers
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.iweb import UNKNOWN_LENGTH

from heartbeatd.client._admin_cli import AnswerTooLarge, read_bounded


class FakeResponse:
    """What `read_bounded` uses of an `IResponse`: a length and `deliverBody`."""

    def __init__(self, length: Any) -> None:
        self.length = length
        self.protocol: Any = None
        self.transport = StringTransport()

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)


def test_a_chunked_answer_is_read_up_to_the_bound_and_no_further() -> None:
    response = FakeResponse(UNKNOWN_LENGTH)  # a string marker, never compared with an int
    body = read_bounded(response, limit=10)  # type: ignore[arg-type]
    response.protocol.dataReceived(b"12345")
    response.protocol.dataReceived(b"67890")
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert successResultOf(body) == b"1234567890"

    response = FakeResponse(UNKNOWN_LENGTH)
    body = read_bounded(response, limit=10)  # type: ignore[arg-type]
    response.protocol.dataReceived(b"123456")
    response.protocol.dataReceived(b"78901")
    assert response.transport.producerState == "stopped"  # reading stopped at the bound
    failure = failureResultOf(body, AnswerTooLarge)
    assert str(failure.value) == "answer larger than 10 bytes; not read"
    response.protocol.dataReceived(b"more")  # what was in flight is dropped
    response.protocol.connectionLost(Failure(ResponseFailed([])))


def test_a_known_length_above_the_bound_is_refused_before_reading() -> None:
    response = FakeResponse(11)
    failure = failureResultOf(read_bounded(response, limit=10), AnswerTooLarge)  # type: ignore[arg-type]
    assert failure.value.length == 11 and response.transport.producerState == "stopped"
    response = FakeResponse(3)
    body = read_bounded(response, limit=10)  # type: ignore[arg-type]
    response.protocol.dataReceived(b"abc")
    response.protocol.connectionLost(Failure(ResponseFailed([Failure(ValueError("cut"))])))
    failureResultOf(body, ResponseFailed)  # a body cut short is not a success


def cli(admin: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HEARTBEAT, *args, "--admin", f"http://127.0.0.1:{admin}"],
        capture_output=True,
        text=True,
        timeout=30,
    )


def ok(admin: int, *args: str) -> str:
    result = cli(admin, *args)
    assert (result.returncode, result.stderr) == (0, ""), (args, result.stdout)
    return result.stdout


def fails(admin: int, *args: str) -> str:
    result = cli(admin, *args)
    assert result.returncode == 1, (args, result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    return result.stderr


def closed(client: Client) -> None:
    """Read up to the server's close (the kick happened), keeping what came before it."""
    while (message := client.raw.recv()) is not None:
        client.inbox.append(message)


def listing(admin: int) -> dict[str, Any]:
    return json.loads(ok(admin, "clients", "--json"))  # type: ignore[no-any-return]


def test_admin_verbs_against_a_two_node_cluster(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis, cluster(tmp_path, redis, 2) as nodes:
        here, there = Client(nodes[0].port), Client(nodes[1].port)
        try:
            # The cluster registers a client in a batch: a presence round trip flushes it.
            for c in (here, there):
                c.request("presence", {"channel": "sync"})
            a0, a1 = nodes[0].admin, nodes[1].admin
            table = ok(a0, "clients")
            assert table.splitlines()[-1] == "2 client(s)"
            assert here.session in table and there.session in table
            assert {(c["session"], c["node"]) for c in listing(a0)["clients"]} == {
                (here.session, "node0"),
                (there.session, "node1"),
            }

            assert ok(a0, "send", there.session, "note", '{"n": 1}') == (
                f"sent note to {there.session}\n"
            )
            assert there.expect("note")["data"] == {"n": 1}
            assert "404" in fails(a0, "send", "nobody", "note")

            assert ok(a1, "broadcast", "all", '"x"') == "sent all to every client of 2 node(s)\n"
            assert here.expect("all")["data"] == there.expect("all")["data"] == "x"

            # A client of the other node: kicked through the cluster, answered 200.
            assert ok(a0, "kick", there.session) == f"disconnected {there.session}\n"
            closed(there)
            # Its close is recorded where it was held (closes are each node's own).
            records = json.loads(ok(a1, "clients", "--json", "--evictions", "1"))
            assert [(r["session"], r["reason"]) for r in records["recent_evictions"]] == [
                (there.session, "admin")
            ]
            assert "admin" in ok(a1, "clients", "--evictions", "1")
            missing = fails(a0, "kick", "nobody")
            assert "404" in missing and "no client 'nobody' in the cluster" in missing
            # And one of its own node.
            assert ok(a0, "kick", here.session) == f"disconnected {here.session}\n"
            closed(here)
        finally:
            here.close()
            there.close()
        for node in nodes:
            assert node.daemon.stop() == 0


@pytest.mark.scenario
def test_admin_verbs_against_workers_and_a_node_beside_them(tmp_path: Path) -> None:
    (tmp_path / "solo").mkdir()
    solo_config = {
        "log": {"level": "debug"},  # for the eviction line
        "cluster": {"node_id": "solo", "node_timeout": NODE_TIMEOUT},
    }
    clients: list[Client] = []
    with RedisServer(tmp_path / "redis") as redis, workers(tmp_path, redis, 2) as daemon:
        solo_config["cluster"]["redis"] = redis.url  # type: ignore[index]
        with Daemon(tmp_path / "solo", solo_config) as solo:
            solo.wait_for(LINK_UP)
            admin = daemon.admin  # type: ignore[attr-defined]
            try:
                clients = [Client(daemon.port) for _ in range(4)]
                elsewhere = Client(solo.port)
                clients.append(elsewhere)
                nodes = nodes_of(daemon, clients)
                assert nodes[elsewhere.session] == "solo"
                table = ok(admin, "clients")
                assert table.splitlines()[-1] == "5 client(s)"

                target = clients[0]
                ok(admin, "send", target.session, "note", "1")
                assert target.expect("note")["data"] == 1
                assert "404" in fails(admin, "send", "nobody", "note")
                assert ok(admin, "broadcast", "all") == "sent all to every client of 3 node(s)\n"
                for c in clients:
                    assert c.expect("all")["type"] == "all"

                # A worker's own client: the holder answers.
                assert ok(admin, "kick", target.session) == f"disconnected {target.session}\n"
                closed(target)
                # A client of another daemon of the cluster: through the cluster.
                assert ok(admin, "kick", elsewhere.session) == (
                    f"disconnected {elsewhere.session}\n"
                )
                closed(elsewhere)
                solo.wait_for(rf"Client {elsewhere.session} .*disconnected: admin")
                assert "404" in fails(admin, "kick", "nobody")
            finally:
                for c in clients:
                    c.close()
            assert solo.stop() == 0

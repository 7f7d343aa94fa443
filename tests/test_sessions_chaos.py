"""Chaos: a client whose connection is cut at random resumes again and again while requests,
pushes and publications flow; everything arrives exactly once, in order, and no handler runs
twice (issue 18, "Done when").  Real daemon, real sockets; the cuts are resets (SO_LINGER 0),
so whatever was in flight in either direction is lost with the connection.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon
from redis_server import RedisServer
from session_peer import SessionPeer
from test_cluster import LINK_UP

HANDLERS = """
SEEN = set()

def register(registry):
    @registry.handler("work")
    def work(request):
        i = request.data
        again = i in SEEN
        SEEN.add(i)
        # A push per request (not ordered with the reply), and every 5th a publication.
        request.server.send(request.session.resumable, "pushed", i)
        if i % 5 == 0:
            request.server.publish("chaos", i)
        return {"i": i, "again": again}
"""

COUNT = 1500


def cut(peer: SessionPeer) -> None:
    """Reset the connection: unread bytes on both sides are lost."""
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.sock.close()


class Chaos:
    """One resumable client doing `COUNT` requests through random cuts.

    ``ports()`` names the port to (re)connect to; ``on_cut(n)`` runs before the n-th resume.
    Requests it holds are dropped when the server's ack covers them and resent (same seq)
    after a resume; replies, pushes and publication offsets are recorded as they come.
    """

    def __init__(self, rng: random.Random, ports: Any, on_cut: Any = None) -> None:
        self.rng = rng
        self.ports = ports
        self.on_cut = on_cut or (lambda n: None)
        self.requests: dict[int, dict[str, Any]] = {}
        self.replies: list[int] = []
        self.pushes: list[int] = []
        self.offsets: list[int] = []
        self.redelivered = 0
        self.cuts = 0

    def run(self, count: int) -> None:
        rng = self.rng
        peer = SessionPeer(self.ports())
        peer.start()
        peer.reply(peer.request("subscribe", {"channel": "chaos"}))
        requests = self.requests
        unacked_since = 0
        sent = 0
        budget = rng.randint(1, 40)  # messages until the next cut
        while len(self.replies) < count:
            while sent < count and sent - len(self.replies) < 8:  # a few in flight
                sent += 1
                peer.seq += 1
                message = {"type": "work", "id": sent, "seq": peer.seq, "data": sent}
                requests[peer.seq] = message
                peer.send(message)
            message = peer.recv()
            if message is not None:
                if "ack" in message:
                    for seq in [s for s in requests if s <= message["ack"]]:
                        del requests[seq]
                self.record(message)
                unacked_since += 1
                if unacked_since >= 32:
                    peer.ack()
                    unacked_since = 0
                budget -= 1
                if budget > 0:
                    continue
                cut(peer)
            # The connection is gone (cut here, or by the server): resume on a new one.
            self.cuts += 1
            self.on_cut(self.cuts)
            budget = rng.randint(1, 40)
            old, peer = peer, peer.clone(self.ports())
            old.close()
            answer = peer.resume()["data"]
            assert answer["resumed"] is True, answer
            for seq in [s for s in requests if s <= answer["ack"]]:
                del requests[seq]
            for seq in sorted(requests):
                peer.send(requests[seq])  # resent, with the same seq
            unacked_since = 0
        peer.close()

    def record(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "work":
            if message["data"]["again"]:
                self.redelivered += 1
            self.replies.append(message["data"]["i"])
        elif kind == "pushed":
            self.pushes.append(message["data"])
        elif kind == "publication":
            self.offsets.append(message["data"]["offset"])

    def check(self, count: int) -> None:
        assert self.replies == list(range(1, count + 1))
        assert self.offsets == list(range(1, len(self.offsets) + 1))
        assert len(self.offsets) >= count // 5 - 8


def test_random_cuts_lose_nothing_and_run_nothing_twice(tmp_path: Path) -> None:
    (tmp_path / "chaos_handlers.py").write_text(HANDLERS)
    config = {"handlers": ["chaos_handlers"], "channels": {"history_size": 1000}}
    with Daemon(tmp_path, config, env={"PYTHONPATH": str(tmp_path)}) as daemon:
        chaos = Chaos(random.Random(18), lambda: daemon.port)
        chaos.run(COUNT)
        assert chaos.cuts > 30
        chaos.check(COUNT)
        assert chaos.redelivered == 0  # one daemon: no handler ran twice
        assert chaos.pushes == list(range(1, COUNT + 1))


@pytest.mark.scenario
def test_random_cuts_on_three_nodes_with_one_killed(tmp_path: Path) -> None:
    (tmp_path / "chaos_handlers.py").write_text(HANDLERS)
    with RedisServer(tmp_path / "redis") as redis, contextlib.ExitStack() as stack:
        daemons = []
        for i in range(3):
            directory = tmp_path / f"node{i}"
            directory.mkdir()
            config = {
                "name": f"node{i}",
                "handlers": ["chaos_handlers"],
                "channels": {"history_size": 1000},
                "cluster": {"redis": redis.url, "node_id": f"node{i}", "node_timeout": 2.0},
            }
            env = {"PYTHONPATH": str(tmp_path)}
            daemons.append(stack.enter_context(Daemon(directory, config, env=env)))
        for daemon in daemons:
            daemon.wait_for(LINK_UP)
        rng = random.Random(19)
        alive = [0, 1, 2]

        def kill(n: int) -> None:
            if n == 20:  # mid-way, the node the client is on may be the one killed
                daemons[2].process.kill()
                daemons[2].process.wait(10)
                alive.remove(2)

        chaos = Chaos(rng, lambda: daemons[rng.choice(alive)].port, kill)
        chaos.run(COUNT)
        assert chaos.cuts > 30
        chaos.check(COUNT)
        # Every push arrived, in order; a redelivered request (its node was killed, or the
        # session moved while it ran) pushes again: at-least-once for a handler's effects.
        assert sorted(set(chaos.pushes)) == list(range(1, COUNT + 1))
        assert chaos.redelivered <= 8 * chaos.cuts

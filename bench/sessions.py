"""What resumable sessions cost: CPU per message, daemon memory and Redis memory per session.

    python bench/sessions.py [--messages N] [--sessions N] [--redis]

* W1/W2 echo with sessions off and on, in one run (interleaved, best of 3 each): the
  per-message cost through ``dataReceived`` into a null transport, as bench/hotpath.py
  measures it (no kernel).  With sessions on, every request carries its seq and the client
  acks every 32 replies, as the client libraries do.
* Daemon memory per idle session: tracemalloc over N in-memory connections that each start a
  session, exchange one request and ack it, less the same connections without a session;
  and per detached session (its connection gone).
* ``--redis``: bytes per idle session in Redis (INFO used_memory over N sessions made
  through a real daemon with ``cluster.redis``, each subscribed to a channel, one request
  answered and acked).  Needs redis-server on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from heartbeatd.config import parse_config
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import default_registry

SHAPES = {"W1": 1, "W2": 32}
SIZE = 64
ACK_EVERY = 32


class NullTransport(StringTransport):
    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, data: list[bytes]) -> None:
        pass


def frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


def _reads(depth: int, messages: int, sessions: bool) -> list[bytes]:
    """The reads a client sends: ``depth`` pipelined echo requests each (numbered and acked
    when ``sessions``)."""
    payload = b"x" * SIZE
    reads = []
    seq = 0
    for _ in range(max(1, messages // depth)):
        chunk = []
        for _ in range(depth):
            seq += 1
            if sessions:
                body = b'{"type":"echo","id":1,"seq":%d,"data":"%s"}' % (seq, payload)
            else:
                body = b'{"type":"echo","id":1,"data":"%s"}' % payload
            chunk.append(frame(body))
            if sessions and seq % ACK_EVERY == 0:
                # The replies so far are seq 1..seq (one each): the client acks them.
                chunk.append(frame(b'{"type":"ack","data":{"seq":%d}}' % seq))
        reads.append(b"".join(chunk))
    return reads


def per_message_us(depth: int, messages: int, sessions: bool) -> float:
    factory = ServerFactory(parse_config({}), default_registry(), Clock())
    proto = factory.buildProtocol(None)
    proto.makeConnection(NullTransport())
    if sessions:
        proto.dataReceived(frame(b'{"type":"session","id":0}'))
        assert proto._resumable is not None
    reads = _reads(depth, messages, sessions)
    receive = proto.dataReceived
    started = time.perf_counter()
    for data in reads:
        receive(data)
    elapsed = time.perf_counter() - started
    if sessions:  # everything was answered and acked: nothing piles up
        state = proto._resumable.state
        assert len(state.unacked) < ACK_EVERY + depth, len(state.unacked)
    return elapsed / (len(reads) * depth) * 1e6


def echo_costs(messages: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for shape, depth in SHAPES.items():
        best = {"off": float("inf"), "on": float("inf")}
        for _ in range(3):
            for mode in ("off", "on"):  # interleaved: the machine's load hits both alike
                best[mode] = min(best[mode], per_message_us(depth, messages, mode == "on"))
        results[shape] = best
    return results


# -- daemon memory ---------------------------------------------------------------------------


def _connect(factory: ServerFactory, port: int) -> Any:
    from twisted.internet.address import IPv4Address

    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 9000),
        peerAddress=IPv4Address("TCP", "127.0.0.1", port),
    )
    proto = factory.buildProtocol(transport.getPeer())
    proto.makeConnection(transport)
    transport.clear()
    return proto


def memory_per_session(count: int) -> dict[str, float]:
    # Every session comes from one address: sessions.max_per_identity (which counts
    # clients without an identity by address) is off.
    config = parse_config(
        {"limits": {"max_connections": count * 2 + 10}, "sessions": {"max_per_identity": 0}}
    )
    factory = ServerFactory(config, default_registry(), Clock())
    protos = [_connect(factory, 10000 + i) for i in range(count)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for proto in protos:
        proto.dataReceived(frame(b'{"type":"session","id":0}'))
        proto.dataReceived(frame(b'{"type":"echo","id":1,"seq":1,"data":"hello"}'))
        proto.dataReceived(frame(b'{"type":"ack","data":{"seq":1}}'))
        proto.transport.clear()
    gc.collect()
    attached = (tracemalloc.get_traced_memory()[0] - before) / count
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    before_close = tracemalloc.get_traced_memory()[0]
    for proto in protos:
        proto.connectionLost(Failure(ConnectionDone()))
    gc.collect()
    # What a detached session holds once its connection is gone (the connection's own
    # memory is freed by then; the measurement keeps only what the session kept).
    protos.clear()
    gc.collect()
    left = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(factory.sessions.states) == count
    return {
        "attached_bytes": attached,
        "detached_bytes": (left - before) / count,
        "freed_by_close_bytes": (before_close - left) / count,
    }


# -- Redis memory ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_info(port: int) -> int:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "INFO", "memory"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(re.search(r"used_memory:(\d+)", out).group(1))  # type: ignore[union-attr]


class _Raw:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buffer = b""

    def send(self, obj: Any) -> None:
        self.sock.sendall(frame(json.dumps(obj).encode()))

    def recv(self) -> Any:
        while True:
            if len(self.buffer) >= 4:
                (n,) = struct.unpack_from("!I", self.buffer)
                if len(self.buffer) >= 4 + n:
                    body, self.buffer = self.buffer[4 : 4 + n], self.buffer[4 + n :]
                    return json.loads(body)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk

    def until(self, id_: Any) -> Any:
        while True:
            message = self.recv()
            if message.get("id") == id_:
                return message


def redis_bytes_per_session(count: int) -> dict[str, float]:
    if shutil.which("redis-server") is None:
        raise SystemExit("--redis needs redis-server on PATH")
    redis_port = _free_port()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        redis = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            cwd=tmp,
        )
        stack.callback(lambda: (redis.kill(), redis.wait()))
        deadline = time.monotonic() + 10
        while True:
            try:
                _redis_info(redis_port)
                break
            except subprocess.CalledProcessError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        config = Path(tmp) / "heartbeatd.yaml"
        config.write_text(
            json.dumps(
                {
                    "listen": "tcp:0:interface=127.0.0.1",
                    "admin": {"listen": ""},
                    "limits": {"max_connections": count + 100},
                    # one address for all: not bounded per address here
                    "sessions": {"max_per_identity": 0},
                    "cluster": {"redis": f"redis://127.0.0.1:{redis_port}/0"},
                }
            )
        )
        twistd = str(Path(sys.executable).parent / "twistd")
        daemon = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "heartbeatd", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        stack.callback(lambda: (daemon.kill(), daemon.wait()))
        port = 0
        assert daemon.stdout is not None
        for line in daemon.stdout:
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
            if "Redis link up" in line and port:
                break
        # One client to create the channel's keys first, so they are not counted.
        first = _Raw(port)
        first.recv()
        first.send({"type": "subscribe", "id": 1, "data": {"channel": "news"}})
        first.until(1)
        base = _redis_info(redis_port)
        clients = []
        sids = []
        for _ in range(count):
            c = _Raw(port)
            c.recv()  # hello
            c.send({"type": "session", "id": "s"})
            sids.append(c.until("s")["data"]["session"])
            c.send({"type": "subscribe", "id": 1, "seq": 1, "data": {"channel": "news"}})
            c.until(1)
            c.send({"type": "echo", "id": 2, "seq": 2, "data": "hello"})
            c.until(2)
            c.send({"type": "ack", "data": {"seq": 2}})
            clients.append(c)
        clients[-1].send({"type": "echo", "id": 3, "data": "sync"})  # acks written before
        clients[-1].until(3)
        attached = (_redis_info(redis_port) - base) / count
        for c in clients:
            c.sock.close()
        first.sock.close()
        # Wait until the daemon has detached them all (a detached session's TTL is its
        # expiry, 120 s; an attached one's is 45 s more).
        deadline = time.monotonic() + 20
        for sid in sids:
            while True:
                ttl = subprocess.run(
                    ["redis-cli", "-p", str(redis_port), "TTL", f"heartbeatd:s:{sid}"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.strip()
                if 0 < int(ttl) <= 120:
                    break
                assert time.monotonic() < deadline, f"session {sid} not detached"
        detached = (_redis_info(redis_port) - base) / count
    return {"attached_bytes": attached, "detached_bytes": detached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000, help="per shape and mode")
    parser.add_argument("--sessions", type=int, default=2000, help="for the memory figures")
    parser.add_argument("--redis", action="store_true", help="also measure Redis bytes")
    args = parser.parse_args()
    for shape, best in echo_costs(args.messages).items():
        off, on = best["off"], best["on"]
        print(
            f"{shape} echo (depth {SHAPES[shape]}, {SIZE} B): sessions off {off:.2f} us/msg, "
            f"on {on:.2f} us/msg ({on / off:.2f}x)"
        )
    memory = memory_per_session(args.sessions)
    print(
        f"daemon memory per idle session ({args.sessions}): attached "
        f"{memory['attached_bytes']:,.0f} B (on top of its connection), detached "
        f"{memory['detached_bytes']:,.0f} B"
    )
    if args.redis:
        redis = redis_bytes_per_session(min(args.sessions, 500))
        print(
            f"Redis memory per idle session: attached {redis['attached_bytes']:,.0f} B, "
            f"detached {redis['detached_bytes']:,.0f} B"
        )


if __name__ == "__main__":
    main()

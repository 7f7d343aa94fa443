"""One message through the real reactor and kernel, in one process: what W1 and W2 cost us.

`hotpath.py` measures ``dataReceived`` alone. This adds everything a socket adds: the
epoll wait, Twisted's dispatch of the read event (``callWithLogger``, the log context,
``doRead``), ``recv``, and the reply's ``send``. The clients are plain non-blocking sockets
driven by this same loop (one ``send`` and one ``recv`` each per round), so their share is
small and identical for any server tree; run it under ``valgrind --tool=callgrind`` to get
instruction counts that a busy machine cannot disturb:

    python bench/reactor_path.py [--profile] [--depth 1] [--conns 50]

With ``PYTHONPATH`` pointing at another checkout, it measures that tree the same way.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import socket
import struct
import time
from typing import Any

from twisted.internet import reactor as _reactor

from heartbeatd.config import parse_config
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import default_registry

reactor: Any = _reactor


def request(size: int) -> bytes:
    body = b'{"type":"echo","id":1,"data":"' + b"x" * size + b'"}'
    return struct.pack("!I", len(body)) + body


class Rig:
    """A listening daemon factory and ``conns`` connected client sockets, all in-process."""

    def __init__(self, conns: int, config: dict[str, Any] | None = None) -> None:
        parsed = parse_config(config or {})
        self.factory = ServerFactory(parsed, default_registry(), reactor)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.lean = getattr(parsed.tcp, "lean_transport", False)  # older trees lack it
        if self.lean:  # as the daemon's service does
            from heartbeatd.server import leantcp

            leantcp.adopt(self.port)
        else:
            try:
                from heartbeatd.server import leantcp
            except ImportError:
                pass
            else:
                leantcp.uninstall_dispatch(reactor)
        address = ("127.0.0.1", self.port.getHost().port)
        self.clients: list[socket.socket] = []
        for _ in range(conns):
            s = socket.create_connection(address)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            self.clients.append(s)
        deadline = time.monotonic() + 10
        while len(self.factory.clients) < conns:
            self.spin(deadline)
        for s in self.clients:  # the hello
            self.receive(s, 1, deadline)

    def spin(self, deadline: float) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not answer in time")
        reactor.runUntilCurrent()
        reactor.doIteration(0)

    def receive(self, s: socket.socket, frames: int, deadline: float) -> None:
        """Read ``frames`` whole frames from ``s``, spinning the reactor while it has none."""
        buffer = b""
        while frames:
            try:
                chunk = s.recv(1 << 20)
            except BlockingIOError:
                self.spin(deadline)
                continue
            buffer += chunk
            while len(buffer) >= 4:
                (length,) = struct.unpack_from("!I", buffer)
                if len(buffer) < 4 + length:
                    break
                buffer = buffer[4 + length :]
                frames -= 1

    def round(self, chunk: bytes, depth: int) -> None:
        """Every client sends ``depth`` requests in one write; wait for all replies."""
        for s in self.clients:
            s.send(chunk)
        deadline = time.monotonic() + 10
        for s in self.clients:
            self.receive(s, depth, deadline)

    def close(self) -> None:
        for s in self.clients:
            s.close()
        deadline = time.monotonic() + 10
        while self.factory.clients:
            self.spin(deadline)
        self.port.stopListening()
        self.spin(deadline)


def per_message_us(
    depth: int, conns: int = 50, size: int = 64, messages: int = 100_000, rig: Rig | None = None
) -> float:
    own = rig is None
    rig = rig or Rig(conns)
    chunk = request(size) * depth
    rounds = max(1, messages // (depth * len(rig.clients)))
    started = time.perf_counter()
    for _ in range(rounds):
        rig.round(chunk, depth)
    elapsed = time.perf_counter() - started
    if own:
        rig.close()
    return elapsed / (rounds * depth * len(rig.clients)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, nargs="*", default=[1, 32])
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true", help="cProfile, sorted by own time")
    parser.add_argument("--stock", action="store_true", help="tcp.lean_transport: false")
    args = parser.parse_args()
    config = {"tcp": {"lean_transport": False}} if args.stock else None
    for depth in args.depth:
        rig = Rig(args.conns, config)
        per_message_us(depth, messages=2_000, rig=rig)  # warm up
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(per_message_us, depth, messages=args.messages, rig=rig)
            print(f"--- depth {depth}")
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        else:
            us = min(per_message_us(depth, messages=args.messages, rig=rig) for _ in range(3))
            print(f"depth {depth:>2}: {us:.2f} us/message, server and clients in one process")
        rig.close()


if __name__ == "__main__":
    main()

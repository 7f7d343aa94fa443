"""Memory of an idle connection, before and after its first ping, with where it goes.

The daemon's factory runs in this process on the real reactor; the clients are plain sockets
in a child process (so their memory is not counted), which connect and never send. Reports
RSS growth per connection once every connection is open (before any ping), then again after
one ping has been written to each. ``--trace`` also takes a tracemalloc snapshot and lists
the allocation sites per connection (tracemalloc's own bookkeeping inflates RSS, so the RSS
figures of a ``--trace`` run are not the ones to quote).

    python bench/idle_memory.py [--conns 10000] [--trace]

With ``PYTHONPATH`` pointing at another checkout, it measures that tree the same way.
"""

from __future__ import annotations

import argparse
import gc
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor

from heartbeatd.config import parse_config
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import default_registry

reactor: Any = _reactor
HERE = Path(__file__).resolve().parent

CLIENTS = r"""
import socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
held = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
print("open", flush=True)
sys.stdin.read()
"""


def rss() -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]


def spin_until(done: Any, seconds: float = 900) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError("gave up waiting")
        reactor.runUntilCurrent()
        reactor.doIteration(0.01)


def settle(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reactor.runUntilCurrent()
        reactor.doIteration(0.01)


def measure(
    conns: int,
    trace: bool,
    top: int,
    stock: bool = False,
    redis: str | None = None,
    answer: bool = False,
) -> dict[str, float]:
    # A long heartbeat and no first-frame limit: nothing is pinged until we say so.
    config: dict[str, Any] = {
        "heartbeat": {"interval": 3600, "timeout": 7200},
        "limits": {"first_frame_timeout": 0},
    }
    if stock:
        config["tcp"] = {"lean_transport": False}
    broker = None
    if redis:  # a cluster node, as each worker is: its clients are registered with Redis
        from heartbeatd.cluster.redis import RedisBroker

        config["cluster"] = {"redis": redis, "node_id": "idle-memory"}
    parsed = parse_config(config)
    if redis:
        broker = RedisBroker(reactor, parsed.cluster, parsed.channels)
    factory = ServerFactory(parsed, default_registry(), reactor, broker)
    factory.startFactory()
    if broker is not None:
        factory.channels.start()
        spin_until(lambda: broker.up, 30)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=1024)
    if getattr(parsed.tcp, "lean_transport", False):  # as the daemon does; older trees lack it
        from heartbeatd.server import leantcp

        leantcp.adopt(port)
    settle(0.2)
    gc.collect()
    if trace:
        tracemalloc.start(4)
        first = tracemalloc.take_snapshot()
    base = rss()
    argv = [sys.executable, "-c", CLIENTS, str(port.getHost().port), str(conns)]
    if answer:  # clients that answer pings, as bench/workers_idle.py's do
        argv = [sys.executable, str(HERE / "idle_clients.py"), "--port", argv[3]]
        argv += ["--conns", str(conns), "--source", "127.0.0.1"]
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        spin_until(lambda: len(factory.clients) >= conns)
        if broker is not None:  # every registration answered by Redis
            spin_until(lambda: not broker._cmd.replyQueue.waiting, 60)  # type: ignore[union-attr]
        settle(0.5)
        gc.collect()
        before = (rss() - base) / conns
        if trace:
            snapshot = tracemalloc.take_snapshot()
            stats = snapshot.compare_to(first, "traceback")
            print(f"top allocation sites, bytes per connection ({conns:,} connections):")
            for stat in stats[:top]:
                where = list(stat.traceback)[::-1][:3]  # most recent call first
                frames = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in where)
                size, count = stat.size_diff / conns, stat.count_diff / conns
                print(f"  {size:7.1f} B  {count:5.2f} blocks  {frames}")
            total = sum(s.size_diff for s in stats)
            print(f"  {total / conns:7.1f} B  in all (tracemalloc)")
        frame = factory.ping_frame(1)
        now = reactor.seconds()
        for client in list(factory.clients.values()):
            client.send_heartbeat(frame, now)
        if answer:
            spin_until(lambda: all(c.pings_unanswered == 0 for c in factory.clients.values()))
        settle(0.5)
        gc.collect()
        after = (rss() - base) / conns
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        child.wait(30)
    spin_until(lambda: not factory.clients)
    port.stopListening()
    factory.stopFactory()
    if broker is not None:
        stopped: list[object] = []
        factory.channels.stop().addBoth(stopped.append)
        spin_until(lambda: stopped, 30)
    return {"connections": conns, "before_ping": before, "after_ping": after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", type=int, default=10_000)
    parser.add_argument("--trace", action="store_true", help="list allocation sites")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--stock", action="store_true", help="tcp.lean_transport: false")
    parser.add_argument("--redis", metavar="URL", help="a cluster node (cluster.redis: URL)")
    parser.add_argument(
        "--answer", action="store_true", help="clients answer the ping (bench/idle_clients.py)"
    )
    args = parser.parse_args()
    result = measure(args.conns, args.trace, args.top, args.stock, args.redis, args.answer)
    print(
        f"{result['connections']:,} idle connections: {result['before_ping']:,.0f} B/conn "
        f"before any ping, {result['after_ping']:,.0f} B/conn after one ping each (RSS)"
    )


if __name__ == "__main__":
    main()

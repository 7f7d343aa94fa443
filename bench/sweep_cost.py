"""What one heartbeat sweep costs, in reactor time, for N connected clients.

Runs the real ServerFactory/ServerProtocol on an in-memory transport and a Clock, so only
heartbeatd's own work is measured (no kernel, no sockets).  Prints, for each N: the cost of a
sweep where every client is due (all idle: each gets a ping), the longest single batch (what
the reactor is blocked for), and a sweep where no client is due (all busy).

    .venv/bin/python bench/sweep_cost.py [N ...]
"""

from __future__ import annotations

import gc
import sys
import time

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITransport
from twisted.internet.task import Clock
from zope.interface import implementer

from heartbeatd.config import parse_config
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import default_registry


@implementer(ITransport)
class NullTransport:
    """Discards writes; the cheapest transport, so the sweep's own cost shows."""

    disconnecting = False

    def __init__(self, port: int) -> None:
        self._peer = IPv4Address("TCP", "127.0.0.1", port)

    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, data: list[bytes]) -> None:
        pass

    def getPeer(self) -> IPv4Address:
        return self._peer

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 9000)

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    def abortConnection(self) -> None:
        pass


def measure(n: int, batch: int = 1000) -> dict[str, float]:
    clock = Clock()
    config = parse_config(
        {
            "heartbeat": {"interval": 10, "timeout": 30, "sweep_batch": batch},
            # The clients never send a frame, and all come from one (None) address: neither
            # the first-frame deadline nor the per-address limit may close them first.
            "limits": {
                "max_connections": n + 1,
                "first_frame_timeout": 0,
                "max_connections_per_address": 0,
            },
        }
    )
    factory = ServerFactory(config, default_registry(), clock)
    factory.max_connections = n + 1  # in memory: no file descriptors, so no open-file cap
    for i in range(n):
        factory.buildProtocol(None).makeConnection(NullTransport(i % 65535))
    monitor = factory.heartbeat
    batches: list[float] = []
    real_run = monitor._run_batch

    def timed(*args: object) -> None:
        began = time.perf_counter()
        real_run(*args)
        batches.append(time.perf_counter() - began)

    monitor._run_batch = timed  # type: ignore[method-assign]
    factory.doStart()
    gc.collect()  # start clean, so a collection of the setup's garbage is not counted
    gc.disable()
    began = time.perf_counter()
    clock.advance(10)  # every client quiet for 10 s: all due
    all_due = time.perf_counter() - began
    assert monitor.pings_sent == n
    clock.advance(1)
    for client in factory.clients.values():  # everyone spoke 9 s before the sweep: none due
        client.last_seen = factory.now()
    began = time.perf_counter()
    clock.advance(9)
    assert monitor.last_sweep_due == 0
    none_due = time.perf_counter() - began
    gc.enable()
    began = time.perf_counter()
    gc.collect()
    full_gc = time.perf_counter() - began
    return {
        "clients": n,
        "all_due_ms": all_due * 1000,
        "per_client_us": all_due / n * 1e6,
        "longest_batch_ms": max(batches) * 1000,
        "none_due_ms": none_due * 1000,
        "full_gc_ms": full_gc * 1000,
    }


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [1_000, 20_000, 100_000]
    print(
        f"{'clients':>8} {'sweep, all due':>15} {'per client':>11} "
        f"{'longest batch':>14} {'sweep, none due':>16} {'one full gc':>12}"
    )
    for n in sizes:
        r = measure(n)
        print(
            f"{n:>8} {r['all_due_ms']:>12.1f} ms {r['per_client_us']:>8.2f} us "
            f"{r['longest_batch_ms']:>11.2f} ms {r['none_due_ms']:>13.3f} ms "
            f"{r['full_gc_ms']:>9.1f} ms"
        )


if __name__ == "__main__":
    main()

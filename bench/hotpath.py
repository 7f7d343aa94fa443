"""heartbeatd's own per-message cost: ServerProtocol.dataReceived into a null transport.

No sockets, no kernel: feeds reads of DEPTH pipelined echo requests (as W1 and W2 send them)
and reports microseconds per message, so a change to the hot path can be judged in isolation.

    python bench/hotpath.py [--profile]
"""

from __future__ import annotations

import cProfile
import pstats
import struct
import sys
import time

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from heartbeatd.config import parse_config
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import default_registry


class NullTransport(StringTransport):
    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, data: list[bytes]) -> None:
        pass


def request(size: int) -> bytes:
    body = b'{"type":"echo","id":1,"data":"' + b"x" * size + b'"}'
    return struct.pack("!I", len(body)) + body


def per_message_us(depth: int, size: int = 64, messages: int = 300_000) -> float:
    factory = ServerFactory(parse_config({}), default_registry(), Clock())
    proto = factory.buildProtocol(None)
    proto.makeConnection(NullTransport())
    chunk = request(size) * depth
    reads = max(1, messages // depth)
    receive = proto.dataReceived
    started = time.perf_counter()
    for _ in range(reads):
        receive(chunk)
    return (time.perf_counter() - started) / (reads * depth) * 1e6


def main() -> None:
    if "--profile" in sys.argv:
        profile = cProfile.Profile()
        profile.runcall(per_message_us, 32)
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)
        return
    for depth in (1, 32):
        best = min(per_message_us(depth) for _ in range(3))
        print(f"depth {depth:>2}: {best:.2f} us/message ({1e6 / best:,.0f} messages/s on one core)")


if __name__ == "__main__":
    main()

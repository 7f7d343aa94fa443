"""heartbeatd's own per-message cost: ServerProtocol.dataReceived into a null transport.

No sockets, no kernel: feeds reads of DEPTH pipelined echo requests (as W1 and W2 send them)
and reports microseconds per message, so a change to the hot path can be judged in isolation.

    python bench/hotpath.py [--profile] [--messages N] [--shape W1 W2 W3]

W3 feeds 256 KiB requests in 64 KiB reads (Twisted's read size), as the socket delivers them.
Under callgrind, run two ``--messages`` counts and divide the difference (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import struct
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


SHAPES = {"W1": (1, 64), "W2": (32, 64), "W3": (1, 262144)}
READ_SIZE = 65536


def per_message_us(depth: int, size: int = 64, messages: int = 300_000) -> float:
    factory = ServerFactory(parse_config({}), default_registry(), Clock())
    proto = factory.buildProtocol(None)
    proto.makeConnection(NullTransport())
    chunk = request(size) * depth
    reads = [chunk[i : i + READ_SIZE] for i in range(0, len(chunk), READ_SIZE)]
    rounds = max(1, messages // depth)
    receive = proto.dataReceived
    started = time.perf_counter()
    for _ in range(rounds):
        for data in reads:
            receive(data)
    return (time.perf_counter() - started) / (rounds * depth) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs="*", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--messages", type=int, help="per shape (default: about 1 s of work)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    for shape in args.shape:
        depth, size = SHAPES[shape]
        messages = args.messages or (300_000 if size < READ_SIZE else 2_000)
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(per_message_us, depth, size, messages)
            print(f"--- {shape}")
            pstats.Stats(profile).sort_stats("tottime").print_stats(15)
            continue
        best = min(per_message_us(depth, size, messages) for _ in range(3))
        print(f"{shape} (depth {depth}, {size:,} B): {best:.2f} us/message")


if __name__ == "__main__":
    main()

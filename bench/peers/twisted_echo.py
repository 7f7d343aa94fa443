"""Peer: what a typical Twisted user writes. Int32StringReceiver plus stdlib json, echoing.

With --heartbeat S it also pings every client every S seconds from one LoopingCall, the way
the seed tutorial's server broadcasts, and prints how long each sweep blocked the reactor.

    python twisted_echo.py PORT [--heartbeat S]
"""

from __future__ import annotations

import json
import sys
import time

from twisted.internet import reactor, task
from twisted.internet.protocol import Factory
from twisted.protocols.basic import Int32StringReceiver

clients: set[Echo] = set()
PING = b'{"type":"ping"}'


class Echo(Int32StringReceiver):
    MAX_LENGTH = 1024 * 1024

    def connectionMade(self) -> None:
        clients.add(self)

    def connectionLost(self, reason: object = None) -> None:
        clients.discard(self)

    def stringReceived(self, string: bytes) -> None:
        self.sendString(json.dumps(json.loads(string)).encode())


def sweep() -> None:
    started = time.perf_counter()
    for client in list(clients):
        client.sendString(PING)
    print(json.dumps({"sweep_ms": (time.perf_counter() - started) * 1000}), flush=True)


def main() -> None:
    port = reactor.listenTCP(
        int(sys.argv[1]), Factory.forProtocol(Echo), backlog=4096, interface="127.0.0.1"
    )
    if "--heartbeat" in sys.argv:
        task.LoopingCall(sweep).start(float(sys.argv[sys.argv.index("--heartbeat") + 1]), now=False)
    print(json.dumps({"port": port.getHost().port}), flush=True)
    reactor.run()


if __name__ == "__main__":
    main()

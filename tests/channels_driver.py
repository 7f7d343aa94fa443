"""Drives the client library's channel API across a node failure, for test_cluster.py.

    python channels_driver.py VICTIM_PORT VICTIM_PID OTHER_PORT

A ReconnectingClient whose endpoint tries the victim first, then the other node, subscribes to
``news``; a second connection publishes 1..3 on the other node; the driver kills the victim
(kill -9), publishes 4..6, and prints one JSON line: the offsets the application received and
the not-recovered notices.  Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from heartbeatd.client import connect
from heartbeatd.client.reconnect import ReconnectingClient

DEADLINE = 20.0


@implementer(IStreamClientEndpoint)
class Failover:
    """Connects to the first endpoint that accepts, starting with the last that worked."""

    def __init__(self, endpoints: list[Any]) -> None:
        self.endpoints = endpoints
        self.current = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        def attempt(i: int) -> Deferred[Any]:
            index = (self.current + i) % len(self.endpoints)
            d = self.endpoints[index].connect(factory)

            def connected(proto: Any) -> Any:
                self.current = index
                return proto

            def failed(f: Any) -> Any:
                return attempt(i + 1) if i + 1 < len(self.endpoints) else f

            return d.addCallbacks(connected, failed)

        return attempt(0)


async def wait_for(reactor: Any, condition: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await task.deferLater(reactor, 0.02, lambda: None)


async def main(reactor: Any, victim_port: int, victim_pid: int, other_port: int) -> dict:
    received: list[int] = []
    lost: list[str] = []
    endpoints = [TCP4ClientEndpoint(reactor, "127.0.0.1", p) for p in (victim_port, other_port)]
    client = ReconnectingClient(reactor, Failover(endpoints), backoff_initial=0.05, backoff_max=0.5)
    client.start()
    await client.subscribe(
        "news", lambda data, offset, sub: received.append(offset), lambda sub, why: lost.append(why)
    )
    publisher = await connect(reactor, f"tcp:host=127.0.0.1:port={other_port}")
    for n in (1, 2, 3):
        await publisher.request("publish", {"channel": "news", "data": n})
    await wait_for(reactor, lambda: len(received) >= 3, "publications 1..3")
    os.kill(victim_pid, signal.SIGKILL)
    for n in (4, 5, 6):
        await publisher.request("publish", {"channel": "news", "data": n})
    await wait_for(reactor, lambda: len(received) >= 6 or lost, "publications 4..6")
    publisher.close()
    await client.stop()
    return {"received": received, "lost": lost}


if __name__ == "__main__":
    from twisted.internet import reactor

    result: dict[str, Any] = {}

    def done(value: Any) -> None:
        result["value"] = value
        reactor.stop()

    def failed(f: Any) -> None:
        result["value"] = {"error": f.getErrorMessage()}
        reactor.stop()

    args = [int(a) for a in sys.argv[1:4]]
    reactor.callWhenRunning(lambda: ensureDeferred(main(reactor, *args)).addCallbacks(done, failed))
    reactor.run()
    print(json.dumps(result["value"]), flush=True)

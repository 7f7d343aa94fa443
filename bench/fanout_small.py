"""Small-channel publish cost: hub.publish to 100 in-memory subscribers (no sockets).

The fan-out queue must leave this path as fast as before: run it here and with
PYTHONPATH=<older checkout> and compare the best of each.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import Peer, make_config
from twisted.internet.task import Clock

import heartbeatd
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import default_registry


class FastClock(Clock):
    def _sortCalls(self):
        calls = self.calls
        if len(calls) < 2 or calls[-1].getTime() >= calls[-2].getTime():
            return
        calls.sort(key=lambda call: call.getTime())


clock = FastClock()
f = ServerFactory(make_config(channels={"client_publish": True}), default_registry(), clock)
peers = []
for i in range(100):
    p = Peer(f, 20000 + i)
    p.send({"type": "subscribe", "id": 1, "data": {"channel": "n"}})
    peers.append(p)
clock.advance(0)
for p in peers:
    p.transport.clear()
hub = f.channels
best = 1e9
for _rep in range(7):
    t = time.perf_counter()
    for i in range(2000):
        hub.publish("n", i)
        if i % 10 == 9:
            clock.advance(0)
    clock.advance(0)
    dt = (time.perf_counter() - t) / 2000
    best = min(best, dt)
    for p in peers:
        p.transport.clear()
assert hub.delivered == 7 * 2000 * 100, hub.delivered
print(heartbeatd.__file__, f"{best * 1e6:.1f} us per publish to 100 subscribers")

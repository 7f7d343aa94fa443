"""Our client and pool in seed framing against tests/interop/seed_server.js; prints JSON.

python seed_python_driver.py PORT
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import task
from twisted.internet.defer import ensureDeferred, gatherResults

from heartbeatd.client import Pool, PoolConfig, connect

PREFIX = "服务端的数据数据:"


async def main(reactor: Any, port: int) -> None:
    endpoint = f"tcp:host=127.0.0.1:port={port}"

    def open_seed() -> Any:
        # The server heartbeats every 0.2 s; with a 1 s timeout a silent server would be dropped.
        return connect(
            reactor, endpoint, framing="seed", heartbeat_interval=0.5, heartbeat_timeout=1
        )

    conn = await open_seed()
    first = await conn.request_value("Thu, 01 Jan 2026 00:00:00 GMT")
    pipelined = await gatherResults([conn.request_value({"n": n}) for n in range(20)])
    await task.deferLater(reactor, 2.0)  # ten server heartbeats; we must still be connected
    alive_after_heartbeats = conn.connected
    after = await conn.request_value([1, 2])
    conn.close()

    pool = Pool(reactor, PoolConfig(endpoint=endpoint, framing="seed", max_size=3), open_seed)
    pooled = await gatherResults([pool.run(lambda c, n=n: c.request_value(n)) for n in range(100)])
    stats = pool.stats()
    await pool.close()
    sys.stdout.write(
        json.dumps(
            {
                "first": first,
                "pipelined_ok": pipelined == [PREFIX + f'{{"n":{n}}}' for n in range(20)],
                "alive_after_heartbeats": alive_after_heartbeats,
                "after": after,
                "pooled_ok": pooled == [PREFIX + str(n) for n in range(100)],
                "pool_created": stats["created"],
            },
            ensure_ascii=False,
        )
        + "\n"
    )


if __name__ == "__main__":
    task.react(lambda reactor: ensureDeferred(main(reactor, int(sys.argv[1]))))

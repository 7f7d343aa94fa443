"""POOL workload: requests/s through a Pool vs one new connection per request.

The seed's case for long connections, measured: the same 50 callers, the same echo request,
for the same number of seconds, once borrowing from a pool of 4 and once connecting, waiting
for the hello, requesting and closing each time.

    python pool_bench.py PORT SECONDS      prints one JSON object
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import task
from twisted.internet.defer import DeferredList, ensureDeferred

from heartbeatd.client import Pool, PoolConfig, connect

CALLERS = 50
POOL_SIZE = 4


async def timed(reactor: Any, seconds: float, one_request: Any) -> float:
    done = 0
    deadline = reactor.seconds() + seconds

    async def caller() -> None:
        nonlocal done
        while reactor.seconds() < deadline:
            await one_request()
            done += 1

    started = reactor.seconds()
    await DeferredList([ensureDeferred(caller()) for _ in range(CALLERS)], fireOnOneErrback=True)
    return done / (reactor.seconds() - started)


async def main(reactor: Any, port: int, seconds: float) -> None:
    endpoint = f"tcp:host=127.0.0.1:port={port}"
    pool = Pool(reactor, PoolConfig(endpoint=endpoint, min_idle=POOL_SIZE, max_size=POOL_SIZE))
    pool.start()

    async def pooled() -> None:
        await pool.request("echo", "x")

    async def fresh() -> None:
        conn = await connect(reactor, endpoint)
        await conn.request("echo", "x")
        conn.close()

    pool_rps = await timed(reactor, seconds, pooled)
    await pool.close()
    connect_rps = await timed(reactor, seconds, fresh)
    sys.stdout.write(
        json.dumps(
            {
                "pool_size": POOL_SIZE,
                "callers": CALLERS,
                "pool_rps": pool_rps,
                "connect_rps": connect_rps,
            }
        )
        + "\n"
    )


if __name__ == "__main__":
    task.react(lambda reactor: ensureDeferred(main(reactor, int(sys.argv[1]), float(sys.argv[2]))))

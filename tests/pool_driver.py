"""Drives a Pool against a live daemon for test_pool_e2e.py, one phase per line on stdin.

    python pool_driver.py ENDPOINT
stdin:  "run N" -> N requests from 50 concurrent callers; prints one JSON result line.
        "quit"  -> closes the pool and exits.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Any

from twisted.internet import task, threads
from twisted.internet.defer import DeferredList, ensureDeferred

from heartbeatd.client import Pool, PoolConfig

CALLERS = 50


async def phase(reactor: Any, pool: Pool, total: int) -> dict[str, Any]:
    outcomes: Counter[str] = Counter()
    started = reactor.seconds()
    remaining = iter(range(total))

    async def caller() -> None:
        for n in remaining:
            try:
                reply = await pool.request("echo", {"n": n})
                outcomes["ok" if reply == {"n": n} else "wrong_reply"] += 1
            except Exception as e:  # the test checks that every failure is a typed one
                outcomes[type(e).__name__] += 1

    await DeferredList([ensureDeferred(caller()) for _ in range(CALLERS)])
    return {
        "outcomes": dict(outcomes),
        "seconds": reactor.seconds() - started,
        "stats": pool.stats(),
    }


async def main(reactor: Any, endpoint: str) -> None:
    config = PoolConfig(
        endpoint=endpoint,
        min_idle=2,
        max_size=4,
        acquire_timeout=2,
        request_timeout=2,
        connect_timeout=2,
        backoff_initial=0.05,
        backoff_max=0.5,
        max_waiters=1000,
    )
    pool = Pool(reactor, config)
    pool.start()
    while True:
        line = (await threads.deferToThread(sys.stdin.readline)).strip()
        if not line or line == "quit":
            break
        _, count = line.split()
        result = await phase(reactor, pool, int(count))
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    await pool.close()


if __name__ == "__main__":
    task.react(lambda reactor: ensureDeferred(main(reactor, sys.argv[1])))

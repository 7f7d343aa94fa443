"""Compare Redis clients for the cluster broker, inside a Twisted reactor.

* txredisapi on Twisted's default (epoll) reactor: native Deferreds.
* redis-py's asyncio client on Twisted's asyncio reactor (``twistd --reactor=asyncio``), each
  call bridged with ``Deferred.fromFuture``.

Each runs the broker's real publish script (EVALSHA: offset, XADD, PUBLISH) against a private
redis-server: one at a time (latency) and many in flight (throughput).  Each client runs in its
own process, since the reactor is chosen once per process.

    .venv/bin/pip install redis   # only for this comparison; heartbeatd does not need it
    .venv/bin/python bench/redis_clients.py [--count 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from redis_server import RedisServer


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def run_txredisapi(port: int, count: int) -> dict[str, float]:
    import txredisapi
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred, gatherResults

    from heartbeatd.cluster.redis import PUBLISH

    async def main() -> dict[str, float]:
        conn = await txredisapi.Connection("127.0.0.1", port, convertNumbers=False)
        sha = await conn.execute_command("SCRIPT", "LOAD", PUBLISH)
        args = ("EVALSHA", sha, 0, "bench", "c", '{"x":1}', "e", 100, 0)
        latencies = []
        start = time.perf_counter()
        for _ in range(count):
            t = time.perf_counter()
            await conn.execute_command(*args)
            latencies.append(time.perf_counter() - t)
        sequential = time.perf_counter() - start
        start = time.perf_counter()
        await gatherResults([conn.execute_command(*args) for _ in range(count)])
        parallel = time.perf_counter() - start
        await conn.disconnect()
        return _result(latencies, sequential, parallel, count)

    out: dict[str, float] = {}

    def done(result: dict[str, float]) -> None:
        out.update(result)
        reactor.stop()

    ensureDeferred(main()).addCallbacks(done, lambda f: (print(f), reactor.stop()))
    reactor.run()
    return out


def run_redis_py(port: int, count: int) -> dict[str, float]:
    from twisted.internet import asyncioreactor

    asyncioreactor.install()
    import asyncio

    import redis.asyncio as aioredis
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, ensureDeferred, gatherResults

    from heartbeatd.cluster.redis import PUBLISH

    def call(client: object, *args: object) -> Deferred[object]:
        return Deferred.fromFuture(asyncio.ensure_future(client.execute_command(*args)))

    async def main() -> dict[str, float]:
        # redis-py runs one command per connection at a time (no multiplexing): many in
        # flight means a pool of connections, which waits when all are busy.
        pool = aioredis.BlockingConnectionPool(
            host="127.0.0.1", port=port, decode_responses=True, max_connections=50
        )
        client = aioredis.Redis(connection_pool=pool)
        sha = await call(client, "SCRIPT", "LOAD", PUBLISH)
        args = ("EVALSHA", sha, 0, "bench", "c", '{"x":1}', "e", 100, 0)
        latencies = []
        start = time.perf_counter()
        for _ in range(count):
            t = time.perf_counter()
            await call(client, *args)
            latencies.append(time.perf_counter() - t)
        sequential = time.perf_counter() - start
        start = time.perf_counter()
        await gatherResults([call(client, *args) for _ in range(count)])
        parallel = time.perf_counter() - start
        await Deferred.fromFuture(asyncio.ensure_future(client.aclose()))
        return _result(latencies, sequential, parallel, count)

    out: dict[str, float] = {}

    def done(result: dict[str, float]) -> None:
        out.update(result)
        reactor.stop()

    ensureDeferred(main()).addCallbacks(done, lambda f: (print(f), reactor.stop()))
    reactor.run()
    return out


def _result(latencies: list[float], sequential: float, parallel: float, count: int) -> dict:
    return {
        "sequential_per_s": round(count / sequential),
        "p50_us": round(percentile(latencies, 0.5) * 1e6, 1),
        "p99_us": round(percentile(latencies, 0.99) * 1e6, 1),
        "in_flight_per_s": round(count / parallel),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--client", choices=["txredisapi", "redis-py"])
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.client:  # the child: one client, one reactor
        run = run_txredisapi if args.client == "txredisapi" else run_redis_py
        print(json.dumps(run(args.port, args.count)))
        return
    directory = Path(tempfile.mkdtemp())
    with RedisServer(directory / "redis") as server:
        port = server.port
        results = {}
        for client in ("txredisapi", "redis-py"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--client",
                    client,
                    "--port",
                    str(port),
                    "--count",
                    str(args.count),
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": os.getcwd()},
            )
            results[client] = (
                json.loads(out.stdout.strip().splitlines()[-1])
                if out.returncode == 0
                else out.stderr[-500:]
            )
        print(json.dumps(results, indent=2))
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Keeps two pools under load against a live daemon, for test_pool_restart.py.

    python pool_restart_driver.py ENDPOINT CALLERS
One pool waits for connections (``plain``), the other has ``fail_fast`` (``fast``).  Every
request is recorded with its start and end on the monotonic clock (shared by the processes on
one machine, so the test can compare them with its own).  One JSON line answers each command:

    start                 -> callers start issuing requests back to back
    wait_ok N             -> once both pools have N successes
    wait_down T_KILL SECS -> once both pools report the server down and SECS passed since T_KILL
    first_ok_after T      -> each pool's first success that ended after T
    stop                  -> callers stop; answers once every request in flight has ended
    quit
Each wait has a deadline, so a broken pool makes the test fail, not hang.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from typing import Any

from twisted.internet import task, threads
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred

from heartbeatd.client import ClientError, Pool, PoolConfig

DEADLINE = 30.0  # seconds any one command may take
PAUSE_AFTER_FAILURE = 0.02  # an application would back off a little too (fail_fast spins else)


class Load:
    """Callers issuing requests on one pool, and what became of each request."""

    def __init__(self, reactor: Any, pool: Pool, callers: int) -> None:
        self.reactor = reactor
        self.pool = pool
        self.callers = callers
        self.running = False
        self.outcomes: Counter[str] = Counter()
        self.untyped: list[str] = []
        self.ok_ends: list[float] = []
        self.in_flight = 0
        self.longest = 0.0
        self.unavailable_sync = 0
        self.unavailable_async = 0
        self.done: Deferred[Any] | None = None
        self.n = 0

    def start(self) -> None:
        self.running = True
        self.done = DeferredList([ensureDeferred(self._caller()) for _ in range(self.callers)])

    async def _caller(self) -> None:
        while self.running:
            self.n += 1
            n = self.n
            started = time.monotonic()
            self.in_flight += 1
            d = self.pool.request("echo", {"n": n})
            at_once = d.called
            failed = False
            try:
                reply = await d
                self.outcomes["ok" if reply == {"n": n} else "wrong_reply"] += 1
                self.ok_ends.append(time.monotonic())
            except Exception as e:
                failed = True
                name = type(e).__name__
                self.outcomes[name] += 1
                if not isinstance(e, ClientError):
                    self.untyped.append(repr(e))
                if name == "PoolUnavailable":
                    if at_once:
                        self.unavailable_sync += 1
                    else:
                        self.unavailable_async += 1
            finally:
                self.in_flight -= 1
                self.longest = max(self.longest, time.monotonic() - started)
            if failed:
                await task.deferLater(self.reactor, PAUSE_AFTER_FAILURE)

    def first_ok_after(self, t: float) -> float | None:
        return next((end for end in self.ok_ends if end > t), None)

    def report(self) -> dict[str, Any]:
        return {
            "outcomes": dict(self.outcomes),
            "untyped": self.untyped[:5],
            "in_flight": self.in_flight,
            "longest": self.longest,
            "unavailable_sync": self.unavailable_sync,
            "unavailable_async": self.unavailable_async,
            "stats": self.pool.stats(),
        }


async def until(reactor: Any, condition: Any) -> bool:
    """Poll ``condition`` every 5 ms of reactor time until it holds or DEADLINE passes."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            return False
        await task.deferLater(reactor, 0.005)
    return True


async def handle(
    reactor: Any, loads: dict[str, Load], command: str, args: list[str]
) -> dict[str, Any]:
    answer: dict[str, Any] = {}
    if command == "start":
        for load in loads.values():
            load.start()
    elif command == "wait_ok":
        wanted = int(args[0])
        answer["ok"] = await until(
            reactor, lambda: all(lo.outcomes["ok"] >= wanted for lo in loads.values())
        )
    elif command == "wait_down":
        t_kill, seconds = float(args[0]), float(args[1])
        answer["ok"] = await until(
            reactor,
            lambda: (
                time.monotonic() - t_kill >= seconds
                and all(lo.pool.stats()["server_down"] for lo in loads.values())
            ),
        )
        answer["now"] = time.monotonic()
        answer["stats"] = {name: lo.pool.stats() for name, lo in loads.items()}
    elif command == "first_ok_after":
        t = float(args[0])
        answer["ok"] = await until(
            reactor, lambda: all(lo.first_ok_after(t) for lo in loads.values())
        )
        answer["first_ok"] = {name: lo.first_ok_after(t) for name, lo in loads.items()}
    elif command == "stop":
        for load in loads.values():
            load.running = False
        answer["ok"] = await until(reactor, lambda: all(lo.in_flight == 0 for lo in loads.values()))
        answer.update({name: lo.report() for name, lo in loads.items()})
    else:
        answer["ok"] = False
        answer["error"] = f"unknown command {command!r}"
    return answer


async def main(reactor: Any, endpoint: str, callers: int) -> None:
    def pool(fail_fast: bool) -> Pool:
        config = PoolConfig(
            endpoint=endpoint,
            min_idle=2,
            max_size=4,
            acquire_timeout=2,
            request_timeout=2,
            connect_timeout=2,
            fail_fast=fail_fast,
            # backoff_initial, backoff_max (10 s) and probe_interval stay at their defaults.
        )
        p = Pool(reactor, config)
        p.start()
        return p

    loads = {
        "plain": Load(reactor, pool(False), callers),
        "fast": Load(reactor, pool(True), callers),
    }
    while True:
        line = (await threads.deferToThread(sys.stdin.readline)).split()
        if not line or line[0] == "quit":
            break
        answer = await handle(reactor, loads, line[0], line[1:])
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    for load in loads.values():
        await load.pool.close()


if __name__ == "__main__":
    task.react(lambda reactor: ensureDeferred(main(reactor, sys.argv[1], int(sys.argv[2]))))

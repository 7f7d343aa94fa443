"""Cluster figures: three daemons, one redis-server, a subscriber on each node (docs/cluster.md).

Phases, each on a fresh channel:

1. latency from publish to the *last* of the three subscribers, p50/p99, at each ``--rates``;
2. kill -9 of one daemon under load: how long until the others' ``GET /clients`` no longer
   list its sessions, and its subscriber, moved to another node with ``since``, counted by
   offset: lost and duplicated publications;
3. Redis stopped for ``--redis-down`` seconds and restarted, under load: publications
   acknowledged to a publisher that some subscriber never received *and was not told about*
   (``on_not_recovered``): the silent losses.

Publishers are one connection per node sending ``publish`` (``channels.client_publish``);
subscribers use heartbeatd's client library (`heartbeatd.client.channels`).

    .venv/bin/python bench/cluster.py [--rates 500 5000] [--seconds 5] [--json out.json]

``--pin nodes=0,redis=1,driver=1`` pins the processes to CPUs (``sched_setaffinity``, as
``taskset`` does): ``nodes``, ``node0``, ``node1``..., ``redis`` and ``driver`` (this
process), each a CPU list (``0``, ``0-1``, ``0,2``).  ``--nodes 2`` runs two daemons, and
``--latency-only`` skips the failure phases.  Each latency figure comes with the load average
before and after it, and the CPU each process spent per publication (Redis too).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from daemon import Daemon
from redis_server import RedisServer
from test_admin import ADMIN, http
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, ensureDeferred

from heartbeatd.client import connect
from heartbeatd.client.channels import Subscription, channels_of

NODE_TIMEOUT = 3.0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sleep(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


class Subscriber:
    """One application subscriber: counts every frame by offset, and what it was told."""

    def __init__(self, name: str, channel: str) -> None:
        self.name = name
        self.received: dict[int, float] = {}
        self.duplicates = 0
        self.not_recovered: list[tuple[str, str, int]] = []
        self.sub = Subscription(channel, self._publication, self._lost)
        self.conn: Any = None
        self.epochs: dict[int, str] = {}

    def _publication(self, data: Any, offset: int, sub: Subscription) -> None:
        if offset in self.received and self.epochs.get(offset) == sub.epoch:
            self.duplicates += 1
        self.received[offset] = time.time()
        self.epochs[offset] = sub.epoch

    def _lost(self, sub: Subscription, reason: str) -> None:
        self.not_recovered.append((reason, sub.epoch, sub.offset))

    async def attach(self, port: int) -> None:
        self.conn = await connect(reactor, f"tcp:host=127.0.0.1:port={port}")
        await channels_of(self.conn).attach(self.sub)


class Publisher:
    """Sends publishes at a rate; remembers each acknowledged offset and its send time."""

    def __init__(self, port: int, channel: str) -> None:
        self.port = port
        self.channel = channel
        self.acked: dict[int, tuple[str, float]] = {}
        self.errors: dict[str, int] = {}
        self.conn: Any = None

    async def start(self) -> None:
        self.conn = await connect(reactor, f"tcp:host=127.0.0.1:port={self.port}")

    def send(self) -> None:
        if self.conn is None or not self.conn.connected:
            self.errors["disconnected"] = self.errors.get("disconnected", 0) + 1
            return
        sent = time.time()
        d = self.conn.request("publish", {"channel": self.channel, "data": {"t": sent}})

        def ok(answer: dict[str, Any]) -> None:
            self.acked[answer["offset"]] = ("", sent)

        def failed(f: Any) -> None:
            code = getattr(f.value, "code", type(f.value).__name__)
            self.errors[code] = self.errors.get(code, 0) + 1

        d.addCallbacks(ok, failed)


async def load(publishers: list[Publisher], rate: int, seconds: float) -> None:
    """Send ``rate`` publishes a second (by elapsed time, so slow ticks catch up) round-robin
    over the connected publishers."""
    start = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(rate * elapsed)
        while sent < due:
            live = [p for p in publishers if p.conn is not None and p.conn.connected]
            (live or publishers)[sent % len(live or publishers)].send()
            sent += 1
        await sleep(0.005)


#: Publisher connections per node in the latency phases (each server connection has at most
#: limits.max_pending_requests publishes in flight, so one connection caps the rate).
PUBLISHERS_PER_NODE = 4

#: Seconds to wait for in-flight publications after a phase (``--quick`` shortens it).
DRAIN = 2.0


async def drain() -> None:
    await sleep(DRAIN)


def cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split("+"):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def pin(spec: str, nodes: list[Any], redis: RedisServer) -> dict[str, list[int]]:
    """Apply ``role=cpus,...`` (see the module docstring); return what was pinned."""
    done: dict[str, list[int]] = {}
    for item in filter(None, spec.split(",")):
        role, _, cpus_text = item.partition("=")
        cpus = cpu_list(cpus_text)
        if role == "nodes":
            targets = {f"node{i}": n.daemon.process.pid for i, n in enumerate(nodes)}
        elif role.startswith("node"):
            targets = {role: nodes[int(role[4:])].daemon.process.pid}
        elif role == "redis":
            assert redis.process is not None
            targets = {"redis": redis.process.pid}
        elif role == "driver":
            targets = {"driver": os.getpid()}
        else:
            raise SystemExit(f"--pin: unknown role {role!r}")
        for name, pid in targets.items():
            os.sched_setaffinity(pid, cpus)
            done[name] = sorted(cpus)
    return done


async def latency_phase(
    nodes: list[Any], rate: int, seconds: float, redis_pid: int | None = None
) -> dict[str, Any]:
    ports = [n.port for n in nodes]
    pids = [n.daemon.process.pid for n in nodes]
    load_before = os.getloadavg()[0]
    redis_before = cpu_seconds(redis_pid) if redis_pid else 0.0
    channel = f"lat{rate}"
    subs = [Subscriber(f"s{i}", channel) for i in range(len(ports))]
    for s, port in zip(subs, ports, strict=True):
        await s.attach(port)
    pubs = [Publisher(port, channel) for port in ports for _ in range(PUBLISHERS_PER_NODE)]
    for p in pubs:
        await p.start()
    cpu_before = [cpu_seconds(pid) for pid in pids] + [cpu_seconds(os.getpid())]
    await load(pubs, rate, seconds)
    await drain()
    cpu = [cpu_seconds(pid) for pid in pids] + [cpu_seconds(os.getpid())]
    cpu = [after - before for after, before in zip(cpu, cpu_before, strict=True)]
    redis_cpu = cpu_seconds(redis_pid) - redis_before if redis_pid else 0.0
    acked: dict[int, float] = {}
    for p in pubs:
        acked.update({o: t for o, (_, t) in p.acked.items()})
    latencies = []
    for offset, sent in acked.items():
        times = [s.received.get(offset) for s in subs]
        if all(t is not None for t in times):
            latencies.append(max(times) - sent)  # type: ignore[arg-type]
    for c in [s.conn for s in subs] + [p.conn for p in pubs]:
        c.close()
    return {
        "rate": rate,
        "published": len(acked),
        "achieved_per_s": round(len(acked) / seconds),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "not_delivered": len(acked) - len(latencies),
        # CPU per publication: each daemon (publish + fan-out to its subscriber), and the
        # driver (publishers and all subscribers); capacity on one core = 1e6 / these.
        "daemon_cpu_us_per_pub": [round(c * 1e6 / max(1, len(acked)), 1) for c in cpu[:-1]],
        "driver_cpu_us_per_pub": round(cpu[-1] * 1e6 / max(1, len(acked)), 1),
        "redis_cpu_us_per_pub": round(redis_cpu * 1e6 / max(1, len(acked)), 1),
        "errors": {k: v for p in pubs for k, v in p.errors.items()},
        "load1_before": round(load_before, 2),
        "load1_after": round(os.getloadavg()[0], 2),
    }


def count_losses(subs: list[Subscriber], acked: dict[int, Any]) -> dict[str, int]:
    lost = dup = told = 0
    for s in subs:
        dup += s.duplicates
        told += len(s.not_recovered)
        for offset in acked:
            if offset not in s.received and not s.not_recovered:
                lost += 1
    return {"lost_silently": lost, "duplicated": dup, "not_recovered_notices": told}


async def kill_phase(nodes: list[Any], rate: int, seconds: float) -> dict[str, Any]:
    channel = "kill"
    ports = [n.port for n in nodes]
    subs = [Subscriber(f"s{i}", channel) for i in range(len(ports))]
    for s, port in zip(subs, ports, strict=True):
        await s.attach(port)
    pubs = [Publisher(port, channel) for port in ports]
    for p in pubs:
        await p.start()
    victim = nodes[2]
    victim_sessions = {
        c["session"]
        for c in http(nodes[0].admin, "GET", "/clients")[1]["clients"]
        if c["node"] == "node2"
    }
    loading = ensureDeferred(load(pubs, rate, seconds))
    await sleep(seconds / 3)
    victim.daemon.process.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    await sleep(0.05)
    await subs[2].attach(ports[0])  # its client reconnects elsewhere, with since
    gone_after = None
    while time.monotonic() - killed < 4 * NODE_TIMEOUT:
        listing = http(nodes[1].admin, "GET", "/clients")[1]["clients"]
        if not victim_sessions & {c["session"] for c in listing}:
            gone_after = time.monotonic() - killed
            break
        await sleep(0.05)
    await loading
    await drain()
    acked: dict[int, Any] = {}
    for p in pubs:
        acked.update(p.acked)
    result = {
        "rate": rate,
        "published": len(acked),
        "sessions_gone_after_s": None if gone_after is None else round(gone_after, 2),
        "node_timeout_s": NODE_TIMEOUT,
        **count_losses(subs, acked),
    }
    for c in [s.conn for s in subs] + [p.conn for p in pubs[:2]]:
        c.close()
    return result


async def redis_phase(
    nodes: list[Any], redis: RedisServer, rate: int, down: float
) -> dict[str, Any]:
    channel = "redis"
    ports = [n.port for n in nodes[:2]]
    subs = [Subscriber(f"s{i}", channel) for i in range(len(ports))]
    for s, port in zip(subs, ports, strict=True):
        await s.attach(port)
    pubs = [Publisher(port, channel) for port in ports]
    for p in pubs:
        await p.start()
    before: dict[int, Any] = {}
    await load(pubs, rate, min(2.0, down))
    for p in pubs:
        before.update(p.acked)
        p.acked.clear()
    redis.stop()
    await load(pubs, rate, down)
    redis.start()
    await load(pubs, rate, min(3.0, down))
    await drain()
    after: dict[int, Any] = {}
    for p in pubs:
        after.update(p.acked)
    # Before the stop: every subscriber must hold them all (nothing was lost then).
    lost_before = sum(1 for s in subs for o in before if o not in s.received)
    # After the restart (a new epoch, since Redis kept nothing): offsets of the new epoch.
    lost_after = 0
    for s in subs:
        for o in after:
            missing = s.received.get(o) is None or s.epochs.get(o) != s.sub.epoch
            if missing and not s.not_recovered:
                lost_after += 1
    result = {
        "rate": rate,
        "redis_down_s": down,
        "published_before": len(before),
        "published_after": len(after),
        "refused_while_down": {k: v for p in pubs for k, v in p.errors.items()},
        "lost_silently": lost_before + lost_after,
        "duplicated": sum(s.duplicates for s in subs),
        "not_recovered_notices": sum(len(s.not_recovered) for s in subs),
    }
    for c in [s.conn for s in subs] + [p.conn for p in pubs]:
        c.close()
    return result


class Node:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.port = daemon.port
        self.admin = int(daemon.wait_for(ADMIN).group(1))


def start_nodes(
    tmp: Path, redis: RedisServer, count: int = 3, profile: Path | None = None
) -> list[Node]:
    """Start the daemons; with ``profile``, node0 runs under cProfile (twistd --profile) and
    writes its statistics there when it stops."""
    nodes = []
    for i in range(count):
        directory = tmp / f"node{i}"
        directory.mkdir(exist_ok=True)
        config = {
            "name": f"node{i}",
            "admin": {"listen": "tcp:0:interface=127.0.0.1"},
            "channels": {"client_publish": True, "history_size": 100_000},
            "cluster": {"redis": redis.url, "node_id": f"node{i}", "node_timeout": NODE_TIMEOUT},
        }
        daemon = Daemon(directory, config)
        if profile is not None and i == 0:
            daemon.argv[1:1] = [f"--profile={profile}", "--profiler=cprofile", "--savestats"]
        try:
            daemon.__enter__()
            nodes.append(Node(daemon))
        except BaseException:
            daemon.__exit__()
            for node in nodes:
                node.daemon.__exit__()
            raise
    return nodes


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp())
    results: dict[str, Any] = {"latency": []}
    with RedisServer(tmp / "redis") as redis:
        nodes = start_nodes(tmp, redis, args.nodes, args.profile)
        try:
            if args.pin:
                results["pinned"] = pin(args.pin, nodes, redis)
            await sleep(1)
            assert redis.process is not None
            for rate in args.rates:
                results["latency"].append(
                    await latency_phase(nodes, rate, args.seconds, redis.process.pid)
                )
                print(json.dumps(results["latency"][-1]), flush=True)
            if args.latency_only:
                return results
            results["kill"] = await kill_phase(nodes, args.kill_rate, args.seconds)
            print(json.dumps(results["kill"]), flush=True)
            results["redis_restart"] = await redis_phase(
                nodes, redis, args.kill_rate, args.redis_down
            )
            print(json.dumps(results["redis_restart"]), flush=True)
        finally:
            if args.profile is not None:  # a clean stop writes the statistics
                nodes[0].daemon.stop(signal.SIGTERM)
            for n in nodes:
                n.daemon.__exit__()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[500, 5000])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--kill-rate", type=int, default=1000)
    parser.add_argument("--redis-down", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--pin", default="", help="e.g. nodes=0,redis=1,driver=1")
    parser.add_argument("--latency-only", action="store_true")
    parser.add_argument("--profile", type=Path, help="node0's cProfile statistics go here")
    parser.add_argument("--quick", action="store_true", help="tiny run, for the smoke test")
    args = parser.parse_args()
    if args.quick:
        global DRAIN
        DRAIN = 1.5
        args.rates, args.seconds, args.kill_rate, args.redis_down = [100], 1.0, 100, 0.5
    out: dict[str, Any] = {}

    def finished(result: Any) -> None:
        out["result"] = result
        reactor.stop()

    def failed(f: Any) -> None:
        f.printTraceback()
        reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(run(args)).addCallbacks(finished, failed))
    reactor.run()
    if "result" in out:
        if args.json:
            args.json.write_text(json.dumps(out["result"], indent=2))
        print(json.dumps(out["result"], indent=2))


if __name__ == "__main__":
    main()

"""Soak: hours of churn compressed into minutes, watching for leaks and miscounts.

One supervisor with two workers and a redis-server (``--mode workers``, the default), or one
daemon without Redis (``--mode single``).  Throughout the run:

* thousands of connections churn: each connects, subscribes to a channel, sends ``echo``
  requests (their round trip is the reply latency) and ends after a random lifetime, in one of
  three ways: a clean close, a reset (RST, ``abortConnection``), or as a *slow reader* that
  stops reading the ``firehose`` channel (the server evicts it, or it closes at its end);
* publishers publish to every channel (8 KiB ones to ``firehose``), and ``POST /broadcast``
  reaches every client once a second;
* SIGHUP reloads every ``--hup-every`` seconds; one worker is killed -9 at ``--kill-at`` of
  the run (the supervisor replaces it; its clients see their connection reset).

Every ``--sample`` seconds it records each process's RSS and open fds, Redis's memory, the
reply p99 of that window, errors by type, and every connection's fate as this side saw it
next to the server's own counters (``/metrics``).  Pass: after the warm-up, RSS and fds grow
less than 5%, no untyped error (an ``internal_error`` frame, a traceback in a log), and the
client-side and server-side counts agree: connections the clients saw open == the workers'
``accepted``; closes the clients saw come from the server == the workers' evictions; and, once
every client has gone, no connection left open on the server.

    .venv/bin/python bench/soak.py [--minutes 10] [--mode workers|single] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import struct
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from daemon import READY, Daemon  # noqa: E402
from redis_server import RedisServer  # noqa: E402
from test_admin import ADMIN  # noqa: E402
from twisted.internet import protocol, reactor, task  # noqa: E402
from twisted.internet.defer import ensureDeferred  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402

ALL_READY = re.compile(r"heartbeatd is ready: (\d+) workers serving")
STARTED = re.compile(r"Worker (\d+) started \(pid (\d+)\)")
METRIC = re.compile(r"^(heartbeatd_[a-z_]+?)(?:_total)?(?:\{([^}]*)\})? (\S+)$", re.MULTILINE)
#: Codes a client may legitimately be told (typed, documented); anything else is untyped.
TYPED = {
    "unavailable",
    "overloaded",
    "slow_consumer",
    "heartbeat_timeout",
    "too_many_connections",
    "shutdown",
}
CHANNELS = 20
FIREHOSE = "firehose"
UNTYPED_LOG = re.compile(r"Traceback \(most recent call last\)|Unhandled error|Unhandled Error")


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def redis_memory(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"INFO memory\r\n")
        data = b""
        while b"used_memory:" not in data or not data.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    m = re.search(rb"used_memory:(\d+)", data)
    return int(m.group(1)) if m else 0


def http_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


def http_post(port: int, path: str, body: Any) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def server_counts(metrics: str) -> dict[str, dict[str, float]]:
    """Per worker (label, "0" without workers): accepted, connections, evicted, errors."""
    out: dict[str, dict[str, float]] = {}
    for name, labels, value in METRIC.findall(metrics):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        worker = fields.get("worker", "0")
        mine = out.setdefault(worker, Counter())
        if name == "heartbeatd_connections_accepted":
            mine["accepted"] += float(value)
        elif name == "heartbeatd_connections" and not fields.get("reason"):
            mine["connections"] += float(value)
        elif name == "heartbeatd_evicted":
            mine[f"evicted:{fields.get('reason')}"] += float(value)
            mine["evicted"] += float(value)
        elif name == "heartbeatd_errors":
            mine[f"error:{fields.get('code')}"] += float(value)
        elif name == "heartbeatd_connections_refused":
            mine["refused"] += float(value)
    return out


# -- the load ---------------------------------------------------------------------------------


class Stats:
    def __init__(self) -> None:
        self.fates: Counter[str] = Counter()  # cumulative
        self.errors: Counter[str] = Counter()  # error frames by code, cumulative
        self.rtts: list[float] = []  # this window's echo round trips
        self.open = 0
        self.connecting = 0
        self.publications = 0
        self.broadcasts = 0


class Client(protocol.Protocol):
    """One churning client; ``kind`` is how it will end: close, rst or slow."""

    def __init__(self, soak: Soak, kind: str, lifetime: float) -> None:
        self.soak = soak
        self.kind = kind
        self.lifetime = lifetime
        self.buffer = b""
        self.sent: dict[int, float] = {}
        self.ids = 0
        self.ending = False  # we started the close
        self.hello = False
        self.told: str | None = None  # the last error code the server sent
        self.resumed = False
        self.session: str | None = None
        self.timers: list[Any] = []

    def connectionMade(self) -> None:
        stats = self.soak.stats
        stats.fates["connected"] += 1
        stats.connecting -= 1
        stats.open += 1
        self.soak.clients.add(self)
        if self.kind == "slow":
            sock = self.transport.getHandle()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        channel = FIREHOSE if self.kind == "slow" else f"ch{random.randrange(CHANNELS)}"
        self.send("subscribe", {"channel": channel})
        self.timers.append(reactor.callLater(self.lifetime, self.end))
        if self.kind == "slow":
            self.timers.append(reactor.callLater(1.0, self.transport.pauseProducing))
        else:
            self.echo = task.LoopingCall(self.send, "echo", {"t": 1})
            self.echo.start(random.uniform(0.5, 2.0), now=False)

    def send(self, type_: str, data: Any) -> None:
        self.ids += 1
        self.sent[self.ids] = time.monotonic()
        body = json.dumps({"type": type_, "id": self.ids, "data": data}).encode()
        self.transport.write(struct.pack("!I", len(body)) + body)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 4:
            (n,) = struct.unpack("!I", self.buffer[:4])
            if len(self.buffer) < 4 + n:
                return
            body, self.buffer = self.buffer[4 : 4 + n], self.buffer[4 + n :]
            self.message(json.loads(body))

    def message(self, m: dict[str, Any]) -> None:
        kind = m.get("type")
        stats = self.soak.stats
        if kind == "hello":
            self.hello = True
            self.session = m.get("data", {}).get("session")
        elif kind == "ping":
            body = json.dumps({"type": "pong", "id": m.get("id")}).encode()
            self.transport.write(struct.pack("!I", len(body)) + body)
        elif kind == "error":
            code = m.get("error", {}).get("code")
            stats.errors[str(code)] += 1
            self.told = str(code)
            self.sent.pop(m.get("id"), None)
        elif kind == "publication":
            stats.publications += 1
        elif kind == "bench":
            stats.broadcasts += 1
        elif kind == "pong" and m.get("id") == "last":
            self.end()  # the server still had us: closing is ours
        elif kind == "echo":
            sent = self.sent.pop(m.get("id"), None)
            if sent is not None:
                stats.rtts.append(time.monotonic() - sent)
        else:
            self.sent.pop(m.get("id"), None)

    def end(self) -> None:
        if self.ending or not self.transport.connected:
            return
        if self.kind == "slow" and not self.resumed:
            # Read again first, and close once the server answers a ping: a paused reader
            # would not see that the server closed it (perhaps still flushing to it).
            self.resumed = True
            self.transport.resumeProducing()
            body = json.dumps({"type": "ping", "id": "last"}).encode()
            self.transport.write(struct.pack("!I", len(body)) + body)
            self.timers.append(reactor.callLater(20.0, self.end))
            return
        self.ending = True
        if self.kind == "rst":
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        for timer in self.timers:
            if timer.active():
                timer.cancel()
        if getattr(self, "echo", None) is not None and self.echo.running:
            self.echo.stop()
        stats = self.soak.stats
        stats.open -= 1
        self.soak.clients.discard(self)
        if self.ending:
            stats.fates[f"closed_by_us:{self.kind}"] += 1
        elif self.session in self.soak.killed_sessions:
            stats.fates["lost_with_killed_worker"] += 1
        else:
            stats.fates[f"closed_by_server:{self.kind}:{self.told or 'no_error_frame'}"] += 1
            stats.fates["closed_by_server"] += 1


class ClientFactory(protocol.ClientFactory):
    def __init__(self, soak: Soak, kind: str, lifetime: float) -> None:
        self.soak, self.kind, self.lifetime = soak, kind, lifetime

    def buildProtocol(self, addr: Any) -> Client:
        return Client(self.soak, self.kind, self.lifetime)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.soak.stats.fates[f"connect_failed:{reason.type.__name__}"] += 1
        self.soak.stats.fates["connect_failed"] += 1
        self.soak.stats.connecting -= 1


class Publisher(Client):
    """Publishes to every channel at a rate, for the whole run (never churned)."""

    def connectionMade(self) -> None:
        self.soak.stats.fates["publisher_connected"] += 1
        self.soak.publishers.add(self)
        self.loop = task.LoopingCall(self.tick)
        self.loop.start(0.1, now=False)
        self.n = 0

    def tick(self) -> None:
        rate = self.soak.args.publish_rate / 10 / self.soak.args.publishers
        for _ in range(max(1, int(rate))):
            self.n += 1
            if self.n % 5 == 0:
                self.send("publish", {"channel": FIREHOSE, "data": "x" * 8192})
            else:
                self.send("publish", {"channel": f"ch{self.n % CHANNELS}", "data": self.n})

    def connectionLost(self, reason: Any) -> None:
        self.soak.publishers.discard(self)
        if self.loop.running:
            self.loop.stop()
        if not self.soak.finishing:
            self.soak.stats.fates["publisher_lost"] += 1
            reactor.callLater(0.5, self.soak.start_publisher)


class Soak:
    def __init__(self, args: argparse.Namespace, port: int, admin: int) -> None:
        self.args = args
        self.port = port
        self.admin = admin
        self.stats = Stats()
        self.clients: set[Client] = set()
        self.publishers: set[Publisher] = set()
        #: Sessions of the worker that was killed -9 (their resets are not evictions).
        self.killed_sessions: set[str | None] = set()
        self.paused = False
        self.finishing = False

    def start_publisher(self) -> None:
        factory = protocol.ClientFactory()
        factory.buildProtocol = lambda addr: Publisher(self, "publisher", 1e9)  # type: ignore
        reactor.connectTCP("127.0.0.1", self.port, factory)

    def churn(self) -> None:
        """Every 0.1 s: open new clients up to the target (at most the churn rate)."""
        if self.paused or self.finishing:
            return
        args = self.args
        budget = max(1, int(args.churn / 10))
        missing = args.conns - self.stats.open - self.stats.connecting
        for _ in range(min(budget, max(0, missing))):
            r = random.random()
            kind = "rst" if r < 0.15 else "slow" if r < 0.20 else "close"
            lifetime = random.uniform(args.lifetime / 2, args.lifetime * 1.5)
            self.stats.fates["attempted"] += 1
            self.stats.connecting += 1
            reactor.connectTCP("127.0.0.1", self.port, ClientFactory(self, kind, lifetime))


# -- the run ---------------------------------------------------------------------------------


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    workers = args.mode == "workers"
    config: dict[str, Any] = {
        "name": "soak",
        "listen": "tcp:0:interface=127.0.0.1:backlog=4096",
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
        "channels": {"client_publish": True, "history_size": 100, "history_ttl": 60},
        "heartbeat": {"interval": 5, "timeout": 15},
        "limits": {"max_outbound_buffer_bytes": 256 * 1024},
        "shutdown": {"drain_timeout": 1, "close_timeout": 5},
        "log": {"level": "info"},
    }
    redis = None
    if workers:
        redis = RedisServer(tmp / "redis")
        redis.start()
        config["workers"] = 2
        config["cluster"] = {"redis": redis.url, "node_id": "soak", "node_timeout": 10}
    daemon = Daemon(tmp, config, ready=ALL_READY if workers else READY)
    daemon.__enter__()
    result: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "samples": [],
        "events": [],
    }
    try:
        admin = int(daemon.wait_for(ADMIN).group(1))
        soak = Soak(args, daemon.port, admin)
        assert daemon.process is not None
        supervisor = daemon.process.pid

        def pids() -> dict[str, int]:
            out = {"supervisor" if workers else "daemon": supervisor}
            for line in daemon.lines:
                if m := STARTED.search(line):
                    out[f"worker{m.group(1)}"] = int(m.group(2))
            return out

        for _ in range(args.publishers):
            soak.start_publisher()
        churn = task.LoopingCall(soak.churn)
        churn.start(0.1)

        def broadcast() -> None:
            deferToThread(http_post, admin, "/broadcast", {"type": "bench", "data": 1})

        broadcaster = task.LoopingCall(broadcast)
        broadcaster.start(1.0, now=False)

        started = time.monotonic()
        duration = args.minutes * 60
        next_hup = args.hup_every
        kill_at = duration * args.kill_at if workers else None
        last_errors: Counter[str] = Counter()
        while (elapsed := time.monotonic() - started) < duration:
            await sleep(min(args.sample, duration - elapsed))
            elapsed = time.monotonic() - started
            if elapsed >= next_hup:
                next_hup += args.hup_every
                os.kill(supervisor, signal.SIGHUP)
                result["events"].append({"t": round(elapsed, 1), "event": "SIGHUP"})
            if kill_at is not None and elapsed >= kill_at:
                kill_at = None
                await kill_worker(soak, daemon, admin, pids(), result, elapsed)
            sample = await take_sample(soak, admin, pids(), redis, last_errors)
            sample["t"] = round(elapsed, 1)
            result["samples"].append(sample)
            print(json.dumps(sample), flush=True)

        # The end: no new clients; every client closes; the server must be left with none.
        soak.finishing = True
        churn.stop()
        broadcaster.stop()
        for client in [*soak.clients, *soak.publishers]:
            client.end()
        for _ in range(200):
            if soak.stats.open == 0:
                break
            await sleep(0.1)
        for client in list(soak.clients):  # still waiting for its last pong: abort it
            client.ending = True
            client.transport.abortConnection()
        await sleep(2)
        final = await take_sample(soak, admin, pids(), redis, last_errors)
        final["t"] = round(time.monotonic() - started, 1)
        result["final"] = final
        result["untyped_log_lines"] = [line for line in daemon.lines if UNTYPED_LOG.search(line)]
        result["verdict"] = verdict(result, args)
    finally:
        daemon.__exit__()
        if redis is not None:
            redis.stop()
    return result


async def kill_worker(
    soak: Soak,
    daemon: Daemon,
    admin: int,
    pids: dict[str, int],
    result: dict[str, Any],
    elapsed: float,
) -> None:
    """kill -9 worker 1, with the counters it had (no connection may start meanwhile)."""
    soak.paused = True
    # Paused readers read for a moment: one the server is closing (still flushing to it) is
    # then gone before the worker's clients are listed, so no close is counted twice.
    paused = [c for c in soak.clients if c.kind == "slow" and not c.resumed]
    for client in paused:
        client.transport.resumeProducing()
    await sleep(2.0)  # connects in flight land, closes finish
    # The supervisor carries a replaced worker's counters over to its successor, as of its
    # last scrape of it: scrape now, with no connection starting, so none is missed.
    metrics = await deferToThread(http_get, admin, "/metrics")
    before = server_counts(metrics).get("1", Counter())
    listing = json.loads(await deferToThread(http_get, admin, "/clients"))
    soak.killed_sessions = {c["session"] for c in listing["clients"] if c["node"] == "soak-w1"}
    os.kill(pids["worker1"], signal.SIGKILL)
    lost_before = soak.stats.fates["lost_with_killed_worker"]
    await sleep(1.0)
    for client in paused:
        if client.transport.connected and not client.resumed:
            client.transport.pauseProducing()
    result["events"].append(
        {
            "t": round(elapsed, 1),
            "event": "kill -9 worker 1",
            "its_clients": int(before.get("connections", 0)),
            "client_saw_reset": soak.stats.fates["lost_with_killed_worker"] - lost_before,
        }
    )
    daemon.wait_for(r"Worker 1 \(pid \d+\) serving again", timeout=60)
    soak.paused = False


async def take_sample(
    soak: Soak,
    admin: int,
    pids: dict[str, int],
    redis: RedisServer | None,
    last_errors: Counter[str],
) -> dict[str, Any]:
    # Read before the request too: answering it, the supervisor holds a connection to us and
    # one to each worker for a moment, and their close may lag our read by a reactor turn.
    fds_before = {name: open_fds(pid) for name, pid in pids.items()}
    metrics = await deferToThread(http_get, admin, "/metrics")
    per_worker = server_counts(metrics)
    server: Counter[str] = Counter()
    for counts in per_worker.values():
        server.update(counts)
    stats = soak.stats
    rtts, stats.rtts = stats.rtts, []
    window_errors = stats.errors - last_errors
    last_errors.clear()
    last_errors.update(stats.errors)
    p99 = percentile(rtts, 0.99)
    fds = {name: open_fds(pid) for name, pid in pids.items()}
    # A serving process's fds minus its open connections: what would show a leak, whatever
    # the share of clients each worker happens to hold at the moment.  A process that holds
    # no clients (the supervisor) counts the smaller of its two readings: a leak shows in
    # both, the request's own connections in one.
    overhead = {name: min(n, fds_before.get(name, n)) for name, n in fds.items()}
    for label, counts in per_worker.items():
        name = f"worker{label}" if f"worker{label}" in fds else "daemon"
        if name in overhead:
            overhead[name] = fds[name] - int(counts.get("connections", 0))
    return {
        "rss_mb": {name: round(rss(pid) / 2**20, 1) for name, pid in pids.items()},
        "fds": fds,
        "fds_less_connections": overhead,
        "pids": pids,
        "redis_memory_mb": round(redis_memory(redis.port) / 2**20, 2) if redis else None,
        "open_clients": stats.open,
        "server_connections": int(server["connections"]),
        "echo_p99_ms": None if p99 is None else round(p99 * 1000, 2),
        "echoes": len(rtts),
        "errors_window": dict(window_errors),
        "client": dict(stats.fates),
        "server": {k: int(v) for k, v in sorted(server.items()) if k != "connections"},
        "publications_received": stats.publications,
        "broadcasts_received": stats.broadcasts,
        "load1": os.getloadavg()[0],
    }


def growth(
    samples: list[dict[str, Any]], key: str, warmup: float, base_key: str | None = None
) -> dict[str, float | None]:
    """Per process (its own pid): the median of the last three samples of ``key`` less the
    median of the first three after warm-up, in percent of the latter, or of ``base_key``'s
    (fds: the change in descriptors beyond the open connections, over all its descriptors;
    under churn the connection count and the fd count are read a moment apart, so the
    difference alone swings by a few percent of the connections)."""
    out: dict[str, float | None] = {}
    names = samples[-1][key].keys() if samples else []
    for name in names:
        pid = samples[-1]["pids"].get(name)
        mine = [s for s in samples if s["pids"].get(name) == pid]
        if not mine:
            continue
        born = mine[0]["t"]
        steady = [s for s in mine if s["t"] >= born + warmup]
        if len(steady) < 3:
            out[name] = None
            continue
        first = sorted(s[key][name] for s in steady[:3])[1]
        last = sorted(s[key][name] for s in steady[-3:])[1]
        base = sorted(s[base_key or key][name] for s in steady[:3])[1]
        out[name] = round((last - first) / base * 100, 1) if base else None
    return out


def verdict(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    samples = result["samples"]
    warmup = args.minutes * 60 * args.warmup
    final = result["final"]
    client, server = final["client"], final["server"]
    errors: Counter[str] = Counter()
    for s in samples:
        errors.update(s["errors_window"])
    untyped = {code: n for code, n in errors.items() if code not in TYPED}
    rss_growth = growth(samples, "rss_mb", warmup)
    fd_growth = growth(samples, "fds_less_connections", warmup, base_key="fds")
    connected = client.get("connected", 0) + client.get("publisher_connected", 0)
    by_server = client.get("closed_by_server", 0)
    checks = {
        "rss_growth_under_5pct": all(g is None or g < 5 for g in rss_growth.values()),
        "fds_growth_under_5pct": all(g is None or g < 5 for g in fd_growth.values()),
        "no_untyped_errors": not untyped and not result["untyped_log_lines"],
        "accepted_equals_connected": server.get("accepted", 0) == connected,
        "evicted_equals_closed_by_server": server.get("evicted", 0) == by_server,
        "none_left_open": final["server_connections"] == 0 and final["open_clients"] == 0,
    }
    return {
        "pass": all(checks.values()),
        "checks": checks,
        "rss_growth_pct": rss_growth,
        "fds_growth_pct": fd_growth,
        "untyped_errors": untyped,
        "errors_total": dict(errors),
        "client_connected": connected,
        "server_accepted": server.get("accepted", 0),
        "client_closed_by_server": by_server,
        "server_evicted": server.get("evicted", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--mode", choices=["workers", "single"], default="workers")
    parser.add_argument("--conns", type=int, default=2000, help="clients open at once")
    parser.add_argument("--churn", type=float, default=100.0, help="new connections a second")
    parser.add_argument("--lifetime", type=float, default=20.0, help="mean client life (s)")
    parser.add_argument("--publish-rate", type=float, default=100.0)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--sample", type=float, default=10.0)
    parser.add_argument("--hup-every", type=float, default=60.0)
    parser.add_argument("--kill-at", type=float, default=0.4, help="fraction of the run")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of the run")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="a few seconds, for the smoke test")
    parser.add_argument("--verdict", type=Path, help="only judge a saved --json run again")
    args = parser.parse_args()
    if args.verdict:
        saved = json.loads(args.verdict.read_text())
        saved_args = argparse.Namespace(**{**vars(args), **saved["args"]})
        print(json.dumps(verdict(saved, saved_args), indent=2))
        return
    if args.quick:
        args.minutes, args.conns, args.churn, args.lifetime = 0.25, 100, 50.0, 3.0
        args.sample, args.hup_every, args.publish_rate = 2.0, 5.0, 50.0
    out: dict[str, Any] = {}

    def finished(result: Any) -> None:
        out["result"] = result
        reactor.stop()

    def failed(f: Any) -> None:
        f.printTraceback()
        reactor.stop()

    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    reactor.suggestThreadPoolSize(4)
    reactor.callWhenRunning(lambda: ensureDeferred(run(args, tmp)).addCallbacks(finished, failed))
    reactor.run()
    if "result" not in out:
        sys.exit(2)
    result = out["result"]
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result["verdict"], indent=2))
    sys.exit(0 if result["verdict"]["pass"] else 1)


if __name__ == "__main__":
    main()

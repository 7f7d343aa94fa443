"""Workers holding many idle connections: memory, heartbeat sweeps, broadcast to all.

One supervisor with ``--workers`` workers (``workers: N``, docs/deployment.md#workers) and one
redis-server; ``--conns`` idle clients from several load-generator processes
(bench/idle_clients.py), each under the 20,000 open-file limit and each from its own source
address (127.0.0.2, 127.0.0.3, ...), so no address runs out of ephemeral ports.  Measured:

1. the time to open every connection (each answered by a hello), and how the workers share
   them (open connections per worker);
2. memory: each worker's RSS before any client, once all are connected, and after a sweep,
   per connection it holds;
3. the heartbeat: after a mark, whether every connection is pinged within two intervals (a
   client is due once it has been quiet for one), the time from the first to the last ping,
   the longest gap between two pings of one client, and worker 0's last sweep (busy time,
   and its longest batch: the longest stall);
4. ``POST /broadcast`` (through Redis to every worker): the time from the request to the
   last client's delivery, counted at every client;
5. SIGTERM with every client connected: the time until the supervisor exits (every worker
   drained its clients and left the cluster);
6. every connection that ended early: per worker, the server's closes and refusals by reason
   (from its log: each line, plus the rate limiter's "N more suppressed" counts; and from
   ``heartbeatd_evicted_total`` in ``/metrics``, labelled by worker), and per
   load generator, how it ended (reset, end of file, connect failure; before or after hello).

``--inspect`` also has each worker write, at each step, CPython's allocator statistics
(``sys._debugmallocstats``) and its most numerous object types, and reports the growth per
connection: what the RSS per connection is made of.

    .venv/bin/python bench/workers_idle.py [--workers 5] [--conns 99000] [--interval 10]

`measure` is the same run as a function (``make bench``'s workers phase, bench/run.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from daemon import Daemon  # noqa: E402
from redis_server import RedisServer  # noqa: E402
from test_admin import ADMIN, http, metric  # noqa: E402

ALL_READY = re.compile(r"heartbeatd is ready: (\d+) workers serving")
STARTED = re.compile(r"Worker (\d+) started \(pid (\d+)\)")
#: A worker's close line (factory.client_closing) and the limiter's count of those it dropped.
CLOSING = re.compile(r"\[worker (\d+)\] Closing client \S+ \([^)]*\): ([a-z_]+)")
REFUSED = re.compile(r"\[worker (\d+)\] Refused a connection from \S+: (.*)")
SUPPRESSED = re.compile(r"\[worker (\d+)\] (\d+) more '(close:[a-z_]+|refused[a-z_:]*)' log lines")
#: Connections per load-generator process: under the 20,000 open-file limit.
PER_PROCESS = 19_800

# Loaded into each worker with ``--inspect`` (PYTHONPATH): on SIGUSR1, write the allocator's
# statistics and the most numerous object types to a file.  Bench-only, never the daemon.
INSPECTOR = """
import os, signal
if os.environ.get("HEARTBEATD_WORKER"):
    def _dump(signum, frame):
        import gc, sys
        from collections import Counter
        out = os.path.join(os.environ["HEARTBEATD_INSPECT"], "%d.%d" % (os.getpid(), _dump.n))
        _dump.n += 1
        fd = os.open(out + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        saved = os.dup(2)
        try:
            os.dup2(fd, 2)  # _debugmallocstats writes to C stderr
            sys._debugmallocstats()
            sys.stderr.flush()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(fd)
        counts = Counter(type(o).__name__ for o in gc.get_objects())
        with open(out + ".tmp", "a") as f:
            for name, count in counts.most_common(40):
                f.write("TYPE %s %d\\n" % (name, count))
        os.rename(out + ".tmp", out)
    _dump.n = 0
    signal.signal(signal.SIGUSR1, _dump)
"""


def rss(pid: int) -> int:
    """The process's resident memory; 0 once it is gone (a worker that died is reported)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class Generators:
    def __init__(self, port: int, conns: int, count: int | None = None) -> None:
        count = max(count or 0, math.ceil(conns / PER_PROCESS))
        self.procs = []
        for i in range(count):
            share = conns // count + (1 if i < conns % count else 0)
            argv = [
                sys.executable,
                str(HERE / "idle_clients.py"),
                "--port",
                str(port),
                "--conns",
                str(share),
                "--source",
                f"127.0.0.{2 + i}",
            ]
            self.procs.append(
                subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )

    def send(self, command: str) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(command + "\n")
            p.stdin.flush()

    def reports(self) -> list[dict[str, Any]]:
        self.send("report")
        out = []
        for p in self.procs:
            assert p.stdout is not None
            out.append(json.loads(p.stdout.readline()))
        return out

    def total(self, key: str) -> int:
        return sum(r[key] for r in self.reports())

    def close(self) -> None:
        for p in self.procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def note(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def poll(condition: Any, timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)  # a benchmark driver polling a condition, not a test


def closes_by_reason(lines: list[str], workers: int) -> list[dict[str, dict[str, int]]]:
    """Per worker, the server's closes and refusals by reason, read from the daemon's log.

    Each close is logged (rate-limited per reason: the limiter later logs how many lines it
    dropped, and those are added back), so the counts are complete once the log is.
    """
    out: list[dict[str, Counter[str]]] = [
        {"closes": Counter(), "refusals": Counter()} for _ in range(workers)
    ]
    for line in lines:
        if m := CLOSING.search(line):
            out[int(m.group(1))]["closes"][m.group(2)] += 1
        elif m := REFUSED.search(line):
            # The reason, without the counts and addresses that make each line unique.
            out[int(m.group(1))]["refusals"][re.sub(r"[\d.:]*\d", "N", m.group(2))[:60]] += 1
        elif m := SUPPRESSED.search(line):
            index, count, cause = int(m.group(1)), int(m.group(2)), m.group(3)
            if cause.startswith("close:"):
                out[index]["closes"][cause[len("close:") :]] += count
            else:
                out[index]["refusals"][f"(suppressed lines: {cause})"] += count
    return [{k: dict(v) for k, v in worker.items()} for worker in out]


EVICTED = re.compile(
    r'^heartbeatd_evicted_total\{reason="([^"]+)"(?:,worker="(\d+)")?\} (\S+)$', re.MULTILINE
)


def evicted_by_worker(metrics: str, workers: int) -> list[dict[str, int]]:
    """``heartbeatd_evicted_total`` per worker and reason, zeros left out."""
    out: list[dict[str, int]] = [{} for _ in range(workers)]
    for m in EVICTED.finditer(metrics):
        index, count = int(m.group(2) or 0), int(float(m.group(3)))
        if count and index < workers:
            out[index][m.group(1)] = count
    return out


def merge_counts(reports: list[dict[str, Any]], key: str) -> dict[str, int]:
    total: Counter[str] = Counter()
    for r in reports:
        total.update(r.get(key) or {})
    return dict(total)


def malloc_summary(path: Path) -> dict[str, Any]:
    """The figures of one inspector dump: pymalloc's bytes and arenas, object counts."""
    text = path.read_text()

    def number(label: str) -> int:
        m = re.search(rf"^# {label}\s*=\s*([\d,]+)", text, re.MULTILINE)
        return int(m.group(1).replace(",", "")) if m else 0

    return {
        "allocated_blocks": number("bytes in allocated blocks"),
        "available_blocks": number("bytes in available blocks"),
        "arenas": number("arenas allocated current"),
        "arena_bytes": int(m.group(1).replace(",", ""))
        if (m := re.search(r"^Total\s*=\s*([\d,]+)", text, re.MULTILINE))
        else 0,
        "types": {
            m.group(1): int(m.group(2)) for m in re.finditer(r"^TYPE (\S+) (\d+)$", text, re.M)
        },
    }


class Inspector:
    """Asks every worker for an allocator dump (``--inspect``) and reads them back."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "sitecustomize.py").write_text(INSPECTOR)
        self.steps = 0

    def env(self) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(self.directory), os.environ.get("PYTHONPATH")) if p)
        return {"PYTHONPATH": path, "HEARTBEATD_INSPECT": str(self.directory)}

    def dump(self, pids: list[int]) -> list[dict[str, Any]]:
        step = self.steps
        self.steps += 1
        for pid in pids:
            os.kill(pid, signal.SIGUSR1)
        files = [self.directory / f"{pid}.{step}" for pid in pids]
        poll(lambda: all(f.exists() for f in files), 60, 0.2)
        return [malloc_summary(f) for f in files]


def per_conn_growth(
    before: list[dict[str, Any]], after: list[dict[str, Any]], conns: list[int]
) -> list[dict[str, Any]]:
    """Per worker: allocator bytes and object counts gained per connection held."""
    out = []
    for b, a, n in zip(before, after, conns, strict=True):
        n = max(1, n)
        types = {
            name: round((a["types"].get(name, 0) - b["types"].get(name, 0)) / n, 2)
            for name in a["types"]
        }
        out.append(
            {
                "allocated_per_conn": round((a["allocated_blocks"] - b["allocated_blocks"]) / n),
                "available_per_conn": round((a["available_blocks"] - b["available_blocks"]) / n),
                "arena_bytes_per_conn": round((a["arena_bytes"] - b["arena_bytes"]) / n),
                "objects_per_conn": {k: v for k, v in types.items() if abs(v) >= 0.05},
            }
        )
    return out


def measure(
    workdir: Path,
    workers: int = 5,
    conns: int = 99_000,
    interval: float = 10.0,
    *,
    connect_timeout: float = 300.0,
    generators: int | None = None,
    inspect: bool = False,
    say: Callable[[str], None] = note,
    log_path: Path | None = None,
) -> dict[str, Any]:
    """Run the whole measurement once (see the module docstring); the figures as a dict."""
    config: dict[str, Any] = {
        # A deep backlog: with a full one, the kernel answers with SYN cookies and drops the
        # client's last ACK, and a client that never sends stays "connected" to nothing.
        "listen": "tcp:0:interface=127.0.0.1:backlog=4096",
        "workers": workers,
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
        "heartbeat": {"interval": interval, "timeout": interval * 3},
        # The load comes from 127.0.0.2-6: exempt it from the per-address limits; the clients
        # never send first (they only answer pings), so no first-frame deadline either.
        "limits": {"per_address_exempt": ["127.0.0.0/8"], "first_frame_timeout": 0},
        "shutdown": {"drain_timeout": 1, "close_timeout": 10},
        "cluster": {"node_id": "bench", "node_timeout": 10},
    }
    result: dict[str, Any] = {"workers": workers, "conns": conns, "interval": interval}
    inspector = Inspector(workdir / "inspect") if inspect else None
    env = inspector.env() if inspector else None
    with RedisServer(workdir / "redis") as redis:
        config["cluster"]["redis"] = redis.url
        with Daemon(workdir, config, ready=ALL_READY, env=env) as daemon:
            admin = int(daemon.wait_for(ADMIN).group(1))
            pids = [int(m.group(2)) for x in daemon.lines if (m := STARTED.search(x))]
            base_rss = [rss(p) for p in pids]
            base_fds = [open_fds(p) for p in pids]
            dumps = [inspector.dump(pids)] if inspector else []
            say(f"{workers} workers ready; opening {conns} connections")
            gens = Generators(daemon.port, conns, generators)
            try:
                start = time.monotonic()

                def all_hello() -> bool:
                    reports = gens.reports()
                    hello = sum(r["hello"] for r in reports)
                    say(f"hello {hello}, open {sum(r['connections'] for r in reports)}")
                    return hello >= conns

                done = poll(all_hello, connect_timeout)
                result["connect_s"] = round(time.monotonic() - start, 1)
                reports = gens.reports()
                result["hello"] = sum(r["hello"] for r in reports)
                # Connections still open (some may have been closed since their hello).
                result["connected"] = sum(r["connections"] for r in reports)
                result["failed"] = sum(r["failed"] for r in reports)
                result["all_connected"] = bool(done)
                fds = [open_fds(p) for p in pids]
                result["per_worker_fds"] = fds
                held = [f - b for f, b in zip(fds, base_fds, strict=True)]
                result["per_worker_conns"] = held
                connected = [rss(p) for p in pids]
                result["bytes_per_conn_connected"] = round(
                    (sum(connected) - sum(base_rss)) / max(1, result["connected"])
                )
                result["per_worker_bytes_per_conn_connected"] = [
                    round((r - b) / max(1, n))
                    for r, b, n in zip(connected, base_rss, held, strict=True)
                ]
                if inspector:
                    dumps.append(inspector.dump(pids))

                say(f"connected {result['connected']} in {result['connect_s']} s; sweep")
                gens.send("mark")
                marked = time.monotonic()
                # A client is pinged by the first sweep after it has been quiet for an interval
                # (it answered the previous ping at some point in the last one): so every
                # client is pinged within two intervals of the mark.
                poll(lambda: gens.total("pinged") >= result["connected"], interval * 2.5, 0.5)
                reports = gens.reports()
                pinged = sum(r["pinged"] for r in reports)
                firsts = [r["first_ping"] for r in reports if r["first_ping"]]
                lasts = [r["last_ping"] for r in reports if r["last_ping"]]
                result["pinged"] = pinged
                result["all_pinged_within_two_intervals"] = bool(
                    pinged >= result["connected"] and lasts and max(lasts) - marked <= 2 * interval
                )
                result["ping_first_to_last_s"] = (
                    round(max(lasts) - min(firsts), 2) if firsts else None
                )
                # Then each client's next ping: the longest gap between two pings of one client
                # says whether every sweep reaches every client within about one interval.
                poll(lambda: gens.total("pinged_twice") >= result["connected"], interval * 2.5, 0.5)
                reports = gens.reports()
                result["pinged_twice"] = sum(r["pinged_twice"] for r in reports)
                result["longest_ping_gap_s"] = round(max(r["max_gap"] for r in reports), 2)
                _, metrics = http(admin, "GET", "/metrics")
                result["worker0_sweep_ms"] = round(
                    metric(metrics, "heartbeatd_heartbeat_sweep_seconds") * 1000, 1
                )
                result["worker0_longest_batch_ms"] = round(
                    metric(metrics, "heartbeatd_heartbeat_batch_max_seconds") * 1000, 1
                )
                after = [rss(p) for p in pids]
                result["bytes_per_conn_after_ping"] = round(
                    (sum(after) - sum(base_rss)) / max(1, result["connected"])
                )
                result["per_worker_bytes_per_conn_after_ping"] = [
                    round((r - b) / max(1, n))
                    for r, b, n in zip(after, base_rss, held, strict=True)
                ]
                result["worker_rss_mb"] = [round(r / 2**20) for r in after]
                if inspector:
                    dumps.append(inspector.dump(pids))
                    result["inspect"] = {
                        "connected": per_conn_growth(dumps[0], dumps[1], held),
                        "after_ping": per_conn_growth(dumps[0], dumps[2], held),
                    }

                say(f"pinged {pinged}; broadcast")
                t0 = time.monotonic()
                status, _ = http(admin, "POST", "/broadcast", {"type": "bench", "data": 1})
                answered = time.monotonic() - t0
                poll(lambda: gens.total("bench") >= result["connected"], 60, 0.2)
                reports = gens.reports()
                result["broadcast_status"] = status
                result["broadcast_answer_ms"] = round(answered * 1000, 1)
                result["broadcast_delivered"] = sum(r["bench"] for r in reports)
                last = max(r["last_bench"] for r in reports)
                result["broadcast_to_last_ms"] = round((last - t0) * 1000, 1) if last else None
                result["client_closes"] = merge_counts(reports, "closes")
                result["client_errors"] = merge_counts(reports, "errors")
                # Each worker's own counters (/metrics labels every series with its worker),
                # to check the count read from the log against.
                _, metrics = http(admin, "GET", "/metrics")
                result["evicted_metric"] = evicted_by_worker(metrics, workers)

                # SIGTERM with every client still connected: each worker tells its clients to
                # go away, closes the rest after shutdown.drain_timeout, and leaves the cluster.
                say("SIGTERM")
                stop_start = time.monotonic()
                result["supervisor_exit"] = daemon.stop(timeout=120)
                result["stop_s"] = round(time.monotonic() - stop_start, 1)
            finally:
                gens.close()
        if log_path is not None:
            log_path.write_text("\n".join(daemon.lines) + "\n")
        by_worker = closes_by_reason(daemon.lines, workers)
        result["server_closes"] = [w["closes"] for w in by_worker]
        result["server_refusals"] = [w["refusals"] for w in by_worker]
        result["worker_exits"] = [x for x in daemon.lines if "exited unexpectedly" in x]
        result["redis_stalls"] = sum("Redis did not answer" in x for x in daemon.lines)
        result["reactor_stalls"] = sum("Reactor stalled" in x for x in daemon.lines)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=5)
    parser.add_argument("--conns", type=int, default=99_000)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--connect-timeout", type=float, default=300.0)
    parser.add_argument(
        "--generators", type=int, help="load-generator processes (default: 19,800 clients each)"
    )
    parser.add_argument(
        "--inspect", action="store_true", help="allocator statistics from each worker"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--log", type=Path, help="write the daemon's whole log here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(
            Path(tmp),
            args.workers,
            args.conns,
            args.interval,
            connect_timeout=args.connect_timeout,
            generators=args.generators,
            inspect=args.inspect,
            log_path=args.log,
        )
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Workers holding many idle connections: memory, heartbeat sweeps, broadcast to all.

One supervisor with ``--workers`` workers (``workers: N``, docs/deployment.md#workers) and one
redis-server; ``--conns`` idle clients from several load-generator processes
(bench/idle_clients.py), each under the 20,000 open-file limit and each from its own source
address (127.0.0.2, 127.0.0.3, ...), so no address runs out of ephemeral ports.  Measured:

1. the time to open every connection (each answered by a hello), and how the workers share
   them (open descriptors per worker);
2. memory: the workers' RSS before any client, once all are connected, and after a sweep;
3. the heartbeat: after a mark, whether every connection is pinged within two intervals (a
   client is due once it has been quiet for one), the time from the first to the last ping,
   and worker 0's last sweep (busy time, and its longest batch: the longest stall);
4. ``POST /broadcast`` (through Redis to every worker): the time from the request to the
   last client's delivery, counted at every client.

    .venv/bin/python bench/workers_idle.py [--workers 5] [--conns 99000] [--interval 10]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from daemon import Daemon  # noqa: E402
from redis_server import RedisServer  # noqa: E402
from test_admin import ADMIN, http, metric  # noqa: E402

ALL_READY = re.compile(r"heartbeatd is ready: (\d+) workers serving")
STARTED = re.compile(r"Worker (\d+) started \(pid (\d+)\)")
#: Connections per load-generator process: under the 20,000 open-file limit.
PER_PROCESS = 19_800


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Generators:
    def __init__(self, port: int, conns: int) -> None:
        count = math.ceil(conns / PER_PROCESS)
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


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    interval = args.interval
    config = {
        # A deep backlog: with a full one, the kernel answers with SYN cookies and drops the
        # client's last ACK, and a client that never sends stays "connected" to nothing.
        "listen": "tcp:0:interface=127.0.0.1:backlog=4096",
        "workers": args.workers,
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
        "heartbeat": {"interval": interval, "timeout": interval * 3},
        # The load comes from 127.0.0.2-6: exempt it from the per-address limits; the clients
        # never send first (they only answer pings), so no first-frame deadline either.
        "limits": {"per_address_exempt": ["127.0.0.0/8"], "first_frame_timeout": 0},
        "shutdown": {"drain_timeout": 1, "close_timeout": 10},
        "cluster": {"node_id": "bench", "node_timeout": 10},
    }
    result: dict[str, Any] = {"workers": args.workers, "conns": args.conns, "interval": interval}
    with RedisServer(workdir / "redis") as redis:
        config["cluster"]["redis"] = redis.url  # type: ignore[index]
        with Daemon(workdir, config, ready=ALL_READY) as daemon:
            admin = int(daemon.wait_for(ADMIN).group(1))
            pids = [int(m.group(2)) for x in daemon.lines if (m := STARTED.search(x))]
            base = sum(rss(p) for p in pids)
            note(f"{args.workers} workers ready; opening {args.conns} connections")
            gens = Generators(daemon.port, args.conns)
            try:
                start = time.monotonic()

                def all_hello() -> bool:
                    reports = gens.reports()
                    hello = sum(r["hello"] for r in reports)
                    note(f"hello {hello}, open {sum(r['connections'] for r in reports)}")
                    return hello >= args.conns

                done = poll(all_hello, args.connect_timeout)
                result["connect_s"] = round(time.monotonic() - start, 1)
                reports = gens.reports()
                result["hello"] = sum(r["hello"] for r in reports)
                # Connections still open (some may have been closed since their hello).
                result["connected"] = sum(r["connections"] for r in reports)
                result["failed"] = sum(r["failed"] for r in reports)
                result["all_connected"] = bool(done)
                result["per_worker_fds"] = [open_fds(p) for p in pids]
                connected = sum(rss(p) for p in pids)
                result["bytes_per_conn_connected"] = round(
                    (connected - base) / max(1, result["connected"])
                )

                note(f"connected {result['connected']} in {result['connect_s']} s; sweep")
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
                _, metrics = http(admin, "GET", "/metrics")
                result["worker0_sweep_ms"] = round(
                    metric(metrics, "heartbeatd_heartbeat_sweep_seconds") * 1000, 1
                )
                result["worker0_longest_batch_ms"] = round(
                    metric(metrics, "heartbeatd_heartbeat_batch_max_seconds") * 1000, 1
                )
                result["ping_first_to_last_s"] = (
                    round(max(lasts) - min(firsts), 2) if firsts else None
                )
                after = sum(rss(p) for p in pids)
                result["bytes_per_conn_after_ping"] = round(
                    (after - base) / max(1, result["connected"])
                )
                result["worker_rss_mb"] = [round(rss(p) / 2**20) for p in pids]

                note(f"pinged {pinged}; broadcast")
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
            finally:
                gens.close()
            stop_start = time.monotonic()
            result["supervisor_exit"] = daemon.stop(timeout=120)
            result["stop_s"] = round(time.monotonic() - stop_start, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=5)
    parser.add_argument("--conns", type=int, default=99_000)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--connect-timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

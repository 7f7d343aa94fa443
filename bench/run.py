"""``make bench``: heartbeatd against its peers, side by side, in one invocation.

Every server runs pinned to core 0 and the C load generator to core 1 (``taskset``), so the
generator never competes with the server it measures. Repeats are interleaved (each round
runs every server once per workload), so drift on a noisy machine hits every server alike;
each figure is the median with its min-max. Ratios are only ever taken between figures of one
invocation.

    python bench/run.py [--repeat 3] [--duration 5] [--idle-conns N] [--quick] [--out DIR]
                        [--before CHECKOUT] [--workers 2] [--workers-conns 10000]

The workers phase (``workers: N`` with Redis, idle clients from 127.0.0.2.., bench/workers_idle.py)
runs unpinned; ``--skip workers`` leaves it out.

``--before`` adds another heartbeatd, an older checkout with its own ``.venv`` (made by its
``make test`` or ``make run``), to every phase, so before/after figures come from one run.

Writes DIR/latest.json, DIR/latest.md and DIR/latest.png (if matplotlib is installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import queue
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
BUILD = BENCH / "build"
ROOT = BENCH.parent
BIN = Path(sys.executable).parent
SERVER_CORE, LOAD_CORE = "0", "1"

WORKLOADS = {
    "W1": {"conns": 50, "depth": 1, "size": 64, "what": "latency: 50 conns, 1 in flight, 64 B"},
    "W2": {"conns": 50, "depth": 32, "size": 64, "what": "throughput: 50 conns, 32 in flight"},
    "W3": {"conns": 4, "depth": 4, "size": 262144, "what": "bandwidth: 4 conns, 4 x 256 KiB"},
}
PEERS = ["heartbeatd", "heartbeatd-py", "twisted", "node", "c"]
LABELS = {
    "heartbeatd": "heartbeatd",
    # The same daemon with HEARTBEATD_NO_EXTENSIONS=1, when the C hot path is built (the
    # throughput phase only): docs/benchmarks.md, "The compiled hot path".
    "heartbeatd-py": "heartbeatd, pure-Python hot path",
    "twisted": "plain Twisted + json",
    "node": "Node.js net",
    "c": "C reframe only",
}
#: An older checkout of heartbeatd to measure beside this one (``--before``), or None.
BEFORE: Path | None = None


def use_before(checkout: Path) -> None:
    """Measure ``checkout`` (an older tree with its own ``.venv``) as the server "before"."""
    global BEFORE
    if not (checkout / ".venv/bin/twistd").exists():
        raise SystemExit(f"--before {checkout}: no .venv/bin/twistd (run `make test` there)")
    BEFORE = checkout.resolve()
    commit = subprocess.run(
        ["git", "-C", str(BEFORE), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    LABELS["before"] = f"heartbeatd before ({commit or checkout.name})"
    PEERS.insert(1, "before")


def pinned(core: str, argv: list[str]) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", core, *argv] if taskset and (os.cpu_count() or 1) > 1 else argv


def build() -> None:
    BUILD.mkdir(exist_ok=True)
    for name, source in (("loadgen", BENCH / "loadgen.c"), ("c_echo", BENCH / "peers/c_echo.c")):
        target = BUILD / name
        if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
            subprocess.run(["gcc", "-O2", "-Wall", "-o", str(target), str(source)], check=True)


class Server:
    """One server under test, started pinned; knows its port and PID."""

    def __init__(
        self, name: str, workdir: Path, heartbeat: float | None = None, quiet: bool = False
    ) -> None:
        self.name = name
        self.admin_port = 0
        self.lines: list[str] = []
        env = {k: v for k, v in os.environ.items() if k != "HEARTBEATD_NO_EXTENSIONS"}
        if name == "heartbeatd-py":
            env["HEARTBEATD_NO_EXTENSIONS"] = "1"
        if name in ("heartbeatd", "heartbeatd-py", "before"):
            config: dict[str, Any] = {
                "listen": "tcp:0:interface=127.0.0.1:backlog=1024",
                "admin": {"listen": "tcp:0:interface=127.0.0.1"},
                "log": {"level": "info"},  # start/stop lines only; per-client logs are debug
                "heartbeat": {"interval": heartbeat or 30, "timeout": (heartbeat or 30) * 20},
            }
            if heartbeat:
                # The idle load generator never answers: without these, its clients would be
                # closed first_frame_timeout (10 s) after connecting, or heartbeat.timeout after
                # that if opening 19,900 connections is slow (a busy machine), mid-measurement.
                config["limits"] = {"first_frame_timeout": 0}
                config["heartbeat"] = {"interval": heartbeat, "timeout": 3600}
            if quiet:  # no ping at all: no sweep within the run, no early ping of newcomers
                config["heartbeat"] = {"interval": 3600, "timeout": 7200}
                config["limits"] = {"first_frame_timeout": 0}
            if name == "before":
                config.pop("limits", None)  # older trees may not know every limit
            path = workdir / f"{name}-{heartbeat}-{quiet}.yaml"
            path.write_text(json.dumps(config))  # JSON is YAML
            twistd = BIN / "twistd" if name != "before" else BEFORE / ".venv/bin/twistd"  # type: ignore[operator]
            argv = [
                str(twistd),
                "--nodaemon",
                "--pidfile=",
                "heartbeatd",
                "--config",
                str(path),
            ]
        else:
            extra = ["--heartbeat", str(heartbeat)] if heartbeat else []
            argv = {
                "twisted": [sys.executable, str(BENCH / "peers/twisted_echo.py"), "0"],
                "node": ["node", str(BENCH / "peers/node_echo.js"), "0"],
                "c": [str(BUILD / "c_echo"), "0"],
            }[name] + extra
        self.process = subprocess.Popen(
            pinned(SERVER_CORE, argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self.port = self._wait_for_port()

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + 30
        port = 0
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                break
            if m := re.search(r"admin API listening on 127\.0\.0\.1:(\d+)", line):
                self.admin_port = int(m.group(1))
            if m := re.search(r"heartbeatd \S+ listening on 127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
            elif line.startswith('{"port"'):
                return int(json.loads(line)["port"])
            elif "heartbeatd is ready" in line:
                return port
        raise RuntimeError(f"{self.name} did not start:\n{''.join(self.lines)}")

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def rss(self) -> int:
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]

    def metric(self, name: str) -> float:
        import urllib.request

        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def loadgen(port: int, **options: Any) -> dict[str, Any]:
    argv = [str(BUILD / "loadgen"), "--port", str(port)]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    result = subprocess.run(pinned(LOAD_CORE, argv), capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"loadgen failed: {result.stderr}")
    return json.loads(result.stdout)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_throughput(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    servers = {name: Server(name, workdir) for name in PEERS if available(name)}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        w: {s: [] for s in servers} for w in args.workloads
    }
    try:
        for round_ in range(args.repeat):
            for workload in args.workloads:
                shape = {k: v for k, v in WORKLOADS[workload].items() if k != "what"}
                for name, server in servers.items():
                    result = loadgen(
                        server.port, duration=args.duration, warmup=args.warmup, **shape
                    )
                    runs[workload][name].append(result)
                    print(
                        f"round {round_ + 1} {workload} {name}: {result['msgs_per_s']:.0f} "
                        f"msgs/s, {result['mb_per_s']:.1f} MB/s, p99 {result['p99_ms']} ms",
                        flush=True,
                    )
    finally:
        for server in servers.values():
            server.stop()
    table: dict[str, Any] = {}
    for workload, by_server in runs.items():
        table[workload] = {}
        for name, results in by_server.items():
            table[workload][name] = {
                key: summary([r[key] for r in results])
                for key in ("msgs_per_s", "mb_per_s", "p50_ms", "p99_ms", "p999_ms")
            }
            table[workload][name]["replies"] = [r["replies"] for r in results]
            if table[workload][name]["msgs_per_s"]["median"] == 0:
                table[workload][name]["zero_reason"] = zero_reason(results, args.duration)
    return {"runs": runs, "table": table}


def idle_connections_allowed() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(10, hard - 100)  # each side needs one descriptor per connection, plus a few


def sample_rss(server: Server, peak: list[int], stop: threading.Event) -> None:
    """Record the server's RSS every 50 ms until ``stop`` is set."""
    while not stop.is_set():
        try:
            peak.append(server.rss())
        except (OSError, AttributeError):
            return
        stop.wait(0.05)


def idle_before_ping(name: str, args: argparse.Namespace, workdir: Path) -> float:
    """RSS per connection once every idle connection is open, with no ping sent yet."""
    server = Server(name, workdir, quiet=True)
    try:
        measured, growth = idle_clients_rss(
            server, conns=args.idle_conns, settle=0, duration=args.idle_before_ping_duration
        )
        return growth / max(1, measured["connections"])
    finally:
        server.stop()


def idle_clients_rss(server: Server, **options: Any) -> tuple[dict[str, Any], int]:
    """Run the idle load generator against ``server`` while sampling the server's RSS;
    return the generator's report and the peak RSS growth."""
    time.sleep(0.5)  # let the freshly started server settle
    base = server.rss()
    peak = [base]
    stop = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(server, peak, stop), daemon=True)
    sampler.start()
    try:
        result = loadgen(server.port, mode="idle", **options)
    finally:
        stop.set()
        sampler.join()
    peak.append(server.rss())
    return result, max(peak) - base


def run_idle(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    interval = args.idle_interval
    for name in ("heartbeatd", "before", "twisted", "node"):
        if not available(name) or (args.quick and name == "node"):  # one peer: the harness
            continue
        before_ping = idle_before_ping(name, args, workdir)
        server = Server(name, workdir, heartbeat=interval)
        try:
            # Settle one interval, so every connection is open before the sweep we time.
            measured, growth = idle_clients_rss(
                server, conns=args.idle_conns, settle=interval * 1.1, duration=interval * 4
            )
            entry: dict[str, Any] = {
                "connections": measured["connections"],
                "pinged": measured["pinged"],
                "bytes_per_conn": growth / max(1, measured["connections"]),
                "bytes_per_conn_before_ping": before_ping,
                "ping_spread_ms": measured["ping_spread_s"] * 1000,
            }
            if name in ("heartbeatd", "before"):
                entry["sweep_busy_ms"] = server.metric("heartbeatd_heartbeat_sweep_seconds") * 1000
                entry["longest_batch_ms"] = (
                    server.metric("heartbeatd_heartbeat_batch_max_seconds") * 1000
                )
            else:
                sweeps = [json.loads(x)["sweep_ms"] for x in server.lines if '"sweep_ms"' in x]
                entry["sweep_busy_ms"] = max(sweeps) if sweeps else None
                entry["longest_batch_ms"] = entry["sweep_busy_ms"]  # one blocking loop
            results[name] = entry
            print(f"IDLE {name}: {entry}", flush=True)
        finally:
            server.stop()
    return results


def run_pool(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    server = Server("heartbeatd", workdir)
    try:
        result = subprocess.run(
            pinned(
                LOAD_CORE,
                [
                    sys.executable,
                    str(BENCH / "pool_bench.py"),
                    str(server.port),
                    str(args.pool_seconds),
                ],
            ),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            raise RuntimeError(result.stderr)
        outcome = json.loads(result.stdout)
    finally:
        server.stop()
    print(f"POOL: {outcome}", flush=True)
    return outcome


def run_workers(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """``workers: N`` holding idle clients: bench/workers_idle.py's run, sized by the options.

    Not pinned: the workers, Redis and the load generators share every core, as they would.
    """
    sys.path.insert(0, str(BENCH))
    import workers_idle  # imported here: it needs redis-server, which other phases do not

    directory = workdir / "workers"
    directory.mkdir()
    result = workers_idle.measure(
        directory,
        args.workers,
        args.workers_conns,
        args.workers_interval,
        generators=max(2, args.workers),  # several source addresses even for a small run
        say=lambda text: print(f"WORKERS: {text}", flush=True),
    )
    print(f"WORKERS: {result}", flush=True)
    return result


def available(name: str) -> bool:
    if name == "before":
        return BEFORE is not None
    if name == "heartbeatd-py":  # beside the C path only: else it is "heartbeatd" again
        return importlib.util.find_spec("heartbeatd.wire._speedups") is not None
    return name != "node" or shutil.which("node") is not None


def ratio(ours: float, theirs: float, who: str, why: str = "") -> str:
    """``ours / theirs`` as ``1.23x``; a zero is reported as a zero, with the reason, never
    divided by (a loaded machine can leave a short run with no reply in its window)."""
    if theirs > 0:
        return f"{ours / theirs:.2f}x"
    return f"n/a ({who} measured 0{': ' + why if why else ''})"


def zero_reason(results: list[dict[str, Any]], duration: float) -> str:
    """Why a server's median is 0, from its runs' own counts."""
    if all(r.get("replies", 0) == 0 for r in results):
        unanswered = sum(r.get("unanswered", 0) for r in results)
        return (
            f"no reply inside the {duration:g} s measuring window"
            + (f", {unanswered} request(s) unanswered" if unanswered else "")
            + "; machine busy or peer stalled"
        )
    return "most runs had no reply inside the measuring window"


def fmt(s: dict[str, float], unit: str = "", digits: int = 0) -> str:
    return f"{s['median']:,.{digits}f}{unit} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"


def markdown(report: dict[str, Any]) -> str:
    table = report.get("throughput", {}).get("table", {})
    names = [n for n in PEERS if any(n in table[w] for w in table)]
    lines = [
        f"Machine: {report['machine']}; {report['repeat']} interleaved rounds of "
        f"{report['duration']} s each; median (min-max). Server on core {SERVER_CORE}, load "
        f"generator on core {LOAD_CORE}.",
        "",
        "| workload | "
        + " | ".join(LABELS[n] for n in names)
        + " | "
        + " | ".join(f"heartbeatd / {LABELS[n]}" for n in names if n != "heartbeatd")
        + " |",
        "|---" * (len(names) * 2) + "|",
    ]
    for workload, by_server in table.items():
        key, unit, digits = ("mb_per_s", " MB/s", 0) if workload == "W3" else ("msgs_per_s", "", 0)
        cells = [fmt(by_server[n][key], unit, digits) for n in names]
        ours = by_server["heartbeatd"][key]["median"]
        ratios = [
            ratio(ours, by_server[n][key]["median"], LABELS[n], by_server[n].get("zero_reason", ""))
            for n in names
            if n != "heartbeatd"
        ]
        lines.append(
            f"| {workload} {'MB/s' if workload == 'W3' else 'msgs/s'} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(ratios)
            + " |"
        )
        p99 = [fmt(by_server[n]["p99_ms"], " ms", 2) for n in names]
        lines.append(f"| {workload} p99 | " + " | ".join(p99) + " |" + " |" * (len(names) - 1))
    if report.get("idle"):
        lines += [
            "",
            f"IDLE ({report['idle_interval']} s heartbeat):",
            "",
            "| server | connections | bytes/conn before any ping | bytes/conn after pings "
            "| reactor time of one sweep | longest blocking slice | first to last ping |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, e in report["idle"].items():
            busy = "n/a" if e["sweep_busy_ms"] is None else f"{e['sweep_busy_ms']:.1f} ms"
            longest = "n/a" if e["longest_batch_ms"] is None else f"{e['longest_batch_ms']:.1f} ms"
            before = e.get("bytes_per_conn_before_ping")
            lines.append(
                f"| {LABELS[name]} | {e['connections']:,} ({e['pinged']:,} pinged) | "
                f"{'n/a' if before is None else f'{before:,.0f}'} | "
                f"{e['bytes_per_conn']:,.0f} | {busy} | {longest} | "
                f"{e['ping_spread_ms']:.0f} ms |"
            )
    if report.get("workers"):
        lines += ["", *workers_markdown(report["workers"])]
    if report.get("pool"):
        p = report["pool"]
        lines += [
            "",
            "| POOL (50 callers) | requests/s |",
            "|---|---|",
            f"| pool of {p['pool_size']} | {p['pool_rps']:,.0f} |",
            f"| new connection per request | {p['connect_rps']:,.0f} |",
            f"| ratio | {ratio(p['pool_rps'], p['connect_rps'], 'connect per request')} |",
        ]
    return "\n".join(lines) + "\n"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())) or "none"


def workers_markdown(w: dict[str, Any]) -> list[str]:
    """The workers phase as a table (bench/workers_idle.py's figures)."""
    per_worker = " / ".join(f"{n:,}" for n in w["per_worker_conns"])
    closes = [f"w{i}: {_counts(c)}" for i, c in enumerate(w["server_closes"]) if c]
    refusals = [f"w{i}: {_counts(c)}" for i, c in enumerate(w["server_refusals"]) if c]
    gap = w.get("longest_ping_gap_s")
    return [
        f"WORKERS ({w['workers']} workers, {w['conns']:,} idle clients, heartbeat "
        f"{w['interval']:g} s; workers, Redis and clients share every core):",
        "",
        "| | |",
        "|---|---|",
        f"| connections held | {w['connected']:,} of {w['conns']:,} "
        f"({w['hello']:,} greeted in {w['connect_s']} s); per worker {per_worker} |",
        f"| closed by the server, by reason | {'; '.join(closes) or 'none'} |",
        f"| refused by the server | {'; '.join(refusals) or 'none'} |",
        f"| workers that died (replaced) | {len(w['worker_exits'])} |",
        f"| ended, as the clients saw it | {_counts(w['client_closes'])} |",
        f"| RSS per connection: connected / after a sweep | {w['bytes_per_conn_connected']:,} B"
        f" / {w['bytes_per_conn_after_ping']:,} B (per worker "
        + " / ".join(f"{b:,}" for b in w["per_worker_bytes_per_conn_after_ping"])
        + ") |",
        f"| sweep: every client pinged within two intervals | "
        f"{'yes' if w['all_pinged_within_two_intervals'] else 'NO'} ({w['pinged']:,} pinged), "
        f"first to last ping {w['ping_first_to_last_s']} s, longest gap between two pings "
        f"of one client {'n/a' if gap is None else f'{gap} s'} |",
        f"| worker 0's sweep: busy / longest batch | {w['worker0_sweep_ms']} ms / "
        f"{w['worker0_longest_batch_ms']} ms |",
        f"| `POST /broadcast`: answered / last client reached | {w['broadcast_answer_ms']} ms / "
        f"{w['broadcast_to_last_ms']} ms ({w['broadcast_delivered']:,} delivered) |",
        f"| SIGTERM to exit (all drained) | {w['stop_s']} s (exit {w['supervisor_exit']}) |",
    ]


def chart(report: dict[str, Any], path: Path) -> bool:
    if not report.get("throughput", {}).get("table"):
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    table = report["throughput"]["table"]
    fig, axes = plt.subplots(1, len(table), figsize=(4 * len(table), 4))
    for ax, (workload, by_server) in zip(
        axes if len(table) > 1 else [axes], table.items(), strict=True
    ):
        key = "mb_per_s" if workload == "W3" else "msgs_per_s"
        names = list(by_server)
        medians = [by_server[n][key]["median"] for n in names]
        errors = [
            [m - by_server[n][key]["min"] for n, m in zip(names, medians, strict=True)],
            [by_server[n][key]["max"] - m for n, m in zip(names, medians, strict=True)],
        ]
        ax.bar(
            [LABELS[n] for n in names],
            medians,
            yerr=errors,
            color=["#d62728" if n == "heartbeatd" else "#7f7f7f" for n in names],
        )
        ax.set_title(f"{workload}: {'MB/s' if workload == 'W3' else 'msgs/s'}")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--idle-conns", type=int, default=idle_connections_allowed())
    parser.add_argument("--idle-interval", type=float, default=3.0)
    parser.add_argument("--pool-seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=2, help="workers phase: worker count")
    parser.add_argument(
        "--workers-conns",
        type=int,
        default=10_000,
        help="workers phase: idle clients (bench/workers_idle.py --conns 99000 for the full size)",
    )
    parser.add_argument("--workers-interval", type=float, default=5.0)
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["throughput", "idle", "pool", "workers"]
    )
    parser.add_argument("--quick", action="store_true", help="tiny run, for the smoke test")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument(
        "--before",
        type=Path,
        help="an older heartbeatd checkout with its own .venv, measured beside this one",
    )
    args = parser.parse_args()
    args.idle_before_ping_duration = 1.5  # seconds the idle clients stay before any ping
    if args.before:
        use_before(args.before)
    if args.quick:
        PEERS.remove("heartbeatd-py")  # the smoke run checks the harness, not the two paths
        args.repeat, args.duration, args.warmup = 1, 0.3, 0.1
        args.idle_conns, args.idle_interval, args.pool_seconds = 50, 0.5, 0.5
        args.idle_before_ping_duration = 0.5
        args.workers, args.workers_conns, args.workers_interval = 2, 200, 1.0
    build()
    report: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores, {os.uname().machine}, Python {sys.version.split()[0]}",
        "repeat": args.repeat,
        "duration": args.duration,
        "idle_interval": args.idle_interval,
        "workloads": {k: WORKLOADS[k]["what"] for k in args.workloads},
        "labels": {name: LABELS[name] for name in PEERS},
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if "throughput" not in args.skip:
            report["throughput"] = run_throughput(args, workdir)
        if "idle" not in args.skip:
            report["idle"] = run_idle(args, workdir)
        if "pool" not in args.skip:
            report["pool"] = run_pool(args, workdir)
        if "workers" not in args.skip:
            report["workers"] = run_workers(args, workdir)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (args.out / "latest.md").write_text(text)
    chart(report, args.out / "latest.png")
    print(text)


if __name__ == "__main__":
    main()

"""The figures docs/tuning.md sizes with: one real daemon holding N idle clients.

Starts ``twistd heartbeatd`` (one process, admin API on, heartbeat every ``--interval``
seconds) and one `idle_clients.py` generator (clients answer pings), then reports:

* the daemon's RSS per connection (``process_resident_memory_bytes`` from ``/metrics``,
  connected minus before);
* the kernel's memory per connection: the slab growth (``/proc/meminfo`` Slab) divided by N;
  on loopback both ends of each connection are on this machine, so this is per *pair*
  (client socket + server socket), an upper bound for the server's side;
* the socket buffer pages in use (``/proc/net/sockstat`` TCP mem) once idle;
* the heartbeat sweep: reactor time and longest batch, the largest seen over four sweeps
  (the clients answer pings, so not every client is due in every sweep), from ``/metrics``.

    .venv/bin/python bench/tuning_figures.py --conns 10000 [--interval 2]

Keep runs short on a shared machine: 10,000 clients take about 20 seconds.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")


def meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def sockstat_mem_pages() -> int:
    match = re.search(r"^TCP: .* mem (\d+)", Path("/proc/net/sockstat").read_text(), re.M)
    return int(match.group(1)) if match else 0


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split(" ")[:2]
            out[name] = float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conns", type=int, default=10_000)
    parser.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "hb.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": "tcp:0:interface=127.0.0.1:backlog=4096",
                    "admin": {"listen": "tcp:0:interface=127.0.0.1"},
                    "heartbeat": {"interval": args.interval, "timeout": args.interval * 5},
                    "limits": {
                        "max_connections_per_address": 0,
                        "accepts_per_second_per_address": 0,
                    },
                }
            )
        )
        daemon = subprocess.Popen(
            [
                TWISTD,
                "-n",
                "--pidfile=",
                "--logger=heartbeatd.daemon.logs.observer",
                "heartbeatd",
                "--config",
                str(config),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        generator = None
        try:
            port = admin = 0
            assert daemon.stdout is not None
            for line in daemon.stdout:
                if m := re.search(r"listening on 127\.0\.0\.1:(\d+) \(", line):
                    port = int(m.group(1))
                if m := re.search(r"admin API listening on 127\.0\.0\.1:(\d+)", line):
                    admin = int(m.group(1))
                if "heartbeatd is ready" in line:
                    break
            before = metrics(admin)
            slab_before = meminfo("Slab")
            generator = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "bench" / "idle_clients.py"),
                    "--port",
                    str(port),
                    "--conns",
                    str(args.conns),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            began = time.monotonic()
            while metrics(admin)["heartbeatd_connections"] < args.conns:
                if time.monotonic() - began > 120:
                    raise SystemExit("the clients did not all connect in 120 s")
                time.sleep(0.5)
            connected = time.monotonic() - began
            # Clients answer pings, so a client is due every other sweep or so: keep the
            # largest sweep seen over four intervals (one where most clients were due).
            sweeps = metrics(admin)["heartbeatd_heartbeat_sweeps_total"]
            sweep = batch = 0.0
            while (after := metrics(admin))["heartbeatd_heartbeat_sweeps_total"] < sweeps + 4:
                sweep = max(sweep, after["heartbeatd_heartbeat_sweep_seconds"])
                batch = max(batch, after["heartbeatd_heartbeat_batch_max_seconds"])
                time.sleep(0.2)
            slab_after = meminfo("Slab")
            n = args.conns
            rss = after["process_resident_memory_bytes"] - before["process_resident_memory_bytes"]
            result = {
                "connections": n,
                "connect_seconds": round(connected, 1),
                "daemon_rss_bytes_per_conn": round(rss / n),
                "kernel_slab_bytes_per_pair": round((slab_after - slab_before) / n),
                "tcp_buffer_pages_idle": sockstat_mem_pages(),
                "sweep_ms": round(sweep * 1000, 1),
                "longest_batch_ms": round(batch * 1000, 1),
                "rss_mb": round(after["process_resident_memory_bytes"] / 2**20, 1),
            }
            print(json.dumps(result))
        finally:
            for process in (generator, daemon):
                if process is not None and process.poll() is None:
                    process.terminate()
                    process.wait(30)


if __name__ == "__main__":
    main()

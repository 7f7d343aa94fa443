"""``limits.max_connections`` against the open-file limit, on the real daemon.

A daemon started with ``ulimit -n 128`` cannot hold 1000 clients: it must say at start which
limit applies and why, and refuse every client beyond it with the typed frame, counted in
``/metrics`` (never by Twisted's EMFILE recovery, which closes sockets without a word).
"""

from __future__ import annotations

import json
import re
import socket
import struct
from pathlib import Path

from daemon import Daemon
from test_admin import ADMIN, http, metric
from twisted.internet.task import Clock

from heartbeatd.config import FD_RESERVE

CLIENTS = 300


def first_frame(sock: socket.socket) -> dict:
    import json

    header = b""
    while len(header) < 4:
        chunk = sock.recv(4 - len(header))
        assert chunk, "closed without a frame"
        header += chunk
    (length,) = struct.unpack("!I", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "closed in the middle of a frame"
        body += chunk
    return json.loads(body)


def test_open_file_limit_caps_max_connections_and_every_refusal_is_answered(
    tmp_path: Path,
) -> None:
    config = {
        "listen": "tcp:0:interface=127.0.0.1:backlog=1024",
        "limits": {"max_connections": 1000},
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
    }
    sockets: list[socket.socket] = []
    with Daemon(tmp_path, config, nofile=128) as daemon:
        started = daemon.wait_for(r"listening on .*up to (\d+) connections")
        limit = 128 - FD_RESERVE
        assert int(started.group(1)) == limit
        line = daemon.wait_for(r"limits\.max_connections 1000 .*open-file limit").string
        assert "128" in line and str(limit) in line
        port = int(daemon.wait_for(ADMIN).group(1))
        try:
            # All at once, as a reconnect storm does: the accept loop sees them together.
            for _ in range(CLIENTS):
                sockets.append(socket.create_connection(("127.0.0.1", daemon.port), timeout=10))
            kinds = []
            for sock in sockets:
                message = first_frame(sock)
                if message["type"] == "hello":
                    kinds.append("hello")
                else:
                    assert message["error"]["code"] == "too_many_connections", message
                    kinds.append("refused")
            assert kinds.count("hello") == limit
            assert kinds.count("refused") == CLIENTS - limit
            _, text = http(port, "GET", "/metrics")
            refused = 'heartbeatd_connections_refused_by_reason_total{reason="max_connections"}'
            assert metric(text, refused) == CLIENTS - limit
            assert metric(text, "heartbeatd_connections") == limit
            assert metric(text, "heartbeatd_connection_limit") == limit
            emfile = 'heartbeatd_accept_errors_total{error="EMFILE"}'
            assert metric(text, emfile) == 0
        finally:
            for sock in sockets:
                sock.close()
        assert daemon.stop() == 0
    assert "EMFILE" not in daemon.log


def test_a_low_open_file_limit_with_max_connections_0_is_warned_of(tmp_path: Path) -> None:
    # The shipped default (0: from the open-file limit) under a forgotten LimitNOFILE: the
    # daemon serves what it can, and says so as a warning, not only in the start-up line.
    config = {"limits": {"max_connections": 0}, "log": {"format": "json"}}
    with Daemon(tmp_path, config, nofile=64) as daemon:
        started = json.loads(daemon.wait_for(r".*listening on .*up to 1 connections.*").group(0))
        assert started["level"] == "info"
        line = daemon.wait_for(r".*Connection limit 1: limits\.max_connections 0: only .*")
        warning = json.loads(line.group(0))
        assert warning["level"] == "warn", warning
        text = warning["text"]
        assert "open-file limit (64) less 64" in text and "but at least 1" in text
        assert "raise LimitNOFILE or ulimit -n (hard limit 64)" in text
        assert daemon.stop() == 0


def test_reload_says_which_limit_applies(tmp_path: Path) -> None:
    config = {"limits": {"max_connections": 10}}
    with Daemon(tmp_path, config, nofile=128) as daemon:
        daemon.wait_for(r"up to 10 connections \(limits\.max_connections\)")
        daemon.config_path.write_text(
            daemon.config_path.read_text().replace("max_connections: 10", "max_connections: 500")
        )
        import signal

        daemon.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        line = daemon.wait_for(r"Connection limit now \d+").string
        assert f"Connection limit now {128 - FD_RESERVE}" in line
        assert re.search(r"limits\.max_connections 500 .*open-file limit", line)
        assert daemon.stop() == 0


# -- the guard, on a fake port ------------------------------------------------------------


class FakePort:
    """What `AcceptGuard` touches on a ``tcp.Port``."""

    # (the reactor is a Clock: the guard's re-check while paused is a delayed call)

    def __init__(self) -> None:
        from twisted.logger import Logger

        self.numberAccepts = 100
        self.reading = True
        self.connected = True
        self.disconnecting = False
        self.batches: list[int] = []
        self._logger = Logger(namespace="twisted.internet.tcp.Port")
        self.reactor = Clock()

    def doRead(self) -> None:
        self.batches.append(self.numberAccepts)

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


def guarded(nofile: int, monkeypatch: object) -> tuple[object, FakePort, object]:
    from helpers import make_config

    from heartbeatd.daemon import fdlimit
    from heartbeatd.server.factory import ServerFactory

    monkeypatch.setattr(fdlimit, "open_file_limit", lambda: (nofile, nofile))  # type: ignore[attr-defined]
    factory = ServerFactory(make_config(), clock=Clock())
    port = FakePort()
    return fdlimit.AcceptGuard(factory, [port]), port, factory


def test_guard_caps_the_batch_to_the_descriptors_left_and_pauses_at_none(monkeypatch) -> None:
    guard, port, factory = guarded(128, monkeypatch)
    room = 128 - FD_RESERVE // 2  # the reserve's other half is for refusals in flight
    port.doRead()
    assert port.batches == [min(100, room)]
    factory.refusing = room - 5
    port.doRead()
    assert port.batches[-1] == 5
    factory.refusing = room
    port.doRead()
    assert len(port.batches) == 2 and not port.reading and guard.paused
    factory.refusing -= 1
    factory.on_room()
    assert port.reading and not guard.paused
    # Descriptors freed where the factory does not hear of it: the re-check finds them.
    factory.refusing += 1
    port.doRead()
    assert not port.reading
    factory.refusing -= 1  # without on_room
    port.reactor.advance(guard.RECHECK)
    assert port.reading and not guard.paused and not port.reactor.getDelayedCalls()
    port.disconnecting = True  # shutting down: never resumes a closed port
    factory.refusing += 1
    port.doRead()
    factory.refusing -= 1
    factory.on_room()
    assert not port.reading


def test_guard_counts_emfile_recovery_as_unanswered_refusals(monkeypatch) -> None:
    _guard, port, factory = guarded(1024, monkeypatch)
    port._logger.info("EMFILE encountered; releasing reserved file descriptor.")
    for _ in range(3):
        port._logger.info("EMFILE recovery: Closed socket from {address}", address="x")
    port._logger.info("Could not accept new connection ({acceptError})", acceptError="ENFILE")
    assert factory.accept_errors == {"EMFILE": 1, "ENFILE": 1}
    assert factory.refusals["file_descriptors"] == 3 and factory.refused == 3


def test_raising_the_soft_limit_is_said(monkeypatch) -> None:
    from twisted.logger import globalLogPublisher

    from heartbeatd.daemon import fdlimit

    limits = [(256, 4096)]
    monkeypatch.setattr(fdlimit.resource, "getrlimit", lambda _which: limits[-1])
    monkeypatch.setattr(fdlimit.resource, "setrlimit", lambda _which, new: limits.append(new))
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert fdlimit.raise_open_file_limit() == (4096, 4096)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert limits[-1] == (4096, 4096)
    (event,) = [e for e in events if e.get("log_namespace") == "heartbeatd.daemon.fdlimit"]
    assert event["soft"] == 256 and event["hard"] == 4096

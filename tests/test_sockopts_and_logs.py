"""Socket options on a real accepted TCP socket, and the log.level filter."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from twisted.internet.interfaces import ITCPTransport
from twisted.logger import LogLevel, globalLogPublisher
from zope.interface import implementer

from heartbeatd._logging import get_logger, set_level
from heartbeatd.config import TcpConfig
from heartbeatd.server.sockopts import configure_socket


@implementer(ITCPTransport)
class SocketTransport:
    """Just enough of a TCP transport around a real socket (what twisted's tcp.Server does)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def getHandle(self) -> socket.socket:
        return self.sock

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(enabled))

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(enabled))


@pytest.fixture
def accepted() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        yield conn
        conn.close()
        client.close()


def test_tcp_options_are_set_on_accepted_sockets(accepted: socket.socket) -> None:
    tcp = TcpConfig(keepalive_idle=42, keepalive_interval=7, keepalive_count=3, user_timeout=9.5)
    configure_socket(SocketTransport(accepted), tcp)
    get = accepted.getsockopt
    assert get(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert get(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert get(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 42
    assert get(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 7
    assert get(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    assert get(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 9500


def test_tcp_options_can_be_turned_off(accepted: socket.socket) -> None:
    configure_socket(
        SocketTransport(accepted), TcpConfig(nodelay=False, keepalive=False, user_timeout=0)
    )
    assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0


def test_non_tcp_transports_are_left_alone() -> None:
    configure_socket(object(), TcpConfig())  # must not raise


def test_log_level_filters_heartbeatd_events() -> None:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    log = get_logger("heartbeatd.test")
    try:
        set_level("warn")
        log.info("hidden")
        log.warn("shown")
        set_level("debug")
        log.debug("now shown")
    finally:
        set_level("info")
        globalLogPublisher.removeObserver(events.append)
    mine = [e for e in events if e.get("log_namespace") == "heartbeatd.test"]
    assert [(e["log_format"], e["log_level"]) for e in mine] == [
        ("shown", LogLevel.warn),
        ("now shown", LogLevel.debug),
    ]

"""Kernel-level socket options for accepted TCP connections.

TCP keepalive and ``TCP_USER_TIMEOUT`` are a backstop to the application heartbeat: they let
the kernel notice a vanished peer (unplugged cable, rebooted NAT) even if the daemon's own
sweep were somehow stalled, and bound how long unacknowledged data may sit in the send queue.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.interfaces import ITCPTransport

from heartbeatd._logging import get_logger
from heartbeatd.config import TcpConfig

__all__ = ["configure_socket"]

log = get_logger(__name__)


def configure_socket(transport: Any, tcp: TcpConfig) -> None:
    """Apply ``tcp.*`` options; a transport that is not TCP (UNIX, in-memory) is left alone."""
    if not ITCPTransport.providedBy(transport):
        return
    try:
        if tcp.nodelay:
            transport.setTcpNoDelay(True)
        if tcp.keepalive:
            transport.setTcpKeepAlive(True)
        get_handle = getattr(transport, "getHandle", None)  # in-memory transports lack it
        handle = get_handle() if get_handle is not None else None
        if not isinstance(handle, socket.socket):
            # A TLS layer's handle is its OpenSSL connection: the socket is one level down.
            inner = getattr(transport, "transport", None)
            get_handle = getattr(inner, "getHandle", None)
            handle = get_handle() if get_handle is not None else None
        if not isinstance(handle, socket.socket):
            return
        if tcp.keepalive:
            _set(handle, "TCP_KEEPIDLE", max(1, int(tcp.keepalive_idle)))
            _set(handle, "TCP_KEEPINTVL", max(1, int(tcp.keepalive_interval)))
            _set(handle, "TCP_KEEPCNT", tcp.keepalive_count)
        if tcp.user_timeout > 0:
            _set(handle, "TCP_USER_TIMEOUT", int(tcp.user_timeout * 1000))
    except OSError as e:
        # The peer may already be gone; the connection's own error path will report it.
        log.debug("Could not set TCP options: {error}", error=e)


def _set(sock: socket.socket, name: str, value: int) -> None:
    option = getattr(socket, name, None)
    if option is not None:  # not every platform has every option
        sock.setsockopt(socket.IPPROTO_TCP, option, value)

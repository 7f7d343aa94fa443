"""Write-through for Twisted TCP transports: send() at once when nothing is queued.

Twisted's ``transport.write`` only queues: the bytes go out on the reactor's next pass, after
an ``epoll_ctl`` to watch for writability, a ``doWrite`` event wrapped in Twisted's log
context, and another ``epoll_ctl`` to stop watching.  For a request/response server that is
most of the cost of a small reply (``bench/``: W1 gains about 40%).  Node.js and most C
servers try the socket first; this does the same.  When the transport already holds queued
bytes, or the kernel takes only part, the rest goes through ``transport.write``, so order
and Twisted's own flow control (producers, loseConnection) are untouched.

It reads ``dataBuffer``, ``offset`` and ``_tempDataLen`` of ``twisted.internet.tcp``
connections, which are implementation details: `supports_direct_write` checks the
transport's class (Twisted's TCP connections and their subclasses) and those attributes, and
is False (use ``transport.write``) for anything else, such as TLS, UNIX sockets, in-memory
test transports, or a Twisted that changed them.
``tcp.direct_write: false`` turns it off.

TLS can also start *later* on a plain ``tcp.Server`` (``startTLS`` sets ``transport.TLS``), and
a half-closed transport (``loseWriteConnection``) must send nothing more: both are checked at
every write, not once, because sending to the socket there would put plaintext on the wire
(or bytes after a FIN).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import tcp

__all__ = ["direct_writer", "supports_direct_write", "unsent_bytes", "write_direct"]

#: The transports Twisted's TCP reactor gives server and client protocols.
_PLAIN_TCP = (tcp.Server, tcp.Client)
_REQUIRED = (
    "dataBuffer",
    "offset",
    "_tempDataLen",
    "socket",
    "connected",
    "disconnecting",
    "TLS",
    "_writeDisconnected",
)


def supports_direct_write(transport: Any) -> bool:
    """Whether `write_direct` may be used on ``transport`` (a plain Twisted TCP connection)."""
    # Subclasses too (heartbeatd's own LeanServer is one): they keep Twisted's write buffer.
    return isinstance(transport, _PLAIN_TCP) and all(hasattr(transport, a) for a in _REQUIRED)


def write_direct(t: Any, data: bytes) -> None:
    """Send ``data`` at once if nothing is queued on ``t``, else queue it behind the rest.

    A plain function of the transport, not a closure per connection: servers hold tens of
    thousands of idle connections, and a closure with its cells costs ~470 bytes each.
    Only for transports `supports_direct_write` accepted.
    """
    if (
        t._tempDataLen
        or t.offset != len(t.dataBuffer)
        or t.disconnecting
        or not t.connected
        or t.TLS  # startTLS happened: only Twisted's write encrypts
        or t._writeDisconnected
    ):
        t.write(data)  # bytes are already waiting, or this is not plain TCP: Twisted's path
        return
    try:
        # The socket itself rather than writeSomeData(): that caps a send at Twisted's 128 KiB
        # SEND_LIMIT (a Windows workaround), and every byte over it would be copied again.
        sent = t.socket.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        t.write(data)  # the connection failed; Twisted's own write path reports it
        return
    if sent < len(data):
        t.write(data[sent:])


def direct_writer(transport: Any) -> Callable[[bytes], None] | None:
    """A ``write(data)`` that sends immediately when it safely can, or None if unsupported."""
    if not supports_direct_write(transport):
        return None

    def write(data: bytes) -> None:
        write_direct(transport, data)

    return write


def unsent_bytes(transport: Any) -> int | None:
    """Bytes written to ``transport`` that the peer has not taken yet, or None if unknown.

    Exact for Twisted's TCP transports and for its TLS layer over them (plaintext waiting
    for the handshake plus ciphertext in the socket's queue); None for anything else.
    """
    if isinstance(transport, _PLAIN_TCP):
        try:
            return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        except AttributeError:
            return None
    pending = getattr(transport, "_appSendBuffer", None)
    lower = getattr(transport, "transport", None)
    if pending is None or lower is None:
        return None
    below = unsent_bytes(lower)
    if below is None:
        return None
    return below + sum(len(chunk) for chunk in pending)

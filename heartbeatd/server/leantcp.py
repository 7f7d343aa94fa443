"""A leaner TCP transport for accepted connections, and a read dispatch without log contexts.

Two costs of Twisted's TCP server path are per connection or per event and buy heartbeatd
nothing (profile and figures in docs/benchmarks.md):

* Memory. ``tcp.Server`` stores, per connection, a log prefix and a repr string, a bound
  ``socket.fileno`` method and an empty write-queue list (~290 bytes), and a fresh host
  string per peer address. `LeanServer` formats the strings when asked, looks ``fileno`` up
  on its socket, keeps the queue list only while it holds data, and interns the host
  (thousands of clients share a few addresses).
* Time. The epoll reactor wraps every I/O event in ``log.callWithLogger``: it asks the
  transport for its log prefix and pushes a copy of the log context, so that legacy
  ``log.msg`` calls made during the event are tagged with it. heartbeatd logs through
  ``twisted.logger``, which never reads that context, and the wrapping costs about as much
  as our own handling of a small request. `install_dispatch` gives the reactor a poll loop
  that calls Twisted's own ``_doReadOrWrite`` directly for `LeanServer` connections (every
  other descriptor still goes through ``callWithLogger``), and logs what escapes it the
  same way. A plain read event, the commonest by far, takes the same steps one call
  shorter (inlined in the loop, and `LeanServer.doRead` with Twisted's ``_dataReceived``
  inlined).
  With the C hot path built, a read event is one C call (``_speedups.read_event``): for
  the commonest read (whole frames, a connection on the fast path) it does what
  ``doRead``, ``dataReceived``, ``_deliver`` and the direct write do, and hands any other
  read to ``dataReceived`` (tests/test_read_event.py compares the two over real sockets).

Both are switched by ``tcp.lean_transport`` (on by default). They apply only where they are
known to fit: a plain ``tcp.Port`` whose transport class is Twisted's ``tcp.Server``, and
Twisted's ``EPollReactor``; anything else keeps the stock path.
"""

from __future__ import annotations

import errno
import select
import sys
import types
from collections.abc import Callable
from typing import Any, Final

from twisted.internet import tcp
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.python import log as legacy_log

from heartbeatd.wire._accelerated import speedups

__all__ = ["LeanServer", "adopt", "install_dispatch", "uninstall_dispatch"]


def _closed_fileno() -> int:
    return -1  # what FileDescriptor.fileno answers once the socket is gone


class LeanServer(tcp.Server):
    """``tcp.Server`` without the per-connection strings and bound method.

    Twisted's ``__init__`` assigns ``logstr``, ``repstr``, ``fileno`` and
    ``_tempDataBuffer`` on the instance; here they are properties whose setters drop the
    value (or an empty queue), so nothing is stored and the getters give the same answers.
    """

    # Attributes are read with getattr, never through ``self.__dict__``: touching that makes
    # CPython build a dict object for the instance (64 bytes) beside its inline values.
    _lean_queue: list[bytes] | None = None

    def __init__(
        self,
        sock: Any,
        protocol: Any,
        client: tuple[Any, ...],
        server: Any,
        sessionno: int,
        reactor: Any,
    ) -> None:
        # One host string per address, not per connection.
        client = (sys.intern(client[0]), *client[1:])
        super().__init__(sock, protocol, client, server, sessionno, reactor)

    def _protocol_name(self) -> str:
        protocol = getattr(self, "protocol", None)  # deleted once the connection is lost
        return self._getLogPrefix(protocol) if protocol is not None else "closed"

    @property  # type: ignore[override]
    def logstr(self) -> str:
        return f"{self._protocol_name()},{self.sessionno},{self.hostname}"

    @logstr.setter
    def logstr(self, value: str) -> None:
        pass  # formatted on demand

    @property
    def repstr(self) -> str:
        port = getattr(self.server, "_realPortNumber", None)
        return f"<{self._protocol_name()} #{self.sessionno} on {port}>"

    @repstr.setter
    def repstr(self, value: str) -> None:
        pass  # formatted on demand

    # Twisted queues writes in a list made per connection (56 bytes even when empty); with
    # direct writes most connections never queue, so the list exists only while it holds data.
    @property
    def _tempDataBuffer(self) -> list[bytes]:
        queue = self._lean_queue
        if queue is None:
            queue = self._lean_queue = []
        return queue

    @_tempDataBuffer.setter
    def _tempDataBuffer(self, value: list[bytes]) -> None:
        self._lean_queue = value or None

    def doRead(self) -> Any:
        """``tcp.Connection.doRead`` with its ``_dataReceived`` step inlined (one call less
        per read event); the same answers: None, or why the connection is done."""
        try:
            data = self.socket.recv(self.bufferSize)
        except OSError as e:
            return None if e.args[0] == errno.EWOULDBLOCK else CONNECTION_LOST
        if not data:
            return CONNECTION_DONE
        self.protocol.dataReceived(data)
        return None

    @property  # type: ignore[override]
    def fileno(self) -> Any:
        sock = getattr(self, "socket", None)  # deleted once the connection is lost
        return sock.fileno if sock is not None else _closed_fileno

    @fileno.setter
    def fileno(self, value: Any) -> None:
        pass  # looked up on the socket when asked

    @fileno.deleter
    def fileno(self) -> None:
        pass  # the socket attribute goes with it, and then fileno() answers -1


def adopt(port: Any) -> bool:
    """Make ``port`` (a listening ``tcp.Port``) accept into `LeanServer`; True if it did.

    Also installs the lean dispatch on the port's reactor.  A port of any other kind (UNIX,
    a subclass, a custom transport) is left as it is.
    """
    if type(port) is not tcp.Port or port.transport is not tcp.Server:
        return False
    port.transport = LeanServer
    install_dispatch(port.reactor)
    return True


def install_dispatch(reactor: Any) -> bool:
    """Give an ``EPollReactor`` the lean poll loop (once); False for any other reactor."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # pragma: no cover - not Linux
        return False
    if type(reactor) is not EPollReactor:
        return False
    global _read_event, _read_event_configured
    if not _read_event_configured:
        _read_event = _configure_read_event()
        _read_event_configured = True
    if "doIteration" not in vars(reactor):
        reactor.doIteration = types.MethodType(_lean_do_poll, reactor)
    return True


def uninstall_dispatch(reactor: Any) -> None:
    """Back to Twisted's own poll loop (tests switch between the two)."""
    vars(reactor).pop("doIteration", None)


def _configure_read_event() -> Callable[[LeanServer], Any] | None:
    """The C read path for `LeanServer` read events, or None (pure Python, or a class that
    is not the one it was written for): then ``doRead`` runs."""
    if speedups is None or not hasattr(speedups, "configure_reads"):
        return None
    from heartbeatd.server.protocol import ServerProtocol
    from heartbeatd.wire.int32 import Int32Framing

    configured = speedups.configure_reads(
        ServerProtocol, LeanServer.doRead, Int32Framing.header, CONNECTION_DONE, CONNECTION_LOST
    )
    return speedups.read_event if configured else None


#: What a `LeanServer` read event calls: ``read_event(connection) -> why``, set by the first
#: `install_dispatch` (importing the protocol module here would be circular).
_read_event: Callable[[LeanServer], Any] | None = None
_read_event_configured = False


def _lean_do_poll(self: Any, timeout: float | None) -> None:
    """``EPollReactor.doPoll``, except that `LeanServer` events skip ``callWithLogger``."""
    if timeout is None:
        timeout = -1
    try:
        events = self._poller.poll(timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    selectables = self._selectables
    handle = self._doReadOrWrite
    read_event = _read_event
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        if type(selectable) is LeanServer:
            # _doReadOrWrite already catches what doRead/doWrite raise and disconnects;
            # this catches what escapes it (a connectionLost that raised), as
            # callWithLogger does, so one connection cannot stop the reactor.
            try:
                if event == _EPOLLIN:
                    # ``_doReadOrWrite`` for a plain read event (no hang-up, error or write
                    # bit), inlined. It skips Twisted's ``fileno() == -1`` check, which guards
                    # against descriptors that closed without telling the reactor: a
                    # `LeanServer` loses its socket only in ``connectionLost``, after the
                    # reactor has forgotten it.
                    try:
                        why = selectable.doRead() if read_event is None else read_event(selectable)
                    except BaseException:
                        why = sys.exc_info()[1]
                        legacy_log.err()
                    if why:
                        self._disconnectSelectable(selectable, why, True)
                else:
                    handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                legacy_log.err(system=selectable.logPrefix())
        else:
            legacy_log.callWithLogger(selectable, handle, selectable, fd, event)


_EPOLLIN: Final = select.EPOLLIN if hasattr(select, "EPOLLIN") else 1

"""The open-file limit against the connection limit: raised, said, and kept.

Each client is a file descriptor.  At start the daemon raises its soft ``RLIMIT_NOFILE`` to
the hard one (as nginx and most daemons do), and the connection limit is
``limits.max_connections`` capped by that limit less `FD_RESERVE`
(`Config.effective_max_connections`); the start-up line and every reload say which limit
applies and why (`describe_limit`).

`AcceptGuard` keeps the daemon below the point where ``accept()`` fails: before each accept
batch it caps the batch to the file descriptors left (clients, plus refused connections
whose error frame is still being written), and stops accepting while none are left (new
connections wait in the listen backlog).  Should ``accept()`` fail anyway (descriptors taken
elsewhere), Twisted closes the waiting connections without a word ("EMFILE recovery"); the
guard counts those (``heartbeatd_accept_errors_total``, and as refusals with reason
``file_descriptors``) and logs them rate-limited, instead of one line per socket.
"""

from __future__ import annotations

import resource
from typing import Any

from twisted.logger import Logger, globalLogPublisher

from heartbeatd._logging import get_logger
from heartbeatd.config import FD_RESERVE, LOW_CONNECTION_LIMIT, Config

__all__ = [
    "ACCEPT_ERRORS",
    "REFUSAL_ROOM",
    "AcceptGuard",
    "describe_limit",
    "open_file_limit",
    "raise_open_file_limit",
]

log = get_logger(__name__)

#: Of `FD_RESERVE`, the descriptors refused connections may hold while their frame is written
#: (the rest is for listeners, logs, the admin API, Redis and the reactor).
REFUSAL_ROOM = FD_RESERVE // 2
#: accept() errors counted (``heartbeatd_accept_errors_total{error}``), shown from zero.
ACCEPT_ERRORS = ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM")
#: What the reserve is for, in the start-up line.
_RESERVE_FOR = "listeners, admin, Redis, logs and refusals in flight"


def open_file_limit() -> tuple[int, int]:
    """The soft and hard ``RLIMIT_NOFILE`` (``RLIM_INFINITY`` stays as it is)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one, and say so."""
    soft, hard = open_file_limit()
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warn("Could not raise the open-file limit to {hard}: {error}", hard=hard, error=e)
        else:
            log.info(
                "Raised the open-file limit (soft RLIMIT_NOFILE) from {soft} to its hard "
                "limit {hard}",
                soft=soft,
                hard=hard,
            )
            soft = hard
    return soft, hard


def describe_limit(config: Config) -> tuple[int, str, bool]:
    """The connection limit, why it is that, and whether to warn of it: the open-file limit
    capped ``limits.max_connections``, or (with 0) leaves fewer than `LOW_CONNECTION_LIMIT`."""
    limit = config.effective_max_connections()
    configured = config.limits.max_connections
    soft, hard = open_file_limit()
    if configured and configured <= limit:
        return limit, "limits.max_connections", False
    files = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
    room = f"the open-file limit ({files}) less {FD_RESERVE} kept for {_RESERVE_FOR}"
    if soft != resource.RLIM_INFINITY and soft - FD_RESERVE < 1:
        room += ", but at least 1"
    raise_it = (
        f"raise LimitNOFILE or ulimit -n (hard limit {hard})"
        if soft == hard
        else f"the hard limit is {hard}"
    )
    if not configured:
        if limit < LOW_CONNECTION_LIMIT:
            return limit, f"limits.max_connections 0: only {room}; {raise_it}", True
        return limit, f"limits.max_connections 0: {room}", False
    return limit, f"limits.max_connections {configured} is capped by {room}; {raise_it}", True


class AcceptGuard:
    """Accepts on its ports only as many connections as there are file descriptors for.

    One guard per factory, watching each of its listeners (the stream port, WebSocket ports):
    they share the factory's connections and the process's descriptors.
    """

    #: Seconds between checks for room while paused: descriptors freed where the factory does
    #: not hear of it (an admin connection, a refused WebSocket upgrade) still resume accepting.
    RECHECK = 1.0

    def __init__(self, factory: Any, ports: Any = ()) -> None:
        self.factory = factory
        self.ports: list[Any] = []
        #: The ports paused for lack of descriptors.
        self.paused: set[Any] = set()
        #: Times accepting paused for lack of descriptors.
        self.pauses = 0
        self._recheck: Any = None
        factory.on_room = self.room_freed
        for port in ports:
            self.watch(port)

    def watch(self, port: Any) -> None:
        accept = port.doRead

        def doRead() -> Any:  # an instance attribute: the reactor calls it
            return self._read(port, accept)

        port.doRead = doRead
        # Twisted logs accept() errors through the port's own logger: count them there.
        inner = port._logger
        port._logger = Logger(namespace=inner.namespace, observer=self._observe)
        self.ports.append(port)

    def room(self) -> int:
        """Descriptors left for connections (clients, handshakes and refusals in flight)."""
        soft, _hard = open_file_limit()
        if soft == resource.RLIM_INFINITY:
            return 1 << 30
        f = self.factory
        used = len(f.clients) + f.refusing + getattr(f, "handshaking", 0)
        return soft - (FD_RESERVE - REFUSAL_ROOM) - used

    def _read(self, port: Any, accept: Any) -> Any:
        room = self.room()
        if room <= 0:
            port.stopReading()
            if port not in self.paused:
                self.paused.add(port)
                self.pauses += 1
            if self.factory.log_allowed("fd_pause"):
                log.warn(
                    "Not accepting for now: {count} connections hold every file descriptor "
                    "the open-file limit leaves (see limits.max_connections); new connections "
                    "wait in the listen backlog",
                    count=len(self.factory.clients) + self.factory.refusing,
                )
            self._schedule_recheck(port)
            return None
        if getattr(port, "numberAccepts", 0) > room:
            port.numberAccepts = room
        return accept()

    def _schedule_recheck(self, port: Any) -> None:
        reactor = getattr(port, "reactor", None)
        if self._recheck is None and reactor is not None:
            self._recheck = reactor.callLater(self.RECHECK, self._recheck_room)

    def _recheck_room(self) -> None:
        self._recheck = None
        self.room_freed()
        for port in self.paused:
            self._schedule_recheck(port)
            break

    def room_freed(self) -> None:
        if not self.paused or self.room() <= 0:
            return
        if not getattr(self.factory, "accepting", True):
            return  # a full worker paused on purpose; it resumes by itself
        for port in list(self.paused):
            self.paused.discard(port)
            if getattr(port, "connected", False) and not getattr(port, "disconnecting", False):
                port.startReading()  # else: stopped listening (shutdown)
        if self._recheck is not None and self._recheck.active():
            self._recheck.cancel()
        self._recheck = None

    def _observe(self, event: dict[str, Any]) -> None:
        text = event.get("log_format") or ""
        factory = self.factory
        if text.startswith("EMFILE recovery: Closed socket"):
            factory.refused += 1
            factory.refusals["file_descriptors"] += 1
            if factory.log_allowed("emfile_close"):
                log.warn(
                    "Out of file descriptors: closed a connection from {peer} without an "
                    "answer (Twisted's EMFILE recovery); lower limits.max_connections or "
                    "raise the open-file limit",
                    peer=event.get("address"),
                )
            return
        if text.startswith("EMFILE encountered"):
            factory.accept_errors["EMFILE"] += 1
            return
        if text.startswith("Re-reserving EMFILE"):
            return
        if text.startswith("Could not accept new connection"):
            error = str(event.get("acceptError", "unknown"))
            factory.accept_errors[error] += 1
            if factory.log_allowed("accept_error:" + error):
                log.warn("Could not accept a connection: {error}", error=error)
            return
        globalLogPublisher(event)

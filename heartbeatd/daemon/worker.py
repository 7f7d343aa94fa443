"""A worker's side of ``workers: N``: what makes ``twistd heartbeatd`` one worker of several.

The supervisor (`heartbeatd.daemon.supervisor`) starts each worker with its settings in
`WORKER_ENV`, the shared listening socket on `LISTEN_FD`, a private admin socket on `ADMIN_FD`
and a status pipe on `STATUS_FD`.  A worker adopts the sockets, reads ``stop``/``reload`` on
stdin (`WorkerLink`), reports its sd_notify messages up the pipe (`PipeNotifier`), logs JSON
lines to stdout (`worker_observer`), and stops accepting when nearly full (`WorkerFactory`).
The whole design is in `heartbeatd.daemon.workers`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import protocol
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import ILogObserver
from zope.interface import implementer, provider

from heartbeatd._logging import get_logger
from heartbeatd.daemon import logs
from heartbeatd.daemon.sdnotify import Notifier
from heartbeatd.server.factory import ServerFactory

__all__ = [
    "ADMIN_FD",
    "LISTEN_FD",
    "MAX_LINE",
    "STATUS_FD",
    "WORKER_ENV",
    "PipeNotifier",
    "WorkerFactory",
    "WorkerLink",
    "WorkerSettings",
    "adopted_endpoint",
    "worker_observer",
    "worker_settings",
]

# One namespace for both sides, as before the split: operators filter logs on it.
log = get_logger("heartbeatd.daemon.workers")

#: The environment variable that makes ``twistd heartbeatd`` a worker (JSON settings).
WORKER_ENV = "HEARTBEATD_WORKER"
#: File descriptors in a worker: the shared listener, its private admin socket, status out.
LISTEN_FD, ADMIN_FD, STATUS_FD = 3, 4, 5
#: Longest line read from a worker pipe; a longer one is cut (a bound on every buffer).
MAX_LINE = 256 * 1024


@dataclass(frozen=True)
class WorkerSettings:
    """What the supervisor tells a worker (through `WORKER_ENV`)."""

    index: int
    node_id: str
    admin: bool
    overrides: dict[str, Any] = field(default_factory=dict)

    def config_overrides(self) -> dict[str, Any]:
        """The supervisor's command-line overrides, plus what makes this process one worker."""
        return {**self.overrides, "workers": 1, "cluster.node_id": self.node_id}


def worker_settings(environ: Mapping[str, str] | None = None) -> WorkerSettings | None:
    """The settings when this process is a worker, else None."""
    raw = (os.environ if environ is None else environ).get(WORKER_ENV)
    if not raw:
        return None
    value = json.loads(raw)
    return WorkerSettings(
        int(value["index"]), str(value["node_id"]), bool(value["admin"]), value["overrides"]
    )


def adopted_endpoint(reactor: Any, fd: int) -> Any:
    """An endpoint serving the inherited listening socket ``fd`` (its family read from it)."""
    from twisted.internet.endpoints import AdoptedStreamServerEndpoint

    sock = socket.socket(fileno=fd)
    try:
        family = sock.family
    finally:
        sock.detach()  # the endpoint owns the fd; it dups it and closes this one
    return AdoptedStreamServerEndpoint(reactor, fd, family)


@implementer(IHalfCloseableProtocol)
class WorkerLink(protocol.Protocol):
    """A worker's end of the pipes: commands in on stdin, status lines out on `STATUS_FD`."""

    def __init__(self, reactor: Any, on_reload: Callable[[], object]) -> None:
        self._reactor = reactor
        self._on_reload = on_reload
        self._buffer = b""
        self.stopping = False

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        self._buffer = self._buffer[-MAX_LINE:]
        for line in lines:
            if line == b"reload":
                self._on_reload()
            elif line == b"stop":
                self._stop("the supervisor asked")

    def readConnectionLost(self) -> None:
        self._stop("the supervisor is gone (stdin closed)")

    def writeConnectionLost(self) -> None:
        pass

    def _stop(self, why: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("Worker stopping: {why}", why=why)
        # Already stopping when a signal reached us too (systemd's KillMode=control-group).
        with contextlib.suppress(ReactorNotRunning):
            self._reactor.stop()

    def send_status(self, fields: Mapping[str, Any]) -> None:
        if self.transport is not None and not self.stopping:
            self.transport.write(json.dumps(dict(fields)).encode() + b"\n")


class PipeNotifier(Notifier):
    """A worker's sd_notify: the messages go to the supervisor, which speaks for all."""

    def __init__(self, link: WorkerLink) -> None:
        super().__init__({})
        self.link = link
        self.address = b"supervisor"  # enabled: the STATUS loop runs too

    def send(self, **fields: Any) -> None:
        self.link.send_status(fields)


class WorkerFactory(ServerFactory):
    """A worker's factory: when nearly full, it stops accepting, so another worker takes over.

    A single daemon at ``limits.max_connections`` accepts and refuses (``too_many_connections``);
    a worker doing that would refuse clients its idle siblings could serve, because the shared
    socket gives each connection to whichever worker accepts first.  It pauses a little below
    the limit, because the reactor's accept loop may still take the connections that arrived
    meanwhile (those are served, up to the limit; the loop's batch is capped to fit), and
    resumes a little below where it paused.
    When every worker is paused, new connections wait in the listen backlog.
    """

    #: Most places kept free for connections accepted after the pause (10% of the limit, less).
    PAUSE_MARGIN = 64
    #: Cap on Twisted's accept batch (``Port.numberAccepts``, which grows by 20 after every
    #: full batch, without limit): one batch, at most this plus 20, then fits in the margin.
    ACCEPT_BATCH = PAUSE_MARGIN - 20
    #: The service whose ``port`` this factory serves (set by the tap once it exists).
    service: Any = None
    accepting = True

    def pause_at(self) -> int:
        return self.max_connections - min(self.PAUSE_MARGIN, self.max_connections // 10)

    def resume_below(self) -> int:
        return self.pause_at() - max(1, self.max_connections // 100)

    def client_connected(self, client: Any) -> None:
        super().client_connected(client)
        port = getattr(self.service, "port", None)
        # Under a long ramp the batch would outgrow the margin, and the accept loop, which
        # runs on after the pause, would take clients past max_connections: refused, where
        # a sibling worker would have served them.
        if getattr(port, "numberAccepts", 0) > self.ACCEPT_BATCH:
            port.numberAccepts = self.ACCEPT_BATCH  # type: ignore[union-attr]
        if self.accepting and len(self.clients) >= self.pause_at() and port is not None:
            port.stopReading()
            self.accepting = False
            log.info(
                "Worker full ({count} clients): not accepting until below {resume}",
                count=len(self.clients),
                resume=self.resume_below(),
            )

    def client_disconnected(self, client: Any, reason: Any) -> None:
        super().client_disconnected(client, reason)
        if not self.accepting and len(self.clients) < self.resume_below():
            self.accepting = True
            port = getattr(self.service, "port", None)
            if port is not None:  # None: draining, the port is closed
                port.startReading()
                log.info("Worker accepting again ({count} clients)", count=len(self.clients))


def worker_observer() -> ILogObserver:
    """twistd's ``--logger`` in a worker: one JSON event per line, for the supervisor."""
    logs.observer_in_use = True  # the supervisor writes them in the configured format
    out = sys.stdout

    @provider(ILogObserver)
    def write(event: dict[str, Any]) -> None:
        if logs.is_twisted_chatter(event):  # as the supervisor's own observer leaves out
            return
        out.write(logs.json_line(event) + "\n")
        out.flush()

    return write

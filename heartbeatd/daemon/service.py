"""The twistd service: listen with the factory, and on shutdown stop listening, then close clients.

Listening happens in ``privilegedStartService`` (before twistd drops privileges and before the
reactor runs), so a port in use or a bad certificate stops the daemon at once with one clear
line, instead of leaving a process running that serves nothing.  The failure is a
`StartupError`, which twistd reports to the process that launched a daemon (and removes the
pidfile): see `heartbeatd.daemon.startup`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from heartbeatd._logging import get_logger
from heartbeatd._version import __version__
from heartbeatd.daemon import logs
from heartbeatd.daemon.fdlimit import AcceptGuard, describe_limit
from heartbeatd.daemon.sdnotify import Notifier
from heartbeatd.daemon.signals import ShutdownSignals
from heartbeatd.daemon.startup import LaunchStderr, StartupError
from heartbeatd.server import leantcp
from heartbeatd.server.connection import format_address
from heartbeatd.server.factory import ServerFactory
from heartbeatd.wire import ACCELERATED

#: How the start-up line names the hot path (heartbeatd.wire.ACCELERATED).
HOT_PATHS = {"c": "C", "python": "pure Python"}

__all__ = ["ServerService"]

log = get_logger(__name__)


class ServerService(Service):
    """Binds ``endpoint`` to ``factory`` for as long as the service runs."""

    #: Seconds between STATUS= updates to systemd.
    STATUS_INTERVAL = 5.0

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: ServerFactory,
        reactor: Any = None,
        notifier: Notifier | None = None,
        on_hangup: Callable[[], object] | None = None,
        admin: tuple[IStreamServerEndpoint, Any] | None = None,
        websocket: tuple[list[tuple[str, IStreamServerEndpoint]], Any] | None = None,
        startup: LaunchStderr | None = None,
    ) -> None:
        self.endpoint = endpoint
        #: Where a start-up failure is written besides the log (the launching stderr).
        self.startup = startup
        self.factory = factory
        self.port: IListeningPort | None = None
        self._reactor = reactor
        self.notifier = notifier or Notifier({})
        self._on_hangup = on_hangup
        self._admin = admin
        self.admin_port: IListeningPort | None = None
        #: ([(description, endpoint)], the `WebSocketSite`) of the WebSocket listener, if on.
        self._websocket = websocket
        self.websocket_ports: list[IListeningPort] = []
        self._status_loop: LoopingCall | None = None
        self.accept_guard: AcceptGuard | None = None

    def startService(self) -> None:
        super().startService()
        self.factory.channels.start()  # the cluster broker connects in the background
        if self._reactor is not None:
            self._reactor.callWhenRunning(self._running)

    def _running(self) -> None:
        # Runs after the reactor installed its own signal handlers, so ours win.
        assert self._reactor is not None
        ShutdownSignals(self._reactor, self._on_hangup).install()
        if self.factory.config.log.format == "json" and not logs.observer_in_use:
            log.warn(
                "log.format is json, but twistd was not started with "
                "--logger heartbeatd.daemon.logs.observer; logging as text"
            )
        log.info("heartbeatd is ready (pid {pid})", pid=os.getpid())
        # READY only now: the listener is bound and signals are handled.
        self.notifier.ready(self.factory.status())
        self.notifier.start_watchdog(self._reactor)
        if self.notifier.enabled:
            self._status_loop = LoopingCall(lambda: self.notifier.status(self.factory.status()))
            self._status_loop.clock = self._reactor
            self._status_loop.start(self.STATUS_INTERVAL, now=False)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.port = result = _bind(
            self.endpoint, self.factory, self.factory.config.listen, self.startup
        )
        config = self.factory.config
        if config.tcp.lean_transport and leantcp.adopt(result):
            log.info("Accepting into the lean TCP transport (tcp.lean_transport)")
        # Every listener accepts only what the open-file limit leaves room for.
        self.accept_guard = guard = AcceptGuard(self.factory)
        if hasattr(result, "numberAccepts"):  # a stream port
            guard.watch(result)
        limit, why, capped = describe_limit(config)
        log.info(
            "heartbeatd {version} listening on {address} ({framing} framing, hot path in "
            "{path}, heartbeat every {interval:g}s, timeout {timeout:g}s, up to {limit} "
            "connections ({why}))",
            version=__version__,
            address=format_address(result.getHost()),
            framing=config.framing,
            path=HOT_PATHS[ACCELERATED],
            accelerated=ACCELERATED,
            interval=config.heartbeat.interval,
            timeout=config.heartbeat.timeout,
            limit=limit,
            why=why,
        )
        if capped:
            log.warn("Connection limit {limit}: {why}", limit=limit, why=why)
        if self._websocket is not None:
            endpoints, site = self._websocket
            for description, endpoint in endpoints:
                port = _bind(endpoint, site, description, self.startup)
                self.websocket_ports.append(port)
                if config.tcp.lean_transport:
                    leantcp.adopt(port)
                if hasattr(port, "numberAccepts"):
                    guard.watch(port)
                log.info(
                    "heartbeatd {version} WebSocket listening on {address} (path {path})",
                    version=__version__,
                    address=format_address(port.getHost()),
                    path=config.websocket.path,
                )
        log.info(
            "Handlers: built-in{modules}; message types: {types}",
            modules="".join(f", {name}" for name in config.handlers),
            types=", ".join(self.factory.registry.types()),
        )
        if self._admin is not None:
            endpoint, site = self._admin
            self.admin_port = _bind(endpoint, site, self.factory.config.admin.listen, self.startup)
            log.info(
                "admin API listening on {address}",
                address=format_address(self.admin_port.getHost()),
            )
        if self.startup is not None:  # started: let go of the launching stderr
            self.startup.close()

    def stopService(self) -> Deferred[None]:
        """Stop listening first (a restarted instance can take new clients), then drain.

        Each step logs one line as it completes, so the log reads in the order things
        happened: stopped listening, draining (goaway), closing the rest, admin API closed,
        stopped.
        """
        super().stopService()
        clock = self._reactor or self.factory.clock
        began = clock.seconds()
        self.notifier.stopping(f"draining {len(self.factory.clients)} client(s)")
        self.notifier.stop_watchdog()
        if self._status_loop is not None and self._status_loop.running:
            self._status_loop.stop()
        port, self.port = self.port, None
        address = format_address(port.getHost()) if port is not None else ""
        stopped = maybeDeferred(port.stopListening) if port is not None else succeed(None)
        ws_ports, self.websocket_ports = self.websocket_ports, []
        if ws_ports:
            stopped = DeferredList(
                [stopped, *(maybeDeferred(p.stopListening) for p in ws_ports)],
                consumeErrors=True,
            )
        shutdown = self.factory.config.shutdown

        def drain(_: object) -> Deferred[None]:
            if port is not None:
                log.info(
                    "Stopped listening on {address}; {count} client(s) connected",
                    address=address,
                    count=len(self.factory.clients),
                )
            return self.factory.drain(shutdown.drain_timeout, shutdown.reconnect_after)

        def close_clients(_: object) -> Deferred[None]:
            count = len(self.factory.clients)
            if count:
                log.info("Drain over; closing {count} client(s)", count=count)
            else:
                log.info("Drain over; every client has left")
            return self.factory.close_all(shutdown.close_timeout)

        def stop_admin(_: object) -> Any:  # last: /healthz answers 503 during the drain
            admin, self.admin_port = self.admin_port, None
            if admin is None:
                return None
            return maybeDeferred(admin.stopListening).addCallback(
                lambda _: log.info("Admin API closed")
            )

        def stop_broker(_: object) -> Any:  # after the clients: their leaves reach the cluster
            return self.factory.channels.stop()

        def done(_: object) -> None:
            log.info(
                "heartbeatd stopped after {seconds:.1f}s of shutdown",
                seconds=clock.seconds() - began,
            )

        def failed(failure: Failure) -> None:
            # twistd would drop a failure here without a word; say what went wrong.
            log.failure("A shutdown step failed; stopping anyway", failure)

        return (
            stopped.addCallback(drain)
            .addCallback(close_clients)
            .addCallback(stop_admin)
            .addCallback(stop_broker)
            .addCallback(done)
            .addErrback(failed)
        )


def _bind(
    endpoint: IStreamServerEndpoint,
    factory: Any,
    description: str,
    startup: LaunchStderr | None = None,
) -> IListeningPort:
    """Listen now, or raise `StartupError` with one clear line (port in use, bad certificate).

    Not SystemExit: twistd reports only an Exception to a daemon's waiting parent.
    """
    outcome: list[IListeningPort | Failure] = []
    endpoint.listen(factory).addBoth(outcome.append)
    message = None
    if not outcome:
        message = f"heartbeatd: {description!r} did not bind synchronously"
    elif isinstance(outcome[0], Failure):
        message = f"heartbeatd: cannot listen on {description!r}: {outcome[0].getErrorMessage()}"
    if message is not None:
        if startup is not None:
            raise startup.fail(message)
        raise StartupError(message)
    return outcome[0]  # type: ignore[return-value]

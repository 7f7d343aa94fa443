"""Test your handlers and clients against a real heartbeatd server, in memory, on a fake clock.

    from heartbeatd.testing import ServerClientPair

    pair = ServerClientPair(handlers=[myapp_handlers.register])
    d = pair.request("sum", [1, 2, 3])      # sent, served and answered before it returns
    assert successResultOf(d) == 6           # e.g. trial's SynchronousTestCase.successResultOf

The server is heartbeatd's own (`ServerFactory`, its protocol, its heartbeat) and the client is
a real `heartbeatd.client.ClientConnection`; the bytes between them go through Twisted's
in-memory transports instead of sockets, and every timer runs on `pair.clock`, a
`twisted.internet.task.Clock`.  Nothing happens until you say so: `flush()` moves bytes until
both sides are quiet, `advance(seconds)` moves time timer by timer, flushing between.  So a
test needs no network, no port and no sleep, and sees exactly what a real client would.

``twisted.test.iosim`` is private Twisted API: this module is the one place heartbeatd
imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.test import iosim

from heartbeatd.client.connection import ClientConnection
from heartbeatd.config import Config
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import HandlerRegistry, default_registry
from heartbeatd.server.session import Server
from heartbeatd.wire.envelope import OMIT

__all__ = ["ServerClientPair"]

#: What ``handlers=`` accepts: a module name, a module, or a ``register(registry)`` function.
HandlerSource = str | ModuleType | Callable[[HandlerRegistry], object]


def _register_all(registry: HandlerRegistry, sources: Iterable[HandlerSource]) -> None:
    for source in sources:
        if isinstance(source, str):
            registry.load_module(source)
            continue
        register = getattr(source, "register", None) if isinstance(source, ModuleType) else source
        if not callable(register):
            raise TypeError(f"{source!r} is not a module with register(registry) nor a function")
        register(registry)


class ServerClientPair:
    """A heartbeatd server with one connected client (and more on request), all in memory.

    ``registry`` is the server's `HandlerRegistry` (default: the built-ins plus the modules in
    ``config.handlers``); ``handlers`` adds more to it: module names, modules, or
    ``register(registry)`` functions.  ``config`` is a `heartbeatd.config.Config` (default: the
    built-in defaults).  ``client_options`` go to every `ClientConnection` made here
    (``request_timeout``, ...); the framing always follows ``config.framing``.
    """

    #: Upper bound on flush rounds: a pair that never goes quiet is a bug in the test.
    MAX_FLUSH_ROUNDS = 10_000

    def __init__(
        self,
        registry: HandlerRegistry | None = None,
        config: Config | None = None,
        *,
        handlers: Iterable[HandlerSource] = (),
        clock: Clock | None = None,
        identity: str | None = None,
        claims: dict[str, Any] | None = None,
        **client_options: Any,
    ) -> None:
        self.config = config if config is not None else Config()
        self.clock = clock if clock is not None else Clock()
        if registry is None:
            registry = default_registry(self.config.handlers)
        _register_all(registry, handlers)
        self.registry = registry
        #: The server's factory.  Handlers never see it; a test may read its counters.
        self.factory = ServerFactory(self.config, registry, self.clock)
        self.factory.doStart()
        self._client_options = client_options
        self._pumps: list[Any] = []
        self._next_port = 40000
        #: The first client, connected and past the server's hello.
        self.client: ClientConnection = self.connect(identity=identity, claims=claims)

    # -- connections ------------------------------------------------------------------------

    def connect(
        self,
        *,
        identity: str | None = None,
        claims: dict[str, Any] | None = None,
        **client_options: Any,
    ) -> ClientConnection:
        """Connect one more client, flush, and return it once the hello arrived.

        ``identity`` and ``claims``: who the server takes the client for, as if it had
        authenticated (``session.identity``, ``session.claims``), so channel permissions and
        the application's authorizers can be tested without tokens or a network.
        A client the server refuses (``limits.max_connections``) is returned closed, with
        the server's error in ``close_reason``.
        """
        options = {**self._client_options, **client_options}
        options.setdefault("framing", self.config.framing)
        client = ClientConnection(self.clock, **options)
        peer = IPv4Address("TCP", "127.0.0.1", self._next_port)
        host = IPv4Address("TCP", "127.0.0.1", 9000)
        self._next_port += 1
        server = self.factory.buildProtocol(peer)
        if identity is not None:
            server.identity = identity  # type: ignore[attr-defined]
        if claims is not None:
            server.claims = dict(claims)  # type: ignore[attr-defined]
        server_io = iosim.FakeTransport(server, isServer=True, hostAddress=host, peerAddress=peer)
        client_io = iosim.FakeTransport(client, isServer=False, hostAddress=peer, peerAddress=host)
        pump = iosim.connect(server, server_io, client, client_io, greet=False, clock=self.clock)
        self._pumps.append(pump)
        ready = client.when_ready()
        self.flush()
        # A refused client's failure is in its close_reason; consumed here, it is not logged
        # as an "Unhandled error in Deferred" (which would fail a trial test).
        ready.addErrback(lambda failure: None)
        return client

    def flush(self) -> None:
        """Deliver bytes and disconnects both ways, and run due calls, until nothing moves."""
        for _ in range(self.MAX_FLUSH_ROUNDS):
            moved = False
            for pump in list(self._pumps):
                if pump.pump():
                    moved = True
            if not moved:
                break
        else:
            raise RuntimeError(f"still busy after {self.MAX_FLUSH_ROUNDS} flush rounds")
        self._pumps = [
            p for p in self._pumps if not (p.clientIO.disconnected and p.serverIO.disconnected)
        ]

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``, as a real network would see that time pass.

        Every timer due in that span runs at its own time, in order, and the bytes it causes
        are delivered before the next one (a ping is answered before the deadline it would
        meet).  So a heartbeat `LoopingCall` fires once per interval, never coalesced.
        """
        clock = self.clock
        target = clock.seconds() + seconds
        for _ in range(self.MAX_FLUSH_ROUNDS):
            due = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= target]
            if not due:
                break
            clock.advance(max(0.0, min(due) - clock.seconds()))
            self.flush()
        else:
            raise RuntimeError(f"timers still due after {self.MAX_FLUSH_ROUNDS} steps")
        clock.advance(max(0.0, target - clock.seconds()))
        self.flush()

    # -- conveniences -------------------------------------------------------------------------

    def request(self, type: str, data: Any = OMIT, timeout: float | None = None) -> Deferred[Any]:
        """``self.client.request(...)``, flushed: a handler that answers at once has answered."""
        d = self.client.request(type, data, timeout)
        self.flush()
        return d

    def send(self, type: str, data: Any = OMIT) -> None:
        """``self.client.send(...)`` (no reply expected), flushed."""
        self.client.send(type, data)
        self.flush()

    @property
    def server(self) -> Server:
        """The `Server` handlers see as ``request.server``: ``send``, ``broadcast``, ``clients``."""
        return self.factory.server

    @property
    def clients(self) -> int:
        """How many clients the server holds now."""
        return self.server.clients

    def close(self) -> None:
        """Close every client, flush, and stop the server's heartbeat."""
        for pump in self._pumps:
            if not pump.clientIO.disconnecting:
                pump.client.close()
        self.flush()
        self.factory.doStop()

    def __enter__(self) -> ServerClientPair:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

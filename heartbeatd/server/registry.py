"""What a connection needs from the server it belongs to: the `ClientRegistry` interface.

A `Connection` (of either transport) depends on this small interface, not on `ServerFactory`,
so the import graph stays a tree (the factory builds protocols; protocols only know this
contract) and a test can drive a protocol against any object that provides it.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from heartbeatd.config import Config
from heartbeatd.server.handlers import HandlerRegistry
from heartbeatd.server.session import Server
from heartbeatd.wire.framing import Framing

__all__ = ["ClientRegistry"]


class ClientRegistry(Protocol):
    """The server as one connection sees it."""

    config: Config
    clock: IReactorTime
    framing: Framing
    #: Message type -> handler.
    registry: HandlerRegistry
    #: The facade handlers reach as ``request.server``.
    server: Server
    #: Bytes held by every connection's unfinished frame together.
    partial_bytes: int
    #: Connections accepted whose transport handshake is not done (not clients yet).
    handshaking: int
    #: Polite closes aborted because the peer did not let them finish (shutdown.close_timeout).
    close_timeouts: int

    def now(self) -> float:
        """The alive clock for last-seen times (reactor stalls excluded)."""
        ...

    def new_session_id(self) -> str: ...

    def hello_body(self, session_id: str, framing: str | None = None) -> bytes:
        """The envelope a new connection is greeted with (``framing``: its framing's name)."""
        ...

    def client_connected(self, client: Any) -> None: ...

    def touch(self, client: Any) -> None:
        """``client`` was just heard from (a complete frame arrived)."""
        ...

    def client_closing(self, client: Any, reason: str, detail: str, *, quiet: bool = False) -> None:
        """The server decided to close ``client``: record and log why."""
        ...

    def client_disconnected(self, client: Any, reason: Failure | None) -> None: ...

    def count_error(self, code: str) -> None: ...

    def count_foreign(self, kind: str) -> None:
        """A peer spoke another protocol (``http``, ``tls``...)."""
        ...

    def log_allowed(self, cause: str) -> bool:
        """Rate limit for log lines a peer can trigger at will."""
        ...

    def record_rtt(self, seconds: float) -> None: ...

"""The two narrow views a handler gets: its client (`Session`) and the server (`Server`).

Handlers used to receive the protocol itself and reached through it to the factory, which
tied application code to internals.  These facades are the whole surface: what they do not
offer, a handler cannot depend on.  Both hold one reference and are created lazily (a
`Session` on a connection's first use, a `Server` once per factory).
"""

from __future__ import annotations

from typing import Any, Protocol

from heartbeatd.wire.envelope import OMIT

__all__ = ["Server", "Session"]


class _Connection(Protocol):
    session_id: str
    peer: str
    identity: str | None
    connected: bool

    def send(self, type: str, data: Any = OMIT) -> None: ...

    def close(self, reason: str, detail: str = "") -> None: ...


class _Clients(Protocol):
    def send(self, session_id: str, type: str, data: Any = OMIT) -> bool: ...

    def broadcast(self, type: str, data: Any = OMIT) -> int: ...

    def client_count(self) -> int: ...

    def publish(self, channel: str, data: Any) -> Any: ...

    def forward(self, session_id: str, type: str, data: Any = OMIT) -> bool: ...


class Session:
    """One client, as a handler sees it."""

    __slots__ = ("_connection",)

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    @property
    def session_id(self) -> str:
        return self._connection.session_id

    @property
    def peer(self) -> str:
        """``host:port`` (or ``unix:path``) of the client."""
        return self._connection.peer

    @property
    def identity(self) -> str | None:
        """Who the client is: its token's identity (``auth.mode``), else the subject of its
        TLS client certificate (``tls.client_ca``); None when neither is in use."""
        return self._connection.identity

    @property
    def claims(self) -> dict[str, Any]:
        """The claims of the client's signed token (``auth.mode: jwt``); else empty."""
        claims = getattr(self._connection, "claims", None)
        return claims if isinstance(claims, dict) else {}

    @property
    def connected(self) -> bool:
        return self._connection.connected

    @property
    def resumable(self) -> str | None:
        """The id of the resumable session this connection carries, else None.  Unlike
        ``session_id`` it outlives the connection: ``server.send(resumable, ...)`` reaches
        the session on its next connection (docs/protocol.md, "Sessions")."""
        attachment = getattr(self._connection, "_resumable", None)
        return attachment.state.sid if attachment is not None else None

    def send(self, type: str, data: Any = OMIT) -> None:
        """Push a message to this client, outside request/reply order."""
        self._connection.send(type, data)

    def close(self, reason: str = "closed_by_handler", detail: str = "") -> None:
        """Flush what is queued for this client, then close it, recording ``reason``."""
        self._connection.close(reason, detail)

    def __repr__(self) -> str:
        return f"Session({self.session_id!r}, peer={self.peer!r})"


class Server:
    """Every client of this daemon, as a handler sees them."""

    __slots__ = ("_clients",)

    def __init__(self, clients: _Clients) -> None:
        self._clients = clients

    def send(self, session_id: str, type: str, data: Any = OMIT) -> bool:
        """Push a message to one client; False when no such client is connected.

        In a cluster, a session of another node is reached through the broker (True then
        means forwarded; a client that left meanwhile does not get it).
        """
        return self._clients.send(session_id, type, data) or self._clients.forward(
            session_id, type, data
        )

    def publish(self, channel: str, data: Any) -> Any:
        """Publish to a channel (on every node); a Deferred firing with the offset.

        It fails with `HandlerError` (``bad_channel``, ``publication_too_large``,
        ``unavailable``), so a handler may return it as is.
        """
        return self._clients.publish(channel, data)

    def broadcast(self, type: str, data: Any = OMIT) -> int:
        """Push a message to every client (encoded once); returns how many were sent it."""
        return self._clients.broadcast(type, data)

    @property
    def clients(self) -> int:
        """How many clients are connected."""
        return self._clients.client_count()

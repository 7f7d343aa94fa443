"""The handler API: what application code registers and what it sees of the server.

A handler is ``handler(request) -> result``.  The result may be a plain value, a Deferred or a
coroutine (the protocol turns a coroutine into a Deferred); it becomes the reply's ``data``.
Return `Reply` to answer with another type (as ``ping`` answers ``pong``), `NO_REPLY` to stay
silent, or raise `HandlerError` for a typed error frame.  Any other exception is an
``internal_error`` on the wire and a traceback in the log.  Applications add types without
forking heartbeatd: a module named in ``handlers:`` defines ``register(registry)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any, Final

from heartbeatd.server.session import Server, Session
from heartbeatd.wire.envelope import OMIT

__all__ = [
    "AUTHORIZE_ACTIONS",
    "NO_REPLY",
    "RESERVED_TYPES",
    "Authorizer",
    "HandlerError",
    "HandlerRegistry",
    "Reply",
    "Request",
    "Server",
    "Session",
    "default_registry",
]


#: Types a client sends in answer to the server (heartbeat pongs, error reports); the
#: protocol handles them itself, so they are never dispatched and cannot be registered.
RESERVED_TYPES: Final = frozenset({"pong", "error"})


class _NoReply:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_REPLY"


#: Return this from a handler to send nothing back (a notification).
NO_REPLY: Final = _NoReply()


class Reply:
    """A handler result that answers with its own ``type`` (and optional ``data``)."""

    __slots__ = ("data", "type")

    def __init__(self, type: str, data: Any = OMIT) -> None:
        self.type = type
        self.data = data


class HandlerError(Exception):
    """Raise from a handler to send ``{"type": "error", "error": {code, message}}``.

    ``retry_after`` (seconds, a number): when the refusal is of a rate that refills with
    time, how long until the request would be accepted; the ``error`` object then carries it
    (docs/protocol.md, "Errors")."""

    #: Also the value for a subclass whose ``__init__`` does not call this one.
    retry_after: float | None = None

    def __init__(self, code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


class Request:
    """One incoming message, as a handler sees it.

    ``session`` is the client that sent it (`Session`: ``session_id``, ``peer``,
    ``identity``, ``send()``, ``close()``); ``server`` reaches every client (`Server`:
    ``send()``, ``broadcast()``).  Neither exposes the protocol or the factory.
    """

    __slots__ = ("_connection", "data", "id", "type")

    #: True when the request may have run before: a node holding its resumable session
    #: died before answering it, and the session resumed elsewhere (docs/protocol.md,
    #: "Sessions").  Handlers with side effects check it.
    redelivered = False

    def __init__(self, type: str, id: str | int | None, data: Any, connection: Any) -> None:
        self.type = type
        self.id = id
        self.data = data
        # Built per message on the hot path, so the facades are looked up only when used.
        self._connection = connection

    @property
    def session(self) -> Session:
        return self._connection.session

    @property
    def server(self) -> Server:
        return self._connection.factory.server

    def __repr__(self) -> str:
        return f"Request(type={self.type!r}, id={self.id!r}, data={self.data!r})"


Handler = Callable[[Request], Any]

#: What an authorizer may decide about (the permissions a namespace can give to it).
AUTHORIZE_ACTIONS: Final = ("subscribe", "publish", "presence", "history")

#: ``authorizer(session, channel, data)``: True allows, False refuses with ``forbidden``, a
#: string refuses with that error code; or a Deferred/coroutine of one of those.
Authorizer = Callable[[Session, str, Any], Any]


class HandlerRegistry:
    """Message type -> handler."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        #: ``get(type)``: the handler, or None. The dict's own method, so the protocol's hot
        #: path pays for no extra call.
        self.get: Callable[[str], Handler | None] = self._handlers.get
        #: action -> the application's authorizer (`authorize`).
        self.authorizers: dict[str, Authorizer] = {}

    def add(self, type: str, handler: Handler, *, replace: bool = False) -> None:
        if not isinstance(type, str) or not type:
            raise ValueError("a message type is a non-empty string")
        if type in RESERVED_TYPES:
            raise ValueError(f"{type!r} answers the server itself and cannot have a handler")
        if type in self._handlers and not replace:
            raise ValueError(f"a handler for {type!r} is already registered")
        self._handlers[type] = handler

    def handler(self, type: str) -> Callable[[Handler], Handler]:
        """Decorator form of `add`."""

        def decorate(fn: Handler) -> Handler:
            self.add(type, fn)
            return fn

        return decorate

    def authorize(self, action: str) -> Callable[[Authorizer], Authorizer]:
        """Decorator: ``fn(session, channel, data)`` decides ``action`` (subscribe, publish,
        presence or history) on the channels of namespaces whose permission for it is
        ``authorizer``.  It returns True (allowed), False (``forbidden``), an error code (a
        string), or a Deferred or coroutine of one; it has ``channels.authorize_timeout``
        seconds.  Raising, timing out or returning anything else refuses the request
        (``authorization_failed``, ``authorization_timeout``): the connection stays up."""
        if action not in AUTHORIZE_ACTIONS:
            raise ValueError(f"authorize() takes one of {', '.join(AUTHORIZE_ACTIONS)}")

        def decorate(fn: Authorizer) -> Authorizer:
            if action in self.authorizers:
                raise ValueError(f"an authorizer for {action!r} is already registered")
            self.authorizers[action] = fn
            return fn

        return decorate

    def types(self) -> list[str]:
        return sorted(self._handlers)

    def load_module(self, name: str) -> None:
        """Import ``name`` and call its ``register(registry)``."""
        module = importlib.import_module(name)
        register = getattr(module, "register", None)
        if not callable(register):
            raise LookupError(f"module {name!r} has no register(registry) function")
        register(self)


def _ping(request: Request) -> Reply:
    return Reply("pong")


def _echo(request: Request) -> Any:
    return request.data


def default_registry(modules: Iterable[str] = ()) -> HandlerRegistry:
    """The built-ins plus the handlers of each module in ``modules``.

    ``ping`` answers ``pong``; ``echo`` returns its data; ``message`` (where seed framing
    delivers bare JSON values) echoes the value back, as the seed tutorial's server did.
    """
    registry = HandlerRegistry()
    registry.add("ping", _ping)
    registry.add("echo", _echo)
    registry.add("message", _echo)
    for name in modules:
        registry.load_module(name)
    return registry

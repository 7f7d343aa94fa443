"""Every failure the client library reports: one hierarchy under `ClientError`.

A caller that catches `ClientError` catches everything a request, a connection, a
reconnecting client or the pool can fail with; the subclasses say which.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "ClientError",
    "ClientStopped",
    "ConnectionClosed",
    "ConnectionFailed",
    "HandshakeTimeout",
    "NotConnected",
    "PoolClosed",
    "PoolError",
    "PoolExhausted",
    "PoolTimeout",
    "PoolUnavailable",
    "RequestTimeout",
    "ServerError",
    "SessionLost",
    "SessionUnavailable",
    "SubscriptionUnavailable",
]


class ClientError(Exception):
    """Base of every failure a request or connection reports."""


class ServerError(ClientError):
    """The server answered with an error frame.

    ``retry_after``: the frame's hint, in seconds, of when to try again (heartbeatd sends it
    with ``rate_limited``); None when absent or not a finite number >= 0.
    """

    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @classmethod
    def from_wire(cls, error: Any) -> ServerError:
        """The error from an error frame's ``error`` object (``{"code", "message",
        "retry_after"?}``); anything malformed becomes ``unknown`` or is left out."""
        if not isinstance(error, dict):
            error = {}
        return cls(
            str(error.get("code", "unknown")),
            str(error.get("message", "")),
            _seconds(error.get("retry_after")),
        )


def _seconds(value: Any) -> float | None:
    """A finite number >= 0 as a float, else None (a bool, NaN, infinity, 10**400...)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond any float
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class SubscriptionUnavailable(ServerError):
    """The server answered ``unavailable`` (its channel broker is down) to every subscribe
    to ``channel`` for ``subscribe_retry_timeout`` seconds: the reconnecting client gave up.

    ``elapsed``: seconds from the first such answer to the last; ``attempts``: subscribes
    answered ``unavailable``; ``limit``: the ``subscribe_retry_timeout`` that ran out.  Its
    ``__cause__`` is the last ``unavailable`` `ServerError`.
    """

    def __init__(self, channel: str, elapsed: float, attempts: int, limit: float) -> None:
        super().__init__(
            "unavailable",
            f"the server answered unavailable to every subscribe to {channel!r} for "
            f"{elapsed:g}s ({attempts} attempts; subscribe_retry_timeout is {limit:g}s): gave up",
        )
        self.channel = channel
        self.elapsed = elapsed
        self.attempts = attempts
        self.limit = limit


class SubscriptionRateLimited(ServerError):
    """The server answered ``rate_limited`` (too many subscribes on this connection) until
    ``subscribe_retry_timeout`` ran out: the reconnecting client gave up.  As
    `SubscriptionUnavailable`, with ``.code`` ``rate_limited`` and the last answer's
    ``retry_after``; its ``__cause__`` is that answer's `ServerError`.
    """

    def __init__(
        self,
        channel: str,
        elapsed: float,
        attempts: int,
        limit: float,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(
            "rate_limited",
            f"the server answered rate_limited to the subscribe to {channel!r} until "
            f"subscribe_retry_timeout ({limit:g}s) ran out, after {elapsed:g}s "
            f"({attempts} refusals): gave up",
            retry_after,
        )
        self.channel = channel
        self.elapsed = elapsed
        self.attempts = attempts
        self.limit = limit


class RequestTimeout(ClientError):
    """No reply within the request's timeout."""


class HandshakeTimeout(ClientError):
    """The server did not send its hello in time."""


class ConnectionClosed(ClientError):
    """The connection closed before the reply arrived (or before it was ready)."""


class SessionLost(ConnectionClosed):
    """A resumable session ended (``reason``: expired, unknown_session, session_taken_over...)
    while this request was waiting: it may or may not have run, and its reply is gone."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or f"the session was lost ({reason})")
        self.reason = reason


class SessionUnavailable(SessionLost):
    """The server answered ``unavailable`` (a cluster whose session store, Redis, is
    unreachable) to every resume or session start for ``session_retry_timeout`` seconds: the
    reconnecting client gave up waiting for it.  A `SessionLost` (``reason``
    ``unavailable``), so ``except SessionLost`` and ``except ConnectionClosed`` catch it.

    ``elapsed``: seconds from the first such answer to the last; ``attempts``: answers
    ``unavailable``; ``limit``: the ``session_retry_timeout`` that ran out.
    """

    def __init__(self, elapsed: float, attempts: int, limit: float) -> None:
        super().__init__(
            "unavailable",
            "the server answered unavailable to every session start or resume for "
            f"{elapsed:g}s ({attempts} attempts; session_retry_timeout is {limit:g}s): gave up",
        )
        self.elapsed = elapsed
        self.attempts = attempts
        self.limit = limit


class ConnectionFailed(ClientError):
    """A connection could not be made (refused, unreachable, timed out, no hello).

    Raised in place of Twisted's own errors (``ConnectionRefusedError``...), whose text it
    keeps, so one ``except ClientError`` covers connecting too.
    """


class NotConnected(ConnectionFailed):
    """No connection was ready within the wait's deadline (or the client was stopped:
    `ClientStopped`)."""


class ClientStopped(ConnectionClosed, NotConnected):
    """The reconnecting client was stopped (`ReconnectingClient.stop`, or `Pool.close` for
    the pool's subscription connection) while this waited: a request waiting for a
    connection or for its reply, a ``when_connected``, a ``subscribe`` not answered yet.

    Both a `ConnectionClosed` and a `NotConnected` (what such waits failed with before it
    existed), so code that catches either still catches it.
    """


class PoolError(ClientError):
    """Base of the pool's own failures."""


class PoolTimeout(PoolError):
    """No connection became available within ``acquire_timeout``."""


class PoolExhausted(PoolError):
    """``max_waiters`` borrowers are already waiting; failing fast instead of queueing."""


class PoolClosed(PoolError):
    """The pool was closed."""


class PoolUnavailable(PoolError):
    """``fail_fast``: the pool knows the server is down, so it fails at once instead of waiting."""

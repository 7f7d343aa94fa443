"""A client that stays connected: Twisted's ClientService plus heartbeatd's handshake and goaway.

Reconnects with exponential backoff and *full jitter* (each delay drawn from
0..min(cap, base * 2^n)), so clients that lost the same server do not return in lockstep.
Push handlers are kept across reconnects.  When the server says ``goaway`` (it is draining),
the client lets its in-flight requests finish, closes, and reconnects after a random delay
within the server's ``reconnect_after`` window instead of treating it as an error.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from typing import Any

from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory

from heartbeatd._logging import get_logger
from heartbeatd.client.connection import (
    DEFAULT_HELLO_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
    ClientConnection,
    PushHandler,
)
from heartbeatd.client.tls import ClientTLS, wrap_client_endpoint
from heartbeatd.wire.envelope import OMIT

__all__ = ["ReconnectingClient", "full_jitter_backoff"]

log = get_logger(__name__)


def full_jitter_backoff(
    initial: float = 0.1, maximum: float = 30.0, random: Callable[[], float] = _random.random
) -> Callable[[int], float]:
    """A ClientService retry policy: attempt n waits random(0..min(maximum, initial*2^(n-1)))."""

    def policy(attempt: int) -> float:
        return random() * min(maximum, initial * 2 ** max(attempt - 1, 0))

    return policy


class ReconnectingClient:
    """Keeps one connection to a heartbeatd server; see the module docstring."""

    def __init__(
        self,
        reactor: Any,
        endpoint: str | IStreamClientEndpoint,
        *,
        framing: str = "int32",
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        hello_timeout: float = DEFAULT_HELLO_TIMEOUT,
        backoff_initial: float = 0.1,
        backoff_max: float = 30.0,
        random: Callable[[], float] = _random.random,
        tls: ClientTLS | None = None,
        token: str | None = None,
    ) -> None:
        if tls is not None:  # TLS under every connection; the token is sent on each
            endpoint = wrap_client_endpoint(reactor, endpoint, tls)
        self._token = token
        if isinstance(endpoint, str):
            from twisted.internet.endpoints import clientFromString

            endpoint = clientFromString(reactor, endpoint)
        self._reactor = reactor
        self._framing = framing
        self._request_timeout = request_timeout
        self._hello_timeout = hello_timeout
        self._random = random
        self._backoff = full_jitter_backoff(backoff_initial, backoff_max, random)
        self._handlers: list[tuple[str, PushHandler]] = []
        self._next_delay: float | None = None
        self._current: ClientConnection | None = None
        self.goaways = 0
        self.service = ClientService(
            endpoint,
            Factory.forProtocol(self._build),
            retryPolicy=self._retry_delay,
            clock=reactor,
            prepareConnection=lambda proxy: proxy.when_ready(),
        )

    def start(self) -> None:
        self.service.startService()

    def stop(self) -> Deferred[None]:
        return self.service.stopService()

    def when_connected(self, fail_after: int | None = None) -> Deferred[ClientConnection]:
        """The current connection, once connected; ``fail_after`` failed attempts fail it."""
        return self.service.whenConnected(failAfterFailures=fail_after)

    def request(self, type: str, data: Any = OMIT, timeout: float | None = None) -> Deferred[Any]:
        return self.when_connected().addCallback(lambda conn: conn.request(type, data, timeout))

    def on(self, type: str, handler: PushHandler) -> None:
        """Register a push handler on this and every future connection."""
        self._handlers.append((type, handler))
        if self._current is not None and not self._current.closed:
            self._current.on(type, handler)

    def _build(self) -> ClientConnection:
        conn = ClientConnection(
            self._reactor,
            self._framing,
            self._request_timeout,
            self._hello_timeout,
            token=self._token,
        )
        for type_, handler in self._handlers:
            conn.on(type_, handler)
        conn.on_goaway(self._goaway)
        self._current = conn
        return conn

    def _retry_delay(self, attempt: int) -> float:
        if self._next_delay is not None:
            delay, self._next_delay = self._next_delay, None
            return delay
        return self._backoff(attempt)

    def _goaway(self, conn: ClientConnection, data: dict[str, Any]) -> None:
        self.goaways += 1
        window = data.get("reconnect_after", 0)
        window = float(window) if isinstance(window, (int, float)) and window > 0 else 0.0
        self._next_delay = self._random() * window
        log.info(
            "Server asked us to go away ({reason}); reconnecting in {delay:.2f}s",
            reason=data.get("reason", "no reason given"),
            delay=self._next_delay,
        )
        conn.when_idle().addCallback(lambda _: conn.close())

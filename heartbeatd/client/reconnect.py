"""A client that stays connected: Twisted's ClientService plus heartbeatd's handshake and goaway.

Reconnects with exponential backoff and *full jitter* (`heartbeatd.client.backoff`), so
clients that lost the same server do not return in lockstep.  Push handlers are kept across
reconnects.  When the server says ``goaway`` (it is draining), the client lets its in-flight
requests finish, closes, and reconnects after a random delay within the server's
``reconnect_after`` window instead of treating it as an error.

Given several endpoints (the nodes of a cluster), it connects to one and, when an attempt
fails (refused, no hello, or a goaway), moves to the next at once; only a full round of
failures, every endpoint once, waits a backoff step, so a dead node costs one quick failed
attempt and not a backoff delay.  A connection that works resets the count.

With ``resumable=True`` the client keeps a resumable session (`heartbeatd.client.session`):
it starts one after its first handshake and resumes it after every reconnect, so requests
survive a lost connection until their own timeout, pushes reach the handlers exactly once and
in order, and subscriptions carry on without being sent again (a subscription counts as
held by the session only once its subscribe was answered; one refused, unavailable or lost
meanwhile is sent again).  ``on_session`` hears
``started``, ``resumed`` and ``session_lost``; after a lost session the client starts a new
one and subscribes again with ``since``, as without sessions.  A resume or a session start
answered ``unavailable`` (a cluster whose Redis is unreachable: the server may well hold the
session still) loses nothing: the client reconnects with its backoff and asks again, the
session and its waiting requests kept, for ``session_retry_timeout`` seconds from the first
such answer (the last try at the deadline); then what waits fails with
`SessionUnavailable` (a `SessionLost`), ``on_session`` hears ``session_lost`` (reason
``unavailable``), and the client goes on trying, a new session.

Every wait has a deadline and every failure is a `ClientError`: ``request(timeout=N)`` spends
at most N seconds in all, waiting for a connection included, and fails with `NotConnected`
while the server is down; ``when_connected`` fails with `ConnectionFailed` or `NotConnected`,
never with Twisted's own connection errors.  ``subscribe`` fails with the server's
`ServerError` when it refuses, and with `SubscriptionUnavailable` after answering
``unavailable`` for ``subscribe_retry_timeout`` seconds (retried with backoff until then); a
subscribe's ``request_timeout`` counts only while connected (in a session, afresh on each
connection).  ``stop`` fails everything still waiting (requests, ``when_connected``,
subscribes) with `ClientStopped`, both a `ConnectionClosed` and a `NotConnected`.  In a
session, ``unsubscribe`` is numbered: made while disconnected, the resume sends it.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.internet import ClientService
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from heartbeatd._logging import get_logger
from heartbeatd.client.backoff import full_jitter_backoff
from heartbeatd.client.channels import Subscription, channels_of
from heartbeatd.client.connection import (
    DEFAULT_HELLO_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
    ClientConnection,
    PushHandler,
)
from heartbeatd.client.errors import (
    ClientError,
    ClientStopped,
    ConnectionClosed,
    ConnectionFailed,
    NotConnected,
    RequestTimeout,
    ServerError,
    SessionLost,
    SubscriptionRateLimited,
    SubscriptionUnavailable,
)
from heartbeatd.client.session import (
    DEFAULT_END_TIMEOUT,
    DEFAULT_RETRY_TIMEOUT,
    ClientSession,
    SessionEvent,
)
from heartbeatd.client.tls import ClientTLS, wrap_client_endpoint
from heartbeatd.wire.envelope import OMIT

__all__ = [
    "DEFAULT_SESSION_RETRY_TIMEOUT",
    "DEFAULT_SUBSCRIBE_RETRY_TIMEOUT",
    "MAX_RETRY_AFTER",
    "ReconnectingClient",
    "full_jitter_backoff",
]

log = get_logger(__name__)

#: How long a subscription keeps subscribing again while the server answers ``unavailable``.
DEFAULT_SUBSCRIBE_RETRY_TIMEOUT = 60.0
#: How long a session keeps resuming (or starting) while the server answers ``unavailable``.
DEFAULT_SESSION_RETRY_TIMEOUT = DEFAULT_RETRY_TIMEOUT
#: Answers to a subscribe that say "not now", not "no": retried with backoff, bounded.
#: ``rate_limited`` too: a client with more subscriptions than the server's
#: ``channels.subscribe_burst`` re-subscribes them all after each reconnect.
RETRIED = frozenset({"unavailable", "rate_limited"})
#: The longest ``retry_after`` hint (in a ``rate_limited`` answer) a retry waits for: a
#: larger one is ignored (the backoff applies), so a hostile server cannot stall it for ever.
MAX_RETRY_AFTER = 60.0


@implementer(IStreamClientEndpoint)
class _RecordingEndpoint:
    """The endpoint `ClientService` connects to: the client's current one, in turn; it
    remembers why the last attempt failed, for the errors we raise."""

    def __init__(self, client: ReconnectingClient) -> None:
        self._client = client

    def connect(self, factory: Any) -> Deferred[Any]:
        endpoint = self._client.endpoints[self._client.current]
        return endpoint.connect(factory).addErrback(self._client._attempt_failed)


Endpoints = str | IStreamClientEndpoint | Sequence[str | IStreamClientEndpoint]


def endpoint_list(
    reactor: Any, endpoints: Endpoints, tls: ClientTLS | None = None
) -> list[IStreamClientEndpoint]:
    """One endpoint, or a list of them (strings or objects), as a non-empty list of objects;
    with ``tls``, each under TLS (its name taken from the string as written)."""
    if isinstance(endpoints, str) or not isinstance(endpoints, Sequence):
        endpoints = [endpoints]
    if not endpoints:
        raise ValueError("no endpoint given")
    out = []
    for endpoint in endpoints:
        if tls is not None:
            endpoint = wrap_client_endpoint(reactor, endpoint, tls)
        elif isinstance(endpoint, str):
            from twisted.internet.endpoints import clientFromString

            endpoint = clientFromString(reactor, endpoint)
        out.append(endpoint)
    return out


class ReconnectingClient:
    """Keeps one connection to a heartbeatd server; see the module docstring."""

    def __init__(
        self,
        reactor: Any,
        endpoint: Endpoints,
        *,
        framing: str = "int32",
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        hello_timeout: float = DEFAULT_HELLO_TIMEOUT,
        backoff_initial: float = 0.1,
        backoff_max: float = 30.0,
        random: Callable[[], float] = _random.random,
        tls: ClientTLS | None = None,
        token: str | None = None,
        get_token: Callable[[], Any] | None = None,
        resumable: bool = False,
        session_expiry: float | None = None,
        session_end_timeout: float = DEFAULT_END_TIMEOUT,
        subscribe_retry_timeout: float = DEFAULT_SUBSCRIBE_RETRY_TIMEOUT,
        session_retry_timeout: float = DEFAULT_SESSION_RETRY_TIMEOUT,
    ) -> None:
        for name, seconds in (
            ("subscribe_retry_timeout", subscribe_retry_timeout),
            ("session_retry_timeout", session_retry_timeout),
        ):
            if not seconds > 0:  # NaN too; math.inf: retry for ever
                raise ValueError(f"{name} must be a positive number of seconds, not {seconds!r}")
        # TLS under every connection; the token is sent on each (``get_token`` is called
        # for a fresh one on each connection and each refresh, JWTs being short-lived).
        endpoints = endpoint_list(reactor, endpoint, tls)
        #: The endpoints tried in turn, and the index of the one connected to (or tried next).
        self.endpoints: list[IStreamClientEndpoint] = endpoints
        self.current = 0
        self._token = token
        self._get_token = get_token
        self._reactor = reactor
        self._framing = framing
        self._request_timeout = request_timeout
        self._hello_timeout = hello_timeout
        self._random = random
        self._backoff = full_jitter_backoff(backoff_initial, backoff_max, random)
        self._subscribe_retry_timeout = subscribe_retry_timeout
        self._handlers: list[tuple[str, PushHandler]] = []
        self._next_delay: float | None = None
        self._current: ClientConnection | None = None
        self._subscriptions: list[Subscription] = []
        #: The resumable session (None without ``resumable``); the subscriptions it holds
        #: server-side (answered: a resume restores them, they are not sent again), and those
        #: sent in it and not answered yet (the answer comes after a resume, by the resend or
        #: the replay: they are not sent again either, unless it says ``not_subscribed``).
        self.session: ClientSession | None = (
            ClientSession(reactor, expiry=session_expiry, retry_timeout=session_retry_timeout)
            if resumable
            else None
        )
        self._session_subs: set[Subscription] = set()
        self._session_sent: set[Subscription] = set()
        self._session_end_timeout = session_end_timeout
        self._stopping = False
        #: Failed attempts (refused, or no hello) since the last good handshake.
        self._failures = 0
        self._in_service = 0  # > 0 while ClientService is calling us back
        self.goaways = 0
        #: Why the last connection attempt failed (None once connected).
        self.last_error: str | None = None
        self.service = ClientService(
            _RecordingEndpoint(self),
            Factory.forProtocol(self._build),
            retryPolicy=self._retry_delay,
            clock=reactor,
        )

    def start(self) -> None:
        self._stopping = False
        self.service.startService()

    def stop(self) -> Deferred[None]:
        """Stop reconnecting and close.  A session acknowledges what it received, fails its
        waiting requests with `ConnectionClosed`, and ends itself on the server (a numbered
        ``session_end``, waiting up to ``session_end_timeout`` seconds for its answer), so
        it does not hold one of the identity's sessions until it expires.

        Everything still waiting fails with `ClientStopped` (both a `ConnectionClosed` and a
        `NotConnected`): a request waiting for a connection or for its reply (in a session
        too), a `when_connected`, and a `subscribe` whose Deferred has not fired yet (no
        answer, or retrying ``unavailable``), which is forgotten.  Subscriptions the server
        accepted stay: a later `start` subscribes them again (with ``since``)."""
        self._stopping = True
        for sub in list(self._subscriptions):
            _cancel_retry(sub)
            if sub.waiters:  # only a Deferred someone holds: nothing is logged for the rest
                self._give_up(
                    sub,
                    Failure(
                        ClientStopped(
                            f"the client was stopped before the subscribe to {sub.channel!r} "
                            "was answered"
                        )
                    ),
                )
        conn = self._current
        if conn is not None and not conn.closed and conn.close_reason is None:
            # Its requests in flight fail with ClientStopped when it is gone.
            conn.close_reason = Failure(ClientStopped("the client was stopped"))
        if self.session is None:
            return self.service.stopService()
        ended = self.session.close(
            ClientStopped("the client was stopped"), end_timeout=self._session_end_timeout
        )
        return ended.addCallback(lambda _: self.service.stopService())

    def on_session(self, callback: Callable[[SessionEvent], object]) -> None:
        """With ``resumable``: ``callback(event)`` for ``{"event": "started"}``,
        ``{"event": "resumed", "replayed": n}`` and ``{"event": "session_lost", "reason": r}``."""
        if self.session is None:
            raise ValueError("on_session needs ReconnectingClient(..., resumable=True)")
        self.session.on_session(callback)

    def when_connected(
        self, fail_after: int | None = None, timeout: float | None = None
    ) -> Deferred[ClientConnection]:
        """The current connection, once connected and past the server's hello.

        Fails with `ConnectionFailed` after ``fail_after`` failed attempts (refused, or no
        hello), with `NotConnected` after ``timeout`` seconds, and with `ClientStopped` (a
        `NotConnected`) when the client is stopped.
        With neither, it waits for as long as it takes (`request` always has a deadline).
        """
        finished: list[str] = []  # set once: "done", "timeout" or "cancelled"
        pending: list[Any] = []  # what we wait on now: a Deferred or a delayed call
        handshakes_failed = 0

        def stop_waiting() -> None:
            for item in pending:
                if isinstance(item, Deferred) or item.active():
                    item.cancel()

        def cancel(_: Deferred[ClientConnection]) -> None:
            finish(Failure(CancelledError()), "cancelled")

        outer: Deferred[ClientConnection] = Deferred(cancel)
        timer = None
        if timeout is not None:
            timer = self._reactor.callLater(
                timeout, lambda: finish(Failure(CancelledError()), "timeout")
            )

        def finish(result: Any, how: str = "done") -> None:
            if finished:
                return
            finished.append(how)
            if timer is not None and timer.active():
                timer.cancel()
            stop_waiting()
            if how == "cancelled":
                return  # Deferred.cancel fails ``outer`` with CancelledError itself
            if isinstance(result, Failure):
                result = self._typed(result, how, timeout)
            if self._in_service:
                # Fired from inside ClientService's state machine: the caller's code must
                # not run there (a when_connected() or stop() of theirs would re-enter it
                # and raise), so it gets the outcome a moment later.
                self._reactor.callLater(0, outer.callback, result)
            else:
                outer.callback(result)

        def from_service(callback: Callable[..., None]) -> Callable[..., None]:
            def marked(result: Any) -> None:
                self._in_service += 1
                try:
                    callback(result)
                finally:
                    self._in_service -= 1

            return marked

        def wait() -> None:
            left = None if fail_after is None else fail_after - handshakes_failed
            connected = self.service.whenConnected(failAfterFailures=left)
            pending[:] = [connected]
            if connected.called:  # already connected: our callbacks run here, not in it
                connected.addCallbacks(handshake, finish)
            else:
                connected.addCallbacks(from_service(handshake), from_service(finish))

        def handshake(conn: ClientConnection) -> None:
            # ClientService's "connected" is TCP; ours is after the hello.
            ready = conn.when_ready()
            pending[:] = [ready]
            ready.addCallbacks(finish, handshake_failed)

        def handshake_failed(failure: Failure) -> None:
            nonlocal handshakes_failed
            if finished:
                return
            handshakes_failed += 1
            if fail_after is not None and handshakes_failed >= fail_after:
                finish(failure, "handshake")
            else:  # the service reconnects; wait for that (after it saw this loss)
                pending[:] = [self._reactor.callLater(0, wait)]

        wait()
        return outer

    def request(self, type: str, data: Any = OMIT, timeout: float | None = None) -> Deferred[Any]:
        """Send a request once connected; ``timeout`` covers the wait for a connection too."""
        seconds = self._request_timeout if timeout is None else timeout
        current = self._current
        session = self.session
        if session is not None and not self._stopping:
            if current is not None and current.usable and current.session_outcome is None:
                return current.request(type, data, seconds)  # the server refused a session
            # Numbered now (so requests keep the order they were made in); sent at once on
            # a connection with the session, else by the resume or the next session start.
            return session.request(type, data, seconds)
        if current is not None and current.usable:  # the common case: no wait at all
            return current.request(type, data, seconds)
        started = self._reactor.seconds()

        def send(conn: ClientConnection) -> Deferred[Any]:
            left = max(seconds - (self._reactor.seconds() - started), 0.0)
            return conn.request(type, data, left)

        return self.when_connected(timeout=seconds).addCallback(send)

    def _typed(self, failure: Failure, how: str, timeout: float | None) -> Failure:
        """Our error for a failed wait: never Twisted's ConnectionRefusedError and kin."""
        last = f" (last attempt: {self.last_error})" if self.last_error else ""
        if how == "timeout":
            error: ClientError = NotConnected(f"not connected within {timeout:g}s{last}")
        elif failure.check(CancelledError):  # ClientService's: stopped (a caller's returns early)
            error = ClientStopped(f"the client was stopped before it connected{last}")
        elif how == "handshake" or not isinstance(failure.value, ClientError):
            message = failure.getErrorMessage() or type(failure.value).__name__
            error = ConnectionFailed(f"could not connect: {message}")
        else:
            return failure
        error.__cause__ = failure.value
        return Failure(error)

    def on(self, type: str, handler: PushHandler) -> None:
        """Register a push handler on this and every future connection."""
        self._handlers.append((type, handler))
        if self._current is not None and not self._current.closed:
            self._current.on(type, handler)

    def subscribe(
        self,
        channel: str,
        on_publication: Callable[..., object],
        on_not_recovered: Callable[..., object] | None = None,
        **options: Any,
    ) -> Deferred[Subscription]:
        """Subscribe now and after every reconnect, with ``since``: each publication is
        delivered exactly once, or ``on_not_recovered(subscription, reason)`` says some were
        lost (see `heartbeatd.client.channels`).

        The result fires with the `Subscription` once the server accepted it (it waits for
        a connection as long as it takes).  It fails, and the subscription is forgotten (never
        sent again), with the server's `ServerError` when it refuses (``bad_channel``,
        ``too_many_channels``, ``forbidden``...), or with `SubscriptionUnavailable` when it
        answered ``unavailable`` (its channel broker is down) to every subscribe for
        ``subscribe_retry_timeout`` seconds: until then each ``unavailable`` is retried with
        the reconnect backoff, on the same connection (``rate_limited`` too, failing with
        that `ServerError` at the bound; a try waits at least the answer's ``retry_after``,
        up to `MAX_RETRY_AFTER`).  It fails with `ClientStopped` when `stop` comes first.  A
        subscribe with no answer within ``request_timeout`` drops the connection (a late
        answer would leave the server subscribed while we are not): the next one subscribes
        again.  A refusal on a later re-subscribe (after a reconnect) is logged."""
        sub = Subscription(channel, on_publication, on_not_recovered, **options)
        self._subscriptions.append(sub)
        first: Deferred[Subscription] = Deferred()
        sub.waiters.append(first)
        conn = self._current
        if conn is not None and conn.usable and not self._stopping:
            self._attach(conn, sub)
        # else: the next connection (after `start`, once stopped) subscribes it
        return first

    def unsubscribe(self, channel: str) -> Deferred[Any]:
        """Stop a subscription here and on every future connection.

        The result fires once the server no longer sends the channel's publications here:

        - on a connection without a session, with the server's answer; with None at once
          while disconnected, and with None when the server answers ``not_subscribed`` or
          the connection goes before the answer (`stop` too): the server holds no such
          subscription, or forgot it with its connection;
        - in a session that holds the subscription (or was sent its subscribe), with the
          answer to a numbered ``unsubscribe``: while disconnected it is sent by the resume,
          in order with what was asked before and after (a `subscribe` to the same channel
          made meanwhile comes after it), and its ``request_timeout`` counts only while
          connected, as a subscribe's does.  It fires with None if the server answers
          ``not_subscribed``, or if the session ends first (lost, or `stop`): the server no
          longer holds the subscription then either.  It fails with `RequestTimeout` when a
          connection gives no answer within ``request_timeout`` (the server may still send
          the channel's publications; they are dropped here).

        A `subscribe` to ``channel`` still waiting for its answer fails with a `ClientError`
        ("unsubscribed ...")."""
        subs = [s for s in self._subscriptions if s.channel == channel]
        session = self.session
        held = (
            session is not None
            and session.state.active
            and any(
                s in self._session_subs
                or s in self._session_sent
                or s._unsure_in == session.state.sid
                for s in subs
            )
        )
        waiters: list[Deferred[Subscription]] = []
        for sub in subs:
            sub.active = False
            _cancel_retry(sub)
            self._subscriptions.remove(sub)
            self._session_subs.discard(sub)
            self._session_sent.discard(sub)
            waiters += sub.waiters
            sub.waiters = []
        conn = self._current
        if held and session is not None:
            for sub in subs:
                self._unroute(sub)
            done = self._unsubscribe_in_session(session, channel)
        elif conn is not None and conn.usable and channel in channels_of(conn).subscriptions:
            # not_subscribed is settled there (None); a lost connection is settled here.
            done = channels_of(conn).unsubscribe(channel).addErrback(_forgotten_with_connection)
        else:
            done = succeed(None)
        # After the unsubscribe is numbered: a subscribe made from these errbacks follows it.
        for waiter in waiters:
            waiter.errback(ClientError(f"unsubscribed from {channel!r} before the server answered"))
        return done

    def _unsubscribe_in_session(self, session: ClientSession, channel: str) -> Deferred[Any]:
        """A numbered ``unsubscribe``, sent now or by the resume; see `unsubscribe`."""

        def settled(failure: Failure) -> Any:
            if failure.check(SessionLost) or (
                failure.check(ServerError) and failure.value.code == "not_subscribed"
            ):
                return None  # the server holds no such subscription (any more)
            if failure.check(ConnectionClosed) and self._stopping:
                return None  # `stop` ends the session, and the subscription with it
            return failure

        timeout = self._request_timeout
        request = session.request("unsubscribe", {"channel": channel}, timeout, per_connection=True)
        return request.addErrback(settled)

    def _attach(self, conn: ClientConnection, sub: Subscription) -> None:
        """Send ``sub``'s subscribe on ``conn`` (numbered in the session when one is attached
        there); its answer decides what comes next (`_subscribed`, `_subscribe_failed`)."""
        _cancel_retry(sub)
        sub._attempt += 1
        attempt = sub._attempt
        session = conn._session
        send = None
        if session is not None:
            self._session_sent.add(sub)
            timeout = self._request_timeout
            if sub._unsure_in is not None and sub._unsure_in == session.state.sid:
                # A subscribe of this session timed out: the server may hold it, and would
                # answer this one already_subscribed.  Unsubscribe first (numbered: handled
                # before the subscribe); either answer will do.
                session.request(
                    "unsubscribe", {"channel": sub.channel}, timeout, per_connection=True
                ).addErrback(lambda _: None)

            # Its deadline runs only while connected, afresh on each connection: the answer
            # comes after a resume (the resend or the replay), however long the reconnect.
            def send(type: str, data: Any) -> Deferred[Any]:
                return session.request(type, data, timeout, per_connection=True)

        sub._unsure_in = None
        channels_of(conn).attach(sub, send).addCallbacks(
            lambda _: self._subscribed(sub, attempt, session),
            lambda failure: self._subscribe_failed(failure, conn, sub, attempt, session),
        )

    def _current_attempt(self, sub: Subscription, attempt: int) -> bool:
        # Unsubscribed or given up: ``active`` is False (and the sub out of our list).
        return sub._attempt == attempt and sub.active and not self._stopping

    def _subscribed(self, sub: Subscription, attempt: int, session: ClientSession | None) -> None:
        if not self._current_attempt(sub, attempt):
            return
        sub._unavailable_since = None  # the next unavailable spell counts from its start
        sub._unavailable_attempts = 0
        if session is not None:
            self._session_sent.discard(sub)
            self._session_subs.add(sub)  # held by the session: a resume restores it

    def _subscribe_failed(
        self,
        failure: Failure,
        conn: ClientConnection,
        sub: Subscription,
        attempt: int,
        session: ClientSession | None,
    ) -> None:
        if not self._current_attempt(sub, attempt):
            return
        self._session_sent.discard(sub)
        error = failure.value
        if isinstance(error, ServerError):
            self._unroute(sub)
            if error.code in RETRIED:
                self._subscribe_unavailable(sub, error)
            elif (
                error.code == "not_subscribed"
                and session is not None
                and session.connection is not conn
            ):
                # Answered in a resume's replay: the server dropped the subscribe when the
                # session's connection went, before it was settled.  Not a refusal: send it
                # again (at most once per connection); if none is up, the next one does.
                live = self._current
                if live is not None and live.usable and live._session is session:
                    self._attach(live, sub)
            else:  # refused for good: bad_channel, too_many_channels, forbidden...
                self._give_up(sub, failure)
        elif isinstance(error, RequestTimeout):
            # A late answer would leave the server subscribed while we are not: drop the
            # connection, the next one subscribes again.  A session outlives it and may hold
            # the subscription: after the resume, unsubscribe first (`_attach`).
            log.warn(
                "No answer to the subscribe to {channel}: {why}; dropping the connection",
                channel=sub.channel,
                why=failure.getErrorMessage(),
            )
            target = conn
            if session is not None:
                sub._unsure_in = session.state.sid
                target = session.connection
            if target is not None:
                target.abort(ConnectionClosed(f"no answer to the subscribe to {sub.channel!r}"))
        # else ConnectionClosed, SessionLost: the next connection (or session) subscribes again

    def _subscribe_unavailable(self, sub: Subscription, error: ServerError) -> None:
        """``unavailable`` (the cluster's broker is down) or ``rate_limited``: subscribe
        again on this connection, backing off, for ``subscribe_retry_timeout`` seconds from
        the first such answer (across reconnects; the last try comes at the deadline), then
        fail: `SubscriptionUnavailable`, or the ``rate_limited`` error itself.  An answer's
        ``retry_after`` (up to `MAX_RETRY_AFTER` seconds; a larger one is ignored) is the
        shortest wait before the next try; when it ends past the deadline, the subscription
        fails at the deadline without a try the server said it would refuse (as in JS)."""
        now = self._reactor.seconds()
        if sub._unavailable_since is None:
            sub._unavailable_since = now
            log.warn(
                "The server cannot subscribe to {channel} now ({why}); retrying for {limit:g}s",
                channel=sub.channel,
                why=error.message,
                limit=self._subscribe_retry_timeout,
            )
        sub._unavailable_attempts += 1
        since, limit = sub._unavailable_since, self._subscribe_retry_timeout
        if now - since >= limit:
            self._stop_retrying(sub, error)
            return
        left = since + limit - now
        delay = min(self._backoff(sub._unavailable_attempts), left)
        hint = error.retry_after  # the server says when it will take one: never sooner
        if hint is not None and hint <= MAX_RETRY_AFTER:
            if hint > left:  # every try before the deadline would be refused
                sub._retry_timer = self._reactor.callLater(left, self._stop_retrying, sub, error)
                return
            delay = max(delay, hint)
        sub._retry_timer = self._reactor.callLater(delay, self._retry_subscribe, sub)

    def _stop_retrying(self, sub: Subscription, error: ServerError) -> None:
        """``subscribe_retry_timeout`` ran out: `SubscriptionUnavailable` or
        `SubscriptionRateLimited`, caused by the last answer."""
        sub._retry_timer = None
        since = sub._unavailable_since
        elapsed = self._reactor.seconds() - (since if since is not None else 0.0)
        attempts, limit = sub._unavailable_attempts, self._subscribe_retry_timeout
        gave_up: ServerError
        if error.code == "unavailable":
            gave_up = SubscriptionUnavailable(sub.channel, elapsed, attempts, limit)
        else:
            gave_up = SubscriptionRateLimited(
                sub.channel, elapsed, attempts, limit, error.retry_after
            )
        gave_up.__cause__ = error
        self._give_up(sub, Failure(gave_up))

    def _retry_subscribe(self, sub: Subscription) -> None:
        sub._retry_timer = None
        conn = self._current
        if self._current_attempt(sub, sub._attempt) and conn is not None and conn.usable:
            self._attach(conn, sub)
        # else: the next connection subscribes it (neither held nor sent in a session)

    def _give_up(self, sub: Subscription, failure: Failure) -> None:
        """The subscription failed for good: forget it, and tell whoever waits for it."""
        sub.active = False
        _cancel_retry(sub)
        self._subscriptions = [s for s in self._subscriptions if s is not sub]
        self._session_subs.discard(sub)
        self._session_sent.discard(sub)
        self._unroute(sub)
        waiters, sub.waiters = sub.waiters, []
        if not waiters:
            log.warn(
                "Subscribing to {channel} again failed, the subscription ends: {why}",
                channel=sub.channel,
                why=failure.getErrorMessage(),
            )
        for waiter in waiters:
            waiter.errback(failure)

    def _unroute(self, sub: Subscription) -> None:
        """The current connection no longer routes ``sub``'s publications."""
        conn = self._current
        if conn is not None:
            channels = channels_of(conn)
            if channels.subscriptions.get(sub.channel) is sub:
                del channels.subscriptions[sub.channel]

    def _subscription_lost(self, data: Any, conn: ClientConnection) -> None:
        """The resumed session could not restore a subscription (its broker was down):
        subscribe again, with ``since`` (an ``unavailable`` answer is retried, bounded)."""
        channel = data.get("channel") if isinstance(data, dict) else None
        sub = next((s for s in self._subscriptions if s.channel == channel and s.active), None)
        if sub is None:
            return
        log.warn(
            "The session's subscription to {channel} was not restored ({reason}); subscribing "
            "again",
            channel=sub.channel,
            reason=data.get("reason"),
        )
        self._session_subs.discard(sub)
        self._session_sent.discard(sub)
        self._unroute(sub)
        live = self._current
        if live is not None and live.usable:
            self._attach(live, sub)
        # else: neither held nor sent, so the next connection subscribes it

    def _resubscribe(self, conn: ClientConnection) -> None:
        channels = channels_of(conn)
        resumed = conn.session_outcome == "resumed"
        if not resumed:  # a new session (or none) holds no subscription
            self._session_subs.clear()
            self._session_sent.clear()
        for sub in list(self._subscriptions):
            if not sub.active:
                continue
            if resumed and (sub in self._session_subs or sub in self._session_sent):
                # The resumed session still has it server-side (or will answer it, by the
                # resend or the replay): route its publications here; nothing is sent.
                channels.subscriptions[sub.channel] = sub
            elif sub.channel not in channels.subscriptions:
                if not resumed:
                    sub._unsure_in = None
                self._attach(conn, sub)

    def _attempt_failed(self, failure: Failure) -> Failure:
        """Remember why (for our errors), move to the next endpoint, pass the failure on."""
        self.last_error = failure.getErrorMessage() or type(failure.value).__name__
        self._failures += 1
        self._next_endpoint()
        return failure

    def _next_endpoint(self) -> None:
        self.current = (self.current + 1) % len(self.endpoints)

    def _handshake_done(self, conn: ClientConnection) -> None:
        self.last_error = None
        self._failures = 0
        self._resubscribe(conn)

    def _handshake_failed(self, failure: Failure) -> None:
        self._attempt_failed(failure)  # recorded, counted, the next endpoint; it ends here

    def _build(self) -> ClientConnection:
        conn = ClientConnection(
            self._reactor,
            self._framing,
            self._request_timeout,
            self._hello_timeout,
            token=None if self._get_token is not None else self._token,
            get_token=self._get_token,
            session=self.session,
        )
        for type_, handler in self._handlers:
            conn.on(type_, handler)
        conn.on_goaway(self._goaway)
        conn.on("subscription_lost", self._subscription_lost)
        conn.when_ready().addCallbacks(self._handshake_done, self._handshake_failed)
        self._current = conn
        return conn

    def _retry_delay(self, attempt: int) -> float:
        if self._next_delay is not None:
            delay, self._next_delay = self._next_delay, None
            return delay
        # Our own count, not ClientService's ``attempt``: that one restarts at each TCP
        # connect, while a server that accepts and then refuses (too_many_connections) or
        # never says hello must be backed off from as well.  0: the connection was lost
        # after working (or a goaway's window was used up): one short step, same endpoint.
        failures = self._failures
        count = len(self.endpoints)
        if not failures:
            delay = self._backoff(1)
        elif failures % count:
            delay = 0.0  # the next endpoint of this round, at once
        else:
            delay = self._backoff(failures // count)  # a full round failed: one backoff step
        deadline = None if self.session is None else self.session.retry_deadline
        if deadline is not None:
            # Resuming a session the server answered unavailable: the last try comes at
            # session_retry_timeout, not a backoff step after it.
            left = deadline - self._reactor.seconds()
            if left > 0:
                delay = min(delay, left)
        return delay

    def _goaway(self, conn: ClientConnection, data: dict[str, Any]) -> None:
        self.goaways += 1
        window = data.get("reconnect_after", 0)
        window = float(window) if isinstance(window, (int, float)) and window > 0 else 0.0
        self._next_delay = self._random() * window
        if len(self.endpoints) > 1:
            self._next_endpoint()  # that server is draining: another one, after the window
        log.info(
            "Server asked us to go away ({reason}); reconnecting in {delay:.2f}s",
            reason=data.get("reason", "no reason given"),
            delay=self._next_delay,
        )
        idle = [conn.when_idle()]
        if self.session is not None:  # numbered requests wait in the session, not the connection
            idle.append(self.session.when_idle())
        gatherResults(idle).addCallback(lambda _: conn.close())


def _forgotten_with_connection(failure: Failure) -> Failure | None:
    """A plain unsubscribe whose connection went (or `stop`): the server dropped every
    subscription of that connection, this one included."""
    return None if failure.check(ConnectionClosed) else failure


def _cancel_retry(sub: Subscription) -> None:
    timer, sub._retry_timer = sub._retry_timer, None
    if timer is not None and timer.active():
        timer.cancel()

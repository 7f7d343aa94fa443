"""A pool of long-lived client connections: the seed tutorial's six properties, done carefully.

1. an idle queue of ready connections;  2. the set of connections in use;  3. a FIFO queue of
borrowers waiting for one;  4. dead connections removed and never lent;  5. configurable sizes;
6. new connections created to refill, with backoff while the server is down.

Each pooled connection has one record (`_Member`: its state, timers and lease), and every way
a connection leaves the pool goes through one method, `Pool._remove`.

Idle connections keep running the protocol heartbeat, so a dead one is noticed and replaced
*before* anyone borrows it, rather than by a validation query at borrow time.  Every wait is
bounded (``acquire_timeout``, ``max_waiters``, ``connect_timeout``), so an acquire never hangs.
Waiter lists are swapped before they are fired, so callbacks that re-enter the pool are safe.

While the server is down the pool sends a single probe connection at a time, one backoff step
per failed round (`heartbeatd.client.backoff`); while callers are asking, probes come at least
every ``probe_interval``, and a waiter about to time out that has seen no attempt triggers one.
With ``fail_fast``, callers fail at once with `PoolUnavailable` instead of waiting.

Given several endpoints (``endpoint: [a, b, c]``, the nodes of a cluster), each new connection
goes to the healthy endpoint holding the fewest of the pool's connections.  An endpoint whose
connect failed is left alone for a backoff delay of its own while others serve; when every
endpoint has failed, the pool is down as above, and each retry is a round that probes the
endpoints one after another, backing off only once the whole round has failed.
"""

from __future__ import annotations

import os
import random as _random
import sys
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from heartbeatd._logging import get_logger
from heartbeatd.client.backoff import backoff_cap
from heartbeatd.client.config import PoolConfig
from heartbeatd.client.connection import ClientConnection, connect
from heartbeatd.client.errors import (
    ConnectionClosed,
    PoolClosed,
    PoolExhausted,
    PoolTimeout,
    PoolUnavailable,
    RequestTimeout,
    ServerError,
)
from heartbeatd.client.reconnect import ReconnectingClient
from heartbeatd.client.tls import client_tls, read_token
from heartbeatd.wire.envelope import OMIT

__all__ = ["Pool"]

log = get_logger(__name__)

#: Server error codes that mean the connection's byte stream itself went wrong.
_PROTOCOL_ERROR_CODES = frozenset({"bad_json", "bad_message", "bad_frame", "frame_too_large"})


def breaks_connection(failure: Failure) -> bool:
    """Whether a failed piece of work means its connection must not be reused."""
    if failure.check(RequestTimeout, ConnectionClosed):
        return True
    error = failure.check(ServerError) and failure.value
    return bool(error) and error.code in _PROTOCOL_ERROR_CODES  # type: ignore[union-attr]


_Frame = tuple[str, int, str]

_DEFER_MODULE = os.path.join("twisted", "internet", "defer.py")


def _caller_frames(limit: int = 8) -> tuple[_Frame, ...]:
    """Where `acquire` was called from (file, line, function), skipping pool and Deferred code.

    Plain tuples, because this runs on every borrow; they are formatted only for a leak.
    """
    frames = []
    frame = sys._getframe(1)
    while frame is not None and len(frames) < limit:
        code = frame.f_code
        filename = code.co_filename
        if filename != __file__ and not filename.endswith(_DEFER_MODULE):
            frames.append((filename, frame.f_lineno, code.co_name))
        frame = frame.f_back
    return tuple(reversed(frames))


def _format_frames(frames: tuple[_Frame, ...]) -> str:
    summaries = [traceback.FrameSummary(f, n, name) for f, n, name in frames]
    return "".join(traceback.format_list(summaries))


def _cancel(timer: IDelayedCall | None) -> None:
    if timer is not None and timer.active():
        timer.cancel()


class _Target:
    """One endpoint of the pool and how it has fared."""

    __slots__ = ("down", "endpoint", "failures", "load", "retry_at")

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint
        #: The pool's connections to it, made or being made (counted, not recounted).
        self.load = 0
        #: Its last connect failed; tried again (while others serve) from ``retry_at``.
        self.down = False
        self.failures = 0
        self.retry_at = 0.0


# A member's states.  NEW: just connected, not yet offered.  IDLE: in the idle queue.
# CHECKING: being pinged before it is lent (counts as in use).  LENT: a borrower has it.
# GONE: removed; a record that outlives its removal (in a callback) sees this.
NEW, IDLE, CHECKING, LENT, GONE = "new", "idle", "checking", "lent", "gone"


class _Member:
    """Everything the pool knows about one of its connections."""

    __slots__ = (
        "conn",
        "idle_timer",
        "leak_timer",
        "life_timer",
        "retiring",
        "since",
        "stack",
        "state",
        "target",
    )

    def __init__(self, conn: ClientConnection, now: float, target: _Target) -> None:
        self.conn = conn
        self.target = target
        self.state = NEW
        #: When it went idle or was last used for a shared request (IDLE), or was lent (LENT).
        self.since = now
        #: Expired, told to go away, or broken under a borrower: destroyed when released.
        self.retiring = False
        self.idle_timer: IDelayedCall | None = None
        self.life_timer: IDelayedCall | None = None
        self.leak_timer: IDelayedCall | None = None
        #: Where the borrower called `acquire`, for the leak warning.
        self.stack: tuple[_Frame, ...] = ()


class _Waiter:
    """A borrower queued for a connection."""

    __slots__ = ("attempts_before", "d", "queued_at", "stack", "timer")

    def __init__(
        self,
        d: Deferred[ClientConnection],
        queued_at: float,
        stack: tuple[_Frame, ...],
        attempts_before: int,
    ) -> None:
        self.d = d
        self.queued_at = queued_at
        self.stack = stack
        #: Connection attempts the pool had started when this waiter arrived.
        self.attempts_before = attempts_before
        self.timer: IDelayedCall | None = None


class _Attempt:
    """One connection being made."""

    __slots__ = ("connecting", "epoch", "target", "timed_out", "timer")

    def __init__(self, epoch: int, target: _Target) -> None:
        #: Failures of attempts started in the same epoch are one failed round.
        self.epoch = epoch
        self.target = target
        self.connecting: Deferred[ClientConnection] | None = None
        self.timer: IDelayedCall | None = None
        self.timed_out = False


class Pool:
    """Lends `ClientConnection`s to borrowers; see the module docstring."""

    #: A waiter that has seen no connection attempt start while it waited triggers one when
    #: this fraction of ``acquire_timeout`` has passed, so it does not time out on a server
    #: that came back during a long backoff delay.
    LAST_CHANCE = 0.8

    def __init__(
        self,
        reactor: IReactorTime,
        config: PoolConfig | None = None,
        connect_fn: Callable[[], Deferred[ClientConnection]] | None = None,
        random: Callable[[], float] = _random.random,
        connect_to: Callable[[Any], Deferred[ClientConnection]] | None = None,
        get_token: Callable[[], Any] | None = None,
        resumable: bool | None = None,
    ) -> None:
        self.clock = reactor
        self.config = config = config or PoolConfig()
        # The argument, when given, wins over the config's field (it came first).
        resumable = config.resumable if resumable is None else resumable
        # Read once, so a missing file or a half TLS setting fails here, not at each connect.
        token = read_token(config.token_file) if config.token_file else None
        tls = client_tls(config)
        #: Makes one new connection to the endpoint it is given; tests replace it.
        self.connect_to = connect_to or (
            lambda endpoint: connect(
                reactor,
                endpoint,
                framing=config.framing,
                request_timeout=config.request_timeout,
                hello_timeout=config.connect_timeout,
                tls=tls,
                token=None if get_token is not None else token,
                get_token=get_token,
            )
        )
        #: Makes one new connection, whatever the endpoint (a test's; None: `connect_to`).
        self.connect_fn = connect_fn
        self._targets = [_Target(endpoint) for endpoint in config.endpoints]
        self._next_target = 0  # where the round robin (ties, probes) goes on
        self._round_left = 0  # endpoints still to probe in this round of an outage
        self._random = random
        #: Makes the reconnecting connection subscriptions live on; tests replace it.
        self.subscriber_fn: Callable[[], ReconnectingClient] = lambda: ReconnectingClient(
            reactor,
            list(config.endpoints),
            framing=config.framing,
            request_timeout=config.request_timeout,
            hello_timeout=config.connect_timeout,
            backoff_initial=config.backoff_initial,
            backoff_max=config.backoff_max,
            tls=tls,
            token=token,
            get_token=get_token,
            resumable=resumable,
            subscribe_retry_timeout=config.subscribe_retry_timeout,
            session_retry_timeout=config.session_retry_timeout,
        )
        self._subscriber: ReconnectingClient | None = None
        #: ``on_session`` callbacks for the subscription connection (``resumable``).
        self._session_callbacks: list[Callable[[dict[str, Any]], object]] = []
        self._members: dict[ClientConnection, _Member] = {}
        self._idle: deque[_Member] = deque()  # oldest first; request() rotates it
        self._waiters: deque[_Waiter] = deque()
        self._attempts: set[_Attempt] = set()
        self._closed = False
        self._close_waiters: list[Deferred[None]] = []
        self._close_timer: IDelayedCall | None = None
        # Recovery: the server is "down" from the first failed round to the next success.
        self._down = False
        self._down_since = 0.0
        self._failed_rounds = 0
        self._epoch = 0
        self._last_error: str | None = None
        self._attempts_started = 0
        self._retry: IDelayedCall | None = None
        self._retry_busy_at = 0.0  # when the pending retry is due if callers are asking
        self._asked = False  # a fail_fast caller asked since the last attempt started
        self.created = 0
        self.destroyed = 0
        self.timeouts = 0
        self.errors = 0
        self.unavailable = 0
        self.waits = 0
        self.wait_seconds_total = 0.0
        self.wait_seconds_max = 0.0

    # -- public API -------------------------------------------------------------------------

    def start(self) -> None:
        """Open ``min_idle`` connections now rather than on first use."""
        self._refill()

    def acquire(self) -> Deferred[ClientConnection]:
        """A connection for your exclusive use; give it back with `release`."""
        # The borrower's stack is taken here, in its own call, for the leak warning.
        return self._acquire(_caller_frames() if self.config.leak_threshold else ())

    def release(self, conn: ClientConnection, broken: bool = False) -> None:
        """Return a connection; ``broken`` destroys it instead of making it idle again."""
        member = self._members.get(conn)
        if member is None or member.state is not LENT:
            return  # released twice, or removed when it died: nothing to do
        _cancel(member.leak_timer)
        member.leak_timer, member.stack = None, ()
        if broken or self._closed or member.retiring or not conn.usable:
            self._remove(member)
        else:
            self._offer(member)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Call ``fn(conn, *args, **kwargs)`` with a borrowed connection; always release it."""

        def use(conn: ClientConnection) -> Deferred[Any]:
            def done(result: Any) -> Any:
                broken = isinstance(result, Failure) and breaks_connection(result)
                self.release(conn, broken=broken)
                return result

            return maybeDeferred(fn, conn, *args, **kwargs).addBoth(done)

        stack = _caller_frames() if self.config.leak_threshold else ()
        return self._acquire(stack).addCallback(use)

    def request(self, type: str, data: Any = OMIT, timeout: float | None = None) -> Deferred[Any]:
        """One request/reply, multiplexed over the pool's connections.

        The protocol matches replies by id, so a single request needs a connection only to be
        *sent*: it goes out on the next idle connection (round robin), which stays available;
        with none idle it waits for one like `acquire`, sends, and gives it back at once.
        ``data`` left out means no ``"data"`` key on the wire; ``None`` sends ``null`` (the
        same rule as `ClientConnection.request`).  Use `run` or `connection` when a
        conversation needs a connection to itself.
        """
        if self._closed:
            return fail(PoolClosed("the pool is closed"))
        idle = self._idle
        while idle:
            member = idle[0]
            if not member.conn.usable or member.retiring:
                self._remove(member)
                continue
            idle.rotate(-1)
            member.since = self.clock.seconds()
            return self._send_shared(member.conn, type, data, timeout)

        def send(conn: ClientConnection) -> Deferred[Any]:
            d = self._send_shared(conn, type, data, timeout)
            self.release(conn)  # back at once: the next borrower may use it while we wait
            return d

        return self._acquire(()).addCallback(send)

    def connection(self) -> _Borrowed:
        """``async with pool.connection() as conn:`` — released even if the body raises."""
        return _Borrowed(self, _caller_frames() if self.config.leak_threshold else ())

    def stats(self) -> dict[str, Any]:
        """Counts, the recovery state, and how long borrowers waited (seconds)."""
        now = self.clock.seconds()
        next_retry: float | None = None
        if self._down:
            pending = self._retry is not None and self._retry.active()
            next_retry = max(self._retry.getTime() - now, 0.0) if pending else 0.0  # type: ignore[union-attr]
        return {
            "idle": len(self._idle),
            "in_use": sum(m.state is LENT or m.state is CHECKING for m in self._members.values()),
            "waiting": len(self._waiters),
            "creating": len(self._attempts),
            "created": self.created,
            "destroyed": self.destroyed,
            "timeouts": self.timeouts,
            "errors": self.errors,
            "unavailable": self.unavailable,
            "server_down": self._down,
            "down_for": now - self._down_since if self._down else 0.0,
            "attempt": self._failed_rounds,
            "next_retry_in": next_retry,
            "last_error": self._last_error,
            "waits": self.waits,
            "wait_seconds_total": self.wait_seconds_total,
            "wait_seconds_max": self.wait_seconds_max,
            "oldest_waiter": now - self._waiters[0].queued_at if self._waiters else 0.0,
            "endpoints": [
                {
                    "endpoint": t.endpoint,
                    "connections": self._load(t),
                    "down": t.down,
                    "failures": t.failures,
                }
                for t in self._targets
            ],
        }

    def subscribe(
        self,
        channel: str,
        on_publication: Callable[..., object],
        on_not_recovered: Callable[..., object] | None = None,
        **options: Any,
    ) -> Deferred[Any]:
        """Subscribe to ``channel``: each publication exactly once, or ``on_not_recovered``.

        Subscriptions do not ride on lent connections (a borrower could close one, and a
        held one would look like a leak): they share one extra, long-lived connection the
        pool keeps for them, which reconnects with backoff and re-subscribes with ``since``
        (`ReconnectingClient.subscribe`).  It is not counted in ``max_size``.  With
        ``Pool(..., resumable=True)`` it keeps a resumable session: after a reconnect it
        resumes (nothing is subscribed again, nothing missed or repeated), see `on_session`.
        The result fails with the server's `ServerError` when it refuses the subscription,
        with `SubscriptionUnavailable` after ``subscribe_retry_timeout`` seconds of
        ``unavailable`` answers (``rate_limited`` ones: that error), or with `ClientStopped`
        (a `ConnectionClosed`) when `close` comes first (`ReconnectingClient.stop`).
        """
        if self._closed:
            return fail(PoolClosed("the pool is closed"))
        if self._subscriber is None:
            self._subscriber = self.subscriber_fn()
            if self._subscriber.session is not None:
                for callback in self._session_callbacks:
                    self._subscriber.on_session(callback)
            self._subscriber.start()
        return self._subscriber.subscribe(channel, on_publication, on_not_recovered, **options)

    def on_session(self, callback: Callable[[dict[str, Any]], object]) -> None:
        """``callback(event)`` for the subscription connection's session (``resumable``):
        ``started``, ``resumed`` (``replayed``), ``session_lost`` (``reason``)."""
        self._session_callbacks.append(callback)
        if self._subscriber is not None and self._subscriber.session is not None:
            self._subscriber.on_session(callback)

    def unsubscribe(self, channel: str) -> Deferred[Any]:
        """Stop a subscription made with `subscribe`."""
        if self._subscriber is None:
            return succeed(None)
        return self._subscriber.unsubscribe(channel)

    def close(self) -> Deferred[None]:
        """Fail every waiter, stop every connect, close every connection; fires once done
        (the subscription connection's session ended first, see `ReconnectingClient.stop`)."""
        stopping: Deferred[None] | None = None
        if self._subscriber is not None:
            subscriber, self._subscriber = self._subscriber, None
            stopping = subscriber.stop()
        if not self._closed:
            self._closed = True
            _cancel(self._retry)
            waiters, self._waiters = self._waiters, deque()
            for waiter in waiters:
                _cancel(waiter.timer)
                waiter.d.errback(PoolClosed("the pool was closed while waiting for a connection"))
            for attempt in list(self._attempts):
                if attempt.connecting is not None:
                    attempt.connecting.cancel()
            for member in list(self._members.values()):
                member.conn.close()
            if self._members:
                # A polite close waits for our unsent bytes; a peer that reads nothing would
                # keep it waiting, so after connect_timeout the rest are aborted.
                self._close_timer = self.clock.callLater(
                    self.config.connect_timeout, self._abort_remaining
                )
        if not self._members and not self._attempts:
            d: Deferred[None] = succeed(None)
        else:
            d = Deferred()
            self._close_waiters.append(d)
        if stopping is None:
            return d
        return stopping.addCallback(lambda _: d)

    # -- lending ----------------------------------------------------------------------------

    def _acquire(self, stack: tuple[_Frame, ...]) -> Deferred[ClientConnection]:
        if self._closed:
            return fail(PoolClosed("the pool is closed"))
        member = self._take_idle()
        if member is not None:
            return self._lend_checked(member, stack)
        if self._down and self.config.fail_fast:
            return self._unavailable(stack)
        if len(self._waiters) >= self.config.max_waiters:
            self.errors += 1
            return fail(
                PoolExhausted(f"{self.config.max_waiters} waiters already; {self._state()}")
            )
        waiter = _Waiter(
            Deferred(lambda _: self._drop_waiter(waiter)),
            self.clock.seconds(),
            stack,
            self._attempts_started,
        )
        waiter.timer = self.clock.callLater(
            self.config.acquire_timeout, self._waiter_timed_out, waiter
        )
        self._waiters.append(waiter)
        if self._down:
            self._hurry_retry(waiter)
        self._refill()
        return waiter.d

    def _unavailable(self, stack: tuple[_Frame, ...]) -> Deferred[ClientConnection]:
        """fail_fast while the server is down: fail now; asking still hurries the next probe."""
        self.unavailable += 1
        self._asked = True
        self._hurry_retry(None)
        self._refill()
        if not self._down:  # that probe connected at once (a synchronous connect_fn)
            return self._acquire(stack)
        return fail(PoolUnavailable(f"the server is down; {self._recovery_text()}"))

    def _take_idle(self) -> _Member | None:
        while self._idle:
            member = self._idle[0]
            if member.conn.usable and not member.retiring:
                self._idle.popleft()
                _cancel(member.idle_timer)
                member.idle_timer = None
                return member
            self._remove(member)
        return None

    def _lend_checked(
        self, member: _Member, stack: tuple[_Frame, ...]
    ) -> Deferred[ClientConnection]:
        window = self.config.ping_on_borrow_after
        if not window or self.clock.seconds() - member.since < window:
            return succeed(self._lend(member, stack))
        # Idle long enough to doubt it: one ping before lending (the heartbeat covers the rest).
        member.state = CHECKING
        conn = member.conn

        def alive(_: object) -> Deferred[ClientConnection]:
            if member.state is not CHECKING:  # removed meanwhile (the pool was closed)
                return self._acquire(stack)
            if member.retiring or not conn.usable:  # goaway or expiry during the ping
                self._remove(member)
                return self._acquire(stack)
            return succeed(self._lend(member, stack))

        def dead(failure: Failure) -> Deferred[ClientConnection]:
            self._remove(member)
            return self._acquire(stack)

        return conn.request("ping", timeout=self.config.connect_timeout).addCallbacks(alive, dead)

    def _lend(self, member: _Member, stack: tuple[_Frame, ...]) -> ClientConnection:
        member.state = LENT
        member.since = self.clock.seconds()
        member.stack = stack
        threshold = self.config.leak_threshold
        if threshold:
            member.leak_timer = self.clock.callLater(threshold, self._leak, member)
        return member.conn

    def _leak(self, member: _Member) -> None:
        member.leak_timer = None
        if member.state is LENT:
            log.warn(
                "A pooled connection has been held for {held:.1f}s (leak_threshold {limit:g}s); "
                "was it released? Acquired at:\n{stack}",
                held=self.clock.seconds() - member.since,
                limit=self.config.leak_threshold,
                stack=_format_frames(member.stack),
            )

    def _offer(self, member: _Member) -> None:
        """A usable connection is free: the first waiter gets it, else it goes idle."""
        if self._waiters:
            waiter = self._waiters.popleft()
            _cancel(waiter.timer)
            waited = self.clock.seconds() - waiter.queued_at
            self.waits += 1
            self.wait_seconds_total += waited
            self.wait_seconds_max = max(self.wait_seconds_max, waited)
            waiter.d.callback(self._lend(member, waiter.stack))
            return
        member.state = IDLE
        member.since = self.clock.seconds()
        self._idle.append(member)
        if self.config.idle_timeout:
            member.idle_timer = self.clock.callLater(
                self.config.idle_timeout, self._idle_expired, member
            )

    def _idle_expired(self, member: _Member) -> None:
        member.idle_timer = None
        if member.state is not IDLE:
            return
        timeout = self.config.idle_timeout
        used_ago = self.clock.seconds() - member.since
        if used_ago >= timeout and len(self._idle) > self.config.min_idle:
            self._remove(member)
        else:  # used for shared requests meanwhile, or needed to keep min_idle: look again
            delay = timeout - used_ago if used_ago < timeout else timeout
            member.idle_timer = self.clock.callLater(delay, self._idle_expired, member)

    def _waiter_timed_out(self, waiter: _Waiter) -> None:
        waiter.timer = None
        self._waiters.remove(waiter)
        self.timeouts += 1
        waiter.d.errback(
            PoolTimeout(
                f"no connection available within {self.config.acquire_timeout:g}s; "
                f"{self._state(extra_waiting=1)}"
            )
        )

    def _drop_waiter(self, waiter: _Waiter) -> None:
        """The borrower cancelled its acquire."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            _cancel(waiter.timer)

    def _state(self, extra_waiting: int = 0) -> str:
        in_use = len(self._members) - len(self._idle)
        text = (
            f"{len(self._idle)} idle, {in_use} in use, {len(self._attempts)} being "
            f"created, {len(self._waiters) + extra_waiting} waiting (max_size "
            f"{self.config.max_size})"
        )
        if self._last_error:
            text += f"; last connect error: {self._last_error}"
        if self._down:
            text += f"; {self._recovery_text()}"
        return text

    def _recovery_text(self) -> str:
        now = self.clock.seconds()
        text = f"down for {now - self._down_since:.2f}s, {self._failed_rounds} failed attempts"
        if self._attempts:
            return text + ", probing now"
        if self._retry is not None and self._retry.active():
            return text + f", next attempt in {self._retry.getTime() - now:.2f}s"
        return text + f", last error: {self._last_error}"

    # -- shared requests --------------------------------------------------------------------

    def _send_shared(
        self, conn: ClientConnection, type: str, data: Any, timeout: float | None
    ) -> Deferred[Any]:
        def failed(failure: Failure) -> Failure:
            if breaks_connection(failure):
                member = self._members.get(conn)
                if member is not None:
                    # Replace it, without pulling it from under an exclusive borrower (who
                    # gets it destroyed on release instead).
                    self._retire(member)
            return failure

        return conn.request(type, data, timeout).addErrback(failed)

    # -- creating ---------------------------------------------------------------------------

    def _active(self) -> int:
        """Connections that count against max_size (retiring ones are on their way out)."""
        retiring = sum(m.retiring for m in self._members.values())
        return len(self._members) + len(self._attempts) - retiring

    def _refill(self) -> None:
        """Create connections for waiters and for ``min_idle``, within ``max_size``.

        While the server is down, only a single probe, once the backoff delay has passed.
        The need is recounted before each connect, because a connect may complete at once
        (and re-enter through the connection's waiter).
        """
        while not self._closed:
            wanted = len(self._waiters) + max(self.config.min_idle - len(self._idle), 0)
            if self.config.max_size - self._active() <= 0:
                return
            if self._down:
                due = self._retry is None or not self._retry.active()
                if not (due and not self._attempts and (wanted or self._asked)):
                    return
            elif wanted <= len(self._attempts):
                return
            self._create()

    @staticmethod
    def _load(target: _Target) -> int:
        return target.load

    def _pick_target(self) -> _Target:
        """Where the next connection goes: the least loaded endpoint that is up (or due for
        another try); in an outage, each endpoint in turn."""
        targets = self._targets
        if len(targets) == 1:
            return targets[0]
        count = len(targets)
        order = [targets[(self._next_target + i) % count] for i in range(count)]
        if not self._down:
            now = self.clock.seconds()
            usable = [t for t in order if not t.down or now >= t.retry_at]
            order = sorted(usable or order, key=self._load)  # stable: round robin for ties
        chosen = order[0]
        self._next_target = (targets.index(chosen) + 1) % count
        return chosen

    def _create(self) -> None:
        target = self._pick_target()
        attempt = _Attempt(self._epoch, target)
        self._attempts.add(attempt)
        target.load += 1
        self._asked = False
        self._attempts_started += 1
        try:
            if self.connect_fn is not None:
                connecting = self.connect_fn()
            else:
                connecting = self.connect_to(target.endpoint)
        except Exception:
            connecting = fail()
        attempt.connecting = connecting
        if not connecting.called:
            attempt.timer = self.clock.callLater(
                self.config.connect_timeout, self._attempt_timed_out, attempt
            )
        connecting.addCallbacks(
            self._created, self._create_failed, callbackArgs=(attempt,), errbackArgs=(attempt,)
        )

    def _attempt_timed_out(self, attempt: _Attempt) -> None:
        """Bound the whole connect (TCP and hello): endpoints default to 30 s or more."""
        attempt.timer = None
        attempt.timed_out = True
        if attempt.connecting is not None:
            attempt.connecting.cancel()

    def _created(self, conn: ClientConnection, attempt: _Attempt) -> None:
        self._attempts.discard(attempt)
        _cancel(attempt.timer)
        self.created += 1
        if self._closed:
            attempt.target.load -= 1
            conn.close()
            self._check_closed()
            return
        target = attempt.target
        if target.down and not self._down and len(self._targets) > 1:
            log.info("Pool connected to {endpoint} again", endpoint=target.endpoint)
        target.down, target.failures = False, 0
        if self._down:
            log.info(
                "Pool reconnected to {endpoint} after {seconds:.2f}s down "
                "({attempts} failed attempts)",
                endpoint=target.endpoint,
                seconds=self.clock.seconds() - self._down_since,
                attempts=self._failed_rounds,
            )
        # A success ends the outage, whatever round it belonged to.
        self._down = False
        self._failed_rounds = 0
        self._epoch += 1
        self._last_error = None
        self._asked = False
        _cancel(self._retry)
        self._retry = None
        member = _Member(conn, self.clock.seconds(), target)
        self._members[conn] = member
        conn.on_close(self._connection_closed)
        if member.state is GONE:  # it closed before we got it
            return
        conn.on_goaway(self._connection_goaway)
        lifetime = self.config.max_lifetime
        if lifetime:
            jittered = lifetime * (1 - self.config.lifetime_jitter * self._random())
            member.life_timer = self.clock.callLater(jittered, self._expired, member)
        self._offer(member)
        self._refill()  # after an outage: the rest of the demand, in parallel again

    def _create_failed(self, failure: Failure, attempt: _Attempt) -> None:
        self._attempts.discard(attempt)
        attempt.target.load -= 1
        _cancel(attempt.timer)
        self.errors += 1
        if attempt.timed_out:
            error = f"no connection within connect_timeout {self.config.connect_timeout:g}s"
        else:
            error = failure.getErrorMessage() or type(failure.value).__name__
        self._last_error = error
        if self._closed:
            self._check_closed()
            return
        if len(self._targets) > 1 and not self._target_failed(attempt.target, error):
            self._refill()  # another endpoint serves, or this round of probes goes on
            return
        if attempt.epoch == self._epoch:
            # The first failure of a round counts; its siblings, started before it, do not:
            # max_size refused connects are one step of backoff, not max_size steps.
            self._epoch += 1
            self._failed_rounds += 1
            if not self._down:
                self._down = True
                self._down_since = self.clock.seconds()
                if self.config.fail_fast:
                    self._fail_waiters()
            self._schedule_retry()
            rounds = self._failed_rounds
            if rounds & (rounds - 1) == 0:  # attempts 1, 2, 4, 8...: an outage logs O(log n)
                log.warn(
                    "Pool could not connect to {endpoint} ({error}); {attempt} failed "
                    "attempts, {recovery}",
                    endpoint=", ".join(map(str, self.config.endpoints)),
                    error=error,
                    attempt=rounds,
                    recovery=self._recovery_text(),
                )
        self._refill()

    # -- recovery ---------------------------------------------------------------------------

    def _target_failed(self, target: _Target, error: str) -> bool:
        """One endpoint of several failed; True when that makes a failed round for the pool
        (every endpoint down, and the outage's round of probes, if any, is over)."""
        config = self.config
        target.failures += 1
        target.down = True
        cap = backoff_cap(target.failures, config.backoff_initial, config.backoff_max)
        target.retry_at = self.clock.seconds() + self._random() * cap
        if any(not t.down for t in self._targets):
            if target.failures & (target.failures - 1) == 0:  # 1, 2, 4, 8...: O(log n) lines
                log.warn(
                    "Pool could not connect to {endpoint} ({error}); {failures} failed "
                    "attempts, the other endpoints serve meanwhile",
                    endpoint=target.endpoint,
                    error=error,
                    failures=target.failures,
                )
            return False
        if self._down and self._round_left > 1:
            self._round_left -= 1  # the next endpoint of this round, at once
            return False
        return True

    def _schedule_retry(self) -> None:
        """After a failed round: one full-jitter draw, two caps.

        Nobody asking: up to ``backoff_max``.  Callers asking (waiters, or fail_fast callers
        refused since the last attempt): the same draw under ``probe_interval``, so the
        server's return is noticed promptly where someone is waiting for it.
        """
        config = self.config
        draw = self._random()
        now = self.clock.seconds()
        idle_delay = draw * backoff_cap(
            self._failed_rounds, config.backoff_initial, config.backoff_max
        )
        busy_max = min(config.backoff_max, config.probe_interval or config.backoff_max)
        busy_delay = draw * backoff_cap(self._failed_rounds, config.backoff_initial, busy_max)
        self._retry_busy_at = now + busy_delay
        asking = bool(self._waiters) or self._asked
        at = self._retry_busy_at if asking else now + idle_delay
        last_chance = self._last_chance()
        if last_chance is not None:
            at = min(at, max(last_chance, now))
        _cancel(self._retry)
        self._retry = self.clock.callLater(at - now, self._retry_now)

    def _fail_waiters(self) -> None:
        """fail_fast: the server just went down; nobody keeps waiting for it."""
        waiters, self._waiters = self._waiters, deque()
        error = f"the server is down; {self._recovery_text()}"
        for waiter in waiters:
            _cancel(waiter.timer)
            self.unavailable += 1
            waiter.d.errback(PoolUnavailable(error))

    def _last_chance(self) -> float | None:
        """When the first waiter that has seen no attempt start must get one."""
        for waiter in self._waiters:
            if waiter.attempts_before == self._attempts_started:
                return waiter.queued_at + self.LAST_CHANCE * self.config.acquire_timeout
        return None

    def _hurry_retry(self, waiter: _Waiter | None) -> None:
        """Someone asks while the server is down: bring the pending retry forward if due."""
        retry = self._retry
        if retry is None or not retry.active():
            return
        at = self._retry_busy_at
        if waiter is not None and waiter.attempts_before == self._attempts_started:
            at = min(at, waiter.queued_at + self.LAST_CHANCE * self.config.acquire_timeout)
        now = self.clock.seconds()
        if at < retry.getTime():
            retry.reset(max(at - now, 0.0))

    def _retry_now(self) -> None:
        self._retry = None
        self._round_left = len(self._targets)  # a round: every endpoint once, then back off
        self._refill()

    # -- leaving the pool -------------------------------------------------------------------

    def _retire(self, member: _Member) -> None:
        """Replace ``member``: now if idle, else when its borrower releases it."""
        member.retiring = True
        if member.state is IDLE:
            self._remove(member)
        else:
            self._refill()

    def _expired(self, member: _Member) -> None:
        member.life_timer = None
        self._retire(member)

    def _connection_goaway(self, conn: ClientConnection, data: dict[str, Any]) -> None:
        member = self._members.get(conn)
        if member is not None:
            self._retire(member)

    def _connection_closed(self, conn: ClientConnection, reason: Failure | None) -> None:
        member = self._members.get(conn)
        if member is None:
            return
        if member.state is IDLE or member.state is NEW or self._closed:
            self._remove(member)
        else:  # lent: destroyed when its borrower releases it; its replacement starts now
            self._retire(member)

    def _remove(self, member: _Member) -> None:
        """The one way out of the pool: forget, stop its timers, close it, refill."""
        if self._members.pop(member.conn, None) is None:
            return
        member.target.load -= 1
        if member.state is IDLE:
            self._idle.remove(member)
        member.state = GONE
        _cancel(member.idle_timer)
        _cancel(member.life_timer)
        _cancel(member.leak_timer)
        member.idle_timer = member.life_timer = member.leak_timer = None
        self.destroyed += 1
        conn = member.conn
        if conn.pending_requests:  # shared requests still in flight: let them end
            conn.when_idle().addCallback(lambda _: conn.close())
        else:
            conn.close()
        self._refill()
        self._check_closed()

    def _abort_remaining(self) -> None:
        self._close_timer = None
        for member in list(self._members.values()):
            member.conn.abort(ConnectionClosed("the pool was closed"))

    def _check_closed(self) -> None:
        if self._closed and not self._members and not self._attempts:
            _cancel(self._close_timer)
            self._close_timer = None
        if self._closed and not self._members and not self._attempts and self._close_waiters:
            waiters, self._close_waiters = self._close_waiters, []
            for d in waiters:
                d.callback(None)


class _Borrowed:
    """Async context manager returned by `Pool.connection`."""

    def __init__(self, pool: Pool, stack: tuple[_Frame, ...]) -> None:
        self._pool = pool
        self._stack = stack
        self._conn: ClientConnection | None = None

    async def __aenter__(self) -> ClientConnection:
        self._conn = await self._pool._acquire(self._stack)
        return self._conn

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        assert self._conn is not None
        broken = exc is not None and breaks_connection(Failure(exc, exc_type, tb))
        self._pool.release(self._conn, broken=broken)

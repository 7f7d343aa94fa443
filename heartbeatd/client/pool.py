"""A pool of long-lived client connections: the seed tutorial's six properties, done carefully.

1. an idle queue of ready connections;  2. the set of connections in use;  3. a FIFO queue of
borrowers waiting for one;  4. dead connections removed and never lent;  5. configurable sizes;
6. new connections created to refill, with backoff while the server is down.

Idle connections keep running the protocol heartbeat, so a dead one is noticed and replaced
*before* anyone borrows it, rather than by a validation query at borrow time.  Every wait is
bounded (``acquire_timeout``, ``max_waiters``), so an acquire never hangs.  Waiter lists are
swapped before they are fired, so callbacks that re-enter the pool are safe.
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
from heartbeatd.client.config import PoolConfig
from heartbeatd.client.connection import ClientConnection, connect
from heartbeatd.client.errors import (
    ConnectionClosed,
    PoolClosed,
    PoolExhausted,
    PoolTimeout,
    RequestTimeout,
    ServerError,
)
from heartbeatd.client.tls import client_tls, read_token

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


_DEFER_MODULE = os.path.join("twisted", "internet", "defer.py")


class _Lease:
    __slots__ = ("acquired_at", "leak_timer", "stack")

    def __init__(
        self,
        acquired_at: float,
        stack: tuple[_Frame, ...],
        leak_timer: IDelayedCall | None,
    ) -> None:
        self.acquired_at = acquired_at
        self.stack = stack
        self.leak_timer = leak_timer


class Pool:
    """Lends `ClientConnection`s to borrowers; see the module docstring."""

    def __init__(
        self,
        reactor: IReactorTime,
        config: PoolConfig | None = None,
        connect_fn: Callable[[], Deferred[ClientConnection]] | None = None,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.clock = reactor
        self.config = config = config or PoolConfig()
        # Read once, so a missing file or a half TLS setting fails here, not at each connect.
        token = read_token(config.token_file) if config.token_file else None
        tls = client_tls(config)
        #: Makes one new connection; tests replace it.
        self.connect_fn = connect_fn or (
            lambda: connect(
                reactor,
                config.endpoint,
                framing=config.framing,
                request_timeout=config.request_timeout,
                hello_timeout=config.connect_timeout,
                tls=tls,
                token=token,
            )
        )
        self._random = random
        self._idle: deque[ClientConnection] = deque()
        self._idle_since: dict[ClientConnection, float] = {}
        self._idle_timers: dict[ClientConnection, IDelayedCall] = {}
        self._in_use: dict[ClientConnection, _Lease] = {}
        self._known: set[ClientConnection] = set()  # every live connection the pool made
        self._retiring: set[ClientConnection] = set()  # expired or told to go away
        self._life_timers: dict[ClientConnection, IDelayedCall] = {}
        self._waiters: deque[tuple[Deferred[ClientConnection], IDelayedCall]] = deque()
        self._creating = 0
        self._failures = 0
        self._last_error: str | None = None
        self._retry: IDelayedCall | None = None
        self._closed = False
        self._close_waiters: list[Deferred[None]] = []
        self.created = 0
        self.destroyed = 0
        self.timeouts = 0
        self.errors = 0

    # -- public API -------------------------------------------------------------------------

    def start(self) -> None:
        """Open ``min_idle`` connections now rather than on first use."""
        self._refill()

    def acquire(self) -> Deferred[ClientConnection]:
        """A connection for your exclusive use; give it back with `release`."""
        if self._closed:
            return fail(PoolClosed("the pool is closed"))
        conn = self._take_idle()
        if conn is not None:
            return self._lend_checked(conn)
        if len(self._waiters) >= self.config.max_waiters:
            self.errors += 1
            return fail(
                PoolExhausted(f"{self.config.max_waiters} waiters already; {self._state()}")
            )

        def cancel(d: Deferred[ClientConnection]) -> None:
            self._drop_waiter(d)

        waiter: Deferred[ClientConnection] = Deferred(cancel)
        timer = self.clock.callLater(self.config.acquire_timeout, self._waiter_timed_out, waiter)
        self._waiters.append((waiter, timer))
        self._refill()
        return waiter

    def release(self, conn: ClientConnection, broken: bool = False) -> None:
        """Return a connection; ``broken`` destroys it instead of making it idle again."""
        lease = self._in_use.pop(conn, None)
        if lease is None:
            return  # released twice, or removed when it died: nothing to do
        if lease.leak_timer is not None and lease.leak_timer.active():
            lease.leak_timer.cancel()
        if broken or self._closed or conn in self._retiring or not conn.usable:
            self._destroy(conn)
            self._refill()
        else:
            self._offer(conn)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Call ``fn(conn, *args, **kwargs)`` with a borrowed connection; always release it."""

        def use(conn: ClientConnection) -> Deferred[Any]:
            def done(result: Any) -> Any:
                broken = isinstance(result, Failure) and breaks_connection(result)
                self.release(conn, broken=broken)
                return result

            return maybeDeferred(fn, conn, *args, **kwargs).addBoth(done)

        return self.acquire().addCallback(use)

    def request(self, type: str, data: Any = None, timeout: float | None = None) -> Deferred[Any]:
        """One request/reply, multiplexed over the pool's connections.

        The protocol matches replies by id, so a single request needs a connection only to be
        *sent*: it goes out on the next idle connection (round robin), which stays available;
        with none idle it waits for one like `acquire`, sends, and gives it back at once.
        Use `run` or `connection` when a conversation needs a connection to itself.
        """
        if self._closed:
            return fail(PoolClosed("the pool is closed"))
        idle = self._idle
        while idle:
            conn = idle[0]
            if not conn.usable or conn in self._retiring:
                idle.popleft()
                self._cancel_idle_timer(conn)
                self._destroy(conn)
                continue
            idle.rotate(-1)
            self._idle_since[conn] = self.clock.seconds()
            return self._send_shared(conn, type, data, timeout)

        def send(conn: ClientConnection) -> Deferred[Any]:
            d = self._send_shared(conn, type, data, timeout)
            self.release(conn)  # back at once: the next borrower may use it while we wait
            return d

        return self.acquire().addCallback(send)

    def _send_shared(
        self, conn: ClientConnection, type: str, data: Any, timeout: float | None
    ) -> Deferred[Any]:
        def failed(failure: Failure) -> Failure:
            if breaks_connection(failure):
                self._broken(conn)
            return failure

        return conn.request(type, data, timeout).addErrback(failed)

    def _broken(self, conn: ClientConnection) -> None:
        """A shared request showed ``conn`` is unusable: replace it without pulling it from
        under an exclusive borrower (who gets it destroyed on release instead)."""
        if conn in self._idle:
            self._idle.remove(conn)
            self._cancel_idle_timer(conn)
            self._destroy(conn)
            self._refill()
        elif conn in self._in_use:
            self._retiring.add(conn)

    def connection(self) -> _Borrowed:
        """``async with pool.connection() as conn:`` — released even if the body raises."""
        return _Borrowed(self)

    def stats(self) -> dict[str, int]:
        return {
            "idle": len(self._idle),
            "in_use": len(self._in_use),
            "waiting": len(self._waiters),
            "creating": self._creating,
            "created": self.created,
            "destroyed": self.destroyed,
            "timeouts": self.timeouts,
            "errors": self.errors,
        }

    def close(self) -> Deferred[None]:
        """Fail every waiter, close every connection; fires once all are closed."""
        if not self._closed:
            self._closed = True
            if self._retry is not None and self._retry.active():
                self._retry.cancel()
            waiters, self._waiters = self._waiters, deque()
            for waiter, timer in waiters:
                timer.cancel()
                waiter.errback(PoolClosed("the pool was closed while waiting for a connection"))
            for conn in [*self._idle, *self._in_use]:
                conn.close()
        if self._tracked() == 0 and self._creating == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._close_waiters.append(d)
        return d

    # -- lending ----------------------------------------------------------------------------

    def _take_idle(self) -> ClientConnection | None:
        while self._idle:
            conn = self._idle.popleft()
            self._cancel_idle_timer(conn)
            if conn.usable and conn not in self._retiring:
                return conn
            self._destroy(conn)
        return None

    def _lend_checked(self, conn: ClientConnection) -> Deferred[ClientConnection]:
        idle_for = self.clock.seconds() - self._idle_since.pop(conn, self.clock.seconds())
        window = self.config.ping_on_borrow_after
        if not window or idle_for < window:
            return succeed(self._lend(conn))
        # Idle long enough to doubt it: one ping before lending (the heartbeat covers the rest).
        self._in_use[conn] = _Lease(self.clock.seconds(), (), None)

        def alive(_: object) -> ClientConnection:
            del self._in_use[conn]
            return self._lend(conn)

        def dead(failure: Failure) -> Deferred[ClientConnection]:
            self._in_use.pop(conn, None)
            self._destroy(conn)
            return self.acquire()

        return conn.request("ping", timeout=self.config.connect_timeout).addCallbacks(alive, dead)

    def _lend(self, conn: ClientConnection) -> ClientConnection:
        threshold = self.config.leak_threshold
        # Remember where the borrower is as cheap frame references; format only on a leak.
        stack = _caller_frames() if threshold else ()
        timer = self.clock.callLater(threshold, self._leak, conn) if threshold else None
        self._in_use[conn] = _Lease(self.clock.seconds(), stack, timer)
        return conn

    def _leak(self, conn: ClientConnection) -> None:
        lease = self._in_use.get(conn)
        if lease is not None:
            log.warn(
                "A pooled connection has been held for {held:.1f}s (leak_threshold {limit:g}s); "
                "was it released? Acquired at:\n{stack}",
                held=self.clock.seconds() - lease.acquired_at,
                limit=self.config.leak_threshold,
                stack=_format_frames(lease.stack),
            )

    def _offer(self, conn: ClientConnection) -> None:
        """A usable connection is free: the first waiter gets it, else it goes idle."""
        if self._waiters:
            waiter, timer = self._waiters.popleft()
            timer.cancel()
            waiter.callback(self._lend(conn))
            return
        self._idle.append(conn)
        self._idle_since[conn] = self.clock.seconds()
        if self.config.idle_timeout:
            self._idle_timers[conn] = self.clock.callLater(
                self.config.idle_timeout, self._idle_expired, conn
            )

    def _idle_expired(self, conn: ClientConnection) -> None:
        self._idle_timers.pop(conn, None)
        if conn not in self._idle:
            return
        if len(self._idle) > self.config.min_idle:
            self._idle.remove(conn)
            self._destroy(conn)
        else:  # needed to keep min_idle: keep it, look again later
            self._idle_timers[conn] = self.clock.callLater(
                self.config.idle_timeout, self._idle_expired, conn
            )

    def _cancel_idle_timer(self, conn: ClientConnection) -> None:
        timer = self._idle_timers.pop(conn, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _waiter_timed_out(self, waiter: Deferred[ClientConnection]) -> None:
        for i, (candidate, _timer) in enumerate(self._waiters):
            if candidate is waiter:
                del self._waiters[i]
                break
        self.timeouts += 1
        waiter.errback(
            PoolTimeout(
                f"no connection available within {self.config.acquire_timeout:g}s; "
                f"{self._state(extra_waiting=1)}"
            )
        )

    def _drop_waiter(self, waiter: Deferred[ClientConnection]) -> None:
        for i, (candidate, timer) in enumerate(self._waiters):
            if candidate is waiter:
                del self._waiters[i]
                timer.cancel()
                return

    def _state(self, extra_waiting: int = 0) -> str:
        text = (
            f"{len(self._idle)} idle, {len(self._in_use)} in use, {self._creating} being "
            f"created, {len(self._waiters) + extra_waiting} waiting (max_size "
            f"{self.config.max_size})"
        )
        if self._last_error:
            text += f"; last connect error: {self._last_error}"
        return text

    # -- creating and destroying ------------------------------------------------------------

    def _tracked(self) -> int:
        return len(self._idle) + len(self._in_use)

    def _active(self) -> int:
        """Connections that count against max_size (retiring ones are on their way out)."""
        return self._tracked() + self._creating - len(self._retiring & self._in_use.keys())

    def _refill(self) -> None:
        """Create connections for waiters and for ``min_idle``, within ``max_size``."""
        if self._closed or (self._retry is not None and self._retry.active()):
            return
        wanted = len(self._waiters) + max(self.config.min_idle - len(self._idle), 0)
        room = self.config.max_size - self._active()
        for _ in range(min(wanted - self._creating, room)):
            self._create()

    def _create(self) -> None:
        self._creating += 1
        try:
            connecting = self.connect_fn()
        except Exception:
            connecting = fail()
        connecting.addCallbacks(self._created, self._create_failed)

    def _created(self, conn: ClientConnection) -> None:
        self._creating -= 1
        self._failures = 0
        self._last_error = None
        self.created += 1
        if self._closed:
            conn.close()
            self._check_closed()
            return
        self._known.add(conn)
        conn.on_close(self._connection_closed)
        conn.on_goaway(self._connection_goaway)
        lifetime = self.config.max_lifetime
        if lifetime:
            jittered = lifetime * (1 - self.config.lifetime_jitter * self._random())
            self._life_timers[conn] = self.clock.callLater(jittered, self._expired, conn)
        self._offer(conn)

    def _create_failed(self, failure: Failure) -> None:
        self._creating -= 1
        self._failures += 1
        self.errors += 1
        self._last_error = failure.getErrorMessage() or type(failure.value).__name__
        if self._closed:
            self._check_closed()
            return
        # Full jitter: a delay drawn from 0..min(cap, base * 2^n), so many clients that lost
        # the same server do not all come back at the same instant.
        cap = min(self.config.backoff_max, self.config.backoff_initial * 2 ** (self._failures - 1))
        delay = cap * self._random()
        log.warn(
            "Pool could not connect to {endpoint} ({error}); attempt {attempt}, retrying in "
            "{delay:.2f}s",
            endpoint=self.config.endpoint,
            error=self._last_error,
            attempt=self._failures,
            delay=delay,
        )
        if self._retry is None or not self._retry.active():
            self._retry = self.clock.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._refill()

    def _expired(self, conn: ClientConnection) -> None:
        self._life_timers.pop(conn, None)
        self._retiring.add(conn)
        if conn in self._idle:
            self._idle.remove(conn)
            self._cancel_idle_timer(conn)
            self._destroy(conn)
        self._refill()

    def _connection_goaway(self, conn: ClientConnection, data: dict[str, Any]) -> None:
        self._retiring.add(conn)
        if conn in self._idle:  # nobody is using it: close now
            self._idle.remove(conn)
            self._cancel_idle_timer(conn)
            self._destroy(conn)
        # In use: its borrower finishes, and release() closes it.
        self._refill()

    def _connection_closed(self, conn: ClientConnection, reason: Failure | None) -> None:
        if conn in self._idle:
            self._idle.remove(conn)
            self._cancel_idle_timer(conn)
        if self._closed and conn in self._in_use:  # closing: stop waiting for its borrower
            lease = self._in_use.pop(conn)
            if lease.leak_timer is not None and lease.leak_timer.active():
                lease.leak_timer.cancel()
        if conn not in self._in_use:  # an in-use one is destroyed when its borrower releases
            self._forget(conn)
        self._refill()
        self._check_closed()

    def _destroy(self, conn: ClientConnection) -> None:
        self._forget(conn)
        if conn.pending_requests:  # shared requests still in flight: let them end
            conn.when_idle().addCallback(lambda _: conn.close())
        else:
            conn.close()

    def _forget(self, conn: ClientConnection) -> None:
        timer = self._life_timers.pop(conn, None)
        if timer is not None and timer.active():
            timer.cancel()
        self._idle_since.pop(conn, None)
        self._retiring.discard(conn)
        if conn in self._known:
            self._known.discard(conn)
            self.destroyed += 1

    def _check_closed(self) -> None:
        if self._closed and self._tracked() == 0 and self._creating == 0 and self._close_waiters:
            waiters, self._close_waiters = self._close_waiters, []
            for d in waiters:
                d.callback(None)


class _Borrowed:
    """Async context manager returned by `Pool.connection`."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._conn: ClientConnection | None = None

    async def __aenter__(self) -> ClientConnection:
        self._conn = await self._pool.acquire()
        return self._conn

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        assert self._conn is not None
        broken = exc is not None and breaks_connection(Failure(exc, exc_type, tb))
        self._pool.release(self._conn, broken=broken)

"""A resumable session on the client side: what outlives each connection of a reconnecting client.

`ClientSession` owns the session's numbers (`SessionState`), the requests waiting for a
reply (they survive a reconnect until their own timeout), the ack timer, and the
application's ``on_session`` callbacks.  A `ClientConnection` given a session opens it
after its handshake (``session``, or ``resume`` when one exists), routes every numbered
server message through it, and detaches it when the connection is lost:

- a request gets the next ``seq`` (its ``id`` too) and a copy is kept until the server
  acknowledges it; while detached it only waits in the buffer, and a resume resends, in
  order and unchanged, every copy above the server's high-water mark; one that times out
  (or is cancelled) before it ever left is dropped, since the application was told it
  failed (`NotConnected`), and the later unsent ones move down one seq;
- a numbered server message at or below the last one delivered is a replayed duplicate and
  is dropped, so handlers see each message once and in order; one past the next is a gap
  and the connection is dropped (the resume that follows replays from what we have);
- acks are batched: one after ``ack_batch`` messages or ``ack_delay`` seconds after the
  first unacknowledged one, and one before a clean close;
- ``resumed: false`` (or ``session_taken_over`` on a live connection) fails the waiting
  requests with `SessionLost`, tells the application ``session_lost`` and starts afresh;
- ``unavailable`` to a resume or a start (a cluster whose Redis is unreachable, say during a
  Sentinel failover: the server may well still hold the session) is not a loss: the
  connection is dropped and the next one asks again (the reconnect backoff), keeping the
  session and what waits in it, for ``retry_timeout`` seconds from the first such answer;
  then what waits fails with `SessionUnavailable` (a held session is lost, reason
  ``unavailable``) and the client goes on trying, a new session.

The wire contract is docs/protocol.md, "Sessions".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from heartbeatd._logging import get_logger
from heartbeatd.client.errors import (
    ClientError,
    ClientStopped,
    ConnectionClosed,
    NotConnected,
    RequestTimeout,
    ServerError,
    SessionLost,
    SessionUnavailable,
)
from heartbeatd.client.session_state import DUPLICATE, GAP, SessionState
from heartbeatd.wire.envelope import OMIT, encode_message

#: A `heartbeatd.client.connection.ClientConnection` (not imported: it imports this module).
ClientConnection = Any

__all__ = ["DEFAULT_RETRY_TIMEOUT", "ClientSession", "SessionEvent"]

log = get_logger(__name__)

#: ``{"event": "started"}``, ``{"event": "resumed", "replayed": n}`` or
#: ``{"event": "session_lost", "reason": r}``.
SessionEvent = dict[str, Any]

#: Acks are sent after this many messages, or this long after the first unacked one.
DEFAULT_ACK_BATCH = 32
DEFAULT_ACK_DELAY = 0.2
#: Requests a session keeps numbered and unacknowledged before `request` refuses more
#: (a server that never acks, or a long outage with a busy application).
DEFAULT_MAX_BUFFERED = 10_000
#: How long a clean close waits for the answer to its ``session_end``.
DEFAULT_END_TIMEOUT = 2.0
#: How long resumes (and session starts) answered ``unavailable`` are retried before what
#: waits in the session fails (`SessionUnavailable`).
DEFAULT_RETRY_TIMEOUT = 60.0

TAKEN_OVER = "session_taken_over"
UNAVAILABLE = "unavailable"


class ClientSession:
    """One resumable session, across the connections of a reconnecting client."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        expiry: float | None = None,
        ack_batch: int = DEFAULT_ACK_BATCH,
        ack_delay: float = DEFAULT_ACK_DELAY,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
    ) -> None:
        if not retry_timeout > 0:  # NaN too; math.inf: retry for ever
            raise ValueError(
                f"session_retry_timeout must be a positive number of seconds, not {retry_timeout!r}"
            )
        self.clock = clock
        #: Asked for in ``session`` (None: the server's default).
        self.expiry = expiry
        self.ack_batch = ack_batch
        self.ack_delay = ack_delay
        self.max_buffered = max_buffered
        self.retry_timeout = retry_timeout
        #: When the first of the resumes (or starts) answered ``unavailable`` in a row was
        #: (the reactor's clock; None: the last one was not), and how many were.
        self.unavailable_since: float | None = None
        self.unavailable_attempts = 0
        self.state = SessionState()
        #: The connection the session is attached to (None between connections).
        self.connection: ClientConnection | None = None
        self._pending: dict[int, _Waiting] = {}
        self._idle_waiters: list[Deferred[None]] = []
        #: The highest seq written to a connection (above it: numbered, never sent yet).
        self._written = 0
        self._ack_timer: IDelayedCall | None = None
        #: The answer to `close`'s ``session_end``, while we wait for it.
        self._ending: Deferred[Any] | None = None
        self._callbacks: list[Callable[[SessionEvent], object]] = []
        self.started = 0
        self.resumed = 0
        self.lost = 0
        self.unavailable = 0
        self.replayed = 0
        self.duplicates = 0

    # -- the application's side --------------------------------------------------------------

    def on_session(self, callback: Callable[[SessionEvent], object]) -> None:
        """Call ``callback(event)`` when a session starts, resumes or is lost."""
        self._callbacks.append(callback)

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    @property
    def retry_deadline(self) -> float | None:
        """While the server answers ``unavailable``: when the client gives up (the reactor's
        clock); the last try comes then.  None otherwise."""
        since = self.unavailable_since
        return None if since is None else since + self.retry_timeout

    def when_idle(self) -> Deferred[None]:
        """Fires once no request of the session waits for its reply (at once if none does):
        a goaway's drain waits for it, so a restarting daemon answers them before it goes."""
        d: Deferred[None] = Deferred()
        if self._pending:
            self._idle_waiters.append(d)
        else:
            d.callback(None)
        return d

    def _maybe_idle(self) -> None:
        if not self._pending and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def request(
        self,
        type: str,
        data: Any = OMIT,
        timeout: float = 10.0,
        *,
        per_connection: bool = False,
    ) -> Deferred[Any]:
        """Number and send a request (or keep it for the next connection); it fires with the
        reply's data, or fails with `RequestTimeout`, `ServerError` or `SessionLost`.

        ``timeout`` runs from now, across reconnects; with ``per_connection`` it runs only
        while the session is attached to a connection, afresh on each one (a subscribe: the
        time spent reconnecting and resuming must not time it out, its answer comes by the
        resend or the replay)."""
        if self._ending is not None:  # numbered after session_end: the server has no session
            return _failed(ClientStopped("the client was stopped (its session is ending)"))
        if len(self.state.unacked) >= self.max_buffered:
            return _failed(
                ConnectionClosed(
                    f"{len(self.state.unacked)} requests wait for the server's ack "
                    f"(max_buffered {self.max_buffered})"
                )
            )
        return self._send(type, data, timeout, per_connection)

    def _send(
        self, type: str, data: Any, timeout: float, per_connection: bool = False
    ) -> Deferred[Any]:
        seq, body = self.state.number(type, data)
        waiting = _Waiting(seq, type, timeout, per_connection)

        def cancel(_: Deferred[Any]) -> None:
            if self._pending.get(waiting.seq) is waiting:
                self._forget(waiting)
            waiting.disarm()
            self._maybe_idle()

        d: Deferred[Any] = Deferred(cancel)
        waiting.d = d
        if not per_connection or self.connection is not None:
            self._arm(waiting)
        self._pending[seq] = waiting
        if self.connection is not None:
            self.connection._write(body)
            self._written = seq
        return d

    def close(
        self, error: ClientError | None = None, end_timeout: float = DEFAULT_END_TIMEOUT
    ) -> Deferred[None]:
        """The client is stopping: flush our ack, fail what waits, and end the session.

        While attached, a numbered ``session_end`` tells the server nobody will resume the
        session (so it does not hold one of the identity's ``sessions.max_per_identity``
        slots for ``expiry`` seconds); the result fires once it is answered, or after
        ``end_timeout`` seconds, or when the connection goes first; detached, at once.
        Either way the session is forgotten (the next `open` starts a new one) and the
        application is not told ``session_lost``: it asked for this.  Never fails."""
        self.flush_ack()
        self._fail_pending(error or ClientStopped("the client was stopped"))
        conn = self.connection
        if conn is None or not conn.connected or not self.state.active:
            self._forget_session()
            return _succeeded(None)
        # Past max_buffered too: it frees the server's side of every buffered copy.
        ended = self._send("session_end", OMIT, end_timeout)
        self._ending = ended

        def done(result: Any) -> None:
            if isinstance(result, Failure):
                log.info(
                    "The session ended without an answer to session_end ({why})",
                    why=result.getErrorMessage(),
                )
            if self._ending is ended:
                self._ending = None
                self._forget_session()

        return ended.addBoth(done)

    def _forget_session(self) -> None:
        """Ended on purpose: forget it quietly (no ``session_lost``, nothing waits)."""
        if self.connection is not None:
            self.detach(self.connection)
        self.state.lose()
        self._written = 0
        self._available()

    # -- the connection's side ----------------------------------------------------------------

    def open(self, conn: ClientConnection) -> Deferred[str | None]:
        """Start or resume the session on a connection past its handshake.  Fires with
        "started", "resumed", None when the server refused a session (the connection is
        then used without one), or "failed" when it did not answer or answered
        ``unavailable`` (the connection is dropped); never fails."""
        opened = self._resume(conn) if self.state.active else self._start(conn)
        return opened.addCallback(self._opened)

    def _opened(self, outcome: str | None) -> str | None:
        if outcome != "failed":  # answered, and not unavailable: the next spell starts afresh
            self._available()
        return outcome

    def _available(self) -> None:
        self.unavailable_since = None
        self.unavailable_attempts = 0

    def _resume(self, conn: ClientConnection) -> Deferred[str | None]:
        state = self.state
        ack = state.resuming()
        d = conn._plain_request(
            "resume",
            {"session": state.sid, "key": state.key, "ack": ack},
            timeout=conn.hello_timeout,
        )

        def answered(answer: Any) -> Any:
            if not isinstance(answer, dict) or answer.get("resumed") is not True:
                reason = answer.get("reason") if isinstance(answer, dict) else None
                if reason == UNAVAILABLE:  # the store is down: the session may well be there
                    return self._unavailable(conn, "resume")
                self._lose(reason if isinstance(reason, str) and reason else "bad_answer")
                return self._start(conn)
            if conn.closed:
                return None
            resend = state.to_resend(answer.get("ack", 0))
            replayed = answer.get("replay", 0)
            replayed = replayed if type(replayed) is int and replayed >= 0 else 0
            self._attach(conn)
            for body in resend:
                conn._write(body)
            self._written = state.next_seq - 1
            self.resumed += 1
            self.replayed += replayed
            log.info(
                "Session resumed ({replayed} replayed, {resent} resent)",
                replayed=replayed,
                resent=len(resend),
            )
            self._tell({"event": "resumed", "replayed": replayed})
            return "resumed"

        def failed(failure: Failure) -> Any:
            if failure.check(ServerError) and failure.value.code == UNAVAILABLE:
                return self._unavailable(conn, "resume")
            if failure.check(ServerError):  # session_exists, unknown_type (an older server)
                self._lose(failure.value.code)
                return self._start(conn)
            return _unanswered(conn, "resume", failure)  # the next connection resumes

        return d.addCallbacks(answered, failed)

    def _start(self, conn: ClientConnection) -> Deferred[str | None]:
        if conn.closed:
            return _succeeded(None)
        data = OMIT if self.expiry is None else {"expiry": self.expiry}
        d = conn._plain_request("session", data, timeout=conn.hello_timeout)

        def answered(answer: Any) -> str | None:
            sid = answer.get("session") if isinstance(answer, dict) else None
            key = answer.get("key") if isinstance(answer, dict) else None
            if not isinstance(sid, str) or not isinstance(key, str) or not sid or not key:
                log.warn("The server's session answer has no session id or key: not resumable")
                self._refused("bad_answer")
                return None
            expiry = answer.get("expiry")
            self.state.start(sid, key, expiry if isinstance(expiry, (int, float)) else None)
            if conn.closed:
                return None  # resumed on the next connection
            self._attach(conn)
            for body in list(self.state.unacked.values()):  # numbered while there was none
                conn._write(body)
            self._written = self.state.next_seq - 1
            self.started += 1
            self._tell({"event": "started"})
            return "started"

        def failed(failure: Failure) -> str | None:
            if failure.check(ServerError) and failure.value.code == UNAVAILABLE:
                # Not a refusal: a session cannot be stored now.  A plain connection would
                # silently drop what the application asked for: ask again (bounded).
                return self._unavailable(conn, "session")
            if failure.check(ServerError):  # sessions_disabled, too_many_sessions...
                log.warn(
                    "The server refused a session ({why}): this connection is not resumable",
                    why=failure.value.code,
                )
                self._refused(failure.value.code)
                return None
            return _unanswered(conn, "session", failure)

        return d.addCallbacks(answered, failed)

    def _unavailable(self, conn: ClientConnection, what: str) -> str:
        """``resume`` or ``session`` answered ``unavailable``: drop this connection, so the
        next one (after the reconnect backoff, capped at `retry_deadline`) asks again,
        the session and what waits in it kept, for ``retry_timeout`` seconds from the first
        such answer.  An answer at or past the deadline gives up: what waits fails with
        `SessionUnavailable`, the application hears ``session_lost`` (reason
        ``unavailable``), and the next connection starts a new session (a new spell)."""
        now = self.clock.seconds()
        self.unavailable += 1
        if self.unavailable_since is None:
            self.unavailable_since = now
            log.warn(
                "The server cannot {what} the session now (its store is unavailable); "
                "retrying for {limit:g}s",
                what="resume" if what == "resume" else "start",
                limit=self.retry_timeout,
            )
        self.unavailable_attempts += 1
        elapsed = now - self.unavailable_since
        if elapsed >= self.retry_timeout:
            error = SessionUnavailable(elapsed, self.unavailable_attempts, self.retry_timeout)
            self._available()
            # Told as a refused start is (``session_lost``); what was numbered for the session
            # is dropped with it, never sent later.
            self._lose(UNAVAILABLE, error)
        conn.abort(
            ConnectionClosed(
                f"the server answered unavailable to {what} (its session store is unreachable)"
            )
        )
        return "failed"

    def _refused(self, reason: str) -> None:
        """No session on this connection: requests numbered for one cannot be sent; the
        application is told (``session_lost``), and the next connection asks again."""
        self._lose(reason)

    def _attach(self, conn: ClientConnection) -> None:
        self.connection = conn
        conn._session = self
        # Per-connection deadlines start afresh (the resend and the replay follow at once).
        for waiting in list(self._pending.values()):
            if waiting.per_connection and waiting.timer is None:
                self._arm(waiting)

    def _arm(self, waiting: _Waiting) -> None:
        waiting.timer = self.clock.callLater(
            waiting.timeout, self._timed_out, waiting, waiting.type, waiting.timeout
        )

    def detach(self, conn: ClientConnection) -> None:
        """The connection is gone; the session waits for the next one."""
        if conn._session is self:
            conn._session = None
        if self.connection is conn:
            self.connection = None
            self._cancel_ack_timer()
            for waiting in self._pending.values():
                if waiting.per_connection:  # paused until the session is attached again
                    waiting.disarm()
            ending, self._ending = self._ending, None
            if ending is not None:  # stopping: no resume will bring its answer
                self._forget_session()
                self._fail_pending(ConnectionClosed("the connection closed before session_end"))

    def received(self, conn: ClientConnection, message: Any, seq: Any, ack: Any) -> bool:
        """A message on an attached connection: True when the session handled it, False
        when it is connection-level (the connection handles it as usual)."""
        state = self.state
        if seq is None:
            if message.type == "ack" and message.id is None and isinstance(message.data, dict):
                state.server_acked(message.data.get("seq"))
                return True
            if (
                message.type == "error"
                and message.id is None
                and isinstance(message.data, dict)
                and message.data.get("code") == TAKEN_OVER
            ):
                self._taken_over(conn)
                return True
            return False
        if type(seq) is not int or seq <= 0:
            conn.abort(ConnectionClosed(f"the server sent a bad seq {seq!r}"))
            return True
        if ack is not None:
            state.server_acked(ack)
        verdict = state.accept(seq)
        if verdict == DUPLICATE:
            self.duplicates += 1
            return True
        if verdict == GAP:
            conn.abort(ConnectionClosed(f"the server skipped from seq {state.delivered} to {seq}"))
            return True
        request_id = message.id
        if type(request_id) is int and request_id in self._pending:
            waiting = self._pending.pop(request_id)
            d = waiting.d
            waiting.disarm()
            if message.type == "error":
                d.errback(ServerError.from_wire(message.data))
            else:
                d.callback(message.data)
            self._maybe_idle()
        elif request_id is None:
            conn._dispatch_push(message.type, message.data)
        # else: the reply to a request that timed out (or was cancelled): nobody waits
        self._count_for_ack()
        return True

    def flush_ack(self) -> None:
        """Send our ack now if anything delivered is unacknowledged."""
        self._cancel_ack_timer()
        conn = self.connection
        if conn is None or not conn.connected:
            return
        seq = self.state.take_ack()
        if seq is not None:
            conn._write(encode_message("ack", {"seq": seq}))

    def _count_for_ack(self) -> None:
        if self.state.ack_pending >= self.ack_batch:
            self.flush_ack()
        elif self._ack_timer is None and self.connection is not None:
            self._ack_timer = self.clock.callLater(self.ack_delay, self._ack_due)

    def _ack_due(self) -> None:
        self._ack_timer = None
        self.flush_ack()

    def _cancel_ack_timer(self) -> None:
        timer, self._ack_timer = self._ack_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _taken_over(self, conn: ClientConnection) -> None:
        """Someone else resumed this session: never resume it again; start afresh."""
        log.warn("The session was taken over by another connection; starting a new one")
        conn.session_outcome = "taken_over"  # not usable: requests wait for the next one
        self.detach(conn)
        self._lose(TAKEN_OVER)
        # The server closes it; until then nothing may use it (the next one has a session).
        conn.abort(ConnectionClosed("the session was taken over by another connection"))

    def _lose(self, reason: str, error: SessionLost | None = None) -> None:
        self.lost += 1
        if self.connection is not None:
            self.detach(self.connection)
        self.state.lose()
        self._written = 0
        log.warn("Session lost ({reason})", reason=reason)
        # The application hears it first, then its waiting requests fail (a request it
        # makes from its callback belongs to the next session).
        pending, self._pending = self._pending, {}
        self._tell({"event": "session_lost", "reason": reason})
        self._fail(pending, error or SessionLost(reason))
        self._maybe_idle()

    def _fail_pending(self, error: ClientError) -> None:
        pending, self._pending = self._pending, {}
        self._fail(pending, error)
        self._maybe_idle()

    @staticmethod
    def _fail(pending: dict[int, _Waiting], error: ClientError) -> None:
        for waiting in pending.values():
            waiting.disarm()
            waiting.d.errback(error)

    def _timed_out(self, waiting: _Waiting, type: str, seconds: float) -> None:
        if self._pending.get(waiting.seq) is not waiting:
            return
        waiting.timer = None
        unsent = waiting.seq > self._written  # no connection within its deadline
        self._forget(waiting)
        if unsent:
            waiting.d.errback(NotConnected(f"not connected within {seconds:g}s"))
        else:
            where = " on a connection" if waiting.per_connection else ""
            waiting.d.errback(RequestTimeout(f"no reply to {type!r} within {seconds:g}s{where}"))
        self._maybe_idle()

    def _forget(self, waiting: _Waiting) -> None:
        """Nobody waits for this request's reply any more (timed out, cancelled).  A copy
        that was written stays: the server may have it, and a resume must resend it with
        its seq (so it may still run: `RequestTimeout` says so).  A copy that never left is
        dropped, so nothing ever runs what failed as `NotConnected`; the later ones, never
        sent either, move down by one (seqs stay consecutive) and their waiters with them."""
        seq = waiting.seq
        del self._pending[seq]
        if seq <= self._written or seq not in self.state.unacked:
            return
        self.state.drop_unsent(seq)
        for later in sorted(s for s in self._pending if s > seq):
            moved = self._pending.pop(later)
            moved.seq = later - 1
            self._pending[later - 1] = moved

    def _tell(self, event: SessionEvent) -> None:
        for callback in list(self._callbacks):
            try:
                callback(dict(event))
            except Exception:
                log.failure("An on_session callback failed")


class _Waiting:
    """A request of the session waiting for its reply; ``seq`` (its id too) moves down
    when an earlier request that never left is dropped (`ClientSession._forget`).  Its
    ``timer`` is None while a ``per_connection`` deadline is paused (detached)."""

    __slots__ = ("d", "per_connection", "seq", "timeout", "timer", "type")

    def __init__(self, seq: int, type: str, timeout: float, per_connection: bool) -> None:
        self.seq = seq
        self.type = type
        self.timeout = timeout
        self.per_connection = per_connection
        self.d: Deferred[Any]
        self.timer: IDelayedCall | None = None

    def disarm(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()


def _unanswered(conn: ClientConnection, what: str, failure: Failure) -> str:
    """No answer to ``session``/``resume`` (a timeout, or the connection went): the server
    may have done it, so this connection is not used without the session; drop it."""
    conn.abort(ConnectionClosed(f"no answer to {what}: {failure.getErrorMessage()}"))
    return "failed"


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d


def _succeeded(value: Any) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.callback(value)
    return d

"""Resumable sessions: numbered, acknowledged delivery both ways that outlives a connection.

The wire contract is docs/protocol.md, "Sessions".  The pieces:

* `SessionState` is a session, whatever holds it: the server's numbering (``out_seq``), the
  numbered messages the client has not acknowledged (``unacked``, bounded), the client's
  high-water mark (``in_hwm``), requests received but held back (``held``), replies still being
  computed (``pending``), and the subscriptions recorded while detached.  It knows no reactor.
* `Attachment` binds a state to one connection for as long as it carries it.  Every write of
  a numbered message goes through the *state*, which writes only to its current attachment:
  a connection that lost the session (taken over, ended, closed) never gets another message
  of it, whatever still holds a reference to that connection (the fence; with a cluster the
  store checks the session's epoch too, see `heartbeatd.server.sessions_store`).
* `Sessions` is the daemon's registry: start, resume, takeover, detach, expiry (on the
  factory's clock), limits, counters for metrics.

The connection core (`heartbeatd.server.connection`) calls in through a few hooks, taken only
when its ``_resumable`` slot is set, so connections without a session pay nothing but a
``None`` test on paths that are not per message.  A session connection uses the general
dispatch path (its ``fast_path`` is switched off for that connection alone).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sys
from collections import Counter, OrderedDict, deque
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from heartbeatd._logging import get_logger
from heartbeatd.server.admission import address_key, parse_address
from heartbeatd.server.connection import CONNECTION_TYPES, Connection, _Slot
from heartbeatd.server.handlers import Request
from heartbeatd.wire import envelope
from heartbeatd.wire.envelope import (
    Message,
    ProtocolError,
    as_message,
    decode_json,
    encode_error,
    encode_message,
)

__all__ = [
    "CONNECTION_TYPES",
    "SESSION_TYPES",
    "Attachment",
    "RedeliveredRequest",
    "SessionState",
    "Sessions",
]

log = get_logger(__name__)

#: Error codes (docs/protocol.md, "Sessions").
SESSIONS_DISABLED = "sessions_disabled"
SESSION_EXISTS = "session_exists"
TOO_MANY_SESSIONS = "too_many_sessions"
BAD_REQUEST = "bad_request"
BAD_SEQ = "bad_seq"
NO_SESSION = "no_session"
SESSION_TAKEN_OVER = "session_taken_over"
SESSION_OVERFLOW = "session_overflow"
RATE_LIMITED = "rate_limited"

#: Why a resume failed (``resumed: false``), and the outcomes counted for metrics.
RESUME_REASONS = (
    "unknown_session",
    "expired",
    "bad_key",
    "forbidden",
    "overflow",
    "unavailable",
    "sessions_disabled",
)

#: Client message types the session layer answers itself (no application handler).
SESSION_TYPES = frozenset({"session", "resume", "ack", "session_end"})

#: Types `Connection._dispatch` handles itself before any handler.
_DISPATCH_OWN = frozenset({"pong", "error"})
#: Handler results answered by `Attachment._call` itself (anything else: the general path).
_PLAIN = frozenset({dict, list, str, int, float, bool, type(None)})

#: Largest seq accepted (JavaScript's safe integers: both clients can count that far).
MAX_SEQ = 2**53 - 1
#: Resume attempts one connection may make (a resume flood is answered ``rate_limited``).
MAX_RESUMES_PER_CONNECTION = 16
#: Ended or expired session ids remembered, so a late resume says why (``expired``...).
REMEMBER_GONE = 10_000
_SID = re.compile(r"[0-9a-f]{16,64}")


def _new_sid() -> str:
    return secrets.token_hex(16)


def _new_key() -> str:
    return secrets.token_urlsafe(24)  # 192 bits


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def bucket_of(conn: Connection) -> str | None:
    """What a session started on ``conn`` is counted under for ``sessions.max_per_identity``:
    ``u:<identity>``, or for a connection without an identity its client's address as the
    per-address connection limits count it (`admission.address_key`; loopback is not exempt
    here), or None (not an IP: UNIX socket).  Behind a trusted WebSocket proxy the client is
    the one ``X-Forwarded-For`` named (``conn.forwarded_client``), not the proxy, which
    every client would share."""
    if conn.identity is not None:
        return sys.intern(f"u:{conn.identity}")  # one string for all its sessions
    host = conn.forwarded_client
    if host is None:
        transport = conn.transport
        host = getattr(transport.getPeer(), "host", None) if transport is not None else None
    address = parse_address(host) if isinstance(host, str) else None
    if address is None:
        return None
    prefix = conn.factory.config.limits.ipv6_prefix_per_address
    return sys.intern(f"a:{address_key(address, prefix)}")


class RedeliveredRequest(Request):
    """A request a node that crashed may have started: run again, flagged."""

    __slots__ = ()
    redelivered = True


class SessionState:
    """One session (see the module docstring); no reactor, no connection knowledge."""

    __slots__ = (
        "acked",
        "attachment",
        "bucket",
        "ended",
        "epoch",
        "expiry",
        "held",
        "identity",
        "in_hwm",
        "key_digest",
        "out_seq",
        "pending",
        "redeliver",
        "sid",
        "subs",
        "timer",
        "unacked",
        "unacked_bytes",
    )

    def __init__(
        self,
        sid: str,
        key_digest: bytes,
        identity: str | None,
        expiry: int,
        bucket: str | None = None,
    ) -> None:
        self.sid = sid
        self.key_digest = key_digest
        self.identity = identity
        self.expiry = expiry
        #: What it counts against ``sessions.max_per_identity`` (`bucket_of`).
        self.bucket = bucket
        #: Bumped by every attach: a write checks the attachment's epoch is still this one.
        self.epoch = 0
        #: The last server seq given out, and the highest the client acknowledged.
        self.out_seq = 0
        self.acked = 0
        #: (seq, numbered body) not yet acknowledged, oldest first.
        self.unacked: deque[tuple[int, bytes]] = deque()
        self.unacked_bytes = 0
        #: The highest client seq received (every one up to it will be, or was, answered).
        self.in_hwm = 0
        #: Numbered requests received while the unacked buffer was full: (message, seq).
        #: (A list: an empty deque costs ~600 bytes per session, and this is rarely used.)
        self.held: list[tuple[envelope.Message, int]] = []
        #: Replies in request order, some still being computed (the connection's queue).
        self.pending: deque[_Slot] = deque()
        #: channel -> (epoch, offset, join_leave), recorded when the session detached.
        self.subs: dict[str, tuple[str, int, bool]] = {}
        self.attachment: Attachment | None = None
        #: The detached session's expiry timer.
        self.timer: Any = None
        #: Why it ended (None while it lives).
        self.ended: str | None = None
        #: (client seq, request JSON) a node that lost the session had started: run again.
        self.redeliver: list[tuple[int, str]] = []

    def number(self, body: bytes, cseq: int) -> bytes:
        """Give ``body`` the next seq (and ``ack``, when it answers client request ``cseq``)
        and keep it until acknowledged; the numbered body."""
        seq = self.out_seq = self.out_seq + 1
        if cseq:
            numbered = b'{"seq":%d,"ack":%d,' % (seq, self.in_hwm) + body[1:]
        else:
            numbered = b'{"seq":%d,' % seq + body[1:]
        self.unacked.append((seq, numbered))
        self.unacked_bytes += len(numbered)
        return numbered

    def ack(self, upto: int) -> int:
        """The client has every server message up to ``upto``; how many were released."""
        if upto <= self.acked:
            return 0
        self.acked = upto
        unacked = self.unacked
        released = 0
        while unacked and unacked[0][0] <= upto:
            self.unacked_bytes -= len(unacked.popleft()[1])
            released += 1
        return released

    def over(self, messages: int, size: int, factor: int = 1) -> bool:
        """More is kept than ``factor`` times the bounds."""
        return len(self.unacked) >= messages * factor or self.unacked_bytes >= size * factor


class Attachment:
    """A session carried by one connection (`Connection._resumable`)."""

    __slots__ = ("conn", "cseq", "epoch", "replied", "sessions", "state")

    def __init__(self, sessions: Sessions, state: SessionState, conn: Connection) -> None:
        self.sessions = sessions
        self.state = state
        self.conn = conn
        state.epoch += 1
        self.epoch = state.epoch
        #: The client seq of the numbered request being dispatched (0: none).
        self.cseq = 0
        #: The request being dispatched was answered (numbered) while it ran.
        self.replied = False

    @property
    def current(self) -> bool:
        """Still the session's connection (not taken over, ended or closed)."""
        state = self.state
        return state.attachment is self and state.epoch == self.epoch

    # -- reading (Connection._handle_item) -------------------------------------------------

    def receive(self, item: bytes) -> None:
        conn = self.conn
        state = self.state
        if (
            state.attachment is not self
            or state.epoch != self.epoch
            or conn.close_reason is not None
        ):
            return  # taken over, ended or closing while this read was under way
        conn.frames_in += 1
        try:
            value = decode_json(item, conn._max_depth)
            # as_message's checks, inlined for the usual envelope (it raises the errors).
            type_ = value.get("type") if type(value) is dict else None
            id_ = value.get("id", None) if type_ is not None else None
            if (
                type(type_) is str
                and type_
                and type_ != "error"
                and (id_ is None or type(id_) is int or type(id_) is str)
            ):
                message = Message(type_, id_, value.get("data"))
            else:
                message = as_message(value)
        except ProtocolError as e:
            conn.factory.count_error(e.code)
            self.raw(encode_error(e.code, e.message, e.id))
            return
        type_ = message.type
        if type_ == "ack":
            self.sessions.client_ack(self, message)
            return
        seq = value.get("seq")
        if seq is None:
            conn._dispatch(message)  # an unnumbered message: handled, and answered, as today
            return
        if type(seq) is not int or not 0 < seq <= MAX_SEQ:
            self.sessions.counts["bad_seq"] += 1
            self.fail(BAD_SEQ, f"seq is an integer from 1 to {MAX_SEQ}", message.id)
            return
        if seq <= state.in_hwm:
            self.sessions.counts["duplicates"] += 1
            return  # its reply is, or will be, in the session's outbound stream
        if seq != state.in_hwm + 1:
            self.sessions.counts["bad_seq"] += 1
            self.fail(BAD_SEQ, f"expected seq {state.in_hwm + 1}, got {seq} (a gap)", message.id)
            return
        sessions = self.sessions
        if state.held or sessions.full(state):
            limit = conn.factory.config.limits.max_pending_requests
            if len(state.held) >= 2 * limit:
                # One read past the pause (below) can carry many more: not received (the hwm
                # stays), so the client resends them after a resume.
                self.sessions.counts["refused_requests"] += 1
                self.fail(
                    RATE_LIMITED,
                    f"{len(state.held)} requests wait for acknowledgements "
                    "(sessions.max_unacked_messages); acknowledge, then resume",
                    message.id,
                )
                return
            state.in_hwm = seq
            self.sessions.received(state, seq, message)
            state.held.append((message, seq))
            if len(state.held) >= limit:
                conn._pause_reading()
            return
        state.in_hwm = seq
        if sessions.records:
            # Run it once Redis holds its receipt, not before: a node killed in between has
            # not run it either, so the client's resend runs it once; one killed after it ran
            # leaves a receipt, and the next holder runs it again flagged ``redelivered``.
            # Receipts are confirmed in order (one Redis link), so requests run in order.
            recorded = sessions.received(state, seq, message)
            recorded.addCallback(self._recorded, message, seq, self.epoch)
            return
        if (
            sessions.inline
            and not state.pending
            and conn._auth is None
            and type_ not in _DISPATCH_OWN
            and type_ != "session_end"
        ):
            handler = conn.factory.registry.get(type_)
            if handler is not None:
                self._answer(handler, message, seq)
                return
        self.run(message, seq)

    def _recorded(self, stored: Any, message: envelope.Message, seq: int, epoch: int) -> None:
        """Redis holds a request's receipt: run it, unless the session moved on meanwhile (it
        was taken over, ended, or its connection closed: whoever resumes it runs it again,
        flagged ``redelivered``, from that receipt)."""
        state = self.state
        if (
            stored is True
            and state.attachment is self
            and state.epoch == epoch == self.epoch
            and self.conn.close_reason is None
        ):
            self.run(message, seq)

    def _answer(self, handler: Any, message: envelope.Message, seq: int) -> None:
        """`run`, `_call`, `emit` and `Sessions.send_numbered` fused for the usual numbered
        request: a handler with a plain JSON result, nothing queued before it, the session's
        own connection, within the bounds.  Anything else takes the general path."""
        state = self.state
        conn = self.conn
        self.cseq = seq
        self.replied = False
        try:
            try:
                result = handler(Request(message.type, message.id, message.data, conn))
            except Exception:
                conn._emit(conn._error_frame(Failure(), message))
            else:
                if type(result) not in _PLAIN or state.pending:
                    conn._handle_result(message, result)
                else:
                    try:
                        body = encode_message(message.type, result, message.id)
                    except Exception:  # not JSON after all: the general path's error
                        conn._handle_result(message, result)
                    else:
                        self._numbered_reply(body, seq)
        finally:
            self.cseq = 0
        if not self.replied and not state.pending and state.ended is None:
            self.sessions.answered(state, seq)  # a notification (NO_REPLY): done already

    def _numbered_reply(self, body: bytes, cseq: int) -> None:
        state = self.state
        if state.attachment is not self or state.epoch != self.epoch or state.ended is not None:
            return
        self.replied = True
        sessions = self.sessions
        if sessions.factory.config is not sessions._bounds_of:
            sessions.bounds()
        messages, size = sessions._bounds
        unacked = state.unacked
        # Near twice the bound the general path decides (it ends the session past it).
        if len(unacked) + 1 >= 2 * messages or state.unacked_bytes + len(body) + 64 >= 2 * size:
            sessions.send_numbered(state, body, cseq)
            return
        seq = state.out_seq = state.out_seq + 1
        numbered = b'{"seq":%d,"ack":%d,' % (seq, state.in_hwm) + body[1:]
        unacked.append((seq, numbered))
        state.unacked_bytes += len(numbered)
        conn = self.conn
        if conn.connected:
            conn._write_body(numbered)

    def run(self, message: envelope.Message, seq: int, redelivered: bool = False) -> None:
        """Dispatch a numbered request; its reply (or error) is numbered with ``ack``."""
        self.cseq = seq
        self.replied = False
        state = self.state
        queued = len(state.pending)
        conn = self.conn
        type_ = message.type
        try:
            if type_ == "session_end":
                self.sessions.end_request(self, message)
            elif redelivered:
                self._redeliver(message)
            else:
                # `Connection._dispatch` inlined for what it would hand to a handler (no
                # auth gate, not pong/error): one call and three checks less per request.
                handler = None
                if conn._auth is None and type_ not in _DISPATCH_OWN:
                    handler = conn.factory.registry.get(type_)
                if handler is None:
                    conn._dispatch(message)
                else:
                    self._call(handler, message)
        finally:
            self.cseq = 0
        if not self.replied and len(state.pending) == queued and state.ended is None:
            self.sessions.answered(state, seq)  # a notification (NO_REPLY): done already

    def _call(self, handler: Any, message: envelope.Message) -> None:
        """Run ``handler``; a plain JSON result is answered here, anything else (Deferred,
        `Reply`, NO_REPLY, a coroutine) as `Connection._handle_result` does."""
        conn = self.conn
        try:
            result = handler(Request(message.type, message.id, message.data, conn))
        except Exception:
            conn._emit(conn._error_frame(Failure(), message))
            return
        if type(result) in _PLAIN and not message.bare:
            try:
                body = encode_message(message.type, result, message.id)
            except Exception:  # not JSON after all: the general path answers the error
                conn._handle_result(message, result)
                return
            self.emit(body)
        else:
            conn._handle_result(message, result)

    def _redeliver(self, message: envelope.Message) -> None:
        conn = self.conn
        handler = conn.factory.registry.get(message.type)
        if handler is None:
            conn._dispatch(message)  # the same answer as the first time (unknown_type...)
            return
        try:
            result = handler(RedeliveredRequest(message.type, message.id, message.data, conn))
        except Exception:
            conn._emit(conn._error_frame(Failure(), message))
            return
        conn._handle_result(message, result)

    def release_held(self) -> None:
        """Run requests held while the buffer was full, as long as there is room."""
        state = self.state
        sessions = self.sessions
        while state.held and not sessions.full(state) and self.current:
            message, seq = state.held.pop(0)
            self.run(message, seq)
        self.conn._resume_reading()

    def may_read(self) -> bool:
        return len(self.state.held) < self.conn.factory.config.limits.max_pending_requests

    def fail(self, code: str, text: str, id: Any = None) -> None:
        """A typed error that closes the connection; the session stays resumable."""
        conn = self.conn
        conn.factory.count_error(code)
        self.raw(encode_error(code, text, id))
        batch = conn._batch
        if batch:
            ready = batch[:]
            batch.clear()
            conn._write_many(ready)
        conn.close(code, text)

    # -- writing -----------------------------------------------------------------------------

    def raw(self, body: bytes) -> None:
        """Write a connection-level body (never numbered, never replayed)."""
        if self.conn.connected:
            self.conn._write_body(body)

    def emit(self, body: bytes) -> None:
        """`Connection._emit`: a reply, numbered when it answers a numbered request."""
        state = self.state
        if state.attachment is not self or state.epoch != self.epoch:
            return  # taken over: nothing more on this connection, and nothing of it elsewhere
        cseq = self.cseq
        if cseq:
            self.replied = True
        if state.pending:
            state.pending.append(_Slot(body, cseq))
        elif cseq:
            self.sessions.send_numbered(state, body, cseq)
        else:
            self.raw(body)

    def push(self, body: bytes) -> None:
        """A push (send, broadcast, publication...): numbered, for whichever connection
        carries the session now (or kept for the next one).  A connection that lost the
        session (taken over) gets nothing more: what is addressed to it is dropped, as for
        any closing connection (a broadcast reaches the session through its new one)."""
        if self.current:
            self.sessions.send_numbered(self.state, body, 0)

    def flush(self) -> None:
        """`Connection._flush_pending`: the session's replies, in request order."""
        self.sessions.flush(self.state)

    def connection_lost(self) -> None:
        """`Connection._closed`: the session detaches (if it was still this connection's)."""
        if self.current:
            self.sessions.detach(self.state)


class Sessions:
    """The daemon's sessions (see the module docstring); the factory owns one."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.states: dict[str, SessionState] = {}
        #: `bucket_of` (identity, or address without one) -> sessions it holds
        #: (sessions.max_per_identity).
        self.per_identity: Counter[str] = Counter()
        #: Bytes the detached sessions keep for their replay (sessions.max_detached_bytes).
        self.detached_bytes = 0
        #: Session ids that ended for a reason a late resume is told (expired, overflow).
        self.gone: OrderedDict[str, str] = OrderedDict()
        self.detached = 0
        self.started = 0
        self.takeovers = 0
        self.replayed = 0
        self.resumes: Counter[str] = Counter()
        self.ended: Counter[str] = Counter()
        #: Odd events (duplicates, bad_seq, late acks, bad acks).
        self.counts: Counter[str] = Counter()
        self._bounds_of: Any = None
        self._bounds = (0, 0)
        self._max_detached = 0
        #: `received` does something (the clustered store records requests in Redis).
        self.records = type(self).received is not Sessions.received
        #: Numbered replies may be written by `Attachment._answer` itself (not with a store
        #: that keeps them elsewhere first).
        self.inline = (
            type(self).store is Sessions.store
            and type(self).send_numbered is Sessions.send_numbered
        )

    @property
    def config(self) -> Any:
        return self.factory.config.sessions

    @property
    def attached(self) -> int:
        return len(self.states) - self.detached

    def channel_keep(self, state: SessionState) -> int:
        """Seconds a detached ``state`` may come back to its subscriptions (the channel
        broker keeps their epochs that long: `heartbeatd.server.channels.ChannelHub._keep`)."""
        return state.expiry

    def bounds(self) -> tuple[int, int]:
        """(``max_unacked_messages``, ``max_unacked_bytes``), read again after a reload."""
        config = self.factory.config
        if config is not self._bounds_of:
            self._bounds_of = config
            self._bounds = (
                config.sessions.max_unacked_messages,
                config.sessions.max_unacked_bytes,
            )
            self._max_detached = config.sessions.max_detached_bytes
        return self._bounds

    def full(self, state: SessionState) -> bool:
        if self.factory.config is not self._bounds_of:
            self.bounds()
        messages, size = self._bounds
        return len(state.unacked) >= messages or state.unacked_bytes >= size

    # -- storage hooks (the clustered store overrides these) ------------------------------

    def received(
        self, state: SessionState, seq: int, message: envelope.Message
    ) -> Deferred[Any] | None:
        """A numbered request arrived (the clustered store records it until answered)."""

    def answered(self, state: SessionState, seq: int) -> None:
        """A numbered request finished without a reply (the clustered store forgets it)."""

    # -- the control messages (Connection._dispatch, for types without a handler) --------

    def control(self, conn: Connection, message: envelope.Message) -> bool:
        """Handle ``session``, ``resume``, ``ack``, ``session_end``; False: not ours."""
        type_ = message.type
        if type_ not in SESSION_TYPES:
            return False
        attachment = conn._resumable
        if type_ == "ack":
            if attachment is not None:
                self.client_ack(attachment, message)
            return True  # an ack for a session already lost: ignored, as pongs are
        if attachment is not None:
            if type_ == "session_end":
                # Sent without seq (a numbered one is run by `Attachment.run`): it ends the
                # session all the same, answered without seq, like any unnumbered request.
                self.end_request(attachment, message)
                return True
            conn._emit(
                encode_error(
                    SESSION_EXISTS, "this connection already carries a session", message.id
                )
            )
            return True
        if type_ == "session_end":
            conn._emit(encode_error(NO_SESSION, "this connection has no session", message.id))
            return True
        if not self.config.enabled:
            conn.factory.count_error(SESSIONS_DISABLED)
            if type_ == "resume":
                self._refuse_resume(conn, message, SESSIONS_DISABLED)
            else:
                conn._emit(encode_error(SESSIONS_DISABLED, "sessions.enabled is false", message.id))
            return True
        if conn._pending:
            conn._emit(
                encode_error(
                    BAD_REQUEST,
                    f"wait for your replies before {type_} (requests in flight)",
                    message.id,
                )
            )
            return True
        if type_ == "session":
            self.start(conn, message)
        else:
            self.resume(conn, message)
        return True

    def granted_expiry(self, conn: Connection, message: envelope.Message) -> int | None:
        """The expiry a ``session`` request gets, or None when refused (answered here)."""
        config = self.config
        data = message.data
        expiry = config.expiry
        if data is not None:
            asked = data.get("expiry", expiry) if isinstance(data, dict) else None
            if type(asked) is not int or asked < 1:
                conn._emit(
                    encode_error(
                        BAD_REQUEST, 'expected data {"expiry": <seconds, 1 or more>}', message.id
                    )
                )
                return None
            expiry = min(asked, config.max_expiry)
        refusal = self._limit(bucket_of(conn))
        if refusal is not None:
            conn.factory.count_error(TOO_MANY_SESSIONS)
            conn._emit(encode_error(TOO_MANY_SESSIONS, refusal, message.id))
            return None
        return expiry

    def start(self, conn: Connection, message: envelope.Message) -> None:
        expiry = self.granted_expiry(conn, message)
        if expiry is None:
            return
        sid = _new_sid()
        key = _new_key()
        state = SessionState(sid, _digest(key), conn.identity, expiry, bucket_of(conn))
        self._add(state)
        self.started += 1
        self.created(state)
        conn._emit(
            envelope.encode_message(
                "session", {"session": sid, "key": key, "expiry": expiry}, message.id
            )
        )
        self.attach(state, conn)
        log.debug(
            "Session {sid} started on {session} ({peer})",
            sid=sid,
            session=conn.session_id,
            peer=conn.peer,
        )

    def created(self, state: SessionState) -> None:
        """A session was started (the clustered store writes it)."""

    def _limit(self, bucket: str | None) -> str | None:
        config = self.config
        if len(self.states) >= config.max_sessions:
            return f"the server holds its maximum of {config.max_sessions} sessions"
        limit = config.max_per_identity
        if bucket is not None and limit and self.per_identity[bucket] >= limit:
            who = repr(bucket[2:]) if bucket[0] == "u" else f"address {bucket[2:]} (no identity)"
            return (
                f"{who} already holds its maximum of {limit} sessions (sessions.max_per_identity)"
            )
        return None

    def _add(self, state: SessionState) -> None:
        self.states[state.sid] = state
        if state.bucket is not None:
            self.per_identity[state.bucket] += 1

    def _forget(self, state: SessionState) -> None:
        if self.states.get(state.sid) is not state:
            return  # an older copy (the session came back here since): not this one
        del self.states[state.sid]
        if state.attachment is None:
            self.detached -= 1
            self.detached_bytes -= state.unacked_bytes
        bucket = state.bucket
        if bucket is not None:
            left = self.per_identity[bucket] - 1
            if left > 0:
                self.per_identity[bucket] = left
            else:
                del self.per_identity[bucket]
        if state.timer is not None and state.timer.active():
            state.timer.cancel()
        state.timer = None

    def attach(self, state: SessionState, conn: Connection) -> Attachment:
        """``conn`` carries ``state`` from now on (a fresh start or a resume)."""
        attachment = Attachment(self, state, conn)
        state.attachment = attachment
        if conn._pending:  # unnumbered replies queued before the session: kept in order
            state.pending.extend(conn._pending)
        conn._pending = state.pending
        conn._resumable = attachment
        # Numbering needs the general path; other connections keep the fast one.
        conn.fast_path = False
        return attachment

    # -- resume ---------------------------------------------------------------------------

    def _refuse_resume(self, conn: Connection, message: envelope.Message, reason: str) -> None:
        self.resumes[reason] += 1
        conn._emit(
            envelope.encode_message("resume", {"resumed": False, "reason": reason}, message.id)
        )

    def _resume_fields(self, message: envelope.Message) -> tuple[str, str, int] | None:
        data = message.data
        if not isinstance(data, dict):
            return None
        sid, key, ack = data.get("session"), data.get("key"), data.get("ack", 0)
        if (
            not isinstance(sid, str)
            or not _SID.fullmatch(sid)
            or not isinstance(key, str)
            or not 0 < len(key) <= 256
            or type(ack) is not int
            or not 0 <= ack <= MAX_SEQ
        ):
            return None
        return sid, key, ack

    def resume(self, conn: Connection, message: envelope.Message) -> None:
        tries = getattr(conn, "_resume_tries", 0) + 1
        conn._resume_tries = tries  # type: ignore[attr-defined]  # rare: the instance dict
        if tries > MAX_RESUMES_PER_CONNECTION:
            conn.factory.count_error(RATE_LIMITED)
            conn._emit(
                encode_error(
                    RATE_LIMITED,
                    f"at most {MAX_RESUMES_PER_CONNECTION} resume attempts per connection",
                    message.id,
                )
            )
            return
        fields = self._resume_fields(message)
        if fields is None:
            conn.factory.count_error(BAD_REQUEST)
            conn._emit(
                encode_error(
                    BAD_REQUEST,
                    'expected data {"session": "<hex id>", "key": "<key>", "ack": <int >= 0>}',
                    message.id,
                )
            )
            return
        sid, key, ack = fields
        self.claim(conn, message, sid, key, ack)

    def claim(
        self, conn: Connection, message: envelope.Message, sid: str, key: str, ack: int
    ) -> None:
        """Resume ``sid`` on ``conn`` if the key and identity match (the clustered store reads
        Redis instead of this daemon's memory)."""
        state = self.states.get(sid)
        if state is None:
            self._refuse_resume(conn, message, self.gone.get(sid, "unknown_session"))
            return
        if not hmac.compare_digest(state.key_digest, _digest(key)):
            self._bad_key(conn, message, sid)
            return
        if state.identity != conn.identity:
            self._refuse_resume(conn, message, "forbidden")
            return
        if ack > state.out_seq:
            self._bad_ack(conn, message, ack, state.out_seq)
            return
        old = state.attachment
        if old is not None:
            self.take_over(old)
        else:
            self.detached -= 1
            self.detached_bytes -= state.unacked_bytes
            if state.timer is not None and state.timer.active():
                state.timer.cancel()
            state.timer = None
        state.ack(ack)
        self.resumed(state, conn, message)

    def _bad_key(self, conn: Connection, message: envelope.Message, sid: str) -> None:
        self._refuse_resume(conn, message, "bad_key")
        if conn.factory.log_allowed("session_bad_key"):
            log.warn(
                "A resume of session {sid} from {peer} gave a wrong key", sid=sid, peer=conn.peer
            )

    def _bad_ack(self, conn: Connection, message: envelope.Message, ack: int, last: int) -> None:
        self.counts["bad_ack"] += 1
        conn.factory.count_error(BAD_REQUEST)
        conn._emit(
            encode_error(
                BAD_REQUEST, f"ack {ack} is past the session's last message ({last})", message.id
            )
        )

    def resumed(self, state: SessionState, conn: Connection, message: envelope.Message) -> None:
        """``conn`` carries ``state`` now: answer, replay what is unacknowledged, then what
        is new (replies finished meanwhile, subscriptions' missed publications)."""
        attachment = self.attach(state, conn)
        self.resumes["resumed"] += 1
        replay = list(state.unacked)
        self.replayed += len(replay)
        attachment.raw(
            envelope.encode_message(
                "resume",
                {
                    "resumed": True,
                    "session": state.sid,
                    "ack": state.in_hwm,
                    "replay": len(replay),
                    "expiry": state.expiry,
                },
                message.id,
            )
        )
        for _seq, body in replay:
            attachment.raw(body)
        log.debug(
            "Session {sid} resumed on {session} ({peer}): {n} replayed",
            sid=state.sid,
            session=conn.session_id,
            peer=conn.peer,
            n=len(replay),
        )
        self.flush(state)
        self.restore_subscriptions(state, conn)
        self.redeliver(attachment)
        attachment.release_held()

    def redeliver(self, attachment: Attachment) -> None:
        """Run again what a node that lost the session had started (clustered store)."""

    def take_over(self, old: Attachment) -> None:
        """A resume won over the connection that still carried the session (half-open):
        it gets ``session_taken_over`` and nothing more of the session."""
        state = old.state
        self.takeovers += 1
        self.record_subscriptions(state, old.conn)
        state.attachment = None
        conn = old.conn
        conn._pending = None  # its queue is the session's: it goes to the new connection
        old.raw(
            encode_error(
                SESSION_TAKEN_OVER,
                "another connection resumed this session; nothing more is sent here",
            )
        )
        conn.close(SESSION_TAKEN_OVER, f"session {state.sid} was resumed on another connection")

    # -- subscriptions --------------------------------------------------------------------

    def record_subscriptions(self, state: SessionState, conn: Connection) -> None:
        """The connection's subscriptions become the session's, with their offsets."""
        hub = self.factory.channels
        state.subs = hub.detach_subscriptions(conn)

    def restore_subscriptions(self, state: SessionState, conn: Connection) -> None:
        subs, state.subs = state.subs, {}
        hub = self.factory.channels
        for channel, (epoch, offset, join_leave) in subs.items():
            d = hub.subscribe(conn, channel, (epoch, offset), join_leave, restore=True)
            d.addCallbacks(
                self._restored,
                self._restore_failed,
                callbackArgs=(state, channel),
                errbackArgs=(state, channel, (epoch, offset, join_leave)),
            )

    def _restored(self, answer: dict[str, Any], state: SessionState, channel: str) -> None:
        if answer.get("recovered") is False and state.attachment is not None:
            self.send_numbered(
                state,
                envelope.encode_message(
                    "resync",
                    {
                        "channel": channel,
                        "epoch": answer["epoch"],
                        "offset": answer["offset"],
                        "recovered": False,
                        "reason": answer.get("reason", "history_lost"),
                    },
                ),
                0,
            )

    def _restore_failed(
        self, failure: Any, state: SessionState, channel: str, was: tuple[str, int, bool]
    ) -> None:
        if state.ended is not None:
            return
        if state.attachment is None:
            state.subs[channel] = was  # detached again meanwhile: try on the next resume
            return
        code = getattr(failure.value, "code", "unavailable")
        self.send_numbered(
            state,
            envelope.encode_message("subscription_lost", {"channel": channel, "reason": code}),
            0,
        )

    # -- numbered output ------------------------------------------------------------------

    def send_numbered(self, state: SessionState, body: bytes, cseq: int) -> None:
        """Number ``body``, keep it until acknowledged, write it to the session's connection
        (detached: keep it for the replay)."""
        if state.ended is not None:
            return
        # SessionState.number, inlined (once per numbered message).
        seq = state.out_seq = state.out_seq + 1
        if cseq:
            numbered = b'{"seq":%d,"ack":%d,' % (seq, state.in_hwm) + body[1:]
        else:
            numbered = b'{"seq":%d,' % seq + body[1:]
        unacked = state.unacked
        unacked.append((seq, numbered))
        state.unacked_bytes += len(numbered)
        attachment = state.attachment
        config = self.factory.config
        if config is not self._bounds_of:
            self.bounds()
        messages, size = self._bounds
        if attachment is None:
            self.detached_bytes += len(numbered)
            if (
                len(state.unacked) > messages
                or state.unacked_bytes > size
                or self.detached_bytes > self._max_detached
            ):
                # Past its own bound, or the daemon's for every detached session
                # (sessions.max_detached_bytes): it cannot be kept, so the session ends.
                self.end(state, "overflow")
                return
        elif len(state.unacked) >= 2 * messages or state.unacked_bytes >= 2 * size:
            # Pushes still go out at the bound (requests wait); a client that reads them but
            # never acknowledges is not allowed to grow the buffer without end.
            attachment.fail(
                SESSION_OVERFLOW,
                "the client did not acknowledge "
                f"{len(state.unacked)} messages ({state.unacked_bytes} bytes)",
            )
            self.end(state, "overflow")
            return
        self.store(state, numbered, cseq, body)

    def store(self, state: SessionState, numbered: bytes, cseq: int, body: bytes) -> None:
        """Keep and write a numbered message (the clustered store writes Redis first, and
        the connection once Redis has it)."""
        attachment = state.attachment
        if attachment is not None:
            attachment.raw(numbered)

    def flush(self, state: SessionState) -> None:
        """Write (or, detached, keep) every finished reply at the head of the queue."""
        pending = state.pending
        attachment = state.attachment
        while pending and pending[0].frame is not None:
            slot = pending.popleft()
            frame = slot.frame
            if not frame:
                if slot.seq:
                    self.answered(state, slot.seq)
                continue
            if slot.seq:
                self.send_numbered(state, frame, slot.seq)
            elif attachment is not None:
                attachment.raw(frame)
        if attachment is not None:
            conn = attachment.conn
            if (
                conn._reading_paused
                and len(pending) < conn.factory.config.limits.max_pending_requests
            ):
                conn._resume_reading()

    # -- acks -----------------------------------------------------------------------------

    def client_ack(self, attachment: Attachment, message: envelope.Message) -> None:
        data = message.data
        upto = data.get("seq") if isinstance(data, dict) else None
        state = attachment.state
        if type(upto) is not int or upto < 0:
            self.counts["bad_ack"] += 1
            attachment.conn.factory.count_error(BAD_REQUEST)
            attachment.raw(
                encode_error(BAD_REQUEST, 'expected data {"seq": <int >= 0>}', message.id)
            )
            return
        if upto > state.out_seq:
            self.counts["bad_ack"] += 1
            attachment.conn.factory.count_error(BAD_REQUEST)
            attachment.raw(
                encode_error(
                    BAD_REQUEST,
                    f"ack {upto} is past the last message sent ({state.out_seq})",
                    message.id,
                )
            )
            return
        if upto <= state.acked:
            self.counts["late_acks"] += 1
            return
        state.ack(upto)
        self.acknowledged(state, upto)
        if state.held and attachment.current:
            attachment.release_held()

    def acknowledged(self, state: SessionState, upto: int) -> None:
        """The client acknowledged up to ``upto`` (the clustered store trims Redis)."""

    # -- lifetime -------------------------------------------------------------------------

    def detach(self, state: SessionState) -> None:
        """The session's connection is gone: keep it ``expiry`` seconds."""
        attachment = state.attachment
        if attachment is not None:
            self.record_subscriptions(state, attachment.conn)
        state.attachment = None
        self.detached += 1
        self.detached_bytes += state.unacked_bytes
        state.timer = self.factory.clock.callLater(state.expiry, self.expire, state)
        self.flush(state)  # replies finished meanwhile are numbered and kept

    def expire(self, state: SessionState) -> None:
        state.timer = None
        if state.attachment is None and state.ended is None:
            self.end(state, "expired")

    def end(self, state: SessionState, reason: str) -> None:
        """The session is over (``expired``, ``overflow``, ``ended``)."""
        if state.ended is not None:
            return
        self._forget(state)
        state.ended = reason
        self.ended[reason] += 1
        state.unacked.clear()
        state.unacked_bytes = 0
        state.held.clear()
        state.subs = {}
        if reason != "ended":
            self.gone[state.sid] = reason
            while len(self.gone) > REMEMBER_GONE:
                self.gone.popitem(last=False)
        attachment = state.attachment
        if attachment is not None:
            state.attachment = None
            conn = attachment.conn
            if conn._resumable is attachment:
                conn._resumable = None
                conn.__dict__.pop("fast_path", None)
        log.debug("Session {sid} ended: {reason}", sid=state.sid, reason=reason)

    def end_request(self, attachment: Attachment, message: envelope.Message) -> None:
        """``session_end``: answered (numbered), then the connection goes on without it."""
        state = attachment.state
        conn = attachment.conn
        conn._emit(envelope.encode_message("session_end", {"ended": True}, message.id))
        pending = state.pending
        self.end(state, "ended")
        conn._pending = pending if pending else None
        # The replies still queued are the connection's now: written as they are.
        for slot in pending:
            slot.seq = 0

    # -- pushes to sessions that are not attached here ------------------------------------

    def send(self, sid: str, body: bytes) -> bool:
        """A push addressed to a session id: numbered into it (attached or not)."""
        state = self.states.get(sid)
        if state is None:
            return False
        self.send_numbered(state, body, 0)
        return True

    def broadcast_detached(self, body: bytes, everywhere: bool = False) -> None:
        """A broadcast reaches detached sessions too (it is in their replay)."""
        if not self.detached:
            return
        for state in [s for s in self.states.values() if s.attachment is None]:
            self.send_numbered(state, body, 0)

    def stats(self) -> dict[str, Any]:
        return {
            "attached": self.attached,
            "detached": self.detached,
            "detached_bytes": self.detached_bytes,
            "started": self.started,
            "takeovers": self.takeovers,
            "replayed": self.replayed,
            "resumes": dict(self.resumes),
            "ended": dict(self.ended),
            "unacked_messages": sum(len(s.unacked) for s in self.states.values()),
        }

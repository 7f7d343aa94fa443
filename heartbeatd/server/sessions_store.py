"""Resumable sessions kept in Redis, so any node of a cluster continues them.

`ClusteredSessions` is `Sessions` (heartbeatd.server.resumable) whose state lives in Redis
(`heartbeatd.cluster.sessions`: keys, scripts, the fence).  What changes on a cluster:

* Redis first, then the wire: a numbered message is written to the client only once Redis
  holds it (one connection to Redis applies the scripts in call order, so they confirm in seq
  order).  A numbered request is recorded in Redis (``RECV``) before anything that
  acknowledges it can be written, and forgotten when its reply is stored.  So after kill -9 of
  the node holding a session, the node a client resumes on has every message the client may
  have seen, the high-water mark the client was told, and the requests that were received but
  not answered: it runs those again, flagged ``request.redelivered``.
* The fence: every script names the epoch the node holds; a resume (``CLAIM``) raises it.
  A node whose write is refused (-1) has lost the session: its connection gets
  ``session_taken_over`` and is closed, and what was refused is not written to it.  The
  resuming node also tells the former holder's node at once (a ``send`` to the old
  connection), which checks the fence and closes it, so a quiet half-open connection does not
  wait for its next write.
* Detached sessions live in Redis only (their keys expire after ``expiry``); this node keeps
  one in memory only while replies it started are still being computed, and numbers those
  replies in Redis (``KEEP``), as pushes and broadcasts for it may be numbered there too.
* A connection that closes while Redis is unreachable leaves its session recorded as
  attached to it (the ``DETACH`` failed): pushes to it would be forwarded to this node, which
  no longer carries it, and broadcasts would skip it.  Such detaches are made when the link
  returns (`on_link`), epoch-fenced, so a resume meanwhile wins.
* One numberer at a time: the node whose connection carries a session numbers its messages;
  a push to it from another node is forwarded there (``PUSH`` publishes it to that node).
  A session no live node carries (detached, or its node's lease ran out) is numbered in
  Redis: pushes (``PUSH``) and broadcasts (``BROADCAST``) wait there for its replay, bounded
  by ``sessions.max_unacked_*`` (past them it ends, ``overflow``).
"""

from __future__ import annotations

import json
import re
from collections import deque
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from heartbeatd._logging import get_logger
from heartbeatd.server.connection import Connection, body_type
from heartbeatd.server.resumable import (
    SESSION_TAKEN_OVER,
    TOO_MANY_SESSIONS,
    Attachment,
    Sessions,
    SessionState,
    _digest,
    _new_key,
    _new_sid,
    bucket_of,
)
from heartbeatd.wire import envelope
from heartbeatd.wire.envelope import encode_error

__all__ = ["KICK", "ClusteredSessions"]

log = get_logger(__name__)

#: The `send` type a resuming node uses to tell the former holder's node (never a client's).
KICK = "session_taken_over"
#: The `send` type of a push forwarded to the node holding the session (``PUSH``).
PUSHED = "session_push"
#: A resumable session's id (32 hex digits; a connection's hello id has 16).
_SESSION_ID = re.compile(r"[0-9a-f]{32}")
#: Seconds between TTL refreshes of the sessions this node holds; attached keys live their
#: expiry plus `EXTRA_TTL`, so a node that dies leaves them to expire like detached ones.
REFRESH_EVERY = 15
EXTRA_TTL = 3 * REFRESH_EVERY
UNAVAILABLE = "unavailable"
#: Sessions written back per REATTACH script (a node with many keeps each call short).
REATTACH_BATCH = 1000

_PUBLICATION = re.compile(rb'\{"type":"publication","data":\{"channel":"([^"\\]*)","offset":\d+,')
_SUB_TYPES = frozenset({b"subscribe", b"unsubscribe", b"resync", b"subscription_lost"})


class ClusteredSessions(Sessions):
    """`Sessions` on Redis (see the module docstring)."""

    def __init__(self, factory: Any, store: Any) -> None:
        super().__init__(factory)
        self.redis = store
        #: Sessions started here that Redis has not confirmed yet (their requests wait).
        self._creating: set[str] = set()
        #: Sessions a session_end is ending: Redis's END, which its answer waits for.
        self._ending: dict[str, Deferred[Any]] = {}
        self.fenced = 0
        self.store_failures = 0
        #: sid -> (epoch, expiry, when its connection went) of the sessions whose detach
        #: Redis did not take (unreachable): detached when the link returns (`on_link`).
        self._undetached: dict[str, tuple[int, int, float]] = {}
        self._refresher = LoopingCall(self._refresh)
        self._refresher.clock = factory.clock
        self._refresher.start(REFRESH_EVERY, now=False)

    def stop(self) -> None:
        if self._refresher.running:
            self._refresher.stop()

    def _refresh(self) -> None:
        held = [(s.sid, s.epoch) for s in self.states.values() if s.attachment is not None]
        if held:
            self.redis.refresh(held, EXTRA_TTL, self.config.max_expiry).addErrback(
                self._failed, "refresh", None
            )
        if self.factory.channels.broker.up:
            self.on_link(True)  # detaches Redis refused with its link up (OOM...): once a period

    def _ttl(self, state: SessionState) -> int:
        return state.expiry + EXTRA_TTL

    def channel_keep(self, state: SessionState) -> int:
        # As long as Redis may keep the session (a node killed while holding it: its keys
        # live expiry + EXTRA_TTL after the last refresh).
        return state.expiry + EXTRA_TTL

    def _failed(
        self, failure: Failure, what: str, state: SessionState | None, detach: bool = True
    ) -> None:
        """A store write failed (Redis unreachable): the client cannot be given what Redis
        does not hold, so its connection is closed ``unavailable``; it resumes later (and
        Redis records the session detached once the link is back)."""
        self.store_failures += 1
        if self.factory.log_allowed("session_store"):
            log.warn(
                "Session store ({what}) failed: {why}", what=what, why=failure.getErrorMessage()
            )
        if state is not None and state.attachment is not None:
            attachment = state.attachment
            if detach:
                self._detach_later(state.sid, state.epoch, state.expiry)
            self._let_go(state)
            attachment.fail(UNAVAILABLE, "the cluster's session store is unreachable")

    def _detach_later(self, sid: str, epoch: int, expiry: int) -> None:
        """Redis still says a connection of this node carries the session (pushes to it would
        be forwarded here and dropped, broadcasts would skip it): detach it there, with the
        subscriptions Redis recorded as its messages were numbered (this node's own record
        may be ahead of what Redis took).  With the link up (a write refused: Redis out of
        memory, a failed save) this one is tried at once; otherwise, and if that fails, when
        the link is back (`on_link`) or at the next refresh period, never all at each failure
        (which made a storm of retries grow with the square of the sessions)."""
        at = self.factory.clock.seconds()
        if self.factory.channels.broker.up:
            d = self.redis.detach(sid, epoch, expiry, None, self.config.max_expiry)
            d.addErrback(self._detach_failed, sid, epoch, expiry, at)
        else:
            self._remember_detach(sid, epoch, expiry, at)

    def _remember_detach(self, sid: str, epoch: int, expiry: int, at: float) -> None:
        if sid not in self._undetached and len(self._undetached) < self.config.max_sessions:
            self._undetached[sid] = (epoch, expiry, at)

    def on_link(self, up: bool) -> None:
        """The broker's link changed; when it is back, the detaches it missed are made.  Each
        names the epoch it had, so a session resumed meanwhile (its epoch raised) is left as
        it is; each keeps what remains of its expiry."""
        if not up or not self._undetached:
            return
        again, self._undetached = self._undetached, {}
        now = self.factory.clock.seconds()
        for sid, (epoch, expiry, at) in again.items():
            left = max(1, int(expiry - (now - at)))
            d = self.redis.detach(sid, epoch, left, None, self.config.max_expiry)
            d.addErrback(self._detach_failed, sid, epoch, expiry, at)

    def _detach_failed(
        self, failure: Failure, sid: str, epoch: int, expiry: int, at: float
    ) -> None:
        self._remember_detach(sid, epoch, expiry, at)
        self._failed(failure, "detach", None)

    def _checked(self, result: Any, state: SessionState, epoch: int) -> bool:
        """True when the write was taken; else the session was resumed elsewhere (-1), or
        Redis numbered messages for it while this node's lease had run out (-2)."""
        if result == -1 or result == b"-1":
            self.fenced += 1
            if state.epoch == epoch and self.states.get(state.sid) is state:
                self._lost(state)
            return False
        if result == -2 or result == b"-2":
            self.counts["numbered_elsewhere"] += 1
            if state.epoch == epoch and self.states.get(state.sid) is state:
                self._numbered_elsewhere(state)
            return False
        return True

    def _numbered_elsewhere(self, state: SessionState) -> None:
        """The other nodes counted this one out (its lease ran out: a partition, a failover)
        and Redis numbered pushes or broadcasts into the session meanwhile.  It is still the
        client's: Redis records it detached, and the connection is closed ``unavailable``,
        so the client resumes and gets everything in order (not ``session_taken_over``:
        nobody else resumed it)."""
        attachment = state.attachment
        sid, epoch, expiry = state.sid, state.epoch, state.expiry
        d = self.redis.detach(sid, epoch, expiry, None, self.config.max_expiry)
        d.addErrback(self._detach_failed, sid, epoch, expiry, self.factory.clock.seconds())
        self._let_go(state)
        if attachment is not None:
            attachment.fail(
                UNAVAILABLE,
                "this node was counted out of the cluster and the session was written to "
                "meanwhile; resume it",
            )

    def reattach(self) -> None:
        """The broker wrote this node's clients back to Redis (a reconnect, or after the other
        nodes reaped it): the sessions its connections carry are recorded as its own again,
        so pushes are forwarded here rather than kept in Redis.  One resumed elsewhere (or
        gone) meanwhile is lost to its connection, as at a fenced write; one Redis numbered
        pushes into has its connection closed ``unavailable``, to resume (at once, not at
        its next write: an idle client would wait for ever)."""
        held = [
            (s.sid, s.epoch, s.out_seq, s.attachment.conn.session_id, self._ttl(s))
            for s in self.states.values()
            if s.attachment is not None and s.sid not in self._creating
        ]
        for start in range(0, len(held), REATTACH_BATCH):
            batch = held[start : start + REATTACH_BATCH]
            d = self.redis.reattach(batch, self.config.max_expiry)
            d.addCallbacks(
                self._reattached,
                self._failed,
                callbackArgs=({sid: epoch for sid, epoch, *_ in batch},),
                errbackArgs=("reattach", None),
            )

    def _reattached(self, refused: dict[str, str], epochs: dict[str, int]) -> None:
        for sid, why in refused.items():
            state = self.states.get(sid)
            if state is None or sid not in epochs:
                continue
            if why == "gone":
                self._gone(state, epochs[sid])
            else:
                self._checked(-2 if why == "moved" else -1, state, epochs[sid])

    def _gone(self, state: SessionState, epoch: int) -> None:
        """Redis lost the session (restarted empty, or failed over to a replica without it):
        nobody took it over, so not ``session_taken_over``.  Its connection is closed
        ``unavailable``; the client's resume then learns the session is unknown."""
        if state.epoch != epoch or self.states.get(state.sid) is not state:
            return
        self.counts["lost_by_the_store"] += 1
        attachment = state.attachment
        self._let_go(state)
        if attachment is not None:
            attachment.fail(UNAVAILABLE, "the cluster's session store no longer has this session")

    def _lost(self, state: SessionState) -> None:
        """Another node resumed the session: stop writing, tell our connection, forget it."""
        attachment = state.attachment
        self._let_go(state)
        if attachment is not None:
            self.takeovers += 1
            attachment.raw(
                encode_error(
                    SESSION_TAKEN_OVER,
                    "another connection resumed this session; nothing more is sent here",
                )
            )
            attachment.conn.close(SESSION_TAKEN_OVER, f"session {state.sid} resumed elsewhere")

    def _let_go(self, state: SessionState) -> None:
        """Forget a session locally (Redis keeps it); its connection carries none now."""
        attachment = state.attachment
        self._forget(state)
        state.ended = "moved"
        state.attachment = None
        if attachment is not None and attachment.conn._resumable is attachment:
            # Its connection is being closed: it keeps the (no longer current) attachment,
            # which drops whatever else is addressed to it.
            attachment.conn._pending = None

    # -- the hooks of Sessions ------------------------------------------------------------

    def start(self, conn: Connection, message: envelope.Message) -> None:
        """Answered once Redis wrote the session (``sessions.max_per_identity`` and
        ``sessions.max_sessions`` are counted there, across the cluster: a detached session
        lives in Redis only); numbered requests sent meanwhile wait, as at the bound."""
        if not self.factory.channels.broker.up:
            conn.factory.count_error(UNAVAILABLE)
            conn._emit(
                encode_error(UNAVAILABLE, "the cluster's session store is unreachable", message.id)
            )
            return
        expiry = self.granted_expiry(conn, message)
        if expiry is None:
            return
        key = _new_key()
        state = SessionState(_new_sid(), _digest(key), conn.identity, expiry, bucket_of(conn))
        self._add(state)
        self._creating.add(state.sid)
        attachment = self.attach(state, conn)
        config = self.config
        # The set it counts in for max_per_identity, only while that bound is on (a set of
        # every anonymous session from one address would cost Redis memory for nothing).
        group = (state.bucket or "") if config.max_per_identity else ""
        d = self.redis.create(
            state.sid,
            state.key_digest.hex(),
            state.identity or "",
            state.expiry,
            conn.session_id,
            self._ttl(state),
            config.max_per_identity if group else 0,
            config.max_expiry,
            config.max_sessions,
            group,
        )
        d.addCallbacks(
            self._created,
            self._create_failed,
            callbackArgs=(attachment, message, key),
            errbackArgs=(state,),
        )

    def _create_failed(self, failure: Failure, state: SessionState) -> None:
        self._creating.discard(state.sid)
        self._failed(failure, "create", state, detach=False)  # nobody can resume it

    def _created(
        self, result: Any, attachment: Attachment, message: envelope.Message, key: str
    ) -> None:
        state = attachment.state
        self._creating.discard(state.sid)
        if state.ended is not None:
            return  # the connection left meanwhile (and the session with it)
        conn = attachment.conn
        if int(result) != 1:
            self._refused(state, attachment, message, int(result))
            return
        self.started += 1
        if attachment.current:
            attachment.raw(
                envelope.encode_message(
                    "session",
                    {"session": state.sid, "key": key, "expiry": state.expiry},
                    message.id,
                )
            )
            log.debug(
                "Session {sid} started on {session} ({peer})",
                sid=state.sid,
                session=conn.session_id,
                peer=conn.peer,
            )
            attachment.release_held()

    def _refused(
        self, state: SessionState, attachment: Attachment, message: envelope.Message, why: int
    ) -> None:
        """Redis counted ``sessions.max_per_identity`` sessions of this identity (``why``
        0) or ``sessions.max_sessions`` in the cluster (2) already: the connection goes on
        without a session (what it sent meanwhile is run unnumbered, as on a connection
        whose ``session`` request was refused)."""
        conn = attachment.conn
        held, state.held = state.held, []
        self._forget(state)
        state.ended = "refused"
        state.attachment = None
        if conn._resumable is attachment:
            conn._resumable = None
            conn.__dict__.pop("fast_path", None)
            conn._pending = state.pending if state.pending else None
        if not conn.connected or conn.close_reason is not None:
            return
        config = self.config
        bucket = state.bucket or "u:"
        who = repr(bucket[2:]) if bucket[0] == "u" else f"address {bucket[2:]} (no identity)"
        if why == 2:
            text = (
                f"the cluster holds its maximum of {config.max_sessions} sessions "
                "(sessions.max_sessions)"
            )
        else:
            text = (
                f"{who} already holds its maximum of {config.max_per_identity} "
                "sessions in the cluster (sessions.max_per_identity)"
            )
        conn.factory.count_error(TOO_MANY_SESSIONS)
        conn._emit(encode_error(TOO_MANY_SESSIONS, text, message.id))
        for request, _seq in held:
            if not conn.connected or conn.close_reason is not None:
                return
            conn._dispatch(request)
        conn._resume_reading()

    def full(self, state: SessionState) -> bool:
        return state.sid in self._creating or super().full(state)

    def received(self, state: SessionState, seq: int, message: envelope.Message) -> Deferred[Any]:
        """Record the request; fires True once Redis holds it (False: fenced, None: failed)."""
        request = json.dumps({"t": message.type, "i": message.id, "d": message.data})
        epoch = state.epoch
        return self.redis.received(state.sid, epoch, seq, request, self._ttl(state)).addCallbacks(
            self._checked, self._failed, callbackArgs=(state, epoch), errbackArgs=("recv", state)
        )

    def answered(self, state: SessionState, seq: int) -> None:
        epoch = state.epoch
        self.redis.done(state.sid, epoch, seq).addCallbacks(
            self._checked, self._failed, callbackArgs=(state, epoch), errbackArgs=("done", state)
        )

    def acknowledged(self, state: SessionState, upto: int) -> None:
        epoch = state.epoch
        self.redis.ack(state.sid, epoch, upto).addCallbacks(
            self._checked, self._failed, callbackArgs=(state, epoch), errbackArgs=("ack", state)
        )

    def _subscription_change(self, state: SessionState, body: bytes) -> tuple[str, str, str]:
        """What a message changes in the session's recorded subscriptions (Redis ``:c``)."""
        attachment = state.attachment
        if attachment is None:
            return ("", "", "")
        match = _PUBLICATION.match(body)
        if match is not None:
            channel = match.group(1).decode()
        else:
            kind = body_type(body)
            if kind not in _SUB_TYPES:
                return ("", "", "")
            try:
                data = json.loads(body).get("data") or {}
                channel = data["channel"]
            except Exception:
                return ("", "", "")
        sub = self.factory.channels.subscription(attachment.conn, channel)
        if sub is None:
            return ("del", channel, "")
        epoch, offset, join_leave = sub
        if not epoch:
            return ("", "", "")  # not located yet: recorded once it is
        return ("set", channel, f"{epoch} {offset} {int(join_leave)}")

    def store(self, state: SessionState, numbered: bytes, cseq: int, body: bytes) -> None:
        epoch = state.epoch
        seq = state.out_seq
        change = self._subscription_change(state, body)
        d = self.redis.out(state.sid, epoch, seq, numbered, cseq, self._ttl(state), change)
        holder = state.attachment

        def stored(result: Any) -> None:
            if not self._checked(result, state, epoch):
                return
            # Still its connection; or the answer to session_end, which ended the session
            # while Redis took the answer (the connection goes on without it).
            if holder is None or holder.epoch != epoch:
                return
            if state.attachment is holder:
                holder.raw(numbered)
            elif state.ended == "ended":
                # The answer to session_end: written once Redis ended the session too, so
                # a client told "ended" never resumes it on another node after all.
                ending = self._ending.get(state.sid)
                if ending is None:
                    holder.raw(numbered)
                else:
                    ending.addBoth(lambda _: holder.raw(numbered))

        d.addCallbacks(stored, self._failed, errbackArgs=("out", state))

    # -- pushes and broadcasts to sessions this node does not carry ----------------------

    def send_numbered(self, state: SessionState, body: bytes, cseq: int) -> None:
        if state.attachment is None and state.ended is None:
            # Detached: pushes and broadcasts may be numbered in Redis meanwhile, so this
            # node's count is stale; Redis numbers it.
            self._keep(state, body, cseq)
            return
        super().send_numbered(state, body, cseq)

    def _keep(self, state: SessionState, body: bytes, cseq: int) -> None:
        config = self.config
        epoch = state.epoch
        d = self.redis.keep(
            state.sid, epoch, body, cseq, config.max_unacked_messages, config.max_unacked_bytes
        )

        def kept(result: Any) -> None:
            if not self._checked(result, state, epoch):
                return
            if int(result) == 0:  # past its bound: Redis ended it (overflow)
                self.ended["overflow"] += 1
                self._let_go(state)

        d.addCallbacks(kept, self._failed, errbackArgs=("keep", None))

    def push(self, sid: str, body: bytes, hops: int = 0) -> Deferred[bool] | None:
        """A push to session ``sid`` wherever it is: this node's, another node's connection,
        or Redis (kept for its replay).  None: ``sid`` is not a session id."""
        state = self.states.get(sid)
        if state is not None and state.ended is None:
            self.send_numbered(state, body, 0)
            return succeed(True)
        if not _SESSION_ID.fullmatch(sid):
            return None
        config = self.config
        d = self.redis.push(sid, body, config.max_unacked_messages, config.max_unacked_bytes, hops)

        def pushed(status: str) -> bool:
            self.counts[f"push_{status}"] += 1
            if status == "here":  # a resume here was answered just before: it is ours now
                state = self.states.get(sid)
                if state is None or state.ended is not None:
                    return False
                self.send_numbered(state, body, 0)
                return True
            if status == "overflow":
                self.ended["overflow"] += 1
            if status == "lost" and self.factory.log_allowed("session_push_lost"):
                log.warn("A push to session {sid} was dropped: it kept moving", sid=sid)
            return status in ("forwarded", "stored")

        return d.addCallback(pushed)

    def pushed(self, data: Any) -> None:
        """Another node forwarded a push to a session one of our connections carries."""
        if not isinstance(data, dict):
            return
        sid, body, hops = data.get("session"), data.get("body"), data.get("hops")
        if not isinstance(sid, str) or not isinstance(body, str) or type(hops) is not int:
            return
        d = self.push(sid, body.encode(), hops)
        if d is not None:
            d.addErrback(self._failed, "push", None)

    def broadcast_detached(self, body: bytes, everywhere: bool = False) -> None:
        """A broadcast reaches the sessions no live node carries, in Redis: every one for a
        cluster's broadcast (``everywhere``), else those this node held last."""
        config = self.config
        only = "" if everywhere else self.redis.node_id
        d = self.redis.broadcast(body, config.max_unacked_messages, config.max_unacked_bytes, only)
        d.addErrback(self._failed, "broadcast", None)

    # -- resume, detach, end --------------------------------------------------------------

    def claim(
        self, conn: Connection, message: envelope.Message, sid: str, key: str, ack: int
    ) -> None:
        d = self.redis.claim(
            sid,
            _digest(key).hex(),
            conn.identity or "",
            ack,
            conn.session_id,
            EXTRA_TTL,
            self.config.max_expiry,
        )
        d.addCallbacks(
            self._claimed,
            self._claim_failed,
            callbackArgs=(conn, message, sid, ack),
            errbackArgs=(conn, message),
        )

    def _claim_failed(self, failure: Failure, conn: Connection, message: envelope.Message) -> None:
        self.store_failures += 1
        if conn.connected and conn.close_reason is None and conn._resumable is None:
            self._refuse_resume(conn, message, UNAVAILABLE)

    def _claimed(
        self, found: Any, conn: Connection, message: envelope.Message, sid: str, ack: int
    ) -> None:
        local = self.states.get(sid)
        if isinstance(found, str):
            # Not resumable here either; a stale local copy is dropped.
            if found == "bad_ack":
                self._bad_ack(conn, message, ack, -1)
            elif found == "bad_key":
                self._bad_key(conn, message, sid)
            else:
                self._refuse_resume(conn, message, found)
            return
        if local is not None:
            # This node held it (attached: a half-open takeover here; or detached with replies
            # still being computed): those replies go on, under the new epoch.
            old = local.attachment
            self._forget(local)
            if old is not None:
                self.take_over(old)
            kept = local.subs
            state = local
        else:
            kept = {}
            state = SessionState(sid, b"", conn.identity, found["expiry"])
        state.key_digest = b""  # Redis checked the key: nothing to keep here
        state.expiry = found["expiry"]
        state.out_seq = found["out_seq"]
        state.acked = found["acked"]
        state.in_hwm = found["in_hwm"]
        state.unacked = deque()
        state.unacked_bytes = 0
        first = state.acked + 1
        for i, body in enumerate(found["unacked"]):
            state.unacked.append((first + i, body))
            state.unacked_bytes += len(body)
        state.subs = {}
        for channel, value in found["subs"].items():
            try:
                epoch, offset, join_leave = value.split(" ")
                state.subs[channel] = (epoch, int(offset), join_leave == "1")
            except ValueError:
                continue
        state.subs.update(kept)  # this node's own record is the newer
        running = {slot.seq for slot in state.pending if slot.seq} | {seq for _m, seq in state.held}
        state.redeliver = [
            (seq, text) for seq, text in sorted(found["inflight"].items()) if seq not in running
        ]
        state.ended = None
        state.epoch = found["epoch"] - 1  # attach() raises it to Redis's
        self._add(state)
        if not conn.connected or conn.close_reason is not None or conn._resumable is not None:
            # The client left while Redis answered: the session is detached again.
            self.detached += 1
            self.detached_bytes += state.unacked_bytes
            self._detach_store(state, {})
            return
        if found["conn"] and local is None:
            # Held by a connection of another node (or one of ours it forgot): tell it now.
            self.factory.channels.forward(found["conn"], KICK, {"session": sid})
        self.resumed(state, conn, message)

    def redeliver(self, attachment: Attachment) -> None:
        state = attachment.state
        again, state.redeliver = state.redeliver, []
        for seq, text in again:
            try:
                raw = json.loads(text)
                message = envelope.Message(raw["t"], raw.get("i"), raw.get("d"))
            except Exception:
                continue
            self.counts["redelivered"] += 1
            attachment.run(message, seq, redelivered=True)

    def detach(self, state: SessionState) -> None:
        attachment = state.attachment
        subs: dict[str, tuple[str, int, bool]] = {}
        if attachment is not None:
            subs = self.factory.channels.detach_subscriptions(attachment.conn)
        state.attachment = None
        self.detached += 1
        self.detached_bytes += state.unacked_bytes
        self._detach_store(state, subs)
        self.flush(state)  # replies finished meanwhile go to Redis
        self._maybe_forget(state)

    def _detach_store(self, state: SessionState, subs: dict[str, tuple[str, int, bool]]) -> None:
        epoch = state.epoch
        values = {c: f"{e} {o} {int(j)}" for c, (e, o, j) in subs.items()}
        d = self.redis.detach(state.sid, epoch, state.expiry, values, self.config.max_expiry)
        d.addCallbacks(
            self._checked,
            self._detach_failed,
            callbackArgs=(state, epoch),
            errbackArgs=(state.sid, epoch, state.expiry, self.factory.clock.seconds()),
        )

    def _maybe_forget(self, state: SessionState) -> None:
        if state.attachment is None and not state.pending and state.ended is None:
            self._forget(state)
            state.ended = "detached"

    def flush(self, state: SessionState) -> None:
        super().flush(state)
        if state.attachment is None and state.ended is None and not state.pending:
            self._maybe_forget(state)

    def end(self, state: SessionState, reason: str) -> None:
        if state.ended is not None:
            return
        epoch = state.epoch
        d = self.redis.end(state.sid, epoch, reason).addErrback(self._failed, "end", None)
        if reason == "ended":
            sid = state.sid
            self._ending[sid] = d

            def ended(result: Any) -> Any:
                if self._ending.get(sid) is d:
                    del self._ending[sid]
                return result

            d.addBoth(ended)
        super().end(state, reason)

    def kicked(self, conn_id: str, data: Any) -> None:
        """Another node resumed a session one of our connections carries (maybe)."""
        conn = self.factory.clients.get(conn_id)
        attachment = getattr(conn, "_resumable", None)
        if attachment is None or not isinstance(data, dict):
            return
        state = attachment.state
        if data.get("session") != state.sid:
            return
        epoch = state.epoch
        self.redis.check(state.sid, epoch).addCallbacks(
            self._checked, self._failed, callbackArgs=(state, epoch), errbackArgs=("check", None)
        )

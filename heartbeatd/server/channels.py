"""Channels on one daemon: subscriptions per connection, limits, delivery and recovery.

The `ChannelHub` is the server half of channels; storage, history and fan-out across nodes are
the `Broker`'s (`heartbeatd.cluster`).  It keeps, per local subscription, the epoch and the
offset last delivered, which is what makes delivery exactly-once and gap-free:

* a publication whose offset is not the next one is either a duplicate (dropped) or the sign of
  a gap (the broker's link blipped), which is filled from the history before anything newer is
  delivered; when the history no longer holds it, the client gets ``resync`` (not recovered);
* while a subscription is being set up (or catching up), publications arriving meanwhile are
  buffered (bounded) and delivered after the backlog, so nothing overtakes and nothing repeats.

Publication frames are built once per publication and written to every local subscriber.

Fairness: fan-out is not written in one go (10,000 subscribers held the reactor ~90 ms, and a
burst of publications from one client starved every other client for seconds).  A publication
is written at once only while the queue is empty and the writes made since the last batch
stay within ``channels.fanout_batch``; any other joins the hub's delivery queue, which makes
``fanout_batch`` writes per reactor turn (``callLater(0)``, as the heartbeat sweep does), so
other connections are served between batches.  What a turn is charged is what costs: a
``send()`` per write, and one more per `WRITE_UNIT_BYTES` it carries (`write_cost`).  One
client starts at most ``channels.publish_per_turn`` of its pipelined publishes per turn
(`ChannelHub.publish_turn`); the rest start in the next turns, in order.

Coalescing: a publication joining the queue right behind a queued publication of the same
channel that has not started (the next offset, the same epoch) joins its *run* (up to
`MAX_RUN_BYTES`; a broadcast likewise joins a queued broadcast to the same connections),
and a subscriber standing at the run's start gets all of it in one write
(`Connection.write_run`), as NATS writes what is pending for a subscriber: a burst of 200
publications to 10,000 subscribers is 10,000 writes, not 2,000,000.  Any other subscriber
(catching up, subscribed meanwhile, a new epoch) takes the run one publication at a time.  A
run is written where its first publication would have been: its later publications come
sooner than they would one by one, never ahead of anything queued before them, so
publications and broadcasts keep their order on every connection.  On a resumable
session each publication is numbered on its own, in order; the outbound limit decides as it
would for one write each.  The queue is
first in, first out, and a publication arriving while it is not empty queues behind it (even
for a small channel), so every subscriber gets publications in offset order, with no gap and
none twice: a fan-out reads its channel's subscribers when it starts, a subscription removed
meanwhile is skipped, and one added meanwhile drops what it already has by offset.  While more
than ``channels.fanout_backlog`` deliveries are queued, the replies to clients' ``publish``
requests wait; a client pipelining publishes then reaches ``limits.max_pending_requests`` and
is no longer read (backpressure: nothing is dropped).  A broadcast to every connection
(`write_to_all`, from ``ServerFactory.broadcast``) goes through the same queue and budget,
in order with publications.
"""

from __future__ import annotations

import contextlib
import re
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.python.failure import Failure

from heartbeatd._logging import get_logger
from heartbeatd.cluster.broker import Broker, BrokerUnavailable, History, Position
from heartbeatd.config import ChannelsConfig, Config
from heartbeatd.server.connection import Connection, SharedRun
from heartbeatd.server.handlers import HandlerError, HandlerRegistry, Request
from heartbeatd.server.permissions import Permissions, valid_personal
from heartbeatd.server.ratelimit import has_token, refill, retry_after
from heartbeatd.wire.envelope import encode_json, encode_message
from heartbeatd.wire.framing import SharedFrame

__all__ = ["CHANNEL_TYPES", "ChannelHub", "register"]


class _Factory(Protocol):
    """What the hub uses of the server factory (which owns the hub: no import back)."""

    config: Config
    framing: Any
    clock: Any
    clients: dict[str, Connection]
    registry: HandlerRegistry

    def log_allowed(self, cause: str) -> bool: ...

    def refuse_identity(self, client: Connection, limit: int) -> None: ...

    def count_error(self, code: str) -> None: ...

    def send(self, session_id: str, type: str, data: Any = ...) -> bool: ...

    def broadcast(self, type: str, data: Any = ...) -> int: ...


log = get_logger(__name__)

#: Error codes of channel requests (documented in docs/protocol.md).
BAD_REQUEST = "bad_request"
BAD_CHANNEL = "bad_channel"
FORBIDDEN = "forbidden"
UNAVAILABLE = "unavailable"
TOO_MANY_CHANNELS = "too_many_channels"
PUBLICATION_TOO_LARGE = "publication_too_large"
ALREADY_SUBSCRIBED = "already_subscribed"
NOT_SUBSCRIBED = "not_subscribed"
RATE_LIMITED = "rate_limited"


_NAME = re.compile(r"[A-Za-z0-9_.:@/#,-]+")

#: Publications buffered for one subscription while it catches up; beyond, it resyncs.
MAX_BUFFERED = 10_000

#: A queued run of one channel's publications (each subscriber gets it in one write) takes
#: no more once its bodies reach this size (below Twisted's 64 KiB write buffer, so a run
#: alone never pauses a connection).
MAX_RUN_BYTES = 32 * 1024

#: Bytes of a write that cost as much of a turn's budget as one more write (`write_cost`).
WRITE_UNIT_BYTES = 16 * 1024


class _Sub:
    """One connection's subscription to one channel."""

    __slots__ = (
        "channel",
        "client",
        "epoch",
        "join_leave",
        "joined",
        "offset",
        "overflowed",
        "pending",
        "removed",
    )

    def __init__(self, client: Connection, channel: str, join_leave: bool) -> None:
        self.client = client
        self.channel = channel
        self.join_leave = join_leave
        #: True once its presence entry was written (so a removal must announce a leave).
        self.joined = False
        self.epoch = ""
        #: The offset last delivered (or known to the client).
        self.offset = 0
        #: Not None while setting up or catching up: publications wait here, in order.
        self.pending: list[tuple[str, int, str]] | None = []
        #: Publications were dropped from a full ``pending``: read them from the history.
        self.overflowed = False
        #: Unsubscribed (or disconnected): a fan-out still holding it skips it.
        self.removed = False


class _Fanout:
    """What waits in (or goes through) the hub's delivery queue: a run of consecutive
    publications of one channel (``offset`` the first, ``datas`` each one's JSON), which
    each subscriber gets in one write; or a broadcast (``channel`` None), whose connections
    are ``clients``."""

    __slots__ = (
        "channel",
        "clients",
        "cost",
        "count",
        "datas",
        "epoch",
        "frame",
        "next",
        "offset",
        "run",
        "subs",
    )

    def __init__(
        self,
        channel: str | None,
        epoch: str,
        offset: int,
        data: str,
        frame: SharedFrame,
        count: int,
        clients: list[Connection] | None = None,
    ) -> None:
        self.channel = channel
        self.clients = clients
        #: Deliveries it added to the hub's ``queued`` (subscribers when queued, times
        #: publications).
        self.count = count
        self.epoch = epoch
        self.offset = offset
        self.datas = [data]
        self.frame = frame
        self.run = SharedRun([frame])
        #: What one write of it costs of a turn's budget (set when it starts).
        self.cost = 1
        #: The channel's subscribers, read when this fan-out starts (None until then).
        self.subs: list[_Sub] | None = None
        #: Index of the next subscriber to write to.
        self.next = 0


def write_cost(size: int) -> int:
    """What one write of ``size`` bytes costs of a turn's budget (``channels.fanout_batch``):
    one, and one more per `WRITE_UNIT_BYTES` (docs/benchmarks.md, "where the time goes": a
    ``send()`` costs about as much as copying 16-32 KiB more through loopback)."""
    return 1 + size // WRITE_UNIT_BYTES


def publication_body(channel: str, offset: int, data: str) -> bytes:
    """The publication envelope, with ``data`` spliced in as the JSON text it already is."""
    return b'{"type":"publication","data":{"channel":%s,"offset":%d,"data":%s}}' % (
        encode_json(channel),
        offset,
        data.encode(),
    )


class ChannelHub:
    """Channels of one daemon, on top of a `Broker` (see the module docstring)."""

    def __init__(self, factory: _Factory, broker: Broker) -> None:
        self.factory = factory
        self.broker = broker
        broker.listener = self
        #: channel -> session id -> subscription (local subscribers only).
        self._subs: dict[str, dict[str, _Sub]] = {}
        #: session id -> channel -> subscription.
        self._by_client: dict[str, dict[str, _Sub]] = {}
        # Counters for metrics.
        self.published = 0
        self.delivered = 0
        self.recoveries = {"recovered": 0, "not_recovered": 0}
        self.resyncs = 0
        self.gaps_filled = 0
        #: Subscriptions whose catch-up failed (broker down): retried when the link returns.
        self._stale: set[_Sub] = set()
        #: The link has been down since start: its return is news, its first coming up is not.
        self._link_was_down = False
        #: session id -> (tokens, when) of its subscribe rate limit (channels.subscribe_rate).
        self._subscribe_buckets: dict[str, tuple[float, float]] = {}
        #: Who may do what on which channel (namespaces, personal channels, the authorizer).
        self.permissions: Permissions
        #: The delivery queue (module docstring, "Fairness"), and its size in deliveries.
        self._fanouts: deque[_Fanout] = deque()
        self.queued = 0
        self._drain_call: Any = None
        #: Replies to publish requests waiting for the queue to shrink (backpressure).
        self._backlog_waiters: list[Deferred[None]] = []
        self._release_call: Any = None
        #: Fan-out batches run (for metrics and tests).
        self.fanout_batches = 0
        #: Broadcast pushes written (``write_to_all``), apart from ``delivered`` publications.
        self.broadcast_written = 0
        #: The budget spent in all (`write_cost` of every write the hub made): what each turn
        #: bounds (``channels.fanout_batch``).
        self.budget_spent = 0
        self._batch = 250
        #: Deliveries written at once in this reactor turn (bounded by ``_batch`` too); the
        #: turn's end (``_turn_ended``) gives the next turn a whole budget.
        self._spent = 0
        self._turn_end: Any = None
        #: Publish requests each connection started in this turn, and those waiting for a
        #: later turn (``channels.publish_per_turn``; `publish_turn`), first in, first out.
        self._publishes_started: dict[Connection, int] = {}
        self._publishes_waiting: dict[Connection, deque[Deferred[None]]] = {}
        self._publish_turn: Any = None
        #: Publish requests that waited for a later turn (for metrics and tests).
        self.publishes_deferred = 0
        self.reconfigure()

    def reconfigure(self) -> None:
        """Read ``channels.*`` again (live reload): permissions and per-namespace history."""
        self.permissions = Permissions(self.config, self.factory)
        self._batch = self.config.fanout_batch
        self.broker.history_of = self.permissions.history_of if self.config.namespaces else None

    @property
    def config(self) -> ChannelsConfig:
        return self.factory.config.channels

    def start(self) -> Deferred[None]:
        return self.broker.start()

    def stop(self) -> Deferred[None]:
        for call in (self._drain_call, self._release_call, self._publish_turn):
            if call is not None and call.active():
                call.cancel()
        self._drain_call = self._release_call = self._publish_turn = None
        return self.broker.stop()

    def backlogged(self) -> bool:
        """More deliveries are queued than ``channels.fanout_backlog``."""
        return self.queued > self.config.fanout_backlog

    def when_drained(self) -> Deferred[None]:
        """Fires once the queue holds at most ``channels.fanout_backlog`` deliveries."""
        if not self.backlogged():
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._backlog_waiters.append(waiter)
        return waiter

    def publish_turn(self, client: Connection) -> Deferred[None] | None:
        """Fairness between clients: None when ``client`` may start a publish now, else a
        Deferred that fires in a later reactor turn, in the order its publishes came.

        A client pipelining publishes starts at most ``channels.publish_per_turn`` of them
        per turn (each one's request handling, and the fan-out it queues); the others wait
        for the next turns, after which other connections are read.  Their replies keep
        request order; past ``limits.max_pending_requests`` the client is no longer read.
        """
        waiting = self._publishes_waiting.get(client)
        if self._publish_turn is None:
            self._publish_turn = self.factory.clock.callLater(0, self._next_publish_turn)
        if waiting is None:
            started = self._publishes_started.get(client, 0)
            if started < self.config.publish_per_turn:
                self._publishes_started[client] = started + 1
                return None
            waiting = self._publishes_waiting[client] = deque()
        self.publishes_deferred += 1
        turn: Deferred[None] = Deferred()
        waiting.append(turn)
        return turn

    def _next_publish_turn(self) -> None:
        """A new turn: each waiting client starts up to ``publish_per_turn`` publishes."""
        self._publish_turn = None
        self._publishes_started = {}
        if not self._publishes_waiting:
            return
        limit = self.config.publish_per_turn
        waiting_all, self._publishes_waiting = self._publishes_waiting, {}
        for client, waiting in waiting_all.items():
            started = 0
            while waiting and started < limit:
                started += 1
                waiting.popleft().callback(None)
            self._publishes_started[client] = started
            if waiting:
                # Anything it sends meanwhile queues behind these (setdefault: its own
                # callbacks may have queued more already).
                self._publishes_waiting.setdefault(client, deque()).extendleft(reversed(waiting))
        self._publish_turn = self.factory.clock.callLater(0, self._next_publish_turn)

    def subscription_count(self) -> int:
        return sum(len(subs) for subs in self._by_client.values())

    def channel_count(self) -> int:
        return len(self._subs)

    def channels_of(self, session: str) -> list[str]:
        return sorted(self._by_client.get(session, ()))

    # -- checks ------------------------------------------------------------------------------

    def check_channel(self, channel: Any) -> str:
        limit = self.config.max_name_length
        if not isinstance(channel, str) or not _NAME.fullmatch(channel):
            raise HandlerError(
                BAD_CHANNEL,
                "a channel name is a non-empty string of letters, digits and - _ . : @ / # ,",
            )
        if not valid_personal(channel):
            raise HandlerError(
                BAD_CHANNEL, "after '#' come identities separated by ',' (user#alice, dm#a,b)"
            )
        if len(channel) > limit:
            raise HandlerError(BAD_CHANNEL, f"a channel name has at most {limit} characters")
        return channel

    def _encode_publication(self, channel: str, data: Any) -> str:
        limit = self.permissions.rule(channel).max_publication_bytes or 0
        try:
            text = encode_json(data)
        except Exception:
            raise HandlerError(BAD_REQUEST, "the publication's data is not valid JSON") from None
        if len(text) > limit:
            raise HandlerError(
                PUBLICATION_TOO_LARGE, f"a publication has at most {limit} bytes of JSON"
            )
        return text.decode()

    # -- publish -----------------------------------------------------------------------------

    def publish(self, channel: str, data: Any) -> Deferred[int]:
        """Publish ``data`` to ``channel`` on every node; fires with its offset.

        Fails with `HandlerError` (``bad_channel``, ``unknown_namespace``,
        ``publication_too_large``, ``unavailable``), so a handler can simply return it.
        """
        try:
            self.check_channel(channel)
            text = self._encode_publication(channel, data)
        except HandlerError as e:
            return fail(e)
        if not self.broker.up:
            return fail(_unavailable())
        d = self.broker.publish(channel, text)

        def done(position: Position) -> int:
            self.published += 1
            return position.offset

        return d.addCallbacks(done, _as_unavailable)

    # -- subscribe ---------------------------------------------------------------------------

    def subscribe(
        self,
        client: Connection,
        channel: str,
        since: tuple[str, int] | None = None,
        join_leave: bool = False,
        *,
        restore: bool = False,
    ) -> Deferred[dict[str, Any]]:
        """Subscribe ``client``; fires with the reply, after which the backlog is delivered.

        ``restore``: a resumed session's subscription coming back (not rate-limited: the
        client did not ask for it again)."""
        session = client.session_id
        if not client.connected or client.close_reason is not None:
            # The authorizer answered after the client left: nothing to set up.
            return fail(HandlerError(NOT_SUBSCRIBED, "the connection is closing"))
        mine = self._by_client.get(session, {})
        if channel in mine:
            return fail(HandlerError(ALREADY_SUBSCRIBED, f"already subscribed to {channel!r}"))
        limit = self.config.max_per_connection
        if len(mine) >= limit:
            return fail(
                HandlerError(TOO_MANY_CHANNELS, f"a connection may join at most {limit} channels")
            )
        wait = None if restore else self._take_subscribe_token(session)
        if wait is not None:
            rate = self.config.subscribe_rate
            return fail(
                HandlerError(
                    RATE_LIMITED,
                    f"too many subscribes: at most {rate:g} per second "
                    f"(channels.subscribe_rate, burst channels.subscribe_burst)",
                    retry_after=wait,
                )
            )
        if not self.broker.up:
            return fail(_unavailable())
        sub = _Sub(client, channel, join_leave)
        if since is not None:  # where it stands until located (a session may detach first)
            sub.epoch, sub.offset = since
        self._by_client.setdefault(session, {})[channel] = sub
        self._subs.setdefault(channel, {})[session] = sub
        reply: Deferred[dict[str, Any]] = Deferred()
        returned = False  # set once the caller holds ``reply`` (and waits on it)

        #: Set when a restored subscription's epoch is gone and it starts at the new one's 0.
        restarted: list[bool] = []

        def locate(_: object) -> Deferred[Any]:
            if since is None:
                return self.broker.position(channel)
            d = self.broker.history(channel, since[0], since[1])
            return d.addCallback(new_epoch) if restore else d

        def new_epoch(history: History) -> Any:
            """A resumed session's channel has a new epoch (a failover, or Redis lost the
            stream): the old one is gone, but the new one's publications so far may all be
            in its history, as for a live subscription (`_fetch_gaps`)."""
            position = history.position
            if history.entries is not None or position.epoch == since[0] or not position.offset:
                return history

            def fresh(start: History) -> History:
                if start.entries is None:
                    return history  # its start is gone too: a gap it cannot fill
                restarted.append(True)
                return start

            return self.broker.history(channel, position.epoch, 0).addCallback(fresh)

        def located(result: Position | History) -> None:
            if not self._is_current(sub):
                reply.errback(HandlerError(NOT_SUBSCRIBED, "unsubscribed meanwhile"))
                return
            backlog: list[str] = []
            if isinstance(result, History):
                position, entries = result
                recovered = entries is not None and not restarted
                self.recoveries["recovered" if recovered else "not_recovered"] += 1
            else:
                position, recovered, entries = result, False, None
            sub.epoch = position.epoch
            sub.offset = position.offset
            answer: dict[str, Any] = {
                "channel": channel,
                "epoch": position.epoch,
                "offset": position.offset,
            }
            if since is not None:
                answer["recovered"] = recovered
                if restarted:  # from the new epoch's start (only a restore gets here)
                    answer["offset"] = sub.offset = 0
                    answer["reason"] = "epoch_changed"
                    backlog = entries or []
                    if backlog:
                        self.gaps_filled += 1
                elif entries is not None:
                    backlog = entries
                    sub.offset = since[1]
            # The reply goes out before any publication: when the protocol is already waiting
            # on ``reply`` it writes it during callback(); when everything was synchronous
            # (the handler has not even returned), the backlog waits one reactor turn, and
            # publications meanwhile queue in ``sub.pending``.
            reply.callback(answer)
            if returned:
                self._live(sub, backlog)
            else:
                self.factory.clock.callLater(0, self._live, sub, backlog)

        def failed(failure: Failure) -> None:
            self._remove(sub)
            reply.errback(_as_unavailable(failure))

        self.broker.subscribe(channel).addCallback(locate).addCallbacks(located, failed)
        returned = True
        return reply

    def subscription(self, client: Connection, channel: str) -> tuple[str, int, bool] | None:
        """Where ``client``'s subscription to ``channel`` stands, or None."""
        sub = self._by_client.get(client.session_id, {}).get(channel)
        return None if sub is None else (sub.epoch, sub.offset, sub.join_leave)

    def detach_subscriptions(self, client: Connection) -> dict[str, tuple[str, int, bool]]:
        """Remove ``client``'s subscriptions and say where each stood: channel -> (epoch,
        offset last written to it, join_leave).  A resumable session keeps them while it is
        detached and restores them, with what it missed, on resume."""
        mine = self._by_client.get(client.session_id)
        if not mine:
            return {}
        # A subscription not located yet (no epoch) was never answered: its request gets
        # an error, so it is not the session's.
        where = {
            sub.channel: (sub.epoch, sub.offset, sub.join_leave)
            for sub in mine.values()
            if sub.epoch
        }
        for sub in list(mine.values()):
            self._remove(sub)
        return where

    def unsubscribe(self, client: Connection, channel: str) -> dict[str, Any]:
        sub = self._by_client.get(client.session_id, {}).get(channel)
        if sub is None:
            raise HandlerError(NOT_SUBSCRIBED, f"not subscribed to {channel!r}")
        self._remove(sub)
        return {"channel": channel}

    def presence(self, channel: str) -> Deferred[dict[str, Any]]:
        if not self.broker.up:
            return fail(_unavailable())
        d = self.broker.presence(channel)
        return d.addCallbacks(
            lambda members: {"channel": channel, "clients": members}, _as_unavailable
        )

    def _is_current(self, sub: _Sub) -> bool:
        return self._subs.get(sub.channel, {}).get(sub.client.session_id) is sub

    def _info(self, client: Connection) -> dict[str, Any]:
        return {
            "session": client.session_id,
            "node": self.broker.node_id,
            "identity": getattr(client, "identity", None),
        }

    def _join(self, sub: _Sub) -> None:
        sub.joined = True
        self.broker.join(sub.channel, self._info(sub.client), self._keep(sub.client)).addErrback(
            _log_failure, "presence join", sub.channel
        )

    @staticmethod
    def _keep(client: Connection) -> int:
        """Seconds the session ``client`` carries may come back to its subscriptions once
        detached (0: no resumable session): the broker keeps the channels' epochs that long."""
        attachment = getattr(client, "_resumable", None)
        return 0 if attachment is None else attachment.sessions.channel_keep(attachment.state)

    def _take_subscribe_token(self, session: str) -> float | None:
        """A token bucket per connection: every subscribe may create Redis state (issue 22).

        None: a token was taken; else the seconds until the next one (`retry_after`)."""
        now = self.factory.clock.seconds()
        config = self.config
        tokens, last = self._subscribe_buckets.get(session, (float(config.subscribe_burst), now))
        tokens = refill(tokens, float(config.subscribe_burst), config.subscribe_rate, now - last)
        if not has_token(tokens, config.subscribe_rate):
            self._subscribe_buckets[session] = (tokens, now)
            return retry_after(tokens, config.subscribe_rate)
        self._subscribe_buckets[session] = (max(0.0, tokens - 1.0), now)
        return None

    def _remove(self, sub: _Sub) -> None:
        """Forget a subscription; the last local one of a channel stops its fan-out here."""
        session, channel = sub.client.session_id, sub.channel
        local = self._subs.get(channel)
        if local is None or local.get(session) is not sub:
            return
        del local[session]
        # A fan-out still holding it must skip it: ``pending`` keeps it off the fast path.
        sub.removed = True
        sub.pending = []
        mine = self._by_client.get(session)
        if mine is not None:
            mine.pop(channel, None)
            if not mine:
                del self._by_client[session]
        if not local:
            del self._subs[channel]
            self.broker.unsubscribe(channel)
        if sub.joined:
            self.broker.leave(channel, session, self._keep(sub.client)).addErrback(
                _log_failure, "presence leave", channel
            )

    # -- connections -------------------------------------------------------------------------

    def _client_info(self, client: Connection) -> dict[str, Any]:
        info = self._info(client)
        info["peer"] = client.peer
        info["connected_at"] = client.connected_at
        return info

    def client_connected(self, client: Connection) -> None:
        if self.broker.clustered:
            self.broker.client_connected(client.session_id, self._client_info(client))

    def client_identified(self, client: Connection, limit: int) -> None:
        """``client`` logged in: the cluster learns its identity; with ``limit``
        (``limits.max_connections_per_identity``) its connections on every node are counted,
        and this one is closed if they are too many (two logging in at once on two nodes may
        both be: the limit is never exceeded)."""
        if not self.broker.clustered:
            return
        self.broker.client_connected(client.session_id, self._client_info(client))
        identity = client.identity
        if not limit or identity is None:
            return

        def counted(sessions: list[str]) -> None:
            if len(sessions) > limit and client.connected and client.close_reason is None:
                # Refused: no longer one of the identity's sessions for any node (a
                # DELETE /identities while it closes would count it), so it leaves the
                # cluster's registry now; its connectionLost repeats that harmlessly.
                self.broker.client_disconnected(client.session_id)
                self.factory.refuse_identity(client, limit)

        self.broker.identity_sessions(identity).addCallbacks(
            counted, _log_failure, errbackArgs=("identity count", identity)
        )

    def kick_identity(self, identity: str) -> Deferred[int]:
        """Disconnect every session of ``identity`` on every node (eviction reason ``admin``);
        fires with how many were disconnected."""
        # A connection already closing (refused, evicted) is not counted again.
        local = [
            c
            for c in self.factory.clients.values()
            if c.identity == identity and c.close_reason is None
        ]
        for client in local:
            client.evict("admin", f"every session of {identity!r} was disconnected (admin API)")
        if not self.broker.clustered:
            return succeed(len(local))
        mine = {c.session_id for c in local}

        def kick_others(sessions: list[str]) -> Deferred[int]:
            others = [s for s in sessions if s not in mine]
            kicks = [self.broker.kick(s) for s in others]
            d = gatherResults(kicks, consumeErrors=True) if kicks else succeed([])
            return d.addCallback(lambda found: len(local) + sum(1 for f in found if f))

        d = self.broker.identity_sessions(identity).addCallback(kick_others)
        return d.addErrback(_as_unavailable)

    def local_clients(self) -> dict[str, dict[str, Any]]:
        """Every connected client with its info (the broker re-registers them after a blip)."""
        return {s: self._client_info(c) for s, c in self.factory.clients.items()}

    def client_disconnected(self, client: Connection) -> None:
        self._subscribe_buckets.pop(client.session_id, None)
        mine = self._by_client.get(client.session_id)
        if mine:
            for sub in list(mine.values()):
                self._remove(sub)
        if self.broker.clustered:
            self.broker.client_disconnected(client.session_id)

    # -- delivery (BrokerListener) -----------------------------------------------------------

    def on_publication(self, channel: str, epoch: str, offset: int, data: str) -> None:
        subs = self._subs.get(channel)
        if not subs:
            return
        frame = SharedFrame(publication_body(channel, offset, data))
        count = len(subs)
        fanouts = self._fanouts
        cost = count * write_cost(len(frame.body))
        if not fanouts and self._spent + cost <= self._batch:
            # Nothing queued and this turn's budget not spent (a small channel, now and then):
            # written now, as it always was.
            if self._turn_end is None:
                self._turn_end = self.factory.clock.callLater(0, self._turn_ended)
            self._spent += cost
            self.budget_spent += cost
            new_epoch: list[_Sub] = []
            for sub in list(subs.values()):
                if sub.pending is None and sub.offset + 1 == offset and sub.epoch == epoch:
                    sub.offset = offset
                    sub.client.write_shared(frame)
                    self.delivered += 1
                elif sub.pending is None and sub.epoch != epoch and offset > 1:
                    new_epoch.append(sub)
                else:
                    self._deliver(sub, epoch, offset, data)
            if new_epoch:
                self._enter_epoch(channel, (epoch, offset, data), new_epoch)
            return
        self.queued += count
        if fanouts:
            tail = fanouts[-1]
            if (
                tail.subs is None
                and tail.channel == channel
                and tail.epoch == epoch
                and tail.offset + len(tail.datas) == offset
                and tail.run.size + len(frame.body) <= MAX_RUN_BYTES
            ):
                # Coalesced: the queued run of this channel not started yet takes it, and
                # each subscriber gets both in one write (module docstring, "Coalescing").
                tail.datas.append(data)
                tail.run.add(frame)
                tail.count += count
                return
        fanouts.append(_Fanout(channel, epoch, offset, data, frame, count))
        if self._drain_call is None:
            self._drain_call = self.factory.clock.callLater(0, self._run_batch)

    def write_to_all(self, frame: SharedFrame, clients: list[Connection]) -> None:
        """A push to many connections (a broadcast), through the same queue and per-turn
        budget as publications: written at once when it fits in this turn's budget with
        nothing queued, else queued (in order with publications, so a connection gets
        pushes and publications in the order they were made)."""
        count = len(clients)
        cost = count * write_cost(len(frame.body))
        if not self._fanouts and self._spent + cost <= self._batch:
            if self._turn_end is None:
                self._turn_end = self.factory.clock.callLater(0, self._turn_ended)
            self._spent += cost
            self.budget_spent += cost
            for client in clients:
                client.write_shared(frame)
            self.broadcast_written += count
            return
        self.queued += count
        fanouts = self._fanouts
        if fanouts:
            tail = fanouts[-1]
            if (
                tail.channel is None
                and tail.next == 0
                and tail.run.size + len(frame.body) <= MAX_RUN_BYTES
                and tail.clients == clients
            ):
                # Coalesced: the same connections as the queued broadcast before it, which
                # has not started: each gets both in one write.
                tail.run.add(frame)
                tail.count += count
                return
        fanouts.append(_Fanout(None, "", 0, "", frame, count, clients))
        if self._drain_call is None:
            self._drain_call = self.factory.clock.callLater(0, self._run_batch)

    def _turn_ended(self) -> None:
        self._turn_end = None
        if not self._fanouts:  # else the next batch sets the budget it leaves
            self._spent = 0

    def _run_batch(self) -> None:
        """Write up to ``fanout_batch`` (in `write_cost`) of the queue; the rest next turn."""
        self._drain_call = None
        budget = self._batch
        fanouts = self._fanouts
        delivered = 0
        self.fanout_batches += 1
        while fanouts and budget > 0:
            fanout = fanouts[0]
            if fanout.channel is None:  # broadcasts to the same connections: write_to_all
                clients = fanout.clients or []
                run = fanout.run
                pushes = len(run.frames)
                if fanout.next == 0:
                    fanout.cost = write_cost(run.size)
                start = fanout.next
                end = min(len(clients), start + max(1, budget // fanout.cost))
                if pushes == 1:
                    frame = fanout.frame
                    for i in range(start, end):
                        clients[i].write_shared(frame)
                else:
                    for i in range(start, end):
                        clients[i].write_run(run)
                self.broadcast_written += (end - start) * pushes
                budget -= max(1, end - start) * fanout.cost
                self.queued -= (end - start) * pushes
                fanout.next = end
                if end >= len(clients):
                    fanouts.popleft()
                continue
            subs = fanout.subs
            runs = len(fanout.datas)
            if subs is None:
                now = self._subs.get(fanout.channel)
                subs = fanout.subs = list(now.values()) if now else []
                # Counted with its channel's subscribers when queued; it has these now.
                self.queued += len(subs) * runs - fanout.count
                fanout.cost = write_cost(fanout.run.size)
            cost = fanout.cost
            start = fanout.next
            end = min(len(subs), start + max(1, budget // cost))
            epoch, first, run = fanout.epoch, fanout.offset, fanout.run
            last = first + runs - 1
            # A run of one (the publications of a quiet channel) is one frame: write_shared.
            single = run.frames[0] if runs == 1 else None
            new_epoch: list[_Sub] = []
            for i in range(start, end):
                sub = subs[i]
                if sub.pending is None and sub.offset + 1 == first and sub.epoch == epoch:
                    sub.offset = last
                    if single is not None:
                        sub.client.write_shared(single)
                    else:
                        sub.client.write_run(run)
                    delivered += runs
                else:
                    delivered += self._deliver_run(sub, fanout, new_epoch)
            if new_epoch:
                self._enter_epoch(fanout.channel, (epoch, first, fanout.datas[0]), new_epoch)
            done = end - start
            budget -= max(1, done) * cost
            self.queued -= done * runs
            fanout.next = end
            if end >= len(subs):
                fanouts.popleft()
        self.delivered += delivered
        self.budget_spent += self._batch - budget
        # What is left of this turn's budget goes to publications written at once (a
        # publication that finds it spent queues, and the next batch starts a new budget).
        self._spent = self._batch - budget
        if fanouts:
            self._drain_call = self.factory.clock.callLater(0, self._run_batch)
        elif self._turn_end is None:
            self._turn_end = self.factory.clock.callLater(0, self._turn_ended)
        if self._backlog_waiters and self._release_call is None and not self.backlogged():
            self._release_waiters()

    def _release_waiters(self) -> None:
        """The queue has drained: answer the publish replies that waited for it, at most
        ``channels.publish_per_turn`` a turn (200 at once held a turn ~5 ms), first in,
        first out; the rest in the next turns."""
        self._release_call = None
        if not self._backlog_waiters or self.backlogged():
            return  # a newer burst filled the queue again: the batches release them
        limit = self.config.publish_per_turn
        waiters = self._backlog_waiters[:limit]
        del self._backlog_waiters[:limit]
        for waiter in waiters:
            waiter.callback(None)
        if self._backlog_waiters and self._release_call is None:
            self._release_call = self.factory.clock.callLater(0, self._release_waiters)

    def _deliver_run(self, sub: _Sub, fanout: _Fanout, new_epoch: list[_Sub]) -> int:
        """A queued run for a subscriber not simply at its start (catching up, subscribed
        meanwhile, a gap, a new epoch): each publication on its own, in order, the ones it
        takes as they come still in one write; how many were written."""
        epoch, first, channel = fanout.epoch, fanout.offset, fanout.channel
        frames = fanout.run.frames
        ready: list[SharedFrame] = []
        written = 0
        for k, data in enumerate(fanout.datas):
            offset = first + k
            if sub.pending is None and sub.offset + 1 == offset and sub.epoch == epoch:
                sub.offset = offset
                ready.append(frames[k])
                continue
            if ready:
                sub.client.write_run(SharedRun(ready))
                written += len(ready)
                ready = []
            if sub.pending is None and sub.epoch != epoch and offset > 1 and not sub.removed:
                # The new epoch's first publications may be in its history: one read for
                # every subscriber of the run that meets it here (`_enter_epoch`); what
                # follows of the run waits behind it.
                sub.pending = [(epoch, offset, data)]
                if k == 0:
                    new_epoch.append(sub)
                else:
                    self._enter_epoch(channel or "", (epoch, offset, data), [sub])
                continue
            before = self.delivered
            self._deliver(sub, epoch, offset, data)
            written += self.delivered - before
            self.delivered = before
        if ready:
            sub.client.write_run(SharedRun(ready))
            written += len(ready)
        return written

    def _enter_epoch(self, channel: str, first: tuple[str, int, str], subs: list[_Sub]) -> None:
        """Live subscriptions meet a new epoch past its first publication (Redis lost the
        stream, or failed over, and this node's pub/sub missed the start of the new one).

        The old epoch cannot be recovered, but the new one's earlier publications may be in
        its history: one read for all of them, then one ``resync`` (offset 0) and everything
        in order.  When the history does not have them (or does not know that epoch), each
        gets the ``resync`` at the publication before this one, as a gap it cannot fill.
        """
        epoch, offset, _ = first
        for sub in subs:
            if sub.pending is None:
                sub.pending = [first]

        def got(history: History) -> None:
            known = history.position.epoch == epoch and history.entries is not None
            for sub in subs:
                if not self._is_current(sub) or sub.pending is None:
                    continue
                if known:
                    self._resync(sub, Position(epoch, 0), "epoch_changed")
                    if history.entries:
                        self.gaps_filled += 1
                    self._go_live(sub, history.entries or [])
                else:
                    self._resync(sub, Position(epoch, offset - 1), "epoch_changed")
                    self._go_live(sub, [])

        def failed(failure: Failure) -> None:
            # The link is not all back yet (pub/sub can return before commands): keep them
            # buffering; the broker's on_link(True) reads their gap, the new epoch's start too.
            log.debug("Reading the new epoch of {c} failed: {why}", c=channel, why=failure)
            self._stale.update(sub for sub in subs if self._is_current(sub))

        self.broker.history(channel, epoch, 0).addCallbacks(got, failed)

    def _deliver(self, sub: _Sub, epoch: str, offset: int, data: str) -> None:
        if sub.removed:
            return
        pending = sub.pending
        if pending is not None:
            if len(pending) < MAX_BUFFERED:
                pending.append((epoch, offset, data))
            else:
                sub.overflowed = True  # not lost: fetched from the history when live again
            return
        if epoch != sub.epoch:
            # The stream was lost and started again: what came before cannot be recovered.
            self._resync(sub, Position(epoch, offset - 1), "epoch_changed")
        if offset <= sub.offset:
            return  # already delivered
        if offset > sub.offset + 1:
            self.catch_up(sub, (epoch, offset, data))
            return
        sub.offset = offset
        sub.client.write_frame(publication_body(sub.channel, offset, data), encoded=False)
        self.delivered += 1

    def _live(self, sub: _Sub, backlog: list[str]) -> None:
        if self._is_current(sub):
            self._go_live(sub, backlog)
            self._join(sub)

    def _go_live(self, sub: _Sub, backlog: list[str]) -> None:
        pending, sub.pending = sub.pending or [], None
        first = sub.offset + 1
        for i, data in enumerate(backlog):
            self._deliver(sub, sub.epoch, first + i, data)
        for epoch, offset, data in pending:
            self._deliver(sub, epoch, offset, data)
        if sub.overflowed and sub.pending is None:
            sub.overflowed = False
            self.catch_up(sub)

    def catch_up(self, sub: _Sub, first: tuple[str, int, str] | None = None) -> None:
        """Fill the gap after ``sub.offset`` from the history, or tell the client it can't."""
        if sub.pending is not None:
            if first is not None:
                sub.pending.append(first)
            return
        sub.pending = [first] if first is not None else []
        self._fetch_gap(sub)

    def _fetch_gap(self, sub: _Sub) -> None:
        self._fetch_gaps(sub.channel, sub.epoch, sub.offset, [sub])

    def _fetch_gaps(self, channel: str, epoch: str, offset: int, subs: list[_Sub]) -> None:
        """One history read for subscriptions (buffering) that all stand at the same place."""

        def got(history: History) -> None:
            position = history.position
            new_epoch: list[_Sub] = []
            for sub in subs:
                if not self._is_current(sub) or sub.pending is None or sub.offset != offset:
                    continue
                entries = history.entries
                if entries is None and position.epoch != epoch and position.offset:
                    # A new epoch (Redis lost the stream, or a failover): the old one is gone,
                    # but the new one's publications so far may all be in its history.
                    self._resync(sub, Position(position.epoch, 0), "epoch_changed")
                    new_epoch.append(sub)
                    continue
                if entries is None:
                    self._resync(sub, position, "history_lost")
                    entries = []
                elif entries:
                    self.gaps_filled += 1
                self._go_live(sub, entries)
            if new_epoch:
                self._fetch_gaps(channel, position.epoch, 0, new_epoch)

        def failed(failure: Failure) -> None:
            # Still down: keep buffering; the broker's on_link(True) tries again.
            log.debug("Catch-up of {channel} failed: {why}", channel=channel, why=failure)
            self._stale.update(sub for sub in subs if self._is_current(sub))

        self.broker.history(channel, epoch, offset).addCallbacks(got, failed)

    def _resync(self, sub: _Sub, position: Position, reason: str) -> None:
        self.resyncs += 1
        sub.epoch, sub.offset = position
        sub.client.send(
            "resync",
            {
                "channel": sub.channel,
                "epoch": position.epoch,
                "offset": position.offset,
                "recovered": False,
                "reason": reason,
            },
        )

    def on_presence(self, channel: str, event: str, info: dict[str, Any]) -> None:
        subs = self._subs.get(channel)
        if not subs:
            return
        body = encode_message(event, {"channel": channel, **info})
        frame = SharedFrame(body)
        session = info.get("session")
        for sub in list(subs.values()):
            if sub.join_leave and sub.pending is None and sub.client.session_id != session:
                sub.client.write_shared(frame)

    def on_message(self, session: str, type: str, data: Any) -> None:
        if type == "session_taken_over":  # a node resumed a session one of ours carries
            kicked = getattr(self.factory.sessions, "kicked", None)  # type: ignore[attr-defined]
            if kicked is not None:
                kicked(session, data)
            return
        if type == "session_push":  # a push to a session one of ours carries, forwarded
            pushed = getattr(getattr(self.factory, "sessions", None), "pushed", None)
            if pushed is not None:
                pushed(data)
            return
        with contextlib.suppress(HandlerError):  # not authenticated yet: dropped
            self.factory.send(session, type, data)

    def on_broadcast(self, type: str, data: Any) -> None:
        self.factory.broadcast(type, data, remote=True)

    def on_kick(self, session: str) -> None:
        self.kick_local(session)

    def on_register(self) -> None:
        """The broker wrote this node's clients back to Redis: its sessions go back too."""
        reattach = getattr(getattr(self.factory, "sessions", None), "reattach", None)
        if reattach is not None:
            reattach()

    def on_link(self, up: bool) -> None:
        """After the broker's link returns, every subscription checks for a gap.

        Subscriptions of one channel at the same position share one history read (after a
        Redis blip, a node with 10,000 subscribers of a channel asks once, not 10,000 times).
        """
        sessions_on_link = getattr(getattr(self.factory, "sessions", None), "on_link", None)
        if sessions_on_link is not None:
            sessions_on_link(up)  # detaches Redis missed while it was unreachable
        if not up:
            self._link_was_down = True
            log.warn("The cluster broker is unreachable; publish answers unavailable")
            return
        if self._link_was_down:
            log.info("The cluster broker is reachable again; subscribers catch up")
        groups: dict[tuple[str, str, int], list[_Sub]] = {}
        stale, self._stale = self._stale, set()
        for sub in stale:
            if self._is_current(sub) and sub.pending is not None:
                groups.setdefault((sub.channel, sub.epoch, sub.offset), []).append(sub)
        for subs in list(self._subs.values()):
            for sub in list(subs.values()):
                if sub.pending is None:
                    sub.pending = []
                    groups.setdefault((sub.channel, sub.epoch, sub.offset), []).append(sub)
        for (channel, epoch, offset), members in groups.items():
            self._fetch_gaps(channel, epoch, offset, members)

    # -- across nodes --------------------------------------------------------------------------

    def send(self, session: str, type: str, data: Any = None) -> Deferred[bool]:
        """Push to a session on any node; fires False when no node has it."""
        try:
            if self.factory.send(session, type, data):
                return succeed(True)
        except HandlerError as e:  # the session has not authenticated: not_authenticated
            return fail(e)
        if not self.broker.clustered:
            return succeed(False)
        pushed = self._push_to_session(session, type, data)
        if pushed is not None:
            return pushed.addErrback(_as_unavailable)
        return self.broker.send(session, type, data).addErrback(_as_unavailable)

    def _push_to_session(self, sid: str, type: str, data: Any) -> Deferred[bool] | None:
        """A push to a resumable session of the cluster, wherever it is (kept in Redis for
        its replay while no node carries it); None when ``sid`` is not a session's id."""
        push = getattr(getattr(self.factory, "sessions", None), "push", None)
        if push is None:
            return None
        return push(sid, encode_message(type, data))

    def kick_local(self, session: str) -> bool:
        """Disconnect a client of this node (eviction reason ``admin``); False if not here."""
        client = self.factory.clients.get(session)
        if client is None:
            return False
        client.evict("admin", "disconnected through the admin API")
        return True

    def kick(self, session: str) -> Deferred[bool]:
        """Disconnect a session on any node; fires False when no node has it."""
        if self.kick_local(session):
            return succeed(True)
        if not self.broker.clustered:
            return succeed(False)
        return self.broker.kick(session).addErrback(_as_unavailable)

    def forward(self, session: str, type: str, data: Any = None) -> bool:
        """Send to a session of another node without waiting (False on one node)."""
        if not self.broker.clustered or not self.broker.up:
            return False
        pushed = self._push_to_session(session, type, data)
        if pushed is not None:
            pushed.addErrback(_log_failure, "send", session)
            return True
        self.broker.send(session, type, data).addErrback(_log_failure, "send", session)
        return True

    def broadcast(self, type: str, data: Any = None) -> Deferred[int]:
        """Push to every client of every node; fires with clients (one node) or nodes reached."""
        if not self.broker.clustered:
            return succeed(self.factory.broadcast(type, data))
        d = self.broker.broadcast(type, data).addErrback(_as_unavailable)
        # Every node writes it to its connections; the sessions none carries get it in Redis.
        sessions = getattr(self.factory, "sessions", None)
        if sessions is not None:
            sessions.broadcast_detached(encode_message(type, data), everywhere=True)
        return d

    def clients(self, identity: str | None = None) -> Deferred[list[dict[str, Any]]]:
        """Every client of the cluster (of ``identity`` only, when given), with its ``node``."""
        if not self.broker.clustered:
            node = self.broker.node_id
            return succeed(
                [
                    {"session": c.session_id, "node": node, "peer": c.peer, "identity": c.identity}
                    for c in self.factory.clients.values()
                    if identity is None or c.identity == identity
                ]
            )
        d = self.broker.clients()
        if identity is not None:
            d.addCallback(lambda found: [c for c in found if c.get("identity") == identity])
        return d.addErrback(_as_unavailable)


def _unavailable() -> HandlerError:
    return HandlerError(UNAVAILABLE, "the cluster broker is unreachable; try again")


def _as_unavailable(failure: Failure) -> Failure:
    if failure.check(BrokerUnavailable):
        return Failure(HandlerError(UNAVAILABLE, str(failure.value) or "broker unreachable"))
    return failure


def _log_failure(failure: Failure, what: str, channel: str) -> None:
    log.debug("{what} for {channel} failed: {why}", what=what, channel=channel, why=failure)


# -- the built-in handlers -------------------------------------------------------------------


# The built-ins need the connection itself (to write publications to it), which application
# handlers never see: they are part of the server, so they may read Request's private link.


def _connection(request: Request) -> Connection:
    return request._connection  # type: ignore[no-any-return]


def _hub(request: Request) -> ChannelHub:
    return _connection(request).factory.channels


def _fields(request: Request) -> dict[str, Any]:
    data = request.data
    if not isinstance(data, dict):
        raise HandlerError(BAD_REQUEST, 'expected data {"channel": "..."}')
    return data


def _since(value: Any) -> tuple[str, int] | None:
    if value is None:
        return None
    if (
        isinstance(value, dict)
        and isinstance(value.get("epoch"), str)
        and type(value.get("offset")) is int
        and 0 <= value["offset"] < 2**63
    ):
        return value["epoch"], value["offset"]
    raise HandlerError(BAD_REQUEST, 'since is {"epoch": "...", "offset": <integer >= 0>}')


def _subscribe(request: Request) -> Deferred[dict[str, Any]]:
    hub = _hub(request)
    data = _fields(request)
    channel = hub.check_channel(data.get("channel"))
    since = _since(data.get("since"))
    join_leave = data.get("join_leave", False)
    if not isinstance(join_leave, bool):
        raise HandlerError(BAD_REQUEST, "join_leave is true or false")
    client = _connection(request)
    actions = ["subscribe"]
    if since is not None:
        actions.append("history")
    if join_leave:
        actions.append("presence")
    checked = hub.permissions.check_all(client, actions, channel, data)
    if checked is None:
        return hub.subscribe(client, channel, since, join_leave)
    return checked.addCallback(lambda _: hub.subscribe(client, channel, since, join_leave))


def _unsubscribe(request: Request) -> dict[str, Any]:
    hub = _hub(request)
    return hub.unsubscribe(_connection(request), hub.check_channel(_fields(request).get("channel")))


def _publish(request: Request) -> Deferred[dict[str, Any]]:
    hub = _hub(request)
    data = _fields(request)
    channel = hub.check_channel(data.get("channel"))
    if "data" not in data:
        raise HandlerError(BAD_REQUEST, 'expected data {"channel": "...", "data": ...}')
    client = _connection(request)

    def start(_: object = None) -> Any:
        checked = hub.permissions.check(client, "publish", channel, data["data"])
        return publish() if checked is None else checked.addCallback(publish)

    def publish(_: object = None) -> Deferred[dict[str, Any]]:
        d = hub.publish(channel, data["data"])
        return d.addCallback(answer)

    def answer(offset: int) -> Any:
        reply = {"channel": channel, "offset": offset}
        if not hub.backlogged():
            return reply
        # Backpressure: the reply waits for the delivery queue, so a client pipelining
        # publishes reaches limits.max_pending_requests and is no longer read.
        return hub.when_drained().addCallback(lambda _: reply)

    turn = hub.publish_turn(client)
    return start() if turn is None else turn.addCallback(start)


def _presence(request: Request) -> Deferred[dict[str, Any]]:
    hub = _hub(request)
    channel = hub.check_channel(_fields(request).get("channel"))
    checked = hub.permissions.check(_connection(request), "presence", channel)
    if checked is None:
        return hub.presence(channel)
    return checked.addCallback(lambda _: hub.presence(channel))


#: The channel message types and their handlers.
CHANNEL_TYPES: dict[str, Callable[[Request], Any]] = {
    "subscribe": _subscribe,
    "unsubscribe": _unsubscribe,
    "publish": _publish,
    "presence": _presence,
}


def register(registry: HandlerRegistry) -> None:
    """Add the channel handlers to ``registry`` (types an application defined are kept)."""
    for type_, handler in CHANNEL_TYPES.items():
        if registry.get(type_) is None:
            registry.add(type_, handler)

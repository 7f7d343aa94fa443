"""The server factory: the registry of connected clients, their heartbeat, push and limits.

The factory owns everything that spans connections: the session registry (kept in last-seen
order for the heartbeat sweep), the `HeartbeatMonitor`, counters, and the connection limit.
Protocols stay thin and ask the factory for time (`now`), which makes the whole server run on
an injected clock in tests.
"""

from __future__ import annotations

import secrets
from bisect import bisect_left
from collections import Counter, OrderedDict, deque
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from heartbeatd._logging import LogLimiter, get_logger
from heartbeatd._version import __version__
from heartbeatd.cluster.broker import Broker, MemoryBroker
from heartbeatd.config import Config
from heartbeatd.server import channels, signed_tokens
from heartbeatd.server.admission import PER_ADDRESS_RATE, Admission
from heartbeatd.server.auth import Authenticator
from heartbeatd.server.connection import Connection, format_address
from heartbeatd.server.handlers import HandlerError, HandlerRegistry, default_registry
from heartbeatd.server.heartbeat import HeartbeatMonitor
from heartbeatd.server.protocol import RefusedProtocol, ServerProtocol
from heartbeatd.server.resumable import Sessions
from heartbeatd.server.session import Server
from heartbeatd.server.signed_tokens import JwtVerifier
from heartbeatd.wire import get_framing
from heartbeatd.wire.envelope import OMIT, TOO_MANY_CONNECTIONS, encode_error, encode_message
from heartbeatd.wire.framing import FrameDecoder, SharedFrame

__all__ = ["NOT_AUTHENTICATED", "EvictionRecord", "NotAuthenticated", "ServerFactory"]

#: The error code of a push to a connection that has not authenticated.
NOT_AUTHENTICATED = "not_authenticated"
#: Why a connection is closed when a reload removed its token.
TOKEN_REVOKED = "token_revoked"


class NotAuthenticated(HandlerError):
    """A direct send named a connection still in its auth gate; nothing was sent."""


log = get_logger(__name__)

#: Upper bounds (seconds) of the heartbeat round-trip histogram.
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: Closes the operator chose for everyone at once: logged per client at debug only, since
#: the service logs one summary line (100k "closing" lines would flood the log at shutdown).
_ROUTINE_CLOSES = frozenset({"shutdown"})


class EvictionRecord:
    """Why and in what state a client was dropped, kept for operators (`recent_closes`)."""

    __slots__ = (
        "at",
        "detail",
        "identity",
        "last_rtt",
        "peer",
        "pings_unanswered",
        "reason",
        "session_id",
        "silent_for",
    )

    def __init__(
        self, client: Connection, reason: str, detail: str, at: float, silent_for: float
    ) -> None:
        self.session_id = client.session_id
        self.peer = client.peer
        self.identity = client.identity
        self.reason = reason
        self.detail = detail
        self.at = at
        self.last_rtt = client.last_rtt
        self.pings_unanswered = client.pings_unanswered
        #: Seconds since the client was last heard from (stalls excluded).
        self.silent_for = round(silent_for, 3)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def make_sessions(factory: ServerFactory, broker: Broker) -> Sessions:
    """The daemon's resumable sessions: in Redis when its broker is a cluster's."""
    store = getattr(broker, "session_store", None) if broker.clustered else None
    if store is None:
        return Sessions(factory)
    from heartbeatd.server.sessions_store import ClusteredSessions

    return ClusteredSessions(factory, store())


def _resolve_clock(clock: IReactorTime | None) -> IReactorTime:
    if clock is not None:
        return clock
    from twisted.internet import reactor  # resolved late: twistd may install another reactor

    return reactor  # type: ignore[return-value]


class ServerFactory(Factory):
    """Builds `ServerProtocol`s, tracks them by session id and runs their heartbeat."""

    protocol = ServerProtocol
    #: How many close records `recent_closes` keeps.
    RECENT_CLOSES = 256
    #: Connections whose auth gate is still pending: pushes skip them (0 with auth off, so
    #: `broadcast` takes its unfiltered path).
    gated = 0

    def __init__(
        self,
        config: Config,
        registry: HandlerRegistry | None = None,
        clock: IReactorTime | None = None,
        broker: Broker | None = None,
    ) -> None:
        self.config = config
        self.clock = _resolve_clock(clock)
        self.framing = get_framing(config.framing)
        #: An empty frame decoder that connections borrow for a read and keep only while a
        #: frame is unfinished (`ServerProtocol.dataReceived`): idle connections hold none.
        self.spare_decoder: FrameDecoder | None = None
        self.registry = registry if registry is not None else default_registry(config.handlers)
        #: What handlers reach as ``request.server``.
        self.server = Server(self)
        if broker is None:
            ch = config.channels
            broker = MemoryBroker(self.clock, ch.history_size, ch.history_ttl, config.name)
        #: Channels, presence, and (with a clustered broker) send/broadcast across nodes.
        self.channels = channels.ChannelHub(self, broker)
        channels.register(self.registry)
        signed_tokens.register(self.registry)
        #: Resumable sessions (sessions.*): in this daemon's memory, or in Redis with a cluster.
        self.sessions = make_sessions(self, broker)
        #: session id -> connection, least recently heard first.
        self.clients: OrderedDict[str, Connection] = OrderedDict()
        self.max_connections = config.effective_max_connections()
        self.accepted = 0
        self.refused = 0
        #: Refused connections still open (their error frame not yet written): each holds a
        #: file descriptor, as a client does.
        self.refusing = 0
        #: accept() failures, by errno name (EMFILE...), counted by the daemon's accept guard.
        self.accept_errors: Counter[str] = Counter()
        #: Called when a connection's file descriptor is released (the daemon's accept guard
        #: resumes accepting); None when nothing waits for room.
        self.on_room: Any = None
        #: Clients connected now by listener (``tcp``, ``tls``, ``websocket``, ``websocket+tls``).
        self.by_listener: Counter[str] = Counter()
        #: Connections accepted whose transport handshake (WebSocket) is not done yet: not in
        #: `clients`, but counted against ``limits.max_connections``.
        self.handshaking = 0
        #: Polite closes aborted after ``shutdown.close_timeout``: the peer did not read them.
        self.close_timeouts = 0
        #: Per-address connection counts and accept rates (limits.*_per_address).
        self.admission = Admission(config.limits, self.clock)
        #: Checks clients' tokens when ``auth.mode`` is not none; the daemon sets it (it reads
        #: the tokens file, at start and on SIGHUP).
        self.authenticator: Authenticator | None = None
        #: session id -> (identity, SHA-256 of its token), for connections that authenticated
        #: with the tokens file: `revalidate` closes those whose token a reload removed.
        self.credentials: dict[str, tuple[str, bytes]] = {}
        #: Checks signed tokens (``auth.jwt``: mode jwt, ``subscribe: token``); the daemon
        #: sets it (it reads the key file, at start and on SIGHUP).
        self.token_verifier: JwtVerifier | None = None
        #: Refresh and expiry timers of connections that logged in with a JWT.
        self.lifetimes = signed_tokens.Lifetimes(self)
        #: identity -> its connections here that logged in (``auth.mode``), and session ->
        #: the identity it was counted under (limits.max_connections_per_identity).
        self.identities: Counter[str] = Counter()
        self._identity_of: dict[str, str] = {}
        self.closes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        #: Connections refused, by reason (``max_connections``, ...).
        self.refusals: Counter[str] = Counter()
        #: Connections that spoke another protocol, by kind (``http``, ``tls``, ...).
        self.foreign: Counter[str] = Counter()
        #: Bytes held by all connections' unfinished frames (``limits.max_partial_frame_bytes``).
        self.partial_bytes = 0
        self.log_limiter = LogLimiter(
            self.clock, config.log.rate_limit_lines, config.log.rate_limit_window
        )
        self.recent_closes: deque[EvictionRecord] = deque(maxlen=self.RECENT_CLOSES)
        #: Frame and byte counts of connections already closed (live ones are summed on demand).
        self.closed_totals = {"frames_in": 0, "frames_out": 0, "bytes_in": 0, "bytes_out": 0}
        #: Heartbeat round trips, seconds: upper bounds and cumulative-ready counts.
        self.rtt_buckets = RTT_BUCKETS
        self.rtt_counts = [0] * (len(RTT_BUCKETS) + 1)
        self.rtt_sum = 0.0
        self._empty_waiters: list[Deferred[None]] = []
        #: True once shutdown began: health checks report it, clients were told goaway.
        self.draining = False
        hb = config.heartbeat
        self.heartbeat = HeartbeatMonitor(
            self.clients,
            self.clock,
            hb.interval,
            hb.timeout,
            self.ping_frame,
            hb.sweep_batch,
            frame_timeout=config.limits.frame_timeout,
            first_frame_timeout=config.limits.first_frame_timeout,
            on_sweep=self.log_limiter.flush,
        )

    def apply_config(self, config: Config) -> None:
        """Use a new configuration from now on (live reload); connections stay open."""
        self.config = config
        self.max_connections = config.effective_max_connections()
        self.admission.configure(config.limits)
        self.spare_decoder = None  # the next one is made with the new max_frame_bytes
        for client in self.clients.values():
            client.set_max_frame_bytes(config.max_frame_bytes)
        self.heartbeat.batch = config.heartbeat.sweep_batch
        self.channels.broker.configure_history(
            config.channels.history_size, config.channels.history_ttl
        )
        self.channels.reconfigure()
        self.heartbeat.frame_timeout = config.limits.frame_timeout
        self.heartbeat.reconfigure(
            config.heartbeat.interval,
            config.heartbeat.timeout,
            first_frame_timeout=config.limits.first_frame_timeout,
        )
        self.log_limiter.lines = config.log.rate_limit_lines
        self.log_limiter.window = config.log.rate_limit_window

    # -- time ---------------------------------------------------------------------------------

    def now(self) -> float:
        """The alive clock used for last-seen times (stalls excluded)."""
        return self.clock.seconds() - self.heartbeat.stalled

    # -- Factory hooks ------------------------------------------------------------------------

    def startFactory(self) -> None:
        self.heartbeat.start()

    def stopFactory(self) -> None:
        self.heartbeat.stop()
        stop = getattr(self.sessions, "stop", None)
        if stop is not None:
            stop()

    def buildProtocol(self, addr: IAddress) -> Protocol:
        refusal, key, wait = self.admit_with_wait(format_address(addr), getattr(addr, "host", None))
        if refusal is not None:
            body = encode_error(TOO_MANY_CONNECTIONS, refusal, retry_after=wait)
            refused = RefusedProtocol(self.framing.encode(body))
            refused.factory = self
            return refused
        protocol = super().buildProtocol(addr)
        protocol.admitted_host = key  # type: ignore[union-attr]
        return protocol  # type: ignore[return-value]

    def admit(
        self, peer: str, host: str | None, *, limit_total: bool = True
    ) -> tuple[str | None, str | None]:
        """May a new connection from ``host`` stay?  ``(None, key)``: yes, counted under the
        admission key (`Admission.release` it when it closes); ``(why, None)``: no, counted
        and logged (rate-limited).  ``limit_total``: also check ``limits.max_connections``
        (every listener's connections together, handshakes included)."""
        refusal, key, _ = self.admit_with_wait(peer, host, limit_total=limit_total)
        return refusal, key

    def admit_with_wait(
        self, peer: str, host: str | None, *, limit_total: bool = True
    ) -> tuple[str | None, str | None, float | None]:
        """`admit`, and the seconds until a refusal of the per-address accept rate would not
        happen again (the error frame's ``retry_after``; None for the other refusals)."""
        if limit_total and len(self.clients) + self.handshaking >= self.max_connections:
            self.refused += 1
            self.refusals["max_connections"] += 1
            if self.log_limiter.allow("refused"):
                log.warn(
                    "Refused a connection from {peer}: {count} clients connected "
                    "(limits.max_connections is {limit})",
                    peer=peer,
                    count=len(self.clients) + self.handshaking,
                    limit=self.max_connections,
                )
            return f"the server holds its maximum of {self.max_connections} connections", None, None
        key = self.admission.key(host)
        refusal = self.admission.admit(key)
        if refusal is None:
            return None, key, None
        reason, message = refusal
        self.refused += 1
        self.refusals[reason] += 1
        if self.log_limiter.allow("refused:" + reason):
            log.warn("Refused a connection from {peer}: {message}", peer=peer, message=message)
        wait = self.admission.wait(key) if reason == PER_ADDRESS_RATE else None
        return message, None, wait

    # -- the registry -------------------------------------------------------------------------

    @staticmethod
    def new_session_id() -> str:
        return secrets.token_hex(8)

    def hello_body(self, session_id: str, framing: str | None = None) -> bytes:
        """The hello envelope; ``framing``: the name of the connection's own framing."""
        hb = self.heartbeat
        hello = {
            "server": self.config.name,
            "version": __version__,
            "session": session_id,
            "framing": framing or self.framing.name,
            "heartbeat": {"interval": hb.interval, "timeout": hb.timeout},
            "max_frame_bytes": self.config.max_frame_bytes,
        }
        if self.authenticator is not None:
            hello["auth"] = "required"
        return encode_message("hello", hello)

    def ping_frame(self, sequence: int) -> SharedFrame:
        """The heartbeat a sweep sends: a ping envelope, or the framing's bare token."""
        return SharedFrame(encode_message("ping", id=f"hb-{sequence}"), ping=True)

    def client_connected(self, client: Connection) -> None:
        self.clients[client.session_id] = client
        self.accepted += 1
        self.by_listener[getattr(client, "listener", "stream")] += 1
        self.heartbeat.watch_newcomer(client)
        self.channels.client_connected(client)
        # The client itself, not its peer string: the line is rendered (and the lazy peer
        # string built) only when debug logging is on.
        log.debug("Client {client.session_id} connected from {client.peer}", client=client)

    def client_identified(self, client: Connection) -> bool:
        """A client logged in as ``client.identity``: count it, refuse it past
        ``limits.max_connections_per_identity`` (False: it is being closed), and tell the
        cluster who it is (``GET /clients?identity=``, ``DELETE /identities/{identity}``)."""
        identity = client.identity
        if identity is None:
            return True
        session = client.session_id
        self._uncount_identity(session)  # a second login of the same connection
        limit = self.config.limits.max_connections_per_identity
        if limit and self.identities[identity] >= limit:
            self.refuse_identity(client, limit)
            return False
        self.identities[identity] += 1
        self._identity_of[session] = identity
        self.channels.client_identified(client, limit)
        return True

    def refuse_identity(self, client: Connection, limit: int) -> None:
        """Close a connection that would pass ``limits.max_connections_per_identity``."""
        self.refused += 1
        self.refusals["max_connections_per_identity"] += 1
        self.count_error(TOO_MANY_CONNECTIONS)
        text = (
            f"{client.identity!r} already holds its maximum of {limit} connections "
            "(limits.max_connections_per_identity)"
        )
        client.write_frame(encode_error(TOO_MANY_CONNECTIONS, text), encoded=False)
        client.close(TOO_MANY_CONNECTIONS, text)

    def _uncount_identity(self, session: str) -> None:
        identity = self._identity_of.pop(session, None)
        if identity is not None:
            left = self.identities[identity] - 1
            if left > 0:
                self.identities[identity] = left
            else:
                del self.identities[identity]

    def touch(self, client: Connection) -> None:
        """Mark a client as just heard from (keeps `clients` in last-seen order)."""
        self.clients.move_to_end(client.session_id)

    def client_closing(
        self, client: Connection, reason: str, detail: str, *, quiet: bool = False
    ) -> None:
        """Record and log (rate-limited per reason) why the server is closing a client."""
        self.closes[reason] += 1
        record = EvictionRecord(
            client, reason, detail, self.clock.seconds(), self.now() - client.last_seen
        )
        self.recent_closes.append(record)
        if reason in _ROUTINE_CLOSES:
            emit = log.debug
        elif quiet or not self.log_limiter.allow("close:" + reason):
            return
        else:
            emit = log.warn
        emit(
            "Closing client {session} ({peer}{who}): {reason}{sep}{detail}; silent {silent:.1f}s, "
            "last ping round trip {rtt}, unanswered pings {missed}",
            session=client.session_id,
            peer=client.peer,
            who=f", {client.identity}" if client.identity else "",
            identity=client.identity,
            reason=reason,
            sep=": " if detail else "",
            detail=detail,
            silent=self.now() - client.last_seen,
            rtt="n/a" if client.last_rtt is None else f"{client.last_rtt * 1000:.1f}ms",
            missed=client.pings_unanswered,
        )

    def record_rtt(self, seconds: float) -> None:
        """One heartbeat round trip (called per pong, not per frame)."""
        self.rtt_counts[bisect_left(self.rtt_buckets, seconds)] += 1
        self.rtt_sum += seconds

    def traffic_totals(self) -> dict[str, int]:
        """Frames and bytes in and out since start, closed and live connections together."""
        totals = dict(self.closed_totals)
        for client in self.clients.values():
            totals["frames_in"] += client.frames_in
            totals["frames_out"] += client.frames_out
            totals["bytes_in"] += client.bytes_in
            totals["bytes_out"] += client.bytes_out
        return totals

    def client_disconnected(self, client: Connection, reason: Failure | None) -> None:
        if self.clients.pop(client.session_id, None) is None:
            return
        if self.on_room is not None:
            self.on_room()
        if self.credentials:
            self.credentials.pop(client.session_id, None)
        if self.lifetimes:
            self.lifetimes.forget(client.session_id)
        if self._identity_of:
            self._uncount_identity(client.session_id)
        self.by_listener[getattr(client, "listener", "stream")] -= 1
        self.channels.client_disconnected(client)
        self.admission.release(getattr(client, "admitted_host", None))
        totals = self.closed_totals
        totals["frames_in"] += client.frames_in
        totals["frames_out"] += client.frames_out
        totals["bytes_in"] += client.bytes_in
        totals["bytes_out"] += client.bytes_out
        log.debug(
            "Client {session} ({peer}) disconnected: {why}",
            session=client.session_id,
            peer=client.peer,
            why=client.close_reason or (reason.getErrorMessage() if reason else "closed"),
        )
        if not self.clients and self._empty_waiters:
            waiters, self._empty_waiters = self._empty_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def status(self) -> str:
        """One line for systemd's STATUS=: what the daemon is doing."""
        count = len(self.clients)
        state = "draining" if self.draining else "serving"
        return f"{state} {count} client{'s' if count != 1 else ''}"

    def count_error(self, code: str) -> None:
        self.errors[code] += 1

    def count_foreign(self, kind: str) -> None:
        self.foreign[kind] += 1

    def log_allowed(self, cause: str) -> bool:
        """Whether a per-event log line for ``cause`` may be written now (rate limit)."""
        return self.log_limiter.allow(cause)

    def revalidate(self) -> int:
        """After a reload: close connections whose token the new tokens file no longer holds
        for their identity (``token_revoked``); the count closed.

        Only what can be told is checked: connections of a custom authenticator or a client
        certificate stay, and with ``auth.mode: none`` everyone stays.
        """
        holds = self.authenticator.holds if self.authenticator is not None else None
        if holds is None or not self.credentials:
            return 0
        revoked = [s for s, (who, digest) in self.credentials.items() if not holds(who, digest)]
        for session in revoked:
            del self.credentials[session]
            client = self.clients.get(session)
            if client is not None:
                client.send(
                    "goaway",
                    {"reason": TOKEN_REVOKED, "detail": "the token was removed by a reload"},
                )
                client.close(TOKEN_REVOKED, "its token was removed from auth.tokens_file")
        return len(revoked)

    # -- push ---------------------------------------------------------------------------------

    def client_count(self) -> int:
        return len(self.clients)

    def send(self, session_id: str, type: str, data: Any = OMIT) -> bool:
        """Push a message to one client; False when no such client is connected.

        Raises `NotAuthenticated` when the client has not authenticated yet: before auth, a
        connection hears nothing but its hello and pongs (docs/security.md).
        """
        client = self.clients.get(session_id)
        if client is None:
            sessions = self.sessions
            return bool(sessions.states) and sessions.send(session_id, encode_message(type, data))
        if client._auth is not None:
            raise NotAuthenticated(
                NOT_AUTHENTICATED, f"client {session_id!r} has not authenticated yet"
            )
        client.send(type, data)
        return True

    def publish(self, channel: str, data: Any) -> Deferred[int]:
        """Publish to a channel (see `ChannelHub.publish`)."""
        return self.channels.publish(channel, data)

    def forward(self, session_id: str, type: str, data: Any = OMIT) -> bool:
        """Send to a session of another node of the cluster; False when there is none."""
        return self.channels.forward(session_id, type, data)

    def broadcast(
        self, type: str, data: Any = OMIT, *, everyone: bool = False, remote: bool = False
    ) -> int:
        """Push a message to every authenticated client, framing it once per framing; the count.

        Connections still in their auth gate are skipped (``everyone``: the shutdown goaway).
        Written through the channel hub's delivery queue, ``channels.fanout_batch``
        connections per reactor turn (``ChannelHub.write_to_all``), except the goaway.
        ``remote``: this node's part of a cluster's broadcast (whose origin numbered it into
        the detached sessions in Redis).
        """
        frame = SharedFrame(encode_message(type, data))
        if self.gated and not everyone:
            clients = [c for c in self.clients.values() if c._auth is None]
        else:
            clients = list(self.clients.values())
        if everyone:  # the shutdown goaway: at once
            for client in clients:
                client.write_shared(frame)
        else:  # in turns of channels.fanout_batch, as publications are (fairness)
            self.channels.write_to_all(frame, clients)
            if not remote:  # kept for the replay of sessions between connections
                self.sessions.broadcast_detached(frame.body)
        return len(clients)

    # -- shutdown -----------------------------------------------------------------------------

    def when_empty(self) -> Deferred[None]:
        """A Deferred that fires once no client is connected."""
        if not self.clients:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._empty_waiters.append(waiter)
        return waiter

    def drain(self, drain_timeout: float, reconnect_after: float) -> Deferred[None]:
        """Ask every client to go away, give them ``drain_timeout`` s to leave; fires when empty.

        Clients keep being served meanwhile, so their in-flight requests finish.
        """
        self.draining = True
        if not self.clients:
            return succeed(None)
        count = self.broadcast(
            "goaway", {"reason": "shutdown", "reconnect_after": reconnect_after}, everyone=True
        )
        log.info(
            "Draining: sent goaway to {count} client(s); waiting up to {timeout:g}s",
            count=count,
            timeout=drain_timeout,
        )
        done = self.when_empty()
        if drain_timeout <= 0:
            return succeed(None)
        timeout: Deferred[None] = Deferred()
        timer = self.clock.callLater(drain_timeout, timeout.callback, None)

        def finished(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not timeout.called:
                timeout.callback(None)

        done.addCallback(finished)
        return timeout

    def close_all(self, timeout: float) -> Deferred[None]:
        """Close every client politely; abort those still open after ``timeout`` seconds."""
        for client in list(self.clients.values()):
            client.close("shutdown", "the server is shutting down")
        done = self.when_empty()
        if self.clients:
            force = self.clock.callLater(timeout, self._abort_all)
            done.addBoth(lambda result: (force.cancel() if force.active() else None, result)[1])
        return done

    def _abort_all(self) -> None:
        for client in list(self.clients.values()):
            client.transport.abortConnection()

"""What a connection means, whatever carries its bytes: the transport-independent core.

`Connection` works on message *bodies* (the JSON of docs/protocol.md); an adapter subclass
turns its transport's bytes into bodies and calls `_deliver`, and frames what the core
writes with its framing (``_framing``: ``header``/``encode``).  Two adapters exist: the
stream one (`heartbeatd.server.protocol.ServerProtocol`: int32 or seed framing, TCP, TLS,
UNIX sockets) and the WebSocket one (`heartbeatd.websocket.protocol`).  What the core does:

* dispatch: a hot path for plain synchronous requests (inlined in `_deliver`, with a C twin
  in ``heartbeatd.wire._speedups`` that runs when built: tests/test_speedups.py) and a
  general path (`_handle_item`) that alone decides what goes on the wire for anything
  unusual, so all answer identically (tests/test_protocol_paths.py);
* reply in request order, even when a later request finishes first (`_pending` slots), and
  write all replies produced by one read with a single write;
* the auth gate's hooks (`auth_succeeded`, `auth_refused`), liveness and heartbeat
  bookkeeping (`last_seen`, `frame_started`, `send_heartbeat`), partial-message accounting
  (``limits.max_partial_frame_bytes``);
* backpressure: stop reading from a peer that does not read our replies, or that has too many
  requests in flight, and close it (``slow_consumer``) once more than
  ``limits.max_outbound_buffer_bytes`` wait for it, so no peer can grow our memory unbounded;
* closing politely (`close`) or at once (`evict`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from inspect import iscoroutine
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from heartbeatd._direct_write import supports_direct_write, unsent_bytes, write_direct
from heartbeatd._logging import get_logger
from heartbeatd.server.auth import peer_certificate_identity
from heartbeatd.server.handlers import NO_REPLY, HandlerError, Reply, Request
from heartbeatd.server.registry import ClientRegistry
from heartbeatd.server.session import Session
from heartbeatd.server.sockopts import configure_socket
from heartbeatd.wire import envelope
from heartbeatd.wire._accelerated import speedups
from heartbeatd.wire.envelope import (
    ProtocolError,
    decode_message,
    encode_error,
    encode_message,
    exceeds_depth,
)
from heartbeatd.wire.framing import HEARTBEAT, Framing, SharedFrame
from heartbeatd.wire.int32 import Int32Framing

__all__ = ["Connection", "SharedRun", "format_address", "is_tls"]

log = get_logger(__name__)

#: Handler results that are plain JSON values, answered on the hot path without more checks.
_PLAIN_RESULTS = frozenset({dict, list, str, int, float, bool, type(None)})

#: Types a client sends that answer *us*; they are never dispatched to handlers.
_PONG = "pong"
_ERROR = "error"

#: The C twin of `Connection._deliver`'s hot-path loop (heartbeatd.wire._speedups.serve),
#: or None on the pure-Python path (``HEARTBEATD_NO_EXTENSIONS=1``, or built without a
#: compiler). It builds `Request` and calls the JSON functions the Python loop calls.
_serve: Callable[..., int] | None = None
if speedups is not None:
    speedups.configure(Request, envelope.decode_json_unchecked, envelope.encode_json, exceeds_depth)
    _serve = speedups.serve
#: The int32 framing's header function: the C loop writes that header itself.
_INT32_HEADER = Int32Framing.header


#: Server message types never numbered on a resumable session: they belong to the
#: connection, not the session (docs/protocol.md, "Sessions").
CONNECTION_TYPES = frozenset(
    {b"hello", b"ping", b"pong", b"goaway", b"ack", b"refresh", b"error", b"session", b"resume"}
)


def body_type(body: bytes) -> bytes | None:
    """The ``type`` of an envelope body as the server encodes it (``{"type":"x",...``)."""
    if body[:9] != b'{"type":"':
        return None
    end = body.find(b'"', 9)
    return body[9:end] if end > 0 else None


def numbered_body(body: bytes) -> bool:
    """Does a server body written on a resumable session get a seq?"""
    kind = body_type(body)
    return kind is not None and kind not in CONNECTION_TYPES


def format_address(address: IAddress) -> str:
    """``host:port`` for IP addresses, ``unix:path`` for UNIX sockets, else the repr."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    if name is not None:
        return f"unix:{name.decode() if isinstance(name, bytes) else name}"
    return str(address)


def is_tls(transport: Any) -> bool:
    """True for a TLS transport: a TLS wrapper, ``ssl:`` listeners, or after ``startTLS``."""
    return ISSLTransport.providedBy(transport) or getattr(transport, "TLS", False) is True


class _Slot:
    """A reply position; ``frame`` is None until the handler finishes.  ``seq``: on a
    resumable session, the client seq of the numbered request it answers (0: none)."""

    __slots__ = ("frame", "seq")

    def __init__(self, frame: bytes | None = None, seq: int = 0) -> None:
        self.frame = frame
        self.seq = seq


class SharedRun:
    """Messages many connections get, written to each in one write (`Connection.write_run`):
    joined at most once per framing, as `SharedFrame` frames one message."""

    __slots__ = ("_framed", "frames", "size")

    def __init__(self, frames: list[SharedFrame]) -> None:
        self.frames = frames
        #: Bytes of the bodies (framing headers not counted).
        self.size = sum(len(frame.body) for frame in frames)
        self._framed: dict[int, bytes] = {}

    def add(self, frame: SharedFrame) -> None:
        """One more message at the end (only before the run is first written)."""
        self.frames.append(frame)
        self.size += len(frame.body)

    def framed(self, framing: Framing) -> bytes:
        """The bytes to write on a connection that uses ``framing``."""
        key = id(framing)
        data = self._framed.get(key)
        if data is None:
            frames = self.frames
            data = self._framed[key] = (
                frames[0].framed(framing)
                if len(frames) == 1
                else b"".join([frame.framed(framing) for frame in frames])
            )
        return data


class Connection(Protocol):
    """One client connection of the daemon, less how its bytes arrive.

    Every attribute is a slot: a daemon holds tens of thousands of mostly idle connections,
    and past 30 attributes CPython gives each instance its own dict (~1.6 KB, with unshared
    keys). `Protocol` has no ``__slots__``, so a ``__dict__`` still exists for attributes
    set from outside (it stays unallocated until one is); what is created per connection is
    only what that connection needs yet (the pending queue on its first asynchronous reply,
    the Session facade on a handler's first use).

    An adapter calls `_open` once its transport can carry messages, `_deliver` with the
    bodies of each read, and `_closed` from ``connectionLost``; it may override
    `_lose_connection` (how a polite close ends the transport).
    """

    __slots__ = (
        "_auth",
        "_bare_type",
        "_batch",
        "_close_timer",
        "_direct_write",
        "_framing",
        "_handshake_timer",
        "_handshaking",
        "_held",
        "_max_depth",
        "_peer",
        "_pending",
        "_reading_paused",
        "_registered",
        "_resumable",
        "_session",
        "_write_paused",
        "_written_while_paused",
        "admitted_host",
        "awaiting_first_frame",
        "bytes_in",
        "bytes_out",
        "close_reason",
        "connected",
        "connected_at",
        "factory",
        "frame_started",
        "frames_in",
        "frames_out",
        "identity",
        "last_rtt",
        "last_seen",
        "ping_sent_at",
        "pings_unanswered",
        "session_id",
        "transport",
    )

    factory: ClientRegistry
    #: `write_shared` may inline `_write_many` (False in an adapter that overrides it).
    _plain_writes = True
    #: Answer plain, synchronous requests on the hot path inlined in `_deliver`.
    #: False sends everything through the general path; a test checks both write the same bytes.
    fast_path = True
    #: Which kind of listener accepted the connection (admin API, logs).
    listener = "stream"
    #: The client a trusted proxy named (``X-Forwarded-For``), set on such connections only:
    #: what is counted per client address instead of the proxy's own.
    forwarded_client: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._plain_writes = cls._write_many is Connection._write_many

    def __init__(self) -> None:
        self.transport: Any = None
        self.factory = None  # type: ignore[assignment]  # set by Factory.buildProtocol
        self.session_id = ""
        # Set only when something overrides the transport's address (see `peer`).
        self._peer: str | None = None
        #: Who the client authenticated as (None when authentication is off).
        self.identity: str | None = None
        self._session: Session | None = None
        #: The resumable session this connection carries (`heartbeatd.server.resumable`
        #: ``Attachment``), else None: the session hooks below are taken only when set.
        self._resumable: Any = None
        self.connected = False
        self.connected_at = 0.0
        #: Alive-clock time of the last complete frame received (see `HeartbeatMonitor.now`):
        #: a frame is the sign of life, a byte is not.
        self.last_seen = 0.0
        #: Alive-clock time the unfinished frame being received began; None between frames.
        self.frame_started: float | None = None
        #: True until the first complete frame arrives (`limits.first_frame_timeout`).
        self.awaiting_first_frame = True
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        #: Heartbeat bookkeeping: pings sent since the peer was last heard, and round trips.
        self.pings_unanswered = 0
        self.ping_sent_at: float | None = None
        self.last_rtt: float | None = None
        self.close_reason: str | None = None
        # Created on the first asynchronous reply: most connections never need one, and an
        # empty deque costs about 760 bytes per connection.
        self._pending: deque[_Slot] | None = None
        self._batch: list[bytes] | None = None
        self._write_paused = False
        # Bytes written since the transport last asked us to pause: the backlog estimate
        # for transports whose queue we cannot read (`unsent_bytes` is None).
        self._written_while_paused = 0
        # Bytes held for an unfinished frame or message (counted in the registry's total).
        self._held = 0
        self._reading_paused = False
        self._registered = False
        self._direct_write = False
        #: How bodies are framed on this transport (``header``, ``encode``, ``name``).
        self._framing: Any = None
        self._bare_type: str | None = None
        self._max_depth = 0
        # -- security (heartbeatd.server.auth, docs/security.md) --
        #: An `AuthGate` while the client must still authenticate, else None.
        self._auth: Any = None
        #: True until the transport's own handshake (TLS, WebSocket) completed.
        self._handshaking = False
        self._handshake_timer: Any = None
        #: Aborts a polite close the peer does not let finish (`_close_deadline`).
        self._close_timer: Any = None
        #: The address key the factory's admission counted this connection under.
        self.admitted_host: str | None = None

    # -- lifecycle (the adapter calls these) -------------------------------------------------

    def _open(self, framing: Framing, since: float | None = None) -> None:
        """The transport carries messages now: register with the server, start the gate.

        ``since``: the alive-clock time liveness counts from, when the transport's own
        handshake came first (``first_frame_timeout`` includes it); else now.
        """
        factory = self.factory
        config = factory.config
        self.connected = True
        self.session_id = factory.new_session_id()
        at = factory.clock.seconds()
        now = factory.now()
        self.last_seen = now if since is None else since
        # Until a reactor stall is recorded (>= 50 ms) the two clocks agree, to the
        # microseconds between these reads: one float for both, 24 bytes per connection.
        self.connected_at = now if abs(at - now) < 0.001 else at
        self._framing = framing
        self._bare_type = config.seed.message_type if framing.wraps_bare_values else None
        self._max_depth = config.limits.max_json_depth
        if not self._registered:
            self.transport.registerProducer(self, True)
            self._registered = True
        configure_socket(self.transport, config.tcp)
        self._direct_write = config.tcp.direct_write and supports_direct_write(self.transport)
        factory.client_connected(self)
        # -- security hooks (heartbeatd.server.auth; TLS, docs/security.md) ------------------
        authenticator = getattr(factory, "authenticator", None)
        if authenticator is not None:
            self._auth = authenticator.gate(self, factory.clock)
            factory.gated += 1  # pushes skip it until it authenticates (ServerFactory.broadcast)

    def _closed(self) -> None:
        """The transport is gone (from ``connectionLost``): release what the connection held."""
        self.connected = False
        if self._resumable is not None:
            self._resumable.connection_lost()  # the session detaches; its replies go on
        self._pending = None
        self._release_partial()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
            self.factory.gated -= 1
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._cancel_close_deadline()

    def _release_partial(self) -> None:
        """Drop the share of an unfinished frame in the registry's partial-byte total."""
        if self._held:
            self.factory.partial_bytes -= self._held
            self._held = 0
        self.frame_started = None

    # -- reading -----------------------------------------------------------------------------

    def _deliver(self, items: list[Any], held: int, error: Any = None) -> None:
        """Handle the bodies one read completed; ``held``: bytes of an unfinished one now;
        ``error``: why the stream cannot go on (answered, then the connection closes)."""
        factory = self.factory
        if items:
            now = factory.now()
            self.last_seen = now
            self.pings_unanswered = 0
            factory.touch(self)
            if held or self.frame_started is not None:
                self.frame_started = now if held else None
            if self.awaiting_first_frame:
                self.awaiting_first_frame = False
        elif held and self.frame_started is None:
            self.frame_started = factory.now()
        if held != self._held:
            grew = held > self._held
            factory.partial_bytes += held - self._held
            self._held = held
            if grew and factory.partial_bytes > factory.config.limits.max_partial_frame_bytes:
                self._overloaded()
        batch: list[bytes] = []
        self._batch = batch
        try:
            if self._bare_type is None and self.fast_path and self._auth is None:
                if _serve is not None:
                    # The hot path in C: the loop below, compiled (tests/test_speedups.py).
                    header = self._framing.header
                    # Not `self.frames_in += _serve(...)`: the general path counts its own frames
                    # while the C loop runs, and `+=` would read the count before.
                    answered = _serve(
                        self,
                        items,
                        factory.registry.get,
                        batch,
                        self._max_depth,
                        None if header is _INT32_HEADER else header,
                    )
                    self.frames_in += answered
                else:
                    # The hot path, inlined (one call less per read): well-formed envelopes with
                    # synchronous JSON results.  Anything unusual (a framing token, invalid JSON, a
                    # bad envelope, a reserved type, a Deferred or `Reply` result, a failing
                    # handler) takes the general path (`_handle_item`), which alone decides what
                    # goes on the wire, so both paths answer identically.
                    loads = envelope.decode_json_unchecked
                    dumps = envelope.encode_json
                    header = self._framing.header
                    answered = 0
                    lookup = factory.registry.get
                    max_depth = self._max_depth
                    # Nesting deeper than max_depth takes at least 2 * (max_depth + 1) bytes, so
                    # short bodies (most of them) skip the depth check altogether.
                    deep_enough = 2 * max_depth + 2
                    pending_items = iter(items)
                    for item in pending_items:
                        if type(item) is not bytes:
                            self._handle_item(item)  # a framing token
                            continue
                        try:
                            value = loads(item)
                        except ValueError:
                            self._handle_item(item)
                            continue
                        if type(value) is not dict or (
                            len(item) >= deep_enough and exceeds_depth(value, item, max_depth)
                        ):
                            self._handle_item(
                                item
                            )  # not an object, or too deep: the general path answers
                            continue
                        type_ = value.get("type")
                        id_ = value.get("id")
                        handler = lookup(type_) if type(type_) is str else None
                        if handler is None or (
                            id_ is not None and type(id_) is not str and type(id_) is not int
                        ):
                            self._handle_item(item)
                            if not self.fast_path:
                                # It started (or resumed) a resumable session: the rest of
                                # this read is numbered, so it takes the general path.
                                for rest in pending_items:
                                    self._handle_item(rest)
                            continue
                        answered += 1
                        data = value.get("data")
                        try:
                            result = handler(Request(type_, id_, data, self))
                        except Exception:
                            self._emit(
                                self._error_frame(Failure(), envelope.Message(type_, id_, data))
                            )
                            continue
                        if type(result) in _PLAIN_RESULTS:
                            reply = (
                                {"type": type_, "id": id_, "data": result}
                                if id_ is not None
                                else {
                                    "type": type_,
                                    "data": result,
                                }
                            )
                            try:
                                body = dumps(reply)
                            except Exception:
                                self._emit(
                                    self._error_frame(Failure(), envelope.Message(type_, id_, data))
                                )
                                continue
                            if self._pending:  # re-read: a handler in this read may have gone async
                                self._emit(body)
                            else:
                                batch.append(header(len(body)) + body)
                        else:
                            self._handle_result(envelope.Message(type_, id_, data), result)
                    self.frames_in += answered
            else:
                for item in items:
                    self._handle_item(item)
            if error is not None:
                self._emit(encode_error(error.code, str(error)))
        finally:
            self._batch = None
        if batch:
            self._write_many(batch)
        if error is not None:
            self.close(error.code, str(error))

    def _overloaded(self) -> None:
        """Unfinished frames of all clients hold more than allowed: this read tipped it."""
        limit = self.factory.config.limits.max_partial_frame_bytes
        self._release_partial()
        self.factory.count_error(envelope.OVERLOADED)
        self.write_frame(
            encode_error(
                envelope.OVERLOADED,
                f"the server holds its maximum of {limit} bytes of unfinished frames",
            ),
            encoded=False,
        )
        self.close(envelope.OVERLOADED, "limits.max_partial_frame_bytes reached")

    def _learn_certificate_identity(self) -> None:
        """After a TLS handshake: the client certificate's subject (with its issuer when
        ``tls.client_identity`` says so) is the connection's identity."""
        subject = peer_certificate_identity(
            self.transport, self.factory.config.tls.client_identity == "issuer_and_subject"
        )
        if subject is not None:
            self.identity = subject

    def _send_hello(self) -> None:
        hello = self.factory.hello_body(self.session_id, self._framing.name)
        self.write_frame(hello, encoded=False)

    # -- authentication (the gate in heartbeatd.server.auth calls these) --------------------

    def auth_succeeded(
        self,
        identity: str,
        reply: bytes,
        held: list[envelope.Message],
        digest: bytes = b"",
        then: Callable[[], None] | None = None,
    ) -> None:
        """The token was accepted: answer, open the fast path, then run what was held.

        ``then`` runs once the reply is written (a JWT's ``channels`` claim pushes
        ``subscribed``/``subscribe_refused``: a client reads them after the ``auth`` reply)."""
        self.identity = identity
        # Refused past limits.max_connections_per_identity: it stays behind the gate (it hears
        # no push) until it is gone.
        if not self.factory.client_identified(self):
            return
        if digest:  # re-checked when the tokens file is reloaded (ServerFactory.revalidate)
            self.factory.credentials[self.session_id] = (identity, digest)
        if self._auth is not None:
            self._auth = None
            self.factory.gated -= 1
        self._emit(reply)
        if then is not None:
            batch = self._batch
            if batch and not self._pending:  # inside dataReceived: the reply goes out first
                ready = batch[:]
                batch.clear()
                self._write_many(ready)
            then()
        for message in held:
            if not self.connected or self.close_reason is not None:
                return
            self._dispatch(message)

    def auth_refused(self, code: str, text: str, id: Any, reason: str) -> None:
        """Answer a typed error, send it with any replies before it, then close."""
        if not self.connected or self.close_reason is not None:
            return
        self.factory.count_error(code)
        self._emit(encode_error(code, text, id))
        batch = self._batch
        if batch:  # inside dataReceived: flush now, since close() comes before its write
            ready = batch[:]
            batch.clear()
            self._write_many(ready)
        self.close(reason, text)

    @property
    def peer(self) -> str:
        """``host:port`` of the client, formatted when asked for (logs, admin, closes).

        Not kept: eager formatting cost every connection a string it mostly never uses
        (a debug log line's arguments are evaluated even when debug is off).
        """
        peer = self._peer
        if peer is not None:
            return peer
        transport = self.transport
        return format_address(transport.getPeer()) if transport is not None else ""

    @peer.setter
    def peer(self, value: str) -> None:
        self._peer = value

    @property
    def session(self) -> Session:
        """The handlers' view of this connection (created on first use)."""
        session = self._session
        if session is None:
            session = self._session = Session(self)
        return session

    # -- dispatch --------------------------------------------------------------------------

    def _handle_item(self, item: bytes | object) -> None:
        if self._resumable is not None and type(item) is bytes:
            self._resumable.receive(item)  # numbered requests, acks (server/resumable.py)
            return
        if item is HEARTBEAT:
            # A bare token (seed framing) is a ping: answer in kind, as ping gets pong.
            self._answer_token()
            return
        self.frames_in += 1
        try:
            message = decode_message(item, self._bare_type, self._max_depth)  # type: ignore[arg-type]
        except ProtocolError as e:
            self.factory.count_error(e.code)
            self._emit(encode_error(e.code, e.message, e.id))
            return
        self._dispatch(message)

    def _fast_failed(self, type_: str, id_: str | int | None, data: Any) -> None:
        """The C hot path's handler (or its reply's encoding) raised: the exception being
        handled is that one, as in the Python loop's ``except Exception:``."""
        self._emit(self._error_frame(Failure(), envelope.Message(type_, id_, data)))

    def _fast_result(self, type_: str, id_: str | int | None, data: Any, result: Any) -> None:
        """The C hot path's handler returned something other than a plain JSON value."""
        self._handle_result(envelope.Message(type_, id_, data), result)

    #: Most characters of a client's ``error`` frame a debug log line shows.
    MAX_LOGGED_ERROR = 200

    def _client_error(self, message: envelope.Message) -> None:
        """A client reported an error: a debug line, rate-limited, bounded, and without the
        payload before auth (a stranger may not write into our log)."""
        if not self.factory.log_allowed("client_error"):
            return
        if self._auth is not None:
            shown = "(not shown before auth)"
        else:
            shown = repr(message.data)
            if len(shown) > self.MAX_LOGGED_ERROR:
                shown = shown[: self.MAX_LOGGED_ERROR] + f"... ({len(shown)} chars)"
        log.debug(
            "Client {session} ({peer}) reported an error: {data}",
            session=self.session_id,
            peer=self.peer,
            data=shown,
        )

    def _dispatch(self, message: envelope.Message) -> None:
        if self._auth is not None and self._auth.intercept(message):
            return  # unauthenticated: the gate answered, held or refused it
        type_ = message.type
        if type_ == _PONG:
            self._heartbeat_answered()
            return
        if type_ == _ERROR:
            self._client_error(message)
            return
        handler = self.factory.registry.get(type_)
        if handler is None:
            sessions = getattr(self.factory, "sessions", None)
            if sessions is not None and sessions.control(self, message):
                return  # session, resume, ack, session_end (server/resumable.py)
            self.factory.count_error(envelope.UNKNOWN_TYPE)
            self._emit(
                encode_error(envelope.UNKNOWN_TYPE, f"no handler for type {type_!r}", message.id)
            )
            return
        try:
            result = handler(Request(type_, message.id, message.data, self))
        except Exception:
            self._emit(self._error_frame(Failure(), message))
            return
        self._handle_result(message, result)

    def _handle_result(self, message: envelope.Message, result: Any) -> None:
        """Reply with a handler's result: a value, `Reply`, `NO_REPLY`, Deferred or coroutine."""
        if iscoroutine(result):
            result = Deferred.fromCoroutine(result)
        if isinstance(result, Deferred):
            slot = _Slot()
            if self._resumable is not None:
                slot.seq = self._resumable.cseq
            if self._pending is None:
                self._pending = deque()
            self._pending.append(slot)
            result.addCallbacks(
                self._async_reply,
                self._async_error,
                callbackArgs=(slot, message),
                errbackArgs=(slot, message),
            )
            if len(self._pending) >= self.factory.config.limits.max_pending_requests:
                self._pause_reading()
        else:
            frame = self._reply_frame(message, result)
            if frame is not None:
                self._emit(frame)

    def _answer_token(self) -> None:
        token = self._framing.heartbeat_token
        assert token is not None
        if self._heartbeat_answered():
            return
        if self._batch is not None:
            self._batch.append(token)
        else:
            self.write_frame(token)

    def _heartbeat_answered(self) -> bool:
        """Record the round trip if our heartbeat was outstanding; False if it was not."""
        if self.ping_sent_at is None:
            return False
        self.last_rtt = self.factory.clock.seconds() - self.ping_sent_at
        self.ping_sent_at = None
        self.factory.record_rtt(self.last_rtt)
        return True

    # -- building replies -------------------------------------------------------------------

    def _reply_frame(self, message: envelope.Message, result: Any) -> bytes | None:
        if result is NO_REPLY:
            return None
        try:
            if message.bare:  # a seed peer sent a plain value: answer with a plain value
                data = result.data if isinstance(result, Reply) else result
                return envelope.encode_json(None if data is envelope.OMIT else data)
            if isinstance(result, Reply):
                return encode_message(result.type, result.data, message.id)
            return encode_message(message.type, result, message.id)
        except Exception:
            return self._error_frame(Failure(), message)

    def _error_frame(self, failure: Failure, message: envelope.Message) -> bytes:
        if failure.check(HandlerError):
            error: HandlerError = failure.value  # type: ignore[assignment]
            self.factory.count_error(error.code)
            return encode_error(error.code, error.message, message.id, error.retry_after)
        self.factory.count_error(envelope.INTERNAL_ERROR)
        if self.factory.log_allowed("handler_failed"):
            log.failure(
                "Handler for {type!r} failed (client {session}, {peer})",
                failure,
                type=message.type,
                session=self.session_id,
                peer=self.peer,
            )
        return encode_error(envelope.INTERNAL_ERROR, "the handler failed", message.id)

    def _async_reply(self, result: Any, slot: _Slot, message: envelope.Message) -> None:
        frame = self._reply_frame(message, result)
        slot.frame = frame if frame is not None else b""
        self._flush_pending()

    def _async_error(self, failure: Failure, slot: _Slot, message: envelope.Message) -> None:
        slot.frame = self._error_frame(failure, message)
        self._flush_pending()

    def _flush_pending(self) -> None:
        """Send every finished reply at the head of the queue, keeping request order."""
        if self._resumable is not None:
            self._resumable.flush()  # the queue is the session's (and survives the connection)
            return
        if not self.connected:
            return
        pending = self._pending
        if pending is None:
            return
        ready: list[bytes] = []
        encode = self._framing.encode
        while pending and pending[0].frame is not None:
            frame = pending.popleft().frame
            if frame:
                ready.append(encode(frame))
        if self._reading_paused and len(pending) < self.factory.config.limits.max_pending_requests:
            self._resume_reading()
        if not ready:
            return
        if self._batch is not None:
            self._batch.extend(ready)
        else:
            self._write_many(ready)

    def _emit(self, body: bytes) -> None:
        """Queue a reply body behind any reply still being computed."""
        if self._resumable is not None:
            self._resumable.emit(body)  # numbered when it answers a numbered request
            return
        if self._pending:
            self._pending.append(_Slot(body))
        else:
            self._write_body(body)

    def _write_body(self, body: bytes) -> None:
        """Frame ``body`` and write it: into the open read's batch (all replies of one read
        go out in one write), or now."""
        framed = self._framing.encode(body)
        batch = self._batch
        if batch is not None:
            batch.append(framed)
        else:
            self._write_many([framed])

    # -- writing -----------------------------------------------------------------------------

    def send(self, type: str, data: Any = envelope.OMIT) -> None:
        """Push a message to this client, outside any request/reply order."""
        self.write_frame(encode_message(type, data), encoded=False)

    def _session_push(self, body: bytes) -> bool:
        """On a resumable session, a push that gets a seq goes through the session (which
        writes it to whichever connection carries it now); True if it did."""
        if numbered_body(body):
            self._resumable.push(body)
            return True
        return False

    def write_frame(self, frame: bytes, *, encoded: bool = True) -> None:
        """Write one frame (``encoded=False``: a body still to be framed)."""
        if self._resumable is not None and not encoded and self._session_push(frame):
            return
        if not self.connected:
            return
        self._write_many([frame if encoded else self._framing.encode(frame)])

    def _write_many(self, frames: list[bytes]) -> None:
        if self._write_paused and self._slow_consumer():
            return
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        size = len(data)
        if self._direct_write:
            write_direct(self.transport, data)
        else:
            self.transport.write(data)
        self.frames_out += len(frames)
        self.bytes_out += size
        if self._write_paused:
            self._written_while_paused += size

    def _slow_consumer(self) -> bool:
        """Close a client whose unread backlog passed the limit; True if it was closed.

        Checked *before* a write while the transport says its buffer is full, against the
        bytes still unsent (not the frame about to go), so one frame larger than the limit
        reaches a client that reads, and a client that does not read holds at most the
        limit plus one frame.
        """
        backlog = unsent_bytes(self.transport)
        if backlog is None:
            backlog = self._written_while_paused
        limit = self.factory.config.limits.max_outbound_buffer_bytes
        if backlog <= limit or not self.connected:
            return False
        self.evict(
            "slow_consumer",
            f"{backlog} bytes are waiting for the client to read them "
            f"(limits.max_outbound_buffer_bytes is {limit})",
        )
        return True

    # -- IPushProducer: the transport tells us when its write buffer is full --------------

    def pauseProducing(self) -> None:
        # Twisted calls this on every write while its buffer is full: only the first call
        # of a paused period starts the count.
        if not self._write_paused:
            self._write_paused = True
            self._written_while_paused = 0
        self._pause_reading()

    def resumeProducing(self) -> None:
        self._write_paused = False
        self._written_while_paused = 0
        if len(self._pending or ()) < self.factory.config.limits.max_pending_requests:
            self._resume_reading()

    def stopProducing(self) -> None:
        pass  # connectionLost follows and does the cleanup

    def _pause_reading(self) -> None:
        # Never during a TLS handshake: the TLS layer pauses us while it cannot write, and it
        # cannot write until it has read the peer's handshake.
        if (
            not self._reading_paused
            and self.connected
            and self.close_reason is None
            and not self._handshaking
        ):
            self._reading_paused = True
            self.transport.pauseProducing()

    def _resume_reading(self) -> None:
        if (
            self._reading_paused
            and not self._write_paused
            and self.connected
            and self.close_reason is None
            and (self._resumable is None or self._resumable.may_read())
        ):
            self._reading_paused = False
            self.transport.resumeProducing()

    # -- closing -----------------------------------------------------------------------------

    def close(self, reason: str, detail: str = "", *, quiet: bool = False) -> None:
        """Flush what is queued, then close politely, recording why (``quiet``: already
        logged by the caller)."""
        if not self.connected or self.close_reason is not None:
            return
        self.close_reason = reason
        self.factory.client_closing(self, reason, detail, quiet=quiet)
        self._unregister()
        self._lose_connection(reason)
        self._close_deadline()

    def evict(self, reason: str, detail: str = "") -> None:
        """Drop the connection at once: a dead or hostile peer never acknowledges a close."""
        if not self.connected or self.close_reason == reason:
            return
        self.close_reason = reason
        self.factory.client_closing(self, reason, detail)
        self._unregister()
        self.transport.abortConnection()

    def _unregister(self) -> None:
        # A paused streaming producer would keep a closing TCP transport from finishing.
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()

    def _lose_connection(self, reason: str) -> None:
        """End the transport politely (a message transport says goodbye its own way)."""
        self.transport.loseConnection()

    def _close_deadline(self) -> None:
        """Bound a polite close: ``loseConnection`` waits until the peer has read what is
        queued, so a peer that stops reading would keep its slot for ever.  After
        ``shutdown.close_timeout`` seconds the connection is aborted (`_close_overdue`)."""
        if self._close_timer is None and self.transport is not None:
            factory = self.factory
            self._close_timer = factory.clock.callLater(
                factory.config.shutdown.close_timeout, self._close_overdue
            )

    def _cancel_close_deadline(self) -> None:
        timer, self._close_timer = self._close_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _close_overdue(self) -> None:
        self._close_timer = None
        factory = self.factory
        factory.close_timeouts += 1
        if factory.log_allowed("close_timeout"):
            log.warn(
                "Aborting {peer}: its close ({reason}) did not finish within {timeout:g}s "
                "(it does not read; shutdown.close_timeout)",
                peer=self.peer,
                reason=self.close_reason,
                timeout=factory.config.shutdown.close_timeout,
            )
        self.transport.abortConnection()

    def send_heartbeat(self, frame: SharedFrame | bytes, now: float) -> None:
        """Called by the heartbeat sweep for a quiet client (``frame``: the sweep's ping)."""
        self.pings_unanswered += 1
        if self.ping_sent_at is None:
            self.ping_sent_at = now
        if type(frame) is bytes:
            self.write_frame(frame)
        else:
            self.write_shared(frame)  # type: ignore[arg-type]

    def write_shared(self, frame: SharedFrame) -> None:
        """Write a message many connections get (broadcast, publication, ping), framed once
        per framing rather than once per connection."""
        if self._resumable is not None and not frame.ping and self._session_push(frame.body):
            return
        if not self.connected:
            return
        data = frame.framed(self._framing)
        if self._write_paused or not self._plain_writes:
            self._write_many([data])
            return
        # `_write_many`'s steps for one frame, inlined: a fan-out makes one of these calls
        # per delivery (docs/benchmarks.md, "Fan-out: where the time goes").
        if self._direct_write:
            write_direct(self.transport, data)
        else:
            self.transport.write(data)
        self.frames_out += 1
        size = len(data)
        self.bytes_out += size
        if self._write_paused:  # this write filled the transport's buffer
            self._written_while_paused += size

    def write_run(self, run: SharedRun) -> None:
        """Write several messages many connections get, in order, with one write (a fan-out's
        publications queued for the same subscribers: one ``send()`` instead of one each).

        On a resumable session each is numbered and kept on its own, in order.  The outbound
        limit decides exactly as it would for one write per message: the run goes in one
        write only when the transport has not asked us to pause and the bytes not yet sent
        plus the run stay within ``limits.max_outbound_buffer_bytes`` (no message of it could
        then have found the limit passed); otherwise each is written, and checked, alone.
        """
        frames = run.frames
        if self._resumable is not None or len(frames) == 1:
            for frame in frames:
                self.write_shared(frame)
            return
        if not self.connected:
            return
        framing = self._framing
        data = run.framed(framing)
        if not self._write_paused:
            backlog = unsent_bytes(self.transport) or 0
            if backlog + len(data) <= self.factory.config.limits.max_outbound_buffer_bytes:
                self._write_many([data])
                self.frames_out += len(frames) - 1
                return
        for frame in frames:
            self._write_many([frame.framed(framing)])

"""The client side of one connection: hello, requests matched by id, pushes, and heartbeats.

Uses the same framing and envelope code as the server.  Every request ends: it fires with the
reply's ``data`` or fails with a typed `ClientError` (`ServerError` for an error frame,
`RequestTimeout`, `ConnectionClosed`).  When the connection drops, every pending request fails
at once.  The heartbeat takes its interval and timeout from the server's hello: the client
answers pings, pings a quiet server, and aborts a server silent past the timeout, so a
half-open connection is found from this side too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from inspect import iscoroutine
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from heartbeatd._direct_write import direct_writer
from heartbeatd._logging import get_logger
from heartbeatd.client.channels import Subscription, channels_of
from heartbeatd.client.errors import (
    ClientError,
    ClientStopped,
    ConnectionClosed,
    ConnectionFailed,
    HandshakeTimeout,
    RequestTimeout,
    ServerError,
)
from heartbeatd.client.tls import ClientTLS, wrap_client_endpoint
from heartbeatd.wire import get_framing
from heartbeatd.wire.envelope import (
    OMIT,
    ProtocolError,
    as_message,
    decode_json,
    decode_message,
    encode_json,
    encode_message,
)
from heartbeatd.wire.framing import HEARTBEAT

if TYPE_CHECKING:
    from heartbeatd.client.session import ClientSession

__all__ = ["ClientConnection", "connect"]

log = get_logger(__name__)

#: ``get_token()``: a token, or a Deferred or coroutine of one (called on connect and refresh).
TokenSource = Callable[[], Any]

DEFAULT_REQUEST_TIMEOUT = 10.0
DEFAULT_HELLO_TIMEOUT = 10.0
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024


PushHandler = Callable[[Any, "ClientConnection"], object]


#: The longest heartbeat interval (and timeout) taken from a hello: a day.
MAX_HEARTBEAT_INTERVAL = 86400.0


class ClientConnection(Protocol):
    """One connection to a heartbeatd server; a Twisted protocol and the user's handle."""

    def __init__(
        self,
        clock: IReactorTime,
        framing: str = "int32",
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        hello_timeout: float = DEFAULT_HELLO_TIMEOUT,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        expect_hello: bool | None = None,
        heartbeat_interval: float = 10.0,
        heartbeat_timeout: float = 30.0,
        token: str | None = None,
        min_heartbeat_interval: float = 1.0,
        get_token: TokenSource | None = None,
        on_push: Callable[[str, Any, ClientConnection], object] | None = None,
        session: ClientSession | None = None,
    ) -> None:
        self.clock = clock
        #: A resumable session (`heartbeatd.client.session`) to start or resume after the
        #: handshake; ready waits for it.  ``_session`` is set while it is attached here.
        self._session_to_open = session
        self._session: ClientSession | None = None
        #: "started", "resumed", "taken_over", "failed", or None (no session here).
        self.session_outcome: str | None = None
        #: Called for a token (a string, or a Deferred or coroutine of one) when there is no
        #: ``token`` to log in with, and whenever the server asks for a ``refresh`` (a JWT
        #: about to expire).  Never logged.
        self.get_token = get_token
        #: The shortest heartbeat interval taken from a server's hello (a server saying 1e-6
        #: would otherwise make us send pings as fast as the socket takes them).
        self.min_heartbeat_interval = min_heartbeat_interval
        #: Sent as ``{"type": "auth", "data": {"token": ...}}`` after the hello; ready waits
        #: for the server's answer.  Never logged.
        self._token = token
        #: Who the server says we are, once authenticated.
        self.identity: str | None = None
        self.framing = get_framing(framing)
        #: A server of the seed tutorial's kind sends no hello: in seed framing, do not wait.
        self.expect_hello = (
            not self.framing.wraps_bare_values if expect_hello is None else expect_hello
        )
        self._default_heartbeat = (heartbeat_interval, heartbeat_timeout)
        self._bare_type = "message" if self.framing.wraps_bare_values else None
        self._bare_pending: deque[tuple[Deferred[Any], Any]] = deque()
        self.request_timeout = request_timeout
        self.hello_timeout = hello_timeout
        self.max_frame_bytes = max_frame_bytes
        #: The server's hello ``data`` once received.
        self.hello: dict[str, Any] | None = None
        self.connected = False
        self.closed = False
        #: True once the server sent goaway: finish what is in flight, start nothing new.
        self.draining = False
        self.goaway: dict[str, Any] | None = None
        self.close_reason: Failure | None = None
        self.last_received = 0.0
        self.last_rtt: float | None = None
        self._ready: Deferred[ClientConnection] = Deferred()
        self._ready_timer: Any = None
        self._pending: dict[int, tuple[Deferred[Any], Any]] = {}
        self._next_id = 0
        self._push_handlers: dict[str, list[PushHandler]] = {}
        #: ``on_push`` is registered before any byte arrives, so it also hears the pushes a
        #: server sends right after the auth reply (a JWT's ``channels`` claim), before
        #: ``connect`` has resolved.
        self._any_handlers: list[Callable[[str, Any, ClientConnection], object]] = (
            [] if on_push is None else [on_push]
        )
        self._close_callbacks: list[Callable[[ClientConnection, Failure], object]] = []
        self._goaway_callbacks: list[Callable[[ClientConnection, dict[str, Any]], object]] = []
        self._idle_waiters: list[Deferred[None]] = []
        self._heartbeat: LoopingCall | None = None
        self._ping_sent_at: float | None = None
        self._interval = 0.0
        self._timeout = 0.0

    # -- lifecycle -------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        self.last_received = self.clock.seconds()
        self._decoder = self.framing.decoder(self.max_frame_bytes)
        self._send_now = direct_writer(self.transport) or self.transport.write
        if self.expect_hello:
            self._ready_timer = self.clock.callLater(self.hello_timeout, self._hello_timed_out)
        else:
            self._start_heartbeat(*self._default_heartbeat)
            self._ready.callback(self)

    def when_ready(self) -> Deferred[ClientConnection]:
        """Fires with this connection once the server's hello arrived."""
        if self._ready.called and not self.closed:
            d: Deferred[ClientConnection] = Deferred()
            d.callback(self)
            return d
        if self.closed:
            return fail(ConnectionClosed("the connection closed before the server's hello"))
        waiter: Deferred[ClientConnection] = Deferred()
        self._ready.addBoth(lambda result: (waiter.callback(result), result)[1])
        return waiter

    def _hello_timed_out(self) -> None:
        self._ready_timer = None
        self.abort(HandshakeTimeout(f"no hello from the server within {self.hello_timeout:g}s"))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected = False
        self.closed = True
        if self.close_reason is None:
            self.close_reason = reason
        why = self.close_reason
        if self._ready_timer is not None and self._ready_timer.active():
            self._ready_timer.cancel()
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        if self._session is not None:  # its requests wait for the next connection
            self._session.detach(self)
        message = _describe(why)
        # Closed by a stopping ReconnectingClient: its requests say so (still ConnectionClosed).
        lost = ClientStopped if why is not None and why.check(ClientStopped) else ConnectionClosed
        pending, self._pending = self._pending, {}
        bare, self._bare_pending = self._bare_pending, deque()
        for d, timer in [*pending.values(), *bare]:
            if timer.active():
                timer.cancel()
            d.errback(lost(f"connection lost before the reply: {message}"))
        if not self._ready.called:
            self._ready.errback(_as_client_failure(why))
            # Its waiters have had it; unobserved, it would log "Unhandled error" when freed.
            self._ready.addErrback(lambda _: None)
        self._maybe_idle()
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            _call_safely(callback, self, why)

    def abort(self, error: Exception) -> None:
        """Drop the connection at once, recording ``error`` as the reason."""
        if self.close_reason is None:
            self.close_reason = Failure(error)
        if self.transport is not None and self.connected:
            self.transport.abortConnection()

    def close(self) -> None:
        """Close politely; pending requests fail once the connection is gone (a session's
        survive it, and it acknowledges what it received first)."""
        if self._session is not None:
            self._session.flush_ack()
        if self.transport is not None and self.connected:
            self.transport.loseConnection()

    @property
    def usable(self) -> bool:
        """Connected, past the handshake, and not asked to go away."""
        return self.connected and self._ready.called and not self.draining

    @property
    def pending_requests(self) -> int:
        return len(self._pending) + len(self._bare_pending)

    # -- callbacks -------------------------------------------------------------------------

    def on(self, type: str, handler: PushHandler) -> None:
        """Call ``handler(data, connection)`` for each pushed message of ``type``."""
        self._push_handlers.setdefault(type, []).append(handler)

    def on_any(self, handler: Callable[[str, Any, ClientConnection], object]) -> None:
        """Call ``handler(type, data, connection)`` for every pushed message."""
        self._any_handlers.append(handler)

    def on_close(self, callback: Callable[[ClientConnection, Failure], object]) -> None:
        if self.closed:
            _call_safely(callback, self, self.close_reason)
        else:
            self._close_callbacks.append(callback)

    def on_goaway(self, callback: Callable[[ClientConnection, dict[str, Any]], object]) -> None:
        self._goaway_callbacks.append(callback)

    def subscribe(
        self, channel: str, on_publication: Callable[..., object], **options: Any
    ) -> Deferred[Subscription]:
        """Subscribe to a channel: ``on_publication(data, offset, subscription)`` per
        publication; options: ``on_not_recovered``, ``since``, ``join_leave``, ``on_presence``
        (see `heartbeatd.client.channels`)."""
        return channels_of(self).subscribe(channel, on_publication, **options)

    def unsubscribe(self, channel: str) -> Deferred[Any]:
        return channels_of(self).unsubscribe(channel)

    # -- sending ---------------------------------------------------------------------------

    def request(self, type: str, data: Any = OMIT, timeout: float | None = None) -> Deferred[Any]:
        """Send a request; fires with the reply's data or fails with a `ClientError`.

        On a connection with a resumable session the request is numbered and belongs to the
        session: it survives this connection until its own timeout."""
        if self._session is not None:
            seconds = self.request_timeout if timeout is None else timeout
            return self._session.request(type, data, seconds)
        return self._plain_request(type, data, timeout)

    def _plain_request(
        self, type: str, data: Any = OMIT, timeout: float | None = None
    ) -> Deferred[Any]:
        """A request of this connection only (auth, refresh, session, resume): unnumbered."""
        if not self.connected:
            return fail(ConnectionClosed("the connection is closed"))
        self._next_id += 1
        request_id = self._next_id
        seconds = self.request_timeout if timeout is None else timeout

        def cancel(d: Deferred[Any]) -> None:
            entry = self._pending.pop(request_id, None)
            if entry is not None and entry[1].active():
                entry[1].cancel()
            self._maybe_idle()

        d: Deferred[Any] = Deferred(cancel)
        timer = self.clock.callLater(seconds, self._timed_out, request_id, type, seconds)
        self._pending[request_id] = (d, timer)
        self._write(encode_message(type, data, request_id))
        return d

    def request_value(self, value: Any, timeout: float | None = None) -> Deferred[Any]:
        """Seed framing: send a bare JSON value; the next bare value received is its reply.

        A server of the seed tutorial's kind has no ids, so replies are matched in order.
        """
        if not self.connected:
            return fail(ConnectionClosed("the connection is closed"))
        seconds = self.request_timeout if timeout is None else timeout
        d: Deferred[Any] = Deferred()
        entry: tuple[Deferred[Any], Any] = (d, None)

        def timed_out() -> None:
            if entry in self._bare_pending:
                self._bare_pending.remove(entry)
                d.errback(RequestTimeout(f"no reply to a bare value within {seconds:g}s"))
                self._maybe_idle()

        entry = (d, self.clock.callLater(seconds, timed_out))
        self._bare_pending.append(entry)
        self._write(encode_json(value))
        return d

    def send(self, type: str, data: Any = OMIT) -> None:
        """Fire and forget (no id: any reply is ignored)."""
        if not self.connected:
            raise ConnectionClosed("the connection is closed")
        self._write(encode_message(type, data))

    def _write(self, body: bytes) -> None:
        self._send_now(self.framing.encode(body))

    def _timed_out(self, request_id: int, type: str, seconds: float) -> None:
        entry = self._pending.pop(request_id, None)
        if entry is not None:
            entry[0].errback(RequestTimeout(f"no reply to {type!r} within {seconds:g}s"))
        self._maybe_idle()

    def when_idle(self) -> Deferred[None]:
        """Fires once no request is waiting for its reply (at once if none is)."""
        d: Deferred[None] = Deferred()
        if self._pending:
            self._idle_waiters.append(d)
        else:
            d.callback(None)
        return d

    def _maybe_idle(self) -> None:
        if not self._pending and not self._bare_pending and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    # -- receiving -------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.last_received = self.clock.seconds()
        decoder = self._decoder
        for item in decoder.feed(data):
            if item is HEARTBEAT:
                self._token_received()
                continue
            session = self._session
            if session is not None:
                self._session_message(session, item)  # type: ignore[arg-type]
                if not self.connected:
                    return
                continue
            try:
                message = decode_message(item, self._bare_type)  # type: ignore[arg-type]
            except ProtocolError as e:
                log.warn("Ignoring a malformed frame from the server: {error}", error=e)
                continue
            self._message_received(message)
            if not self.connected:
                return
        if decoder.error is not None:
            self.abort(ConnectionClosed(f"server sent an unframeable stream: {decoder.error}"))

    def _session_message(self, session: ClientSession, body: bytes) -> None:
        """A frame while a session is attached: numbered messages go to the session."""
        try:
            value = decode_json(body)
            message = as_message(value)
        except ProtocolError as e:
            log.warn("Ignoring a malformed frame from the server: {error}", error=e)
            return
        if not session.received(self, message, value.get("seq"), value.get("ack")):
            self._message_received(message)

    def _heartbeat_answered(self) -> bool:
        """Record the round trip if our heartbeat was outstanding; False if it was not."""
        if self._ping_sent_at is None:
            return False
        self.last_rtt = self.clock.seconds() - self._ping_sent_at
        self._ping_sent_at = None
        return True

    def _token_received(self) -> None:
        if self._heartbeat_answered():  # the answer to our own token: not answered again
            return
        if self.framing.heartbeat_token is not None:
            self.transport.write(self.framing.heartbeat_token)

    def _message_received(self, message: Any) -> None:
        type_, request_id = message.type, message.id
        if message.bare:
            if self._bare_pending:
                d, timer = self._bare_pending.popleft()
                timer.cancel()
                d.callback(message.data)
                self._maybe_idle()
            else:
                self._dispatch_push(type_, message.data)
            return
        if type_ == "hello" and isinstance(message.data, dict) and not self.expect_hello:
            self._hello_received(message.data)  # a heartbeatd server in seed framing
            return
        if self.hello is None and self.expect_hello:
            if type_ == "hello" and isinstance(message.data, dict):
                self._hello_received(message.data)
            elif type_ == "error":  # refused before the hello (e.g. too_many_connections)
                self.abort(ServerError.from_wire(message.data))
            return
        if request_id is not None and request_id in self._pending:
            d, timer = self._pending.pop(request_id)
            if timer.active():
                timer.cancel()
            if type_ == "error":
                d.errback(ServerError.from_wire(message.data))
            else:
                d.callback(message.data)
            self._maybe_idle()
            return
        if type_ == "ping":
            self._write(encode_message("pong", id=request_id))
        elif type_ == "pong":
            self._heartbeat_answered()
        elif type_ == "goaway":
            self._goaway_received(message.data if isinstance(message.data, dict) else {})
        else:
            if type_ == "refresh" and request_id is None:
                self._refresh()
            self._dispatch_push(type_, message.data)

    def _dispatch_push(self, type_: str, data: Any) -> None:
        for handler in self._push_handlers.get(type_, ()):
            _call_safely(handler, data, self)
        for any_handler in self._any_handlers:
            _call_safely(any_handler, type_, data, self)

    def _hello_received(self, hello: dict[str, Any]) -> None:
        self.hello = hello
        if self._ready_timer is not None and self._ready_timer.active():
            self._ready_timer.cancel()
        self._ready_timer = None
        heartbeat = hello.get("heartbeat") or {}
        interval = heartbeat.get("interval")
        timeout = heartbeat.get("timeout")
        if isinstance(interval, (int, float)) and 0 < interval < MAX_HEARTBEAT_INTERVAL:
            timeout = float(timeout) if isinstance(timeout, (int, float)) else interval * 3
            if interval < self.min_heartbeat_interval:  # clamped, and the timeout with it
                interval = self.min_heartbeat_interval
                timeout = max(timeout, interval * 3)
            self._start_heartbeat(float(interval), min(timeout, MAX_HEARTBEAT_INTERVAL))
        if self._token is not None and not self._ready.called:
            self._authenticate(self._token)
            return
        if self.get_token is not None and not self._ready.called:
            self._fetch_token().addCallbacks(self._authenticate, self._token_unavailable)
            return
        if hello.get("auth") == "required" and not self._ready.called:
            self._fail_ready(Failure(ServerError("unauthenticated", "the server requires a token")))
            self.close()
            return
        if not self._ready.called:
            self._handshake_complete()

    def _handshake_complete(self) -> None:
        """Hello (and auth) done: open the session if there is one, then we are ready."""
        session = self._session_to_open
        if session is None:
            self._ready.callback(self)
            return

        def opened(outcome: str | None) -> None:
            self.session_outcome = outcome
            if outcome == "failed":
                return  # aborted: ready fails with the reason when the connection is gone
            if not self._ready.called and not self.closed:
                self._ready.callback(self)

        session.open(self).addCallback(opened)

    def _fail_ready(self, failure: Failure) -> None:
        self._ready.errback(failure)
        self._ready.addErrback(lambda _: None)  # its waiters have it; do not log it as unhandled

    def _authenticate(self, token: str) -> None:
        """Send the token; ready fires once the server accepted it, or fails with its error."""

        def accepted(data: Any) -> None:
            if isinstance(data, dict) and isinstance(data.get("identity"), str):
                self.identity = data["identity"]
            if not self._ready.called:
                self._handshake_complete()

        def refused(failure: Failure) -> None:
            if not self._ready.called:
                self._fail_ready(failure)

        self._plain_request("auth", {"token": token}, timeout=self.hello_timeout).addCallbacks(
            accepted, refused
        )

    def _fetch_token(self) -> Deferred[str]:
        """Ask ``get_token`` for a token; fails when it raises or gives no string."""
        from twisted.internet.defer import maybeDeferred

        assert self.get_token is not None
        d = maybeDeferred(self.get_token)

        def checked(token: Any) -> Any:
            if iscoroutine(token):
                return Deferred.fromCoroutine(token).addCallback(checked)
            if not isinstance(token, str) or not token:
                raise ValueError(f"get_token returned {type(token).__name__}, not a token")
            return token

        return d.addCallback(checked)

    def _token_unavailable(self, failure: Failure) -> None:
        log.warn("get_token failed: {why}", why=failure.getErrorMessage())
        if not self._ready.called:
            self._fail_ready(failure)
            self.close()

    def _refresh(self) -> None:
        """The server's token is about to expire: send a new one from ``get_token``."""
        if self.get_token is None:
            log.warn("The server asked for a new token (refresh); no get_token was given")
            return

        def send(token: str) -> Deferred[Any]:
            return self._plain_request("refresh", {"token": token}, timeout=self.hello_timeout)

        def failed(failure: Failure) -> None:
            log.warn("Refreshing the token failed: {why}", why=failure.getErrorMessage())

        self._fetch_token().addCallback(send).addErrback(failed)

    def _start_heartbeat(self, interval: float, timeout: float) -> None:
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self._interval = interval
        self._timeout = timeout
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = self.clock
        self._heartbeat.start(interval, now=False)

    def _goaway_received(self, data: dict[str, Any]) -> None:
        self.draining = True
        self.goaway = data
        for callback in list(self._goaway_callbacks):
            _call_safely(callback, self, data)

    # -- heartbeat ---------------------------------------------------------------------------

    def _beat(self) -> None:
        silent = self.clock.seconds() - self.last_received
        if silent > self._timeout:
            self.abort(
                ConnectionClosed(f"server silent for {silent:.1f}s (timeout {self._timeout:g}s)")
            )
        elif silent >= self._interval:
            if self._ping_sent_at is None:
                self._ping_sent_at = self.clock.seconds()
            token = self.framing.heartbeat_token
            self.transport.write(token if token is not None else self.framing.encode(_PING))


_PING = encode_message("ping")


def _describe(failure: Failure | None) -> str:
    if failure is None:
        return "closed"
    return failure.getErrorMessage() or type(failure.value).__name__


def _as_client_failure(failure: Failure | None) -> Failure:
    if failure is not None and isinstance(failure.value, ClientError):
        return failure
    return Failure(ConnectionClosed(f"connection lost during the handshake: {_describe(failure)}"))


def _call_safely(fn: Callable[..., object], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.failure("A client callback failed")


def connect(
    reactor: Any,
    endpoint: str | IStreamClientEndpoint,
    *,
    framing: str = "int32",
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT,
    tls: ClientTLS | None = None,
    **options: Any,
) -> Deferred[ClientConnection]:
    """Connect to ``endpoint`` (e.g. ``tcp:host=127.0.0.1:port=9000``); fire when ready.

    Ready means after the server's hello (and, with ``token=``, its acceptance of the token),
    or at once in seed framing, whose servers send none.  ``tls`` puts TLS under the
    connection (`ClientTLS`).  ``options`` go to `ClientConnection` (``token``,
    ``expect_hello``, ``heartbeat_interval``, ``on_push``: a ``handler(type, data,
    connection)`` that also hears pushes sent right after the auth reply...).
    """
    from twisted.internet.endpoints import clientFromString, connectProtocol

    if tls is not None:
        endpoint = wrap_client_endpoint(reactor, endpoint, tls)
    if isinstance(endpoint, str):
        endpoint = clientFromString(reactor, endpoint)
    connection = ClientConnection(reactor, framing, request_timeout, hello_timeout, **options)

    def wait_for_hello(_: object) -> Deferred[ClientConnection]:
        # Cancelling while the hello is awaited drops the connection, so a caller that gave
        # up (a pool's connect_timeout) leaves no socket behind.
        ready: Deferred[ClientConnection] = Deferred(
            lambda _: connection.abort(ConnectionClosed("connect cancelled"))
        )

        def relay(result: Any) -> None:
            if not ready.called:  # else the caller cancelled: the outcome is nobody's
                ready.callback(result)

        connection.when_ready().addBoth(relay)
        return ready

    return connectProtocol(endpoint, connection).addCallbacks(wait_for_hello, _typed)


def _typed(failure: Failure) -> Failure:
    """Twisted's connect errors (refused, DNS, timeout) become `ConnectionFailed`, with the
    original as ``__cause__``; our own errors and a caller's cancel pass through."""
    if failure.check(ClientError, CancelledError):
        return failure
    error = ConnectionFailed(failure.getErrorMessage() or type(failure.value).__name__)
    error.__cause__ = failure.value
    return Failure(error)

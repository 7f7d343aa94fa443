"""The WebSocket adapter: an HTTP upgrade, then RFC 6455 text messages into the connection core.

A connection first speaks HTTP/1.1 (parsed by h11 through wsproto's ``H11Handshake``); a
request head is bounded at 16 KiB here, before h11 sees it (h11 bounds only a head still
incomplete after a read).  The upgrade is refused with a short HTTP answer when the
path is not ``websocket.path`` (404), a browser's ``Origin`` is not in
``websocket.allowed_origins`` (403), the request is not an upgrade (426), it is malformed
(400), or the per-address limits refuse the client (429) once ``X-Forwarded-For`` from a
trusted proxy has named it.  The whole handshake, TLS included, must finish within
``websocket.handshake_timeout``; until it has, the connection is not a client (it is counted
against ``limits.max_connections`` through ``ServerFactory.handshaking``).

Then wsproto reads frames (masking, fragmentation, control frames, UTF-8 across fragments,
reserved bits and opcodes) and this adapter assembles text messages, bounded by
``max_frame_bytes`` before they are buffered (close 1009), counts unfinished ones in
``limits.max_partial_frame_bytes`` and hands complete bodies to `Connection._deliver`.
A binary message is closed with 1003, invalid UTF-8 with 1007, a protocol violation with
1002.  Replies and pushes are framed by `heartbeatd.wire.websocket` without wsproto (a
server's frames are unmasked: header plus body); control frames go through wsproto.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import re
import zlib
from collections import deque
from typing import Any

from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from wsproto import ConnectionType
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason
from wsproto.handshake import H11Handshake
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from heartbeatd._logging import get_logger
from heartbeatd.server.connection import Connection, format_address, is_tls
from heartbeatd.server.protocol import RefusedProtocol
from heartbeatd.wire import envelope
from heartbeatd.wire.framing import FrameTooLarge
from heartbeatd.wire.websocket import (
    CLOSE_CODES,
    DeflateFraming,
    WebSocketFraming,
    close_frame,
    read_text_frames,
)

__all__ = ["WebSocketProtocol", "WebSocketSite", "http_response", "shown"]

log = get_logger(__name__)

#: Why a server-side close happens -> its close code; anything else closes with 1000.
_CLOSE_CODE_BY_REASON = {
    "shutdown": CLOSE_CODES["shutdown"],
    envelope.OVERLOADED: CLOSE_CODES["overloaded"],
    "frame_too_large": CLOSE_CODES["frame_too_large"],
    "unauthenticated": CLOSE_CODES["policy"],
    "auth_failed": CLOSE_CODES["policy"],
    "auth_timeout": CLOSE_CODES["policy"],
}
#: wsproto's close codes for what it refuses -> our close reason (counters, logs).
_REASON_BY_CODE = {
    CloseReason.PROTOCOL_ERROR: "protocol_error",
    CloseReason.INVALID_FRAME_PAYLOAD_DATA: "invalid_utf8",
    CloseReason.MESSAGE_TOO_BIG: "frame_too_large",
}
_STATUS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    426: "Upgrade Required",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


#: The most bytes a handshake's request head may have (h11's own bound, which h11 applies
#: only to a head still incomplete after a read): ``400`` past it.
MAX_HEAD_BYTES = 16 * 1024
#: Where a request head ends (h11 accepts a bare LF as a line end).
_HEAD_END = re.compile(rb"\n\r?\n")

#: Most characters of a peer's text (path, origin, header) that a log line or answer shows.
MAX_SHOWN = 200


def shown(text: str | bytes, limit: int = MAX_SHOWN) -> str:
    """A peer's text as a log line or an answer may show it: ASCII, non-printable and
    non-ASCII characters escaped (``\\x85``, ``\\u2028``), at most ``limit`` characters of
    it, and its length when cut."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    out = text[:limit].encode("unicode_escape").decode("ascii")
    if len(text) > limit:
        out += f"... ({len(text)} characters)"
    return out


def http_response(status: int, text: str, extra: bytes = b"") -> bytes:
    """A short, complete HTTP/1.1 answer that ends the connection."""
    body = (text + "\n").encode("utf-8")
    return (
        (
            f"HTTP/1.1 {status} {_STATUS[status]}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
        ).encode("ascii")
        + extra
        + b"\r\n"
        + body
    )


def retry_after_header(wait: float | None) -> bytes:
    """``Retry-After`` for a refusal of the per-address accept rate (``wait`` seconds, whole
    seconds in HTTP: rounded up); nothing for the other refusals."""
    if wait is None:
        return b""
    return b"Retry-After: %d\r\n" % max(1, math.ceil(wait))


class BoundedDeflate(PerMessageDeflate):
    """permessage-deflate whose inflated message is capped at ``limit`` bytes (1009 past it):
    wsproto would inflate a small frame into any size (a zip bomb)."""

    def __init__(self, limit: int) -> None:
        # The server compresses each message on its own (one DeflateFraming for everyone);
        # the client's window is kept small, as its decompressor lives as long as the socket.
        super().__init__(client_max_window_bits=12, server_no_context_takeover=True)
        self.limit = limit
        self._inflated = 0
        #: Why this extension failed the connection (``bad_deflate``, ``frame_too_large``):
        #: wsproto reports both only as close codes (1007, 1009).
        self.fault: str | None = None

    def accept(self, offer: str) -> bool | str | None:
        # A smaller window than 15 bits only when the client said it can compress with one.
        if "client_max_window_bits" not in offer:
            self.client_max_window_bits = 15
        return super().accept(offer)

    def frame_inbound_payload_data(self, proto: Any, data: bytes) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        assert self._decompressor is not None
        try:
            out = self._decompressor.decompress(bytes(data), self.limit - self._inflated + 1)
        except zlib.error:
            self.fault = "bad_deflate"
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(out)
        if self._decompressor.unconsumed_tail or self._inflated > self.limit:
            self.fault = "frame_too_large"
            return CloseReason.MESSAGE_TOO_BIG
        return out

    def frame_inbound_complete(self, proto: Any, fin: bool) -> bytes | CloseReason | None:
        result = super().frame_inbound_complete(proto, fin)
        if fin:
            self._inflated = 0
        return result


class _InflatedTooLarge(FrameTooLarge):
    """A compressed message that inflates past ``max_frame_bytes``."""

    def __init__(self, limit: int) -> None:
        Exception.__init__(self, f"message inflates past the limit of {limit} bytes")
        self.length = limit + 1
        self.limit = limit


class WebSocketSite(Factory):
    """The WebSocket listener's factory, in front of the daemon's `ServerFactory`."""

    noisy = False

    def __init__(self, server: Any) -> None:
        #: The daemon's `ServerFactory`: clients, limits, counters, handlers.
        self.server = server
        self.framing = WebSocketFraming()
        self._deflate: dict[int, DeflateFraming] = {}

    @property
    def config(self) -> Any:
        return self.server.config.websocket

    def deflate_framing(self, window_bits: int) -> DeflateFraming:
        framing = self._deflate.get(window_bits)
        if framing is None:
            framing = self._deflate[window_bits] = DeflateFraming(window_bits)
        return framing

    def trusted(self, host: str | None) -> bool:
        """Is ``host`` one of ``websocket.trusted_proxies``?"""
        if not host or not self.config.trusted_proxies:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(
            address in ipaddress.ip_network(net, strict=False)
            for net in self.config.trusted_proxies
        )

    def buildProtocol(self, addr: Any) -> Any:
        server = self.server
        host = getattr(addr, "host", None)
        # Behind a trusted proxy the client is known only from its request's headers: the
        # per-address limits wait for them (the total limit applies now).
        proxied = self.trusted(host)
        refusal, key, wait = server.admit_with_wait(format_address(addr), None if proxied else host)
        if refusal is not None:
            refused = RefusedProtocol(http_response(503, refusal, retry_after_header(wait)))
            refused.factory = server
            return refused
        protocol = WebSocketProtocol(self)
        protocol.factory = server
        protocol.admitted_host = key
        return protocol


class WebSocketProtocol(Connection):
    """One client connection of the WebSocket listener (see the module docstring)."""

    __slots__ = ("_message", "_site", "_ws")

    #: Read whole text messages without wsproto when they come one frame each
    #: (`read_text_frames`); False sends every byte through wsproto (a test compares both).
    frame_fast_path = True

    def __init__(self, site: WebSocketSite) -> None:
        super().__init__()
        self._site = site
        #: wsproto's ``H11Handshake`` during the handshake, then its ``Connection``.
        self._ws: Any = None
        #: The unfinished (fragmented) text message's bytes so far; None between messages.
        self._message: bytearray | None = None

    @property
    def listener(self) -> str:  # type: ignore[override]
        """``websocket``, or ``websocket+tls`` (wss://): for the admin API."""
        return "websocket+tls" if is_tls(self.transport) else "websocket"

    # -- the handshake ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        factory.handshaking += 1
        self.connected = True
        self._handshaking = True
        # Liveness counts from connect: first_frame_timeout includes the handshake.
        self.last_seen = factory.now()
        self._ws = H11Handshake(ConnectionType.SERVER)
        self._handshake_timer = factory.clock.callLater(
            self._site.config.handshake_timeout, self._handshake_timed_out
        )

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        timeout = self._site.config.handshake_timeout
        self._refuse_upgrade(0, "websocket_handshake_timeout", f"no handshake within {timeout:g}s")

    def _handshake(self, data: bytes) -> None:
        handshake = self._ws
        # h11 bounds only a head still incomplete after a read: a whole head in one read
        # (64 KiB, thousands of headers) went through.  Measure it here, before h11 parses.
        h11 = getattr(handshake, "_h11_connection", None)
        buffered = getattr(getattr(h11, "_receive_buffer", None), "_data", b"")
        tail = bytes(buffered[-3:])
        end = _HEAD_END.search(tail + data)
        head = len(buffered) - len(tail) + (end.end() if end else len(tail) + len(data))
        if head > MAX_HEAD_BYTES:
            self._refuse_upgrade(400, "head_too_large", f"request head over {MAX_HEAD_BYTES} bytes")
            return
        try:
            handshake.receive_data(data)
            for event in handshake.events():
                if isinstance(event, Request):
                    self._upgrade(event)
                    return
        except RemoteProtocolError as e:
            if "Missing header" in str(e) or "must be GET" in str(e):
                self._refuse_upgrade(
                    426,
                    "not_websocket",
                    "this port speaks WebSocket (docs/websocket.md); send an Upgrade request",
                    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
                )
            else:
                self._refuse_upgrade(400, "bad_handshake", f"bad HTTP request: {shown(str(e))}")
        except (UnicodeError, ValueError) as e:  # e.g. a Host that is not IDNA
            self._refuse_upgrade(400, "bad_handshake", f"bad HTTP request: {shown(str(e))}")

    def _upgrade(self, request: Request) -> None:
        site = self._site
        config = site.config
        headers = {name.lower(): value for name, value in request.extra_headers}
        path = request.target.split("?", 1)[0]
        if path != config.path:
            self._refuse_upgrade(
                404, "bad_path", f"no WebSocket at {shown(path)}; try {config.path}"
            )
            return
        if not _valid_key(headers.get(b"sec-websocket-key", b"")):
            self._refuse_upgrade(
                400, "bad_handshake", "Sec-WebSocket-Key is not 16 bytes in base64 (RFC 6455)"
            )
            return
        origin = headers.get(b"origin")
        if origin is not None:
            text = origin.decode("latin-1")
            allowed = config.allowed_origins
            if "*" not in allowed and text not in allowed:
                self._refuse_upgrade(
                    403,
                    "origin_refused",
                    f"origin {shown(text)} is not in websocket.allowed_origins",
                )
                return
        peer = self.transport.getPeer()
        host = getattr(peer, "host", None)
        if site.trusted(host):
            # Repeated headers are one list, in order (RFC 7230 section 3.2.2).
            forwarded = [v for n, v in request.extra_headers if n.lower() == b"x-forwarded-for"]
            client = _forwarded_client(forwarded, site) if forwarded else None
            if forwarded and client is None:
                # Falling back to the proxy's own (often exempt) address would lift the
                # per-address limits for this client: refuse instead.
                self._refuse_upgrade(
                    400,
                    "bad_forwarded_for",
                    "X-Forwarded-For from a trusted proxy names no client address: "
                    + shown(b", ".join(forwarded)),
                )
                return
            if client is not None:
                self._peer = f"{client} (via {format_address(peer)})"
                self.forwarded_client = client
            refusal, key, wait = self.factory.admit_with_wait(
                self.peer, client or host, limit_total=False
            )
            if refusal is not None:
                extra = retry_after_header(wait)
                self._refuse_upgrade(429, "refused", refusal, extra, counted=True)
                return
            self.admitted_host = key
        extensions = []
        framing = site.framing
        offers = [
            offer
            for offer in request.extensions
            if offer.split(";", 1)[0].strip() == "permessage-deflate"
        ]
        if config.compression and offers:
            deflate = BoundedDeflate(self.factory.config.max_frame_bytes)
            for offer in offers:
                # wsproto parses an offer's window bits with int() and raises on anything
                # else (``client_max_window_bits=abc``): refuse such a handshake here.
                try:
                    BoundedDeflate(0)._parse_params(offer)
                except ValueError:
                    self._refuse_upgrade(
                        400,
                        "bad_extension",
                        f"malformed permessage-deflate offer {shown(offer)}",
                    )
                    return
            extensions.append(deflate)
        accept = self._ws.send(AcceptConnection(extensions=extensions))
        if extensions and deflate.enabled():
            framing = site.deflate_framing(deflate.server_max_window_bits)
            # The hot path writes header + body as they are; the general path compresses.
            self.fast_path = False
        trailing = getattr(self._ws, "_h11_connection", None)
        trailing = trailing.trailing_data[0] if trailing is not None else b""
        self._ws = connection = self._ws.connection
        # wsproto queues events in a deque of its own only for receive_data(None), which we
        # never call: an empty deque is 760 bytes, a third of an idle connection.
        if type(getattr(connection, "_events", None)) is deque and not connection._events:
            connection._events = ()
        self._end_handshake()
        self.transport.write(accept)
        if is_tls(self.transport):
            self._learn_certificate_identity()
        self._open(framing, since=self.last_seen)
        self._send_hello()
        if trailing:
            self._receive(trailing)

    def _end_handshake(self) -> None:
        if self._handshaking:
            self._handshaking = False
            self.factory.handshaking -= 1
            timer, self._handshake_timer = self._handshake_timer, None
            if timer is not None and timer.active():
                timer.cancel()

    def _refuse_upgrade(
        self, status: int, reason: str, text: str, extra: bytes = b"", *, counted: bool = False
    ) -> None:
        """Answer the handshake with ``status`` (0: nothing, abort) and end the connection."""
        factory = self.factory
        if not counted:
            factory.refused += 1
            factory.refusals["websocket_" + reason.removeprefix("websocket_")] += 1
        if factory.log_allowed("websocket_refused:" + reason):
            log.warn("Refused a WebSocket handshake from {peer}: {text}", peer=self.peer, text=text)
        self._end_handshake()
        self.close_reason = reason
        if status:
            self.transport.write(http_response(status, text, extra))
            self.transport.loseConnection()
            self._close_deadline()
        else:
            self.transport.abortConnection()

    # -- messages --------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.session_id:  # opened: messages
            self._receive(data)
        elif self._handshaking:
            self._handshake(data)
        # else the handshake was refused: what the peer still sends is of no interest

    def _receive(self, data: bytes) -> None:
        ws = self._ws
        limit = self.factory.config.max_frame_bytes
        message = self._message
        if message is None and self.frame_fast_path and self.fast_path:
            # Whole text messages at the front of the read, while wsproto holds nothing of
            # the stream: read here; wsproto reads from the first other frame on.
            decoder = ws._proto._frame_decoder
            if decoder.header is None and not len(decoder.buffer) and self.close_reason is None:
                items, used = read_text_frames(data, limit)
                if used == len(data):
                    self._deliver(items, 0)
                    return
                data = data[used:]
            else:
                items = []
        else:
            items = []
        try:
            ws.receive_data(data)
        except LocalProtocolError:
            return  # closed already: what the peer adds is of no interest
        control: list[bytes] = []
        error: FrameTooLarge | None = None
        ended: Any = None
        for event in ws.events():
            kind = type(event)
            if kind is TextMessage:
                chunk = event.data.encode("utf-8")
                if message is None:
                    if event.message_finished:
                        if len(chunk) > limit:
                            error = FrameTooLarge(len(chunk), limit)
                            break
                        items.append(chunk)
                        continue
                    message = bytearray()
                message += chunk
                if len(message) > limit:
                    error = FrameTooLarge(len(message), limit)
                    break
                if event.message_finished:
                    items.append(bytes(message))
                    message = None
            elif kind is Ping:
                control.append(ws.send(event.response()))
            elif kind is BytesMessage or kind is CloseConnection:
                ended = event
                break
        else:
            # A frame that announces more than the limit is refused before it is buffered
            # (compressed frames announce their compressed size: BoundedDeflate caps those).
            decoder = getattr(ws._proto, "_frame_decoder", None)
            header = getattr(decoder, "header", None)
            if header is not None and not header.opcode.iscontrol() and not header.rsv.rsv1:
                remaining = header.payload_len - decoder.payload_consumed
                size = (len(message) if message else 0) + remaining
                if size > limit:
                    error = FrameTooLarge(size, limit)
        if error is not None or ended is not None:
            message = None
        self._message = message
        if control:
            self.transport.write(b"".join(control))
        self._deliver(items, len(message) if message is not None else 0, error)
        if ended is not None:
            if type(ended) is BytesMessage:
                self._fail(CLOSE_CODES["binary_message"], "binary_message", "")
            else:
                self._peer_closed(ended)

    def _fail(self, code: int, reason: str, detail: str) -> None:
        """Close for a fault of the peer's WebSocket framing (not of its envelopes): counted
        among the closes by reason, with no error envelope (the close code says it)."""
        self._message = None
        if self.connected and self.close_reason is None:
            self.close_reason = reason
            self.factory.client_closing(self, reason, detail)
            self._unregister()
            self.transport.write(close_frame(code, reason))
            self.transport.loseConnection()
            self._close_deadline()

    def _peer_closed(self, event: CloseConnection) -> None:
        ws = self._ws
        if ws.state is not ConnectionState.REMOTE_CLOSING:
            # wsproto refused a frame (bad UTF-8, reserved bits, unmasked, ...).
            reason = _REASON_BY_CODE.get(event.code, "protocol_error")
            for extension in getattr(ws._proto, "extensions", ()):
                if isinstance(extension, BoundedDeflate) and extension.fault is not None:
                    reason = extension.fault
                    if reason == "frame_too_large":
                        # A compression bomb: the error envelope, then 1009, as for a
                        # message whose header announces too much.
                        self._message = None
                        return self._deliver([], 0, _InflatedTooLarge(extension.limit))
            return self._fail(int(event.code), reason, event.reason or "")
        self._message = None
        if self.close_reason is None:
            self.close_reason = "client_closed"
            self._unregister()
            self.transport.write(ws.send(event.response()))
            self.transport.loseConnection()
            self._close_deadline()

    def set_max_frame_bytes(self, limit: int) -> None:
        """A new ``max_frame_bytes`` (reload) is read per message: nothing to do."""

    # -- writing and closing ---------------------------------------------------------------

    def _write_many(self, frames: list[bytes]) -> None:
        # Nothing may follow our close frame.
        if self.close_reason is None:
            super()._write_many(frames)

    def _lose_connection(self, reason: str) -> None:
        code = _CLOSE_CODE_BY_REASON.get(reason, CLOSE_CODES["normal"])
        self.transport.write(close_frame(code, reason))
        self.transport.loseConnection()

    def _release_partial(self) -> None:
        self._message = None
        super()._release_partial()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._handshaking or not self.session_id:
            # Never became a client: only the handshake's share of the limits to give back.
            self._end_handshake()
            self._cancel_close_deadline()
            self.connected = False
            self.factory.admission.release(self.admitted_host)
            self.admitted_host = None
            return
        self._closed()
        self.factory.client_disconnected(self, reason)


def _valid_key(key: bytes) -> bool:
    """RFC 6455: the key is 16 random bytes, base64-encoded."""
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def _hop_address(hop: str) -> str | None:
    """One ``X-Forwarded-For`` element as an address: ``ip``, ``ip:port``, ``[v6]`` or
    ``[v6]:port``; None if it is none of those."""
    if hop.startswith("["):
        end = hop.find("]")
        rest = hop[end + 1 :] if end > 0 else "x"
        if rest and not _is_port(rest[1:] if rest[0] == ":" else "x"):
            return None
        hop = hop[1:end]
    elif hop.count(":") == 1:  # IPv4 with a port (an IPv6 address has more colons)
        hop, _, port = hop.partition(":")
        if not _is_port(port):
            return None
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return None


def _is_port(text: str) -> bool:
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit()


def _forwarded_client(values: list[bytes], site: WebSocketSite) -> str | None:
    """The client named by ``X-Forwarded-For`` (its headers' values, in order): the last
    address that is not a trusted proxy (each proxy appends the address it heard from).
    None when an element read before the client's is not an address, or there is none:
    the caller refuses the handshake rather than trust the proxy's own address."""
    hops = [h.strip() for value in values for h in value.decode("latin-1").split(",")]
    hops = [h for h in hops if h]
    address = None
    for hop in reversed(hops):
        address = _hop_address(hop)
        if address is None:
            return None
        if not site.trusted(address):
            return address
    return address  # every hop is a trusted proxy: the first of them

"""The stream adapter: a byte stream (TCP, TLS, UNIX) framed by int32 or seed, into the core.

`ServerProtocol` is what the main listener accepts.  It adds to the transport-independent
`Connection` (heartbeatd.server.connection: dispatch, ordered replies, auth, liveness,
backpressure) only what a byte stream needs:

* framing: a connection between frames holds no decoder; it borrows the factory's empty one
  for a read and keeps it only while a frame is unfinished (idle connections stay small);
* sniffing: a peer whose first bytes are another protocol's (HTTP, TLS, SSH...) is answered
  with ``wrong_protocol`` and closed;
* TLS: the hello waits for the handshake, bounded by ``tls.handshake_timeout``, and a client
  certificate's subject becomes the identity (mutual TLS).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from heartbeatd._logging import get_logger
from heartbeatd.server.connection import Connection, format_address, is_tls
from heartbeatd.wire import envelope
from heartbeatd.wire.envelope import encode_error
from heartbeatd.wire.framing import FrameDecoder
from heartbeatd.wire.sniff import DESCRIPTIONS, SNIFF_BYTES, identify

__all__ = ["RefusedProtocol", "ServerProtocol", "format_address", "is_tls"]

log = get_logger(__name__)


@implementer(IHandshakeListener)
class ServerProtocol(Connection):
    """One client connection of the stream listener (see the module docstring)."""

    __slots__ = ("_decoder", "_sniff_head")

    def __init__(self) -> None:
        super().__init__()
        # Held only while a frame is unfinished or the stream broken (see `dataReceived`).
        self._decoder: FrameDecoder | None = None
        # The connection's first bytes, while they may still be a foreign protocol's.
        self._sniff_head: bytes | None = b""

    @property
    def listener(self) -> str:  # type: ignore[override]
        """``tcp`` or ``tls`` (``unix`` sockets count as ``tcp``): for the admin API."""
        return "tls" if is_tls(self.transport) else "tcp"

    # -- connection lifecycle -------------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        self._open(factory.framing)
        if is_tls(self.transport):
            # The hello waits for the handshake: written now, it would sit in the TLS layer,
            # which pauses us as a producer, and a paused reader never reads the handshake.
            self._handshaking = True
            self._handshake_timer = factory.clock.callLater(
                factory.config.tls.handshake_timeout, self._handshake_timed_out
            )
        else:
            self._send_hello()

    # -- TLS (IHandshakeListener) -----------------------------------------------------------

    def handshakeCompleted(self) -> None:
        """The TLS handshake finished: learn the client's certificate, then say hello."""
        self._handshaking = False
        timer, self._handshake_timer = self._handshake_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if not self.connected or self.close_reason is not None:
            return
        self._learn_certificate_identity()
        self._send_hello()
        if self._write_paused:  # the TLS layer is still flushing: now backpressure may apply
            self._pause_reading()

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        timeout = self.factory.config.tls.handshake_timeout
        self.evict("tls_handshake_timeout", f"no TLS handshake within {timeout:g}s")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._closed()
        self.factory.client_disconnected(self, reason)

    # -- reading ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        factory = self.factory
        self.bytes_in += len(data)
        if self._sniff_head is not None and self._sniffed_foreign(data):
            return
        # Between frames a connection holds no decoder (an idle one would cost ~100 bytes
        # each): it borrows the factory's empty one and keeps it only while a frame is
        # unfinished or the stream is broken; an emptied one goes back as the spare.
        decoder = self._decoder
        if decoder is None:
            decoder = factory.spare_decoder
            if decoder is None:
                decoder = factory.spare_decoder = factory.framing.decoder(
                    factory.config.max_frame_bytes
                )
            items = decoder.feed(data)
            held = decoder.buffered
            if held or decoder.error is not None:
                self._decoder = decoder
                factory.spare_decoder = None
        else:
            items = decoder.feed(data)
            held = decoder.buffered
            if not held and decoder.error is None:
                self._decoder = None
                if factory.spare_decoder is None:
                    factory.spare_decoder = decoder
        self._deliver(items, held, decoder.error)

    def _sniffed_foreign(self, data: bytes) -> bool:
        """Answer and close a peer whose first bytes are another protocol's; True if so."""
        head = self._sniff_head + data[:SNIFF_BYTES]  # type: ignore[operator]
        kind = identify(head)
        if not kind:
            self._sniff_head = head if kind == "" and len(head) < SNIFF_BYTES else None
            return False
        self._sniff_head = None
        what = DESCRIPTIONS[kind]
        self.factory.count_foreign(kind)
        if self.factory.log_allowed("wrong_protocol"):
            log.warn(
                "Closing {peer}: it sent {what}; this listener speaks heartbeatd's "
                "{framing} framing",
                peer=self.peer,
                what=what,
                framing=self.factory.framing.name,
            )
        self.factory.count_error(envelope.WRONG_PROTOCOL)
        self.write_frame(
            encode_error(
                envelope.WRONG_PROTOCOL,
                f"this port speaks heartbeatd's {self.factory.framing.name} framing "
                f"(docs/protocol.md); the first bytes look like {what}",
            ),
            encoded=False,
        )
        self.close(envelope.WRONG_PROTOCOL, what, quiet=True)
        return True

    def _release_partial(self) -> None:
        """Drop an unfinished frame and its share of the registry's partial-byte total."""
        if self._held:
            decoder = self._decoder
            if decoder is not None:
                self._decoder = self.factory.framing.decoder(decoder.max_frame_bytes)
                self._decoder.error = decoder.error
        super()._release_partial()

    def set_max_frame_bytes(self, limit: int) -> None:
        """Apply a new frame limit (live reload), also to a frame being received.

        A connection between frames has no decoder: it borrows the factory's, which the
        reload has already replaced, when its next bytes come.
        """
        if self._decoder is not None:
            self._decoder.max_frame_bytes = limit


class RefusedProtocol(Protocol):
    """Answers a connection over ``limits.max_connections`` with an error frame, then closes."""

    def __init__(self, frame: bytes) -> None:
        self._frame = frame
        self._abort: Any = None

    def connectionMade(self) -> None:
        self.transport.write(self._frame)
        self.transport.loseConnection()
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.refusing += 1  # a file descriptor until the frame is out
        if factory is not None and is_tls(self.transport):
            # Over TLS the frame waits for a handshake the peer may never do: bound the wait.
            self._abort = factory.clock.callLater(
                factory.config.tls.handshake_timeout, self.transport.abortConnection
            )

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.refusing -= 1
            if factory.on_room is not None:
                factory.on_room()

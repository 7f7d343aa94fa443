"""The framing interface: how a codec turns a byte stream into frame bodies and back.

A framing knows only where one message ends and the next begins; what a body means is the
envelope's business (`heartbeatd.wire.envelope`).  Server, client and pool share these codecs, and
because they never touch a socket they can be fuzzed byte by byte.

The model is Twisted's ``IntNStringReceiver``: the length limit is checked *before* a body is
buffered, one buffer and one offset are kept, and every complete frame of a read is parsed in a
single pass.
"""

from __future__ import annotations

from typing import Final, Protocol

__all__ = [
    "HEARTBEAT",
    "FrameDecoder",
    "FrameTooLarge",
    "Framing",
    "FramingError",
    "Heartbeat",
    "SharedFrame",
]


class FramingError(Exception):
    """The byte stream cannot be framed any more; the connection must close."""

    code = "bad_frame"


class FrameTooLarge(FramingError):
    """A header announced a body longer than the receiver accepts."""

    code = "frame_too_large"

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame of {length} bytes exceeds the limit of {limit} bytes")
        self.length = length
        self.limit = limit


class Heartbeat:
    """The type of `HEARTBEAT`: a bare heartbeat token that carries no body.

    Only framings with an out-of-band token (the seed's ``HeartBeat``) produce it.
    """

    __slots__ = ()
    _instance: Heartbeat | None = None

    def __new__(cls) -> Heartbeat:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "HEARTBEAT"


HEARTBEAT: Final = Heartbeat()

Item = bytes | Heartbeat


class FrameDecoder(Protocol):
    """Stateful decoder fed with whatever the transport read.

    `feed` returns the items completed by this chunk, in order.  When the stream turns invalid,
    the items completed before the fault are still returned, `error` is set, and every later
    `feed` returns nothing: the caller processes what it got, then reports `error` and closes.

    A decoder whose `buffered` is 0 and `error` None holds no state of any stream, so one
    such decoder may serve many connections in turn (the server's connections borrow one).
    """

    error: FramingError | None
    #: Bytes held while waiting for the rest of a frame.
    buffered: int

    def feed(self, data: bytes) -> list[Item]: ...


class Framing(Protocol):
    """A wire framing: how bodies are delimited and how a bare heartbeat is written."""

    name: str
    #: Bytes of an out-of-band heartbeat, or None when heartbeats are ping envelopes.
    heartbeat_token: bytes | None
    #: True when bodies that are not envelopes are delivered as bare values (seed framing).
    wraps_bare_values: bool

    def header(self, length: int) -> bytes:
        """The bytes written before a body of ``length`` bytes (``encode`` is header + body)."""
        ...

    def encode(self, body: bytes) -> bytes: ...

    def decoder(self, max_frame_bytes: int) -> FrameDecoder: ...


class SharedFrame:
    """One message many connections get (a broadcast, a publication, the sweep's ping),
    framed at most once per framing however many connections it goes to.

    With ``ping=True`` it is a heartbeat, which a framing with an out-of-band token (seed)
    sends as that token instead of the body.
    """

    __slots__ = ("_framed", "body", "ping")

    def __init__(self, body: bytes, *, ping: bool = False) -> None:
        self.body = body
        self.ping = ping
        self._framed: dict[int, bytes] = {}

    def framed(self, framing: Framing) -> bytes:
        """The bytes to write on a connection that uses ``framing``."""
        key = id(framing)
        frame = self._framed.get(key)
        if frame is None:
            token = framing.heartbeat_token if self.ping else None
            frame = self._framed[key] = token if token is not None else framing.encode(self.body)
        return frame

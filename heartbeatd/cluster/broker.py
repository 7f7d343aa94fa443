"""The `Broker` interface, and `MemoryBroker`: one node's channels, history and presence.

A broker stores each channel's publications under consecutive offsets within an *epoch* (a
random name for one life of the channel's stream: when the stream is lost, a new epoch starts
and old positions cannot be recovered), keeps a bounded history for recovery, fans
publications out to the nodes that asked for a channel, and tracks presence.  It never sees a
connection: the server's `ChannelHub` is its `BrokerListener`.

Publication data crosses the broker as JSON text, encoded once by the publisher.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from heartbeatd.wire.envelope import ProtocolError, decode_json

__all__ = [
    "BadBrokerMessage",
    "Broker",
    "BrokerListener",
    "BrokerUnavailable",
    "History",
    "MemoryBroker",
    "Position",
    "new_epoch",
]


class BrokerUnavailable(Exception):
    """The broker cannot take the operation now (Redis unreachable): ``unavailable``."""


class Position(NamedTuple):
    """Where a channel's stream stands: its epoch and the offset of its latest publication."""

    epoch: str
    offset: int


class History(NamedTuple):
    """The answer to a recovery: the stream's position and, when recoverable, what follows.

    ``entries`` is None when the publications after ``since`` are gone (trimmed, expired, or a
    new epoch); else the JSON texts of offsets ``since + 1 .. position.offset``, in order.
    """

    position: Position
    entries: list[str] | None


def new_epoch() -> str:
    return secrets.token_hex(4)


# -- what a node accepts from the broker (a shared Redis is not trusted, issue 22) -----------

#: Types only the server itself may send: a broadcast or send from another node with one of
#: these is dropped (a forged ``goaway``, ``auth`` or ``publication`` would mislead clients).
RESERVED_TYPES = frozenset(
    {"hello", "auth", "goaway", "ping", "pong", "error", "publication", "join", "leave", "resync"}
)
#: The keys of a presence entry (`ChannelHub._info`), and nothing else.
PRESENCE_KEYS = frozenset({"session", "node", "identity"})


class BadBrokerMessage(ValueError):
    """What came from the broker is not something a node sends: dropped and counted."""


def checked_data(text: str) -> str:
    """``text`` if it is exactly one JSON value (it is spliced into frames as is).

    Parsed with the wire's decoder (orjson: strict, no NaN, "trailing characters" for
    ``1,"type":"goaway"``), which costs a node a fraction of the stdlib's per publication.
    """
    try:
        decode_json(text.encode())
    except ProtocolError as e:
        raise BadBrokerMessage(f"the data is not one JSON value: {e.message}") from None
    return text


def checked_epoch(text: str) -> str:
    if not (0 < len(text) <= 64 and text.isascii() and text.isalnum()):
        raise BadBrokerMessage("bad epoch")
    return text


def checked_presence(info: Any) -> dict[str, Any]:
    """A join/leave entry with only the keys a node writes, each a short string (or None)."""
    if not isinstance(info, dict) or not isinstance(info.get("session"), str):
        raise BadBrokerMessage("a presence entry is an object with a session")
    out = {}
    for key, value in info.items():
        if key not in PRESENCE_KEYS or not (value is None or isinstance(value, str)):
            raise BadBrokerMessage(f"unexpected presence field {key!r}")
        out[key] = value
    return out


def checked_push(type: Any) -> str:
    """The type of a broadcast or send from another node: a string the server does not own."""
    if not isinstance(type, str) or not type or type in RESERVED_TYPES:
        raise BadBrokerMessage(f"type {type!r} may not come from another node")
    return type


class BrokerListener(Protocol):
    """What a broker tells its node (the server's channel hub implements this)."""

    def on_publication(self, channel: str, epoch: str, offset: int, data: str) -> None: ...

    def on_presence(self, channel: str, event: str, info: dict[str, Any]) -> None:
        """``event`` is ``join`` or ``leave``; ``info`` is the session's presence info."""

    def on_message(self, session: str, type: str, data: Any) -> None:
        """A `send` from any node for a session of this node."""

    def on_broadcast(self, type: str, data: Any) -> None: ...

    def on_kick(self, session: str) -> None:
        """A `kick` from any node for a session of this node: disconnect it."""

    def on_link(self, up: bool) -> None:
        """The broker's link went down or came back (after which subscribers catch up)."""

    def on_register(self) -> None:
        """A clustered broker wrote this node's clients and presence back (after its link
        returned, or after the other nodes reaped it): the node's resumable sessions are
        written back too (optional: a listener without it is not asked)."""

    def local_clients(self) -> dict[str, dict[str, Any]]:
        """Every client of this node now, session -> info (as given to `client_connected`).

        A clustered broker registers them again after its link returns, so it need not keep a
        copy of each client's info for as long as the client is connected.
        """


class Broker(Protocol):
    """The small interface between one daemon and the storage/fan-out of all daemons."""

    node_id: str
    #: True when other nodes exist (send/broadcast/clients go through the broker).
    clustered: bool
    #: False while the broker cannot serve (Redis unreachable); health and metrics show it.
    up: bool
    listener: BrokerListener | None

    def start(self) -> Deferred[None]: ...

    def stop(self) -> Deferred[None]: ...

    def configure_history(self, size: int, ttl: float) -> None:
        """New ``channels.history_size`` / ``history_ttl`` (live reload)."""

    #: ``channel -> (history_size, history_ttl)`` where namespaces differ (else None: the
    #: configured pair for every channel); the channel hub sets it.
    history_of: Callable[[str], tuple[int, float]] | None

    def publish(self, channel: str, data: str) -> Deferred[Position]: ...

    def position(self, channel: str) -> Deferred[Position]: ...

    def history(self, channel: str, epoch: str, since: int) -> Deferred[History]: ...

    def subscribe(self, channel: str) -> Deferred[None]:
        """Deliver this channel's publications to this node from now on (first local sub)."""

    def unsubscribe(self, channel: str) -> None: ...

    def join(self, channel: str, info: dict[str, Any], keep: int = 0) -> Deferred[None]:
        """``info`` is a member of ``channel`` now.  ``keep`` > 0: a resumable session, which
        counts on the channel's epoch and offset for ``keep`` seconds after it leaves (it may
        come back to its subscription, see `leave`)."""

    def leave(self, channel: str, session: str, keep: int = 0) -> Deferred[None]:
        """``session`` left ``channel``; with ``keep`` > 0 the channel's epoch and offset
        stay at least ``keep`` seconds even when nobody is left (a detached session restores
        its subscription from them: a new epoch would tell it ``history_lost`` for nothing)."""

    def presence(self, channel: str) -> Deferred[list[dict[str, Any]]]: ...

    def client_connected(self, session: str, info: dict[str, Any]) -> None:
        """Tell the other nodes (a clustered broker may batch it with others, in order)."""

    def client_disconnected(self, session: str) -> None: ...

    def clients(self) -> Deferred[list[dict[str, Any]]]:
        """Every node's clients (their info dicts, each with ``node``)."""

    def identity_sessions(self, identity: str) -> Deferred[list[str]]:
        """The sessions of ``identity`` on every node (clustered brokers only)."""

    def send(self, session: str, type: str, data: Any) -> Deferred[bool]: ...

    def kick(self, session: str) -> Deferred[bool]:
        """Tell the node holding ``session`` to disconnect it; False when no live node has it."""

    def broadcast(self, type: str, data: Any) -> Deferred[int]:
        """Push to every node's clients; fires with the number of nodes reached."""


class _Stream:
    __slots__ = ("entries", "epoch", "kept_until", "last_used", "offset")

    def __init__(self, now: float) -> None:
        self.epoch = new_epoch()
        self.offset = 0
        self.entries: deque[str] = deque()
        self.last_used = now
        #: A detached resumable session may come back to the epoch until then (`leave`).
        self.kept_until = 0.0


class MemoryBroker:
    """The embedded broker: this process is the whole cluster.

    History is a bounded deque per channel; an idle channel's history (and epoch) is dropped
    after ``history_ttl`` seconds, checked when the channel is next used.
    """

    up = True
    clustered = False

    def __init__(
        self,
        clock: IReactorTime,
        history_size: int = 100,
        history_ttl: float = 300.0,
        node_id: str = "local",
    ) -> None:
        self.clock = clock
        self.node_id = node_id
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.listener: BrokerListener | None = None
        self.history_of: Callable[[str], tuple[int, float]] | None = None
        self._streams: dict[str, _Stream] = {}
        self._presence: dict[str, dict[str, dict[str, Any]]] = {}
        self._listening: set[str] = set()

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def configure_history(self, size: int, ttl: float) -> None:
        self.history_size = size
        self.history_ttl = ttl
        for stream in self._streams.values():
            while len(stream.entries) > size:
                stream.entries.popleft()

    def _history(self, channel: str) -> tuple[int, float]:
        policy = self.history_of
        return (self.history_size, self.history_ttl) if policy is None else policy(channel)

    def _stream(self, channel: str) -> _Stream:
        """The channel's stream; its history is dropped ``history_ttl`` after the last publish.

        While this node listens to the channel, the epoch and offset stay (nothing was lost:
        live subscribers saw everything); an unwatched idle channel starts a new epoch.
        """
        now = self.clock.seconds()
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._streams[channel] = _Stream(now)
        elif (ttl := self._history(channel)[1]) and now - stream.last_used > ttl:
            if channel in self._listening or now < stream.kept_until:
                stream.entries.clear()
                stream.last_used = now
            else:
                stream = self._streams[channel] = _Stream(now)
        return stream

    def publish(self, channel: str, data: str) -> Deferred[Position]:
        stream = self._stream(channel)
        stream.last_used = self.clock.seconds()
        stream.offset += 1
        size = self._history(channel)[0]
        if size:
            stream.entries.append(data)
            while len(stream.entries) > size:
                stream.entries.popleft()
        if self.listener is not None:
            self.listener.on_publication(channel, stream.epoch, stream.offset, data)
        return succeed(Position(stream.epoch, stream.offset))

    def position(self, channel: str) -> Deferred[Position]:
        stream = self._stream(channel)
        return succeed(Position(stream.epoch, stream.offset))

    def history(self, channel: str, epoch: str, since: int) -> Deferred[History]:
        stream = self._stream(channel)
        position = Position(stream.epoch, stream.offset)
        missed = stream.offset - since
        if epoch != stream.epoch or missed < 0 or missed > len(stream.entries):
            return succeed(History(position, None))
        entries = list(stream.entries)[len(stream.entries) - missed :] if missed else []
        return succeed(History(position, entries))

    def subscribe(self, channel: str) -> Deferred[None]:
        if channel not in self._listening and channel in self._streams:
            self._stream(channel)  # expire an idle unwatched stream before watching it
        self._listening.add(channel)
        return succeed(None)

    def unsubscribe(self, channel: str) -> None:
        self._listening.discard(channel)
        self._unused(channel)

    def _unused(self, channel: str) -> None:
        # Without history, a channel nobody listens to needs no memory at all.
        if not self._history(channel)[0] and not self._presence.get(channel):
            stream = self._streams.get(channel)
            if stream is not None and stream.kept_until <= self.clock.seconds():
                del self._streams[channel]

    def join(self, channel: str, info: dict[str, Any], keep: int = 0) -> Deferred[None]:
        self._presence.setdefault(channel, {})[info["session"]] = info
        if self.listener is not None:
            self.listener.on_presence(channel, "join", info)
        return succeed(None)

    def leave(self, channel: str, session: str, keep: int = 0) -> Deferred[None]:
        stream = self._streams.get(channel)
        if keep and stream is not None:
            stream.kept_until = max(stream.kept_until, self.clock.seconds() + keep)
        members = self._presence.get(channel)
        info = members.pop(session, None) if members else None
        if members is not None and not members:
            del self._presence[channel]
        if info is not None and self.listener is not None:
            self.listener.on_presence(channel, "leave", info)
        return succeed(None)

    def presence(self, channel: str) -> Deferred[list[dict[str, Any]]]:
        return succeed(list(self._presence.get(channel, {}).values()))

    # One node: the server's own registry answers for its clients, so nothing is kept here.

    def client_connected(self, session: str, info: dict[str, Any]) -> None:
        pass

    def client_disconnected(self, session: str) -> None:
        pass

    def clients(self) -> Deferred[list[dict[str, Any]]]:
        return succeed([])

    def send(self, session: str, type: str, data: Any) -> Deferred[bool]:
        return succeed(False)

    def kick(self, session: str) -> Deferred[bool]:
        return succeed(False)

    def identity_sessions(self, identity: str) -> Deferred[list[str]]:
        return succeed([])  # one node: the hub counts its own clients

    def broadcast(self, type: str, data: Any) -> Deferred[int]:
        if self.listener is None:
            return fail(BrokerUnavailable("no listener"))
        self.listener.on_broadcast(type, data)
        return succeed(1)

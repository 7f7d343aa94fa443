"""Channel subscriptions on the client side: exactly-once delivery, or an explicit "not recovered".

A `Subscription` remembers the channel's epoch and the offset of the last publication handed to
the application.  It outlives connections: the reconnecting client subscribes again with
``since`` (to any node of a cluster), and the application either receives every publication it
missed, in order and once each, or its ``on_not_recovered`` callback is told that some are
gone (then it resyncs from its own source of truth).  Duplicates are dropped by offset here
too, so even a server that repeated itself could not make the application see one twice.

This module never imports the connection (the connection imports it): it talks to anything
with ``request()`` and ``on()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from heartbeatd._logging import get_logger
from heartbeatd.client.errors import ServerError

__all__ = ["ChannelClient", "Subscription", "channels_of"]

log = get_logger(__name__)

#: ``on_publication(data, offset, subscription)``
PublicationCallback = Callable[[Any, int, "Subscription"], object]
#: ``on_not_recovered(subscription, reason)``: publications were lost; resync.
NotRecoveredCallback = Callable[["Subscription", str], object]


class _Connection(Protocol):
    def request(
        self, type: str, data: Any = ..., timeout: float | None = None
    ) -> Deferred[Any]: ...

    def on(self, type: str, handler: Callable[[Any, Any], object]) -> None: ...


class Subscription:
    """One channel the application listens to, across reconnects."""

    def __init__(
        self,
        channel: str,
        on_publication: PublicationCallback,
        on_not_recovered: NotRecoveredCallback | None = None,
        join_leave: bool = False,
        on_presence: Callable[[str, dict[str, Any]], object] | None = None,
    ) -> None:
        self.channel = channel
        self.on_publication = on_publication
        self.on_not_recovered = on_not_recovered
        self.join_leave = join_leave
        self.on_presence = on_presence
        #: Position of the last publication delivered ("" / 0 before the first subscribe).
        self.epoch = ""
        self.offset = 0
        self.active = True
        #: Publications that arrived before the subscribe reply, delivered after it.
        self._early: list[tuple[int, Any]] | None = None
        self.delivered = 0
        self.not_recovered = 0
        #: Fired with this subscription after its next successful subscribe.
        self.waiters: list[Deferred[Subscription]] = []
        #: The reconnecting client's bookkeeping (`heartbeatd.client.reconnect`): the
        #: latest subscribe sent, the ``unavailable`` spell (since when, answers so far,
        #: the retry timer) and the session that may hold a subscribe that timed out.
        self._attempt = 0
        self._unavailable_since: float | None = None
        self._unavailable_attempts = 0
        self._retry_timer: Any = None
        self._unsure_in: str | None = None

    def _not_recovered(self, reason: str) -> None:
        self.not_recovered += 1
        if self.on_not_recovered is not None:
            _call_safely(self.on_not_recovered, self, reason)
        else:
            log.warn(
                "Channel {channel}: publications were lost ({reason}) and no on_not_recovered "
                "callback is set",
                channel=self.channel,
                reason=reason,
            )

    def _publication(self, offset: int, data: Any) -> None:
        if self._early is not None:
            self._early.append((offset, data))
            return
        if offset <= self.offset:
            return  # already delivered
        if offset > self.offset + 1 and self.epoch:
            self._not_recovered("gap")
        self.offset = offset
        self.delivered += 1
        _call_safely(self.on_publication, data, offset, self)

    def _answered(self, answer: dict[str, Any], asked_since: bool) -> None:
        epoch, offset = answer["epoch"], answer["offset"]
        early, self._early = self._early or [], None
        if asked_since and not answer.get("recovered"):
            self.epoch, self.offset = epoch, offset
            self._not_recovered("not_recovered")
        elif not asked_since:
            self.epoch, self.offset = epoch, offset
        else:
            self.epoch = epoch  # recovered: the backlog follows from our own offset
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.callback(self)
        for off, data in early:
            self._publication(off, data)


class ChannelClient:
    """The subscriptions of one connection, routing its channel pushes."""

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection
        self.subscriptions: dict[str, Subscription] = {}
        connection.on("publication", self._on_publication)
        connection.on("resync", self._on_resync)
        connection.on("join", lambda data, conn: self._on_presence("join", data))
        connection.on("leave", lambda data, conn: self._on_presence("leave", data))

    def attach(
        self, sub: Subscription, send: Callable[[str, Any], Deferred[Any]] | None = None
    ) -> Deferred[Subscription]:
        """Subscribe ``sub`` here, with ``since`` when it has a position already; ``send(type,
        data)`` sends the request (default: the connection's ``request``)."""
        request: dict[str, Any] = {"channel": sub.channel}
        asked_since = bool(sub.epoch)
        if asked_since:
            request["since"] = {"epoch": sub.epoch, "offset": sub.offset}
        if sub.join_leave:
            request["join_leave"] = True
        self.subscriptions[sub.channel] = sub
        sub._early = []

        def answered(answer: dict[str, Any]) -> Subscription:
            sub._answered(answer, asked_since)
            return sub

        def failed(failure: Any) -> Any:
            sub._early = None
            if self.subscriptions.get(sub.channel) is sub:
                del self.subscriptions[sub.channel]
            return failure

        if send is None:
            send = self.connection.request
        return send("subscribe", request).addCallbacks(answered, failed)

    def subscribe(
        self,
        channel: str,
        on_publication: PublicationCallback,
        on_not_recovered: NotRecoveredCallback | None = None,
        *,
        since: tuple[str, int] | None = None,
        join_leave: bool = False,
        on_presence: Callable[[str, dict[str, Any]], object] | None = None,
    ) -> Deferred[Subscription]:
        sub = Subscription(channel, on_publication, on_not_recovered, join_leave, on_presence)
        if since is not None:
            sub.epoch, sub.offset = since
        return self.attach(sub)

    def unsubscribe(self, channel: str) -> Deferred[Any]:
        """Stop ``channel`` here (its publications are no longer routed at once).  Fires
        with the server's answer, or with None when it answers ``not_subscribed``: it holds
        no such subscription, which is the state asked for."""
        sub = self.subscriptions.pop(channel, None)
        if sub is not None:
            sub.active = False
        return self.connection.request("unsubscribe", {"channel": channel}).addErrback(
            _not_subscribed_is_done
        )

    def _on_publication(self, data: Any, connection: Any) -> None:
        if not isinstance(data, dict):
            return
        sub = self.subscriptions.get(data.get("channel"))  # type: ignore[arg-type]
        offset = data.get("offset")
        if sub is not None and type(offset) is int:
            sub._publication(offset, data.get("data"))

    def _on_resync(self, data: Any, connection: Any) -> None:
        if not isinstance(data, dict):
            return
        sub = self.subscriptions.get(data.get("channel"))  # type: ignore[arg-type]
        if sub is None or not isinstance(data.get("offset"), int):
            return
        sub.epoch, sub.offset = str(data.get("epoch", "")), data["offset"]
        sub._not_recovered(str(data.get("reason", "resync")))

    def _on_presence(self, event: str, data: Any) -> None:
        if not isinstance(data, dict):
            return
        sub = self.subscriptions.get(data.get("channel"))  # type: ignore[arg-type]
        if sub is not None and sub.on_presence is not None:
            _call_safely(sub.on_presence, event, data)


def _not_subscribed_is_done(failure: Failure) -> Failure | None:
    if failure.check(ServerError) and failure.value.code == "not_subscribed":
        return None
    return failure


def channels_of(connection: Any) -> ChannelClient:
    """The connection's `ChannelClient`, created on first use."""
    client = getattr(connection, "_channel_client", None)
    if client is None:
        client = connection._channel_client = ChannelClient(connection)
    return client


def _call_safely(fn: Callable[..., object], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.failure("A channel callback failed")

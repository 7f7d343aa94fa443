"""The service's stop order, in-process on a MemoryReactorClock (no process, no sleep).

Stop goes: stop listening -> goaway to every client -> drain (up to drain_timeout) -> close
the rest (abort after close_timeout) -> admin API closed last (so /healthz says "draining"
throughout) -> the stop Deferred fires.
"""

from __future__ import annotations

from typing import Any

from helpers import Peer, make_config
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock

from heartbeatd.daemon.service import ServerService
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import default_registry


class RecordingPort:
    """An IListeningPort whose stopListening is recorded and finishes when the test says."""

    def __init__(self, name: str, events: list[str], port: int) -> None:
        self.name, self.events, self.port = name, events, port
        self.stopped: Deferred[None] | None = None

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", self.port)

    def stopListening(self) -> Deferred[None]:
        self.events.append(f"{self.name} stops listening")
        self.stopped = Deferred()
        return self.stopped


class RecordingEndpoint:
    def __init__(self, port: RecordingPort) -> None:
        self.port = port

    def listen(self, factory: Any) -> Deferred[RecordingPort]:
        return succeed(self.port)


class WatchedPeer(Peer):
    """An in-memory client that records what reaches it; it may ignore a polite close."""

    def __init__(
        self, factory: ServerFactory, events: list[str], port: int, obeys_close: bool = True
    ) -> None:
        super().__init__(factory, port)
        self.events, self.name, self.obeys_close = events, f"client {port}", obeys_close

    def pump(self) -> None:
        for message in self.received():
            self.events.append(f"{self.name} got {message['type']}")
        if not self.protocol.connected:
            return
        if self.transport.disconnected:  # StringTransport's abortConnection
            self.events.append(f"{self.name} aborted")
            self.disconnect()
        elif self.transport.disconnecting and self.obeys_close:
            self.events.append(f"{self.name} closed")
            self.disconnect()


def make_service(
    **shutdown: float,
) -> tuple[ServerService, ServerFactory, MemoryReactorClock, list[str], dict[str, RecordingPort]]:
    reactor = MemoryReactorClock()
    config = make_config(shutdown={"drain_timeout": 10, "close_timeout": 5, **shutdown})
    factory = ServerFactory(config, default_registry(), reactor)
    events: list[str] = []
    ports = {name: RecordingPort(name, events, n) for name, n in (("server", 1), ("admin", 2))}
    service = ServerService(
        RecordingEndpoint(ports["server"]),
        factory,
        reactor,
        admin=(RecordingEndpoint(ports["admin"]), factory),
    )
    service.privilegedStartService()
    service.startService()
    return service, factory, reactor, events, ports


def test_clients_that_leave_during_the_drain() -> None:
    service, factory, reactor, events, ports = make_service()
    peers = [WatchedPeer(factory, events, 40000 + i) for i in range(2)]

    stopped: list[object] = []
    service.stopService().addBoth(stopped.append)
    for peer in peers:
        peer.pump()
    assert events == ["server stops listening"]  # goaway waits until the listener is closed
    assert ports["server"].stopped is not None
    ports["server"].stopped.callback(None)
    for peer in peers:
        peer.pump()
    assert events[1:] == ["client 40000 got goaway", "client 40001 got goaway"]
    assert factory.draining  # /healthz answers 503 from now on

    reactor.advance(9)  # within drain_timeout, nobody is closed by the server
    for peer in peers:
        peer.pump()
        assert peer.protocol.connected
    for peer in peers:
        peer.disconnect()  # both leave on their own, before the drain timeout
    assert events[-1] == "admin stops listening"  # last, and without waiting the timeout
    assert stopped == []
    assert ports["admin"].stopped is not None
    ports["admin"].stopped.callback(None)
    assert stopped == [None]
    assert reactor.getDelayedCalls() == []  # no timer left behind


def test_clients_that_stay_are_closed_then_aborted() -> None:
    service, factory, reactor, events, ports = make_service()
    polite = WatchedPeer(factory, events, 40000)
    stubborn = WatchedPeer(factory, events, 40001, obeys_close=False)
    stopped: list[object] = []
    service.stopService().addBoth(stopped.append)
    assert ports["server"].stopped is not None
    ports["server"].stopped.callback(None)
    for peer in (polite, stubborn):
        peer.pump()
    events.clear()

    reactor.advance(9.99)
    polite.pump()
    assert events == []  # still draining
    reactor.advance(0.01)  # drain_timeout: the server closes those still connected
    polite.pump()
    stubborn.pump()
    assert events == ["client 40000 closed"]
    assert "admin stops listening" not in events and stubborn.protocol.connected
    reactor.advance(5)  # close_timeout: the one that ignored the close is aborted
    stubborn.pump()
    assert events == ["client 40000 closed", "client 40001 aborted", "admin stops listening"]
    assert ports["admin"].stopped is not None
    ports["admin"].stopped.callback(None)
    assert stopped == [None]
    assert factory.clients == {}
    reactor.advance(100)
    assert reactor.getDelayedCalls() == []


def test_no_clients_means_an_immediate_stop() -> None:
    service, _factory, reactor, events, ports = make_service()
    stopped: list[object] = []
    service.stopService().addBoth(stopped.append)
    assert ports["server"].stopped is not None
    ports["server"].stopped.callback(None)
    assert events == ["server stops listening", "admin stops listening"]
    assert ports["admin"].stopped is not None
    ports["admin"].stopped.callback(None)
    assert stopped == [None] and reactor.getDelayedCalls() == []

"""Factory behaviour: connection limit, shutdown, and wire compatibility over iosim."""

from __future__ import annotations

import json

from helpers import Peer, iosim, make_config, parse_frames
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.protocols.basic import Int32StringReceiver

from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import HandlerRegistry
from heartbeatd.server.protocol import RefusedProtocol


def test_connections_over_the_limit_get_an_error_frame_then_close(
    clock: Clock, registry: HandlerRegistry
) -> None:
    factory = ServerFactory(make_config(limits={"max_connections": 2}), registry, clock)
    first, _second = Peer(factory, 1), Peer(factory, 2)
    third = Peer(factory, 3)
    assert isinstance(third.protocol, RefusedProtocol)
    (error,) = parse_frames(third.transport.value())
    assert error["type"] == "error"
    assert error["error"]["code"] == "too_many_connections"
    assert "maximum of 2" in error["error"]["message"]
    assert third.transport.disconnecting
    assert (factory.refused, len(factory.clients)) == (1, 2)
    first.disconnect()
    assert Peer(factory, 4).hello["type"] == "hello"  # room again


def test_close_all_closes_politely_then_aborts_stragglers(
    clock: Clock, registry: HandlerRegistry
) -> None:
    factory = ServerFactory(make_config(), registry, clock)
    polite, stubborn = Peer(factory, 1), Peer(factory, 2)
    done = factory.close_all(timeout=5)
    assert polite.transport.disconnecting and stubborn.transport.disconnecting
    assert not stubborn.transport.disconnected
    polite.disconnect()
    assert not done.called
    clock.advance(5)
    assert stubborn.transport.disconnected  # aborted at the deadline
    stubborn.disconnect()
    assert done.called
    assert factory.closes["shutdown"] == 2


def test_close_all_with_no_clients_is_immediate(clock: Clock, registry: HandlerRegistry) -> None:
    factory = ServerFactory(make_config(), registry, clock)
    assert factory.close_all(timeout=5).called
    assert clock.getDelayedCalls() == []


class Int32Client(Int32StringReceiver):
    """What a typical Twisted user writes: Twisted's own length-prefixed receiver."""

    def connectionMade(self) -> None:
        self.received: list = []

    def stringReceived(self, string: bytes) -> None:
        self.received.append(json.loads(string))


def test_wire_compatible_with_twisted_int32_string_receiver(
    clock: Clock, registry: HandlerRegistry
) -> None:
    server_factory = ServerFactory(make_config(), registry, clock)
    client_factory = Factory.forProtocol(Int32Client)
    client, _server, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
    )
    pump.flush()
    assert client.received[0]["type"] == "hello"
    for i in range(5):
        client.sendString(json.dumps({"type": "echo", "id": i, "data": "x" * i * 1000}).encode())
    pump.flush()
    assert [m["id"] for m in client.received[1:]] == [0, 1, 2, 3, 4]
    assert client.received[5]["data"] == "x" * 4000
    assert len(server_factory.clients) == 1
    client.transport.loseConnection()
    pump.flush()
    assert server_factory.clients == {}


def test_handler_deferred_fired_after_disconnect_is_dropped(
    clock: Clock, registry: HandlerRegistry
) -> None:
    factory = ServerFactory(make_config(), registry, clock)
    pending: list[Deferred] = []
    factory.registry.add("slow", lambda request: pending.append(Deferred()) or pending[-1])
    peer = Peer(factory)
    peer.send({"type": "slow", "id": 1})
    peer.disconnect()
    pending[0].callback("late")
    assert peer.received() == []

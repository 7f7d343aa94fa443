"""Seed framing: the codec at every split point, and the server speaking it."""

from __future__ import annotations

import json

import pytest
from helpers import make_config
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import HandlerRegistry
from heartbeatd.wire import HEARTBEAT, FrameTooLarge, FramingError
from heartbeatd.wire.seed import SeedDecoder, SeedFraming

ENCODE = SeedFraming.encode
TOKEN = b"HeartBeat"


def test_header_is_the_seed_tutorials() -> None:
    body = json.dumps("Thu, 01 Jan 2026 00:00:00 GMT").encode()
    assert ENCODE(body) == b"length:0000000000031" + body
    assert len(b"length:0000000000031") == 20


ITEMS = [TOKEN, ENCODE(b'"a"'), ENCODE(b"{}"), TOKEN, TOKEN, ENCODE(b""), ENCODE(b"[1,2,3]"), TOKEN]
EXPECTED = [HEARTBEAT, b'"a"', b"{}", HEARTBEAT, HEARTBEAT, b"", b"[1,2,3]", HEARTBEAT]


def test_tokens_and_frames_in_one_read() -> None:
    decoder = SeedDecoder(100)
    assert decoder.feed(b"".join(ITEMS)) == EXPECTED
    assert decoder.buffered == 0


def test_every_split_point() -> None:
    stream = b"".join(ITEMS)
    for cut in range(len(stream) + 1):
        decoder = SeedDecoder(100)
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == EXPECTED, cut
        assert decoder.error is None


def test_byte_by_byte() -> None:
    decoder = SeedDecoder(100)
    got = []
    for byte in b"".join(ITEMS):
        got += decoder.feed(bytes([byte]))
    assert got == EXPECTED


@pytest.mark.parametrize(
    "garbage",
    [b"hello", b"HeartBeet", b"length:00000x", b"lenght:", b"\x00\x00\x00\x05", b"{}", b"Heart "],
)
def test_anything_else_at_a_boundary_is_bad_frame(garbage: bytes) -> None:
    decoder = SeedDecoder(100)
    assert decoder.feed(TOKEN + garbage + TOKEN) == [HEARTBEAT]
    assert type(decoder.error) is FramingError
    assert decoder.error.code == "bad_frame"
    assert "at a frame boundary" in str(decoder.error)
    assert decoder.buffered == 0
    assert decoder.feed(TOKEN) == []


def test_garbage_is_caught_on_its_first_wrong_byte() -> None:
    decoder = SeedDecoder(100)
    decoder.feed(b"len")
    assert decoder.error is None  # could still become a header
    decoder.feed(b"x")
    assert decoder.error is not None


def test_oversized_frame_is_refused_from_the_header() -> None:
    decoder = SeedDecoder(10)
    assert decoder.feed(b"length:0000000000011") == []
    assert isinstance(decoder.error, FrameTooLarge)


@given(
    st.lists(st.one_of(st.just(None), st.binary(max_size=40)), max_size=15),
    st.lists(st.integers(0, 2000), max_size=6),
)
def test_property_any_split_decodes_to_the_same_items(parts, cuts) -> None:
    stream = b"".join(TOKEN if p is None else ENCODE(p) for p in parts)
    expected = [HEARTBEAT if p is None else p for p in parts]
    decoder = SeedDecoder(40)
    got, last = [], 0
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        got += decoder.feed(stream[last:cut])
        last = cut
    assert got == expected


@given(st.binary(max_size=300))
def test_property_arbitrary_bytes_decode_or_fail_cleanly(stream: bytes) -> None:
    decoder = SeedDecoder(64)
    items = decoder.feed(stream)
    consumed = b"".join(TOKEN if i is HEARTBEAT else ENCODE(i) for i in items)
    assert stream.startswith(consumed)
    if decoder.error is None:
        assert decoder.buffered == len(stream) - len(consumed)
    else:
        assert decoder.buffered == 0


# -- the server in seed framing ----------------------------------------------------------


class SeedPeer:
    def __init__(self, factory: ServerFactory) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        self.decoder = SeedDecoder(10**6)

    def received(self) -> list:
        items = self.decoder.feed(self.transport.value())
        self.transport.clear()
        return [i if i is HEARTBEAT else json.loads(i) for i in items]


@pytest.fixture
def seed_factory(clock: Clock, registry: HandlerRegistry) -> ServerFactory:
    config = make_config(framing="seed", heartbeat={"interval": 10, "timeout": 30})
    factory = ServerFactory(config, registry, clock)
    factory.doStart()
    return factory


def test_seed_client_values_are_echoed_as_plain_values(seed_factory: ServerFactory) -> None:
    peer = SeedPeer(seed_factory)
    assert peer.received()[0]["type"] == "hello"
    date = json.dumps("Thu, 01 Jan 2026 00:00:00 GMT").encode()
    peer.protocol.dataReceived(ENCODE(date) + ENCODE(b"[1,2]") + ENCODE(b'{"no":"type"}'))
    assert peer.received() == ["Thu, 01 Jan 2026 00:00:00 GMT", [1, 2], {"no": "type"}]


def test_envelopes_still_work_in_seed_framing(seed_factory: ServerFactory) -> None:
    peer = SeedPeer(seed_factory)
    peer.received()
    peer.protocol.dataReceived(ENCODE(b'{"type":"echo","id":1,"data":5}') + ENCODE(b"{bad"))
    got = peer.received()
    assert got[0] == {"type": "echo", "id": 1, "data": 5}
    assert got[1]["error"]["code"] == "bad_json"


def test_message_type_is_configurable(clock: Clock, registry: HandlerRegistry) -> None:
    registry.add("upper", lambda request: str(request.data).upper())
    config = make_config(framing="seed", seed={"message_type": "upper"})
    peer = SeedPeer(ServerFactory(config, registry, clock))
    peer.received()
    peer.protocol.dataReceived(ENCODE(b'"shout"'))
    assert peer.received() == ["SHOUT"]


def test_token_heartbeats_both_ways(seed_factory: ServerFactory, clock: Clock) -> None:
    peer = SeedPeer(seed_factory)
    peer.received()
    peer.protocol.dataReceived(TOKEN)  # the client's heartbeat: answered with a token
    assert peer.received() == [HEARTBEAT]
    clock.advance(10)  # quiet client: the server's sweep sends the token
    assert peer.received() == [HEARTBEAT]
    clock.advance(0.01)
    peer.protocol.dataReceived(TOKEN)  # the client's answer: not answered again
    assert peer.received() == []
    assert peer.protocol.last_rtt == pytest.approx(0.01)


def test_silent_seed_client_is_evicted(seed_factory: ServerFactory, clock: Clock) -> None:
    peer = SeedPeer(seed_factory)
    peer.protocol.dataReceived(TOKEN)  # heard once, then silent: the sweep's business
    clock.pump([10] * 4)
    assert peer.transport.disconnected
    assert peer.protocol.close_reason == "heartbeat_timeout"


def test_garbage_gets_bad_frame_and_close(seed_factory: ServerFactory) -> None:
    peer = SeedPeer(seed_factory)
    peer.received()
    peer.protocol.dataReceived(ENCODE(b'"ok"') + b"GET / HTTP/1.1\r\n")
    got = peer.received()
    assert got[0] == "ok"
    assert got[1]["error"]["code"] == "bad_frame"
    assert peer.transport.disconnecting

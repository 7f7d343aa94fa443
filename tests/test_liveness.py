"""Hostile-peer defences on a Clock: liveness is a frame, deadlines, bounds, sniffing, log limits.

The same defences are driven over real sockets in test_hostile_peers.py; here each rule is
pinned down deterministically.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from helpers import Peer, frame, make_config
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from heartbeatd._logging import LogLimiter
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import HandlerRegistry
from heartbeatd.wire import envelope
from heartbeatd.wire.envelope import exceeds_depth, nesting_exceeds
from heartbeatd.wire.sniff import identify


def started(clock: Clock, registry: HandlerRegistry, **limits: Any) -> ServerFactory:
    config = make_config(heartbeat={"interval": 10, "timeout": 30}, limits=limits)
    factory = ServerFactory(config, registry, clock)
    factory.doStart()
    return factory


def header(length: int) -> bytes:
    return struct.pack("!I", length)


# -- liveness is a complete frame -----------------------------------------------------------


def test_bytes_of_an_unfinished_frame_are_not_a_sign_of_life(
    clock: Clock, registry: HandlerRegistry
) -> None:
    factory = started(clock, registry, first_frame_timeout=0)
    peer = Peer(factory)
    seen = peer.protocol.last_seen
    clock.advance(5)
    peer.protocol.dataReceived(header(100) + b"x")
    assert peer.protocol.last_seen == seen
    assert peer.protocol.frame_started == 5
    clock.advance(1)
    peer.send({"type": "ping"})  # not yet: it is body bytes of the unfinished frame
    assert peer.protocol.last_seen == seen


def test_a_trickled_frame_is_closed_after_frame_timeout(
    clock: Clock, registry: HandlerRegistry
) -> None:
    factory = started(clock, registry, first_frame_timeout=0, frame_timeout=60)
    peer = Peer(factory)
    peer.protocol.dataReceived(header(1000))
    for _ in range(80):  # one byte a second, never finishing
        clock.advance(1)
        if not peer.transport.disconnected:
            peer.protocol.dataReceived(b"x")
    assert peer.transport.disconnected
    assert peer.protocol.close_reason == "frame_timeout"
    # Evicted at the first sweep past the deadline, not at the heartbeat timeout (30 s).
    record = factory.recent_closes[-1]
    assert 60 <= record.at <= 70


def test_a_slow_but_finishing_large_frame_survives_the_heartbeat_timeout(
    clock: Clock, registry: HandlerRegistry
) -> None:
    factory = started(clock, registry, first_frame_timeout=0, frame_timeout=60)
    peer = Peer(factory)
    body = json.dumps({"type": "echo", "id": 1, "data": "y" * 500}).encode()
    data = header(len(body)) + body
    seconds = (len(data) - 1) // 10  # ten bytes a second: 54 s, past the 30 s timeout
    for i in range(seconds):
        peer.protocol.dataReceived(data[i * 10 : (i + 1) * 10])
        clock.advance(1)
    peer.protocol.dataReceived(data[seconds * 10 :])
    assert not peer.transport.disconnected
    assert peer.received() == [{"type": "echo", "id": 1, "data": "y" * 500}]
    assert peer.protocol.frame_started is None
    assert peer.protocol.last_seen == seconds > 30


# -- first frame --------------------------------------------------------------------------


def test_a_silent_new_connection_is_closed_after_first_frame_timeout(
    clock: Clock, registry: HandlerRegistry
) -> None:
    factory = started(clock, registry, first_frame_timeout=4)
    peer = Peer(factory)
    clock.pump([1] * 6)
    assert peer.transport.disconnected
    assert peer.protocol.close_reason == "first_frame_timeout"
    assert factory.recent_closes[-1].at <= 4 * 1.25


def test_a_listening_client_answers_the_early_ping_and_stays(
    clock: Clock, registry: HandlerRegistry
) -> None:
    factory = started(clock, registry, first_frame_timeout=4)
    peer = Peer(factory)
    for _ in range(8):
        clock.advance(1)
        for message in peer.received():
            if message["type"] == "ping":  # what the client library does
                peer.send({"type": "pong", "id": message["id"]})
    assert not peer.transport.disconnected
    assert not peer.protocol.awaiting_first_frame


def test_a_client_that_speaks_first_is_not_pinged_early(
    clock: Clock, registry: HandlerRegistry
) -> None:
    factory = started(clock, registry, first_frame_timeout=4)
    peer = Peer(factory)
    peer.send({"type": "echo", "id": 1, "data": 1})
    peer.received()
    clock.pump([1] * 8)
    assert peer.received() == []
    assert not peer.transport.disconnected


# -- bounded partial frames ------------------------------------------------------------------


def test_unfinished_frames_of_all_clients_have_a_bound(
    clock: Clock, registry: HandlerRegistry
) -> None:
    factory = started(clock, registry, first_frame_timeout=0, max_partial_frame_bytes=5000)
    peers = [Peer(factory, port=40000 + i) for i in range(4)]
    for peer in peers:
        peer.protocol.dataReceived(header(100_000) + b"z" * 2000)
    assert factory.partial_bytes <= 5000
    overloaded = [p for p in peers if p.transport.disconnecting]
    assert len(overloaded) == 2
    (error,) = overloaded[0].received()
    assert error["error"]["code"] == "overloaded"
    assert "5000" in error["error"]["message"]
    assert factory.errors["overloaded"] == 2
    # Closing a holder gives its bytes back.
    peers[0].protocol.connectionLost(None)
    assert factory.partial_bytes == 2004


# -- JSON nesting -----------------------------------------------------------------------------


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def test_json_deeper_than_the_limit_gets_too_deep_and_no_traceback(
    factory: ServerFactory, log_events: list[dict]
) -> None:
    peer = Peer(factory)
    peer.send({"type": "echo", "id": 7, "data": nested(300)})
    peer.send({"type": "echo", "id": 8, "data": nested(63)})
    deep, fine = peer.received()
    assert deep["error"]["code"] == "too_deep" and deep["id"] == 7
    assert fine == {"type": "echo", "id": 8, "data": nested(63)}
    assert not peer.transport.disconnecting
    assert not [e for e in log_events if e.get("log_failure")]


def test_nesting_check_counts_levels_exactly() -> None:
    assert not nesting_exceeds(nested(3), 3)
    assert nesting_exceeds(nested(4), 3)
    assert nesting_exceeds({"a": [{"b": {}}]}, 2)
    assert not nesting_exceeds([[], {}, [1, 2]], 2)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=60,
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    value=st.lists(json_values, max_size=4)
    | st.dictionaries(st.text(max_size=5), json_values, max_size=4),
    limit=st.integers(min_value=0, max_value=8),
)
def test_depth_check_short_cuts_agree_with_the_walk(value: Any, limit: int) -> None:
    """`exceeds_depth` skips the walk (and the byte count) where it can; never the answer.

    (Bodies reach the depth check only when they parsed to an object or an array.)
    """
    body = json.dumps(value).encode()
    assert exceeds_depth(value, body, limit) == nesting_exceeds(value, limit)


def test_a_long_string_body_is_not_scanned_for_brackets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 MiB string of brackets in ``data`` is depth 1: answered from the parsed value,
    without the byte scan; a value with many members is scanned first, then walked."""
    scans: list[int] = []
    count = envelope.may_be_deeper_than

    def counted(body: bytes, limit: int) -> bool:
        scans.append(len(body))
        return count(body, limit)

    monkeypatch.setattr(envelope, "may_be_deeper_than", counted)
    value = {"type": "echo", "data": "[{" * 512 * 1024}
    body = json.dumps(value).encode()
    assert not exceeds_depth(value, body, 4)
    assert scans == []
    # Many members: past the walk's budget the bracket count decides first, then the walk.
    long_flat = [1] * 1000
    assert not exceeds_depth(long_flat, json.dumps(long_flat).encode(), 4)
    deep_at_the_end = [*long_flat, nested(5)]
    assert exceeds_depth(deep_at_the_end, json.dumps(deep_at_the_end).encode(), 4)
    assert len(scans) == 2
    assert exceeds_depth({"type": "echo", "data": nested(5)}, json.dumps(nested(5)).encode() * 2, 4)


# -- foreign protocols -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first_bytes", "kind"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "http"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "http2"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "tls"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "ssh"),
        (b"*1\r\n$4\r\nPING\r\n", "resp"),
    ],
)
def test_foreign_protocols_get_wrong_protocol(
    clock: Clock, registry: HandlerRegistry, first_bytes: bytes, kind: str
) -> None:
    # A frame limit so large that "GET " would be a valid length: sniffing must not care.
    factory = ServerFactory(make_config(max_frame_bytes=2**32 - 1), registry, clock)
    peer = Peer(factory)
    for i in range(len(first_bytes)):  # one byte at a time: the worst case
        if peer.transport.disconnecting:
            break
        peer.protocol.dataReceived(first_bytes[i : i + 1])
    (error,) = peer.received()
    assert error["error"]["code"] == "wrong_protocol"
    assert "int32" in error["error"]["message"]
    assert peer.transport.disconnecting
    assert factory.foreign[kind] == 1


def test_identify_leaves_our_own_frames_alone() -> None:
    assert identify(frame({"type": "ping"})[:16]) is None
    assert identify(b"length:0000000000002[]") is None
    assert identify(b"HeartBeat") is None
    assert identify(b"G") == ""  # undecided: could still be GET


# -- log flood -------------------------------------------------------------------------------


def test_per_event_log_lines_are_rate_limited_and_counters_stay_exact(
    clock: Clock, registry: HandlerRegistry, log_events: list[dict]
) -> None:
    factory = started(clock, registry, max_connections=1)
    factory.log_limiter.lines = 3
    factory.log_limiter.window = 10
    Peer(factory)
    for _ in range(50):
        factory.buildProtocol(None)  # refused: over max_connections
    refusals = [e for e in log_events if "Refused a connection" in e.get("log_format", "")]
    assert len(refusals) == 3
    assert factory.refused == 50
    clock.advance(10)  # the next sweep reports the rest
    summaries = [e for e in log_events if "suppressed" in e.get("log_format", "")]
    assert len(summaries) == 1 and summaries[0]["count"] == 47


def test_log_limiter_windows() -> None:
    clock = Clock()
    limiter = LogLimiter(clock, lines=2, window=5)
    assert [limiter.allow("x") for _ in range(4)] == [True, True, False, False]
    assert limiter.allow("y")
    clock.advance(5)
    assert limiter.allow("x")
    assert limiter.suppressed == {"x": 2}


# -- outbound accounting ----------------------------------------------------------------------


def test_repeated_pause_calls_do_not_reset_the_backlog(
    clock: Clock, registry: HandlerRegistry
) -> None:
    factory = started(clock, registry, max_outbound_buffer_bytes=4096)
    peer = Peer(factory)
    protocol = peer.protocol
    protocol.pauseProducing()
    for _ in range(10):  # Twisted pauses us again on every write while its buffer is full
        protocol.send("news", "n" * 1000)
        protocol.pauseProducing()
    assert protocol.close_reason == "slow_consumer"


def test_one_frame_larger_than_the_limit_reaches_a_client_that_reads(
    clock: Clock, registry: HandlerRegistry
) -> None:
    factory = started(clock, registry, max_outbound_buffer_bytes=4096)
    peer = Peer(factory)
    peer.received()
    peer.protocol.send("big", "b" * 20_000)
    peer.protocol.pauseProducing()  # the transport's buffer is full of that one frame
    peer.protocol.resumeProducing()  # ... and the client read it
    peer.protocol.send("after", 1)
    assert peer.protocol.close_reason is None
    assert [m["type"] for m in peer.received()] == ["big", "after"]

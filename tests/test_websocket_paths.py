"""The WebSocket adapter's frame fast path and wsproto must put the same bytes on the wire.

`read_text_frames` takes whole text messages off the front of a read and leaves everything
else to wsproto.  A protocol with ``frame_fast_path = False`` gives every byte to wsproto, so
for any sequence of frames (whole messages, fragments with control frames between them,
faults of every kind), cut into reads anywhere, both must write identical bytes and end the
connection the same way.
"""

from __future__ import annotations

import json
from typing import Any

from helpers import make_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_protocol_paths import _FixedIdFactory, _registry
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from wsclient import BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT, frame, handshake_request

from heartbeatd.websocket.protocol import WebSocketProtocol, WebSocketSite
from heartbeatd.wire.websocket import read_text_frames

MAX = 512


class _WsprotoOnly(WebSocketProtocol):
    frame_fast_path = False


def _envelope(draw: Any) -> bytes:
    type_ = draw(st.sampled_from(["echo", "ping", "const", "later", "refuse", "crash", "nope"]))
    data = draw(st.one_of(st.none(), st.integers(), st.text(max_size=20)))
    return json.dumps({"type": type_, "id": draw(st.integers(0, 9)), "data": data}).encode()


@st.composite
def frames(draw: Any) -> bytes:
    kind = draw(
        st.sampled_from(
            ["text"] * 6
            + ["fragmented", "ping", "pong", "bad-utf8", "binary", "unmasked", "too-large"]
            + ["rsv", "reserved-opcode", "close", "not-json", "long-length"]
        )
    )
    body = _envelope(draw)
    if kind == "text":
        return frame(TEXT, body)
    if kind == "fragmented":
        cut = draw(st.integers(0, len(body)))
        middle = frame(PING, b"p") if draw(st.booleans()) else b""
        return frame(TEXT, body[:cut], fin=False) + middle + frame(CONTINUATION, body[cut:])
    if kind == "ping":
        return frame(PING, draw(st.binary(max_size=10)))
    if kind == "pong":
        return frame(PONG, b"")
    if kind == "bad-utf8":
        return frame(TEXT, b'{"type":"echo","data":"\xc3"}')
    if kind == "binary":
        return frame(BINARY, body)
    if kind == "unmasked":
        return frame(TEXT, body, mask=False)
    if kind == "too-large":
        return frame(TEXT, b'"' + b"x" * MAX + b'"')
    if kind == "rsv":
        return frame(TEXT, body, rsv=2)
    if kind == "reserved-opcode":
        return frame(0xB, b"")
    if kind == "close":
        return frame(CLOSE, b"\x03\xe8")
    if kind == "not-json":
        return frame(TEXT, b"[1, 2]")
    # A short length written in the 8-byte form: a protocol error for wsproto.
    head = bytes((0x81, 0x80 | 127)) + len(body).to_bytes(8, "big")
    return head + b"\0\0\0\0" + body


def _run(protocol_type: type[WebSocketProtocol], data: bytes, cuts: list[int]) -> Any:
    config = make_config(max_frame_bytes=MAX, websocket={"listen": "tcp:0"})
    factory = _FixedIdFactory(config, _registry(), Clock())
    site = WebSocketSite(factory)
    protocol = protocol_type(site)
    protocol.factory = factory
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
    protocol.makeConnection(transport)
    protocol.dataReceived(handshake_request())
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        if start < cut:
            protocol.dataReceived(data[start:cut])
            start = cut
    return transport.value(), transport.disconnecting, protocol.close_reason


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames(), min_size=1, max_size=8), st.data())
def test_fast_path_and_wsproto_write_the_same_bytes(parts: list[bytes], data: Any) -> None:
    stream = b"".join(parts)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    assert _run(WebSocketProtocol, stream, cuts) == _run(_WsprotoOnly, stream, cuts)


def test_the_fast_path_takes_whole_text_messages_and_stops_at_anything_else() -> None:
    first, second = frame(TEXT, b'{"a":1}'), frame(TEXT, "€".encode())
    rest = frame(PING, b"") + frame(TEXT, b"{}")
    assert read_text_frames(first + second + rest, MAX) == (
        [b'{"a":1}', "€".encode()],
        len(first + second),
    )
    for stop in (
        frame(TEXT, b"x", fin=False),
        frame(TEXT, b"x", mask=False),
        frame(TEXT, b"x", rsv=4),
        frame(TEXT, b"\xff"),
        frame(TEXT, b"x" * (MAX + 1)),
        frame(TEXT, b"x" * 300)[:-1],  # incomplete
    ):
        assert read_text_frames(stop, MAX) == ([], 0)

"""The inlined hot path and the general path must put the same bytes on the wire.

The hot path inlined in `Connection._deliver` answers plain synchronous requests without
building `Message` objects; anything unusual falls back to `_handle_item`.  A protocol with
``fast_path = False`` sends everything through the general path, so for any sequence of frames,
cut into reads anywhere, the two must write identical bytes.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from helpers import make_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import NO_REPLY, HandlerError, HandlerRegistry, Reply, Request
from heartbeatd.server.protocol import ServerProtocol


class _GeneralPathProtocol(ServerProtocol):
    fast_path = False


class _FixedIdFactory(ServerFactory):
    """Session ids are random; both runs must greet with the same bytes."""

    @staticmethod
    def new_session_id() -> str:
        return "0123456789abcdef"


def _registry() -> HandlerRegistry:
    registry = HandlerRegistry()
    registry.add("echo", lambda r: r.data)
    registry.add("ping", lambda r: Reply("pong"))
    registry.add("quiet", lambda r: NO_REPLY)
    registry.add("const", lambda r: {"n": 1, "s": "é", "l": [1.5, None, True]})
    registry.add("later", lambda r: succeed(r.data))
    registry.add("refuse", _refuse)
    registry.add("slow_down", _slow_down)
    registry.add("crash", _crash)
    registry.add("unencodable", lambda r: {1, 2})
    registry.add("who", lambda r: r.session.session_id)
    return registry


def _refuse(request: Request) -> Any:
    raise HandlerError("nope", "refused on purpose")


def _slow_down(request: Request) -> Any:
    """A refusal of a rate: its error frame carries ``retry_after`` on both paths."""
    raise HandlerError("rate_limited", "slow down", retry_after=0.25)


def _crash(request: Request) -> Any:
    raise RuntimeError("handler bug (expected in this test)")


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
_handled = [
    "echo",
    "ping",
    "quiet",
    "const",
    "later",
    "refuse",
    "slow_down",
    "crash",
    "unencodable",
    "who",
]
_types = st.sampled_from([*_handled, "nosuch", "pong", "error", ""])
_ids = st.none() | st.integers(-5, 5) | st.text(max_size=3) | st.just(True) | st.just(1.5)


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=12))  # usually not JSON
    if kind == 1:
        return json.dumps(draw(_json_values)).encode()  # JSON, maybe not an envelope
    envelope: dict[str, Any] = {"type": draw(_types)}
    msg_id = draw(_ids)
    if msg_id is not None:
        envelope["id"] = msg_id
    if draw(st.booleans()):
        envelope["data"] = draw(_json_values)
    return json.dumps(envelope).encode()


def _run(protocol_class: type[ServerProtocol], stream: bytes, cuts: list[int]) -> bytes:
    factory = _FixedIdFactory(make_config(), _registry(), Clock())
    factory.protocol = protocol_class
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol = factory.buildProtocol(transport.getPeer())
    protocol.makeConnection(transport)
    start = 0
    for cut in [*sorted(cuts), len(stream)]:
        if cut > start:
            protocol.dataReceived(stream[start:cut])
            start = cut
    return transport.value()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_bodies(), min_size=1, max_size=12), st.data())
def test_fast_and_general_paths_write_identical_bytes(bodies: list[bytes], data: Any) -> None:
    stream = b"".join(struct.pack("!I", len(b)) + b for b in bodies)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=4))
    fast = _run(ServerProtocol, stream, cuts)
    general = _run(_GeneralPathProtocol, stream, cuts)
    assert fast == general


def test_the_fast_path_is_taken_for_plain_requests(monkeypatch: Any) -> None:
    """Guards the test above: if nothing took the fast path, it would compare nothing."""
    calls: list[object] = []
    original = ServerProtocol._handle_item
    monkeypatch.setattr(
        ServerProtocol,
        "_handle_item",
        lambda self, item: (calls.append(item), original(self, item)),
    )
    body = json.dumps({"type": "echo", "id": 1, "data": 2}).encode()
    out = _run(ServerProtocol, struct.pack("!I", len(body)) + body, [])
    assert b'{"type":"echo","id":1,"data":2}' in out
    assert calls == []

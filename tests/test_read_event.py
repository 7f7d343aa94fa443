"""The C read path (``_speedups.read_event``) answers exactly as ``LeanServer.doRead``.

`heartbeatd.server.leantcp` hands a `LeanServer` read event to one C call when the module
is built: for a read of whole frames on a plain connection it does what ``doRead``,
``dataReceived``, ``_deliver`` and the direct write do, and gives every other read to
``dataReceived``.  Here the same byte stream, cut into the same reads, goes through a real
loopback socket into a daemon factory on the real epoll reactor, once with the C read path
and once with Python's: the client must get the same bytes, and the connection must count
the same frames, bytes, errors and close decision.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from helpers import make_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_lean_transport import spin_until
from test_protocol_paths import _FixedIdFactory, _registry
from test_speedups import ODD_TYPE, _deep, _hot_bodies
from twisted.internet.defer import Deferred

from heartbeatd.server import leantcp
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.protocol import ServerProtocol

try:
    from heartbeatd.wire import _speedups  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - test_speedups.test_the_extension_is_built says so
    _speedups = None

reactor: Any
from twisted.internet import reactor  # noqa: E402  (the test drives the real reactor by hand)

pytestmark = [
    pytest.mark.skipif(_speedups is None, reason="the C module is not built"),
    pytest.mark.skipif(
        type(reactor).__name__ != "EPollReactor", reason="the lean dispatch is for epoll"
    ),
]

END = b'{"type":"echo","id":"end"}'


@contextmanager
def read_path(c: bool) -> Iterator[list[int]]:
    """Read events through the C path (``c``) or ``doRead``; yields a count of C calls."""
    calls = [0]
    saved = leantcp._read_event, leantcp._read_event_configured
    real = leantcp._configure_read_event()
    assert real is not None, "configure_reads refused ServerProtocol"

    def counted(connection: Any) -> Any:
        calls[0] += 1
        return real(connection)

    leantcp._read_event, leantcp._read_event_configured = (counted if c else None), True
    try:
        yield calls
    finally:
        leantcp._read_event, leantcp._read_event_configured = saved


def send_all(client: socket.socket, data: bytes, drain: Any) -> None:
    """``sendall`` on a non-blocking socket, the reactor (and the client's reads) running
    while the kernel's buffers are full."""
    view = memoryview(data)
    while view:
        try:
            view = view[client.send(view) :]
        except BlockingIOError:
            drain()
            reactor.runUntilCurrent()
            reactor.doIteration(0.001)


@contextmanager
def connected(factory: ServerFactory) -> Iterator[tuple[socket.socket, ServerProtocol]]:
    """``factory`` listening on a lean port of 127.0.0.1, one client connected to it: the
    client's socket and the server's protocol; all closed afterwards."""
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    assert leantcp.adopt(port)
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        spin_until(lambda: bool(factory.clients))
        (protocol,) = factory.clients.values()
        yield client, protocol
    finally:
        client.close()
        spin_until(lambda: not factory.clients)
        port.stopListening()
        spin_until(lambda: not port.connected)
        leantcp.uninstall_dispatch(reactor)


def quiet_factory(registry: Any = None) -> ServerFactory:
    """A factory whose heartbeat never pings during a test."""
    config = make_config(heartbeat={"interval": 3600, "timeout": 7200})
    return ServerFactory(config, registry or _registry(), reactor)


def run(stream: bytes, cuts: list[int], max_frame_bytes: int) -> tuple[Any, ...]:
    """Send ``stream`` in reads cut at ``cuts``, each read taken by the server before the
    next is sent; then everything the client got and what the connection counted."""
    held: list[Deferred[Any]] = []
    registry = _registry()
    registry.add("hold", lambda r: held.append(Deferred()) or held[-1])
    registry.add(ODD_TYPE, lambda r: [r.type, r.id, r.data])
    registry.add("deep", _deep)
    config = make_config(
        max_frame_bytes=max_frame_bytes, heartbeat={"interval": 3600, "timeout": 7200}
    )
    factory = _FixedIdFactory(config, registry, reactor)  # the same session id in both runs
    with connected(factory) as (client, protocol):
        try:
            return _send_cut(factory, client, protocol, held, stream, cuts)
        finally:
            for d in held:
                d.callback("late")


def _send_cut(
    factory: ServerFactory,
    client: socket.socket,
    protocol: ServerProtocol,
    held: list[Deferred[Any]],
    stream: bytes,
    cuts: list[int],
) -> tuple[Any, ...]:
    """`run`'s steps once connected."""
    client.setblocking(False)
    received = bytearray()
    closed = [False]

    def drain() -> None:
        while not closed[0]:
            try:
                chunk = client.recv(1 << 20)
            except BlockingIOError:
                return
            if not chunk:
                closed[0] = True
            received.extend(chunk)

    stream += struct.pack("!I", len(END)) + END
    start = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        if cut <= start:
            continue
        send_all(client, stream[start:cut], drain)
        target = protocol.bytes_in + cut - start
        spin_until(lambda target=target: protocol.bytes_in >= target or not protocol.connected)
        start = cut
        if held and cut % 3 == 0:  # some replies finish between reads, some after
            held.pop(0).callback({"late": cut})
        if not protocol.connected:
            break

    def finished() -> bool:
        while held:  # the end marker's reply comes after every held one
            held.pop(0).callback("late")
        drain()
        return closed[0] or received.endswith(END[:-1] + b',"data":null}')

    spin_until(finished)
    return (
        bytes(received),
        protocol.close_reason,
        protocol.frames_in,
        protocol.frames_out,
        protocol.bytes_in,
        protocol.bytes_out,
        protocol.pings_unanswered,
        protocol.awaiting_first_frame,
        dict(factory.errors),
        factory.partial_bytes,
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(_hot_bodies(), min_size=1, max_size=12),
    st.data(),
    st.sampled_from([None, 8, 4096]),
)
@pytest.mark.scenario
def test_the_c_read_path_answers_as_do_read(
    bodies: list[bytes], data: Any, tail: int | None
) -> None:
    stream = b"".join(struct.pack("!I", len(b)) + b for b in bodies)
    if tail is not None:  # a header past max_frame_bytes (1000 here) ends the stream
        stream += struct.pack("!I", 1000 + tail) + b"x" * min(tail, 20)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    with read_path(c=False):
        expected = run(stream, cuts, 1000)
    with read_path(c=True) as calls:
        got = run(stream, cuts, 1000)
    assert calls[0] > 0
    assert got == expected


@st.composite
def _large_bodies(draw: st.DrawFn) -> bytes:
    """Echo requests around and above the decoder's large-body size (64 KiB), which the C
    path receives straight into the body once its first read has come."""
    size = draw(st.sampled_from([65_530, 65_536, 70_000, 200_000, 262_144, 300_000]))
    text = draw(st.sampled_from(["x", "ab~ ", 'q"\\', "é"])) * (size // 4)
    body = json.dumps({"type": "echo", "id": draw(st.integers(0, 9)), "data": text}).encode()
    return body if draw(st.booleans()) else body[:-1]  # invalid JSON too


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(_large_bodies() | _hot_bodies(), min_size=1, max_size=4),
    st.data(),
)
def test_large_bodies_on_the_c_read_path_answer_as_do_read(bodies: list[bytes], data: Any) -> None:
    stream = b"".join(struct.pack("!I", len(b)) + b for b in bodies)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    with read_path(c=False):
        expected = run(stream, cuts, 1 << 20)
    with read_path(c=True):
        got = run(stream, cuts, 1 << 20)
    assert got == expected


def test_a_large_body_is_received_into_place(monkeypatch: Any) -> None:
    """After its first read, the rest of a large body does not pass through dataReceived:
    the C path receives it into the decoder's buffer, and the echo comes back whole."""
    reads: list[int] = []
    original = ServerProtocol.dataReceived

    def spy(self: ServerProtocol, data: bytes) -> None:
        reads.append(len(data))
        original(self, data)

    monkeypatch.setattr(ServerProtocol, "dataReceived", spy)
    body = json.dumps({"type": "echo", "id": 1, "data": "y" * 300_000}).encode()
    frame = struct.pack("!I", len(body)) + body
    with read_path(c=True):
        got = run(frame * 3, [], 1 << 20)
    assert got[1] is None and got[2] == 4  # three echoes and the end marker
    assert got[0].count(b"y" * 300_000) == 3
    assert got[4] == len(frame) * 3 + 4 + len(END)
    assert sum(reads) < len(frame) * 3 // 2, reads


def test_whole_frames_never_reach_data_received(monkeypatch: Any) -> None:
    """Guards the comparison above: the C path does take whole-frame reads itself, and gives
    a read that ends inside a frame to ``dataReceived``."""
    reads: list[bytes] = []
    original = ServerProtocol.dataReceived

    def spy(self: ServerProtocol, data: bytes) -> None:
        reads.append(data)
        original(self, data)

    monkeypatch.setattr(ServerProtocol, "dataReceived", spy)
    echo = struct.pack("!I", 31) + b'{"type":"echo","id":1,"data":2}'
    size = len(echo)
    with read_path(c=True) as calls:
        got = run(echo * 4, [size, size * 3, size * 3 + 7], 1000)
    assert calls[0] >= 4
    # The first read is the sniffing one (dataReceived); the second, two whole frames, is
    # answered in C; the third ends inside a frame and the fourth completes it: both go to
    # dataReceived (the decoder holds bytes in between).
    assert reads[0] == echo
    assert reads[1:] == [echo[:7], echo[7:] + struct.pack("!I", len(END)) + END]
    assert got[2] == 5  # four echoes and the end marker answered
    assert got[1] is None


def test_an_aborted_connection_reads_nothing_more() -> None:
    """Twisted's abortConnection replaces ``doRead`` with a no-op on the instance: a read
    event already returned by epoll must run that, not read and answer."""
    with read_path(c=True), connected(quiet_factory()) as (client, protocol):
        transport = protocol.transport
        echo = struct.pack("!I", 31) + b'{"type":"echo","id":1,"data":2}'
        client.sendall(echo)  # the sniffing read first, then a plain one
        spin_until(lambda: protocol.frames_in == 1)
        frames = protocol.frames_in
        client.sendall(echo)
        transport.abortConnection()
        assert leantcp._read_event is not None
        assert leantcp._read_event(transport) is None
        assert protocol.frames_in == frames


def test_a_subclass_is_read_by_its_own_data_received() -> None:
    """``configure_reads`` is for ServerProtocol exactly: a subclass's overrides run."""

    class Counting(ServerProtocol):
        seen = 0

        def dataReceived(self, data: bytes) -> None:
            Counting.seen += 1
            super().dataReceived(data)

    factory = quiet_factory()
    factory.protocol = Counting
    with read_path(c=True) as calls, connected(factory) as (client, protocol):
        echo = struct.pack("!I", 31) + b'{"type":"echo","id":1,"data":2}'
        for n in (1, 2, 3):
            client.sendall(echo)
            spin_until(lambda n=n: protocol.frames_in == n)
        assert calls[0] >= 3 and Counting.seen == 3


def test_the_c_read_path_leaks_no_references(monkeypatch: Any) -> None:
    """Thousands of C-path reads (answered, failing, refused and unparsable bodies, several
    frames a read) keep the interpreter's allocated blocks flat: a reference leaked per read
    would keep thousands more."""
    import gc
    import sys

    monkeypatch.setattr(ServerFactory, "log_allowed", lambda self, cause: False)
    bodies = [
        b'{"type":"echo","id":1,"data":"x"}',
        b'{"type":"crash","id":2}',
        b'{"type":"unencodable","id":3}',
        b"not json",
        b'{"type":"nosuch","id":4}',
        b'{"type":"echo","id":5,"data":{"a":[1,2]}}',
    ]
    reads = [struct.pack("!I", len(b)) + b for b in bodies]
    reads.append(reads[0] * 3)

    def send(client: socket.socket, protocol: ServerProtocol, rounds: int) -> None:
        for _ in range(rounds):
            for data in reads:
                target = protocol.bytes_in + len(data)
                client.sendall(data)
                spin_until(lambda target=target: protocol.bytes_in >= target)
                try:
                    while client.recv(1 << 16):
                        pass
                except BlockingIOError:
                    pass

    with read_path(c=True) as calls, connected(quiet_factory()) as (client, protocol):
        client.setblocking(False)
        send(client, protocol, 50)
        gc.collect()
        before = sys.getallocatedblocks()
        send(client, protocol, 400)
        gc.collect()
        grown = sys.getallocatedblocks() - before
        assert calls[0] >= 400 * len(reads) and protocol.connected
        assert grown < 1000, grown

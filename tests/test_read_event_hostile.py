"""The C read path (``_speedups.read_event``) against a hostile peer: what it reads, holds and
counts must stay what ``LeanServer.doRead`` would (tests/test_read_event.py compares ordinary
streams; here are the reads a hostile peer chooses, and connections a handler changes
mid-read).

Real loopback sockets, the real epoll reactor driven by hand (as in tests/test_read_event.py),
and each test runs the same peer on both paths where the comparison is the point.
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
from test_lean_transport import spin_until
from test_protocol_paths import _registry
from test_read_event import connected, read_path
from test_read_event import pytestmark as read_event_pytestmark

from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.protocol import ServerProtocol

reactor: Any
from twisted.internet import reactor  # noqa: E402  (the test drives the real reactor by hand)

pytestmark = read_event_pytestmark  # the C module built, the epoll reactor

#: LeanServer's (Twisted's) read size: what one doRead takes at most.
BUFFER_SIZE = 65536


def framed(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


def echo(data: Any, id_: Any = 1) -> bytes:
    return framed(json.dumps({"type": "echo", "id": id_, "data": data}).encode())


class Peer:
    """A client socket on a listening factory, and the server side's protocol."""

    def __init__(self, factory: ServerFactory, client: socket.socket) -> None:
        self.factory = factory
        self.client = client
        spin_until(lambda: bool(factory.clients))
        (self.protocol,) = factory.clients.values()
        self.received = bytearray()
        self.eof = False

    def drain(self) -> None:
        while not self.eof:
            try:
                chunk = self.client.recv(1 << 20)
            except BlockingIOError:
                return
            except ConnectionResetError:  # aborted: what came before the reset is kept
                chunk = b""
            if not chunk:
                self.eof = True
            self.received.extend(chunk)

    def send(self, data: bytes) -> None:
        """Send all of ``data``, the reactor running while the kernel's buffers are full,
        then wait until the server has read it (or closed)."""
        protocol = self.protocol
        target = protocol.bytes_in + len(data)
        view = memoryview(data)
        while view:
            try:
                view = view[self.client.send(view) :]
            except BlockingIOError:
                self.drain()
                reactor.runUntilCurrent()
                reactor.doIteration(0.001)
        spin_until(lambda: protocol.bytes_in >= target or not protocol.connected)

    def stuff(self, data: bytes) -> int:
        """Put as much of ``data`` into the kernel's buffers as they take, the server not
        reading meanwhile: how many bytes went."""
        sent = 0
        while sent < len(data):
            try:
                sent += self.client.send(data[sent:])
            except BlockingIOError:
                break
        return sent

    def frames(self) -> list[bytes]:
        """The bodies received so far (the hello first)."""
        self.drain()
        out, at = [], 0
        data = bytes(self.received)
        while len(data) - at >= 4:
            (n,) = struct.unpack_from("!I", data, at)
            if len(data) - at - 4 < n:
                break
            out.append(data[at + 4 : at + 4 + n])
            at += 4 + n
        return out


@contextmanager
def serving(c: bool, registry: Any = None, **sections: Any) -> Iterator[Peer]:
    """A factory on 127.0.0.1 port 0 with its reads on the C path (``c``) or ``doRead``, and
    one connected peer."""
    sections.setdefault("heartbeat", {"interval": 3600, "timeout": 7200})
    config = make_config(**sections)
    factory = ServerFactory(config, registry or _registry(), reactor)
    with connected(factory) as (client, _protocol), read_path(c) as calls:
        client.setblocking(False)
        peer = Peer(factory, client)
        peer.calls = calls  # type: ignore[attr-defined]
        yield peer


# -- memory: a large body read into place -------------------------------------------------------


@pytest.mark.parametrize("c", [False, True], ids=["doRead", "C"])
def test_a_large_body_never_overshoots_the_partial_limit_by_more_than_a_read(
    c: bool, monkeypatch: Any
) -> None:
    """``limits.max_partial_frame_bytes`` is checked after each read: doRead's reads are at
    most 64 KiB, so a peer gets at most that past the limit before it is closed.  The C path's
    FIONREAD-sized read of a body must not let the peer park megabytes first."""
    held: list[int] = []
    original = ServerProtocol._deliver

    def spy(self: ServerProtocol, items: list[Any], now_held: int, error: Any = None) -> None:
        held.append(now_held)
        original(self, items, now_held, error)

    monkeypatch.setattr(ServerProtocol, "_deliver", spy)
    limit = 100_000
    with serving(c, max_frame_bytes=64 << 20, limits={"max_partial_frame_bytes": limit}) as peer:
        protocol = peer.protocol
        head = struct.pack("!I", 32 << 20) + b'{"type":"echo","data":"'
        peer.send(head + b"x" * 1000)  # the sniffed first read: the decoder holds the body
        assert protocol._held == len(head) + 1000
        # A window as large as autotuning opens on a fast link after a few reads.
        protocol.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        stuffed = peer.stuff(b"x" * (8 << 20))  # all the kernel takes, unread
        assert stuffed > 4 * BUFFER_SIZE
        spin_until(lambda: not protocol.connected)
        assert protocol.close_reason == "overloaded"
    assert max(held) <= limit + BUFFER_SIZE, (max(held), stuffed)


# -- the same peer on both paths -----------------------------------------------------------------


def counters(peer: Peer) -> tuple[Any, ...]:
    p = peer.protocol
    return (
        p.close_reason,
        p.connected,
        p.frames_in,
        p.frames_out,
        p.bytes_in,
        p.bytes_out,
        p.pings_unanswered,
        p.awaiting_first_frame,
        p.frame_started is None,
        p._held,
        p._write_paused,
        p._written_while_paused,
        dict(peer.factory.errors),
        dict(peer.factory.closes),
        peer.factory.partial_bytes,
    )


def both_paths(script: Any, registry: Any = None, **sections: Any) -> None:
    """Run ``script(peer)`` on doRead and on the C path: the peer must get the same frames,
    and the connection and factory must count the same."""
    results = []
    for c in (False, True):
        with serving(c, registry, **sections) as peer:
            script(peer)
            results.append((peer.frames()[1:], counters(peer)))  # (the hello's id differs)
            assert not c or peer.calls[0] > 0  # type: ignore[attr-defined]
    assert results[1] == results[0]


def test_a_reply_that_fills_the_socket_counts_as_written_while_paused() -> None:
    """A reply the kernel takes only part of, with more than bufferSize left, pauses the
    connection (Twisted's buffer is full) during the write itself: _write_many then counts
    it in ``_written_while_paused`` (the backlog estimate), and so must the C write."""

    registry = _registry()
    registry.add("big", lambda r: "y" * 3_000_000)

    def script(peer: Peer) -> None:
        peer.send(echo("a"))  # the sniffed first read
        peer.protocol.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        peer.send(framed(b'{"type":"big","id":2}'))  # the client reads nothing meanwhile
        assert peer.protocol._write_paused

    both_paths(script, registry)


def _changing_registry(holder: list[Any]) -> Any:
    """Handlers that change the connection or the server in the middle of a read."""
    registry = _registry()
    registry.add("close", lambda r: r.session.close("bye"))
    registry.add("evict", lambda r: r._connection.evict("kicked"))  # abortConnection

    def reload(r: Any) -> str:
        factory = holder[0]
        factory.apply_config(make_config(max_frame_bytes=200, heartbeat=factory.config.heartbeat))
        return "reloaded"

    registry.add("reload", reload)
    return registry


def _request(type_: str, id_: Any) -> bytes:
    return framed(json.dumps({"type": type_, "id": id_}).encode())


@pytest.mark.parametrize("kind", ["close", "evict", "reload"])
def test_a_handler_that_changes_the_connection_mid_read(kind: str) -> None:
    """Frames after the one whose handler closes, aborts or reloads (lowering
    max_frame_bytes below the next frames), in the same read and the next one."""
    holder: list[Any] = []
    registry = _changing_registry(holder)

    def script(peer: Peer) -> None:
        holder[:] = [peer.factory]
        peer.send(echo("a"))
        long = echo("z" * 400, 9)
        peer.send(echo(1, 2) + _request(kind, 3) + echo(2, 4) + long + echo(3, 5))
        if peer.protocol.connected and kind == "reload":
            peer.send(echo(4, 6) + long)
        spin_until(lambda: peer.protocol.close_reason is None or not peer.protocol.connected)
        peer.drain()

    both_paths(script, registry, max_frame_bytes=1000)


def test_zero_length_frames_and_a_read_ending_at_a_header() -> None:
    def script(peer: Peer) -> None:
        peer.send(echo("a"))
        peer.send(framed(b"") * 3 + echo(1))
        peer.send(echo(2) + struct.pack("!I", 0))
        peer.send(echo(3) + struct.pack("!I", 31))  # a header, its body in the next read
        peer.send(b'{"type":"echo","id":1,"data":2}' + echo(4))

    both_paths(script)


def test_a_large_body_trickled_then_frames_after_it() -> None:
    """A peer trickles a large body a few bytes a read (FIONREAD small), then completes it
    with whole frames and a too-large header behind it in the same write."""
    body = json.dumps({"type": "echo", "id": 7, "data": "t" * 70_000}).encode()
    frame = framed(body)

    def script(peer: Peer) -> None:
        peer.send(echo("a"))
        peer.send(frame[:100])
        for at in range(100, 160):
            peer.send(frame[at : at + 1])
        peer.send(frame[160:50_000])
        for at in range(50_000, 50_010):
            peer.send(frame[at : at + 1])
        peer.send(frame[50_010:] + echo(8) + struct.pack("!I", 1 << 30) + b"x")
        spin_until(lambda: not peer.protocol.connected)

    both_paths(script, max_frame_bytes=1 << 20)


def test_a_session_started_mid_read() -> None:
    """A read that starts a resumable session in its first frame: the rest of it is numbered
    (the general path), on both paths alike."""

    def script(peer: Peer) -> None:
        peer.send(echo("a"))
        start = framed(b'{"type":"session","id":"s"}')
        peer.send(echo(1) + start + echo(2) + echo(3))
        peer.send(echo(4) + echo(5))

    results = []
    for c in (False, True):
        with serving(c) as peer:
            script(peer)
            frames = [json.loads(f) for f in peer.frames()[1:]]
            for f in frames:  # the session's id and key are random
                if f.get("type") == "session":
                    f["data"] = sorted(f["data"])
            results.append((frames, counters(peer)[2:]))
    assert results[1] == results[0]


@pytest.mark.parametrize("c", [False, True], ids=["doRead", "C"])
def test_a_huge_announced_body_costs_only_the_bytes_received(c: bool) -> None:
    """A header announcing 256 MiB, then 300 kB of body in reads of every size (a few
    bytes, FIONREAD-sized): memory grows with the bytes received, not with the announcement."""
    import tracemalloc

    with serving(c, max_frame_bytes=256 << 20) as peer:
        peer.send(echo("a"))
        tracemalloc.start()
        try:
            peer.send(struct.pack("!I", 256 << 20) + b'{"type":"echo","data":"')
            for size in (1, 2, 3, 100, 5000, 70_000, 1, 200_000, 7, 30_000):
                peer.send(b"x" * size)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peer.protocol._held == 4 + 23 + 305_114
        assert peak < 3 * 305_114 + (1 << 20), peak


def test_a_reply_that_is_not_bytes_is_written_as_its_bytes() -> None:
    """Whatever code appends to the connection's batch (a bytearray here, through the private
    attribute) is written as _write_many writes it: its contents, never the object's memory
    read as if it were bytes."""
    from heartbeatd.server.handlers import NO_REPLY

    registry = _registry()

    def raw(r: Any) -> Any:
        r._connection._batch.append(bytearray(framed(b'{"type":"raw"}')))
        return NO_REPLY

    registry.add("raw", raw)

    def script(peer: Peer) -> None:
        peer.send(echo("a"))
        peer.send(_request("raw", 1))
        peer.send(_request("raw", 2) + echo(3))

    both_paths(script, registry)


@pytest.mark.scenario
def test_bodies_received_into_place_leak_nothing() -> None:
    """Many large bodies received into place (read_into_body, the spare decoder handed back,
    _deliver called from C), answered and refused: traced memory stays flat."""
    import gc
    import sys
    import tracemalloc

    body = json.dumps({"type": "echo", "id": 1, "data": "q" * 70_000}).encode()
    frame = framed(body)
    bad = framed(body[:-1])  # invalid JSON: the general path answers it

    with serving(True, max_frame_bytes=1 << 20) as peer:
        peer.send(echo("a"))

        def rounds(n: int) -> None:
            for _ in range(n):
                for f in (frame, bad):
                    peer.send(f[:1000])
                    peer.send(f[1000:40_000])
                    peer.send(f[40_000:])
                peer.frames()
                peer.received.clear()

        rounds(5)
        tracemalloc.start()
        try:
            gc.collect()
            before = tracemalloc.get_traced_memory()[0], sys.getallocatedblocks()
            rounds(40)  # 240 reads: one object leaked a read would show
            gc.collect()
            grown = (
                tracemalloc.get_traced_memory()[0] - before[0],
                sys.getallocatedblocks() - before[1],
            )
        finally:
            tracemalloc.stop()
        assert peer.protocol.connected and peer.protocol.frames_in == 1 + 45 * 2
        assert grown[0] < 32 * 1024 and grown[1] < 120, grown

"""Idle connections hold no frame decoder: they borrow the factory's spare between frames.

A decoder is kept by a connection only while one of its frames is unfinished (or its
stream is broken); these tests interleave many connections' partial frames to show that
no byte is ever decoded for the wrong connection, and that the memory goes away.
"""

from __future__ import annotations

import itertools
import json
import struct
from typing import Any

from helpers import Peer, frame, make_config
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import default_registry


def server(**sections: Any) -> ServerFactory:
    return ServerFactory(make_config(**sections), default_registry(), Clock())


def echo(peer: int, n: int, size: int) -> bytes:
    return frame({"type": "echo", "id": n, "data": f"{peer}:" + "x" * size})


def test_a_connection_between_frames_holds_no_decoder() -> None:
    factory = server()
    a, b = Peer(factory), Peer(factory, port=40001)
    a.send_raw(echo(0, 1, 10))
    assert a.protocol._decoder is None  # answered, nothing held
    whole = echo(1, 2, 10)
    b.send_raw(whole[:7])  # b's frame is unfinished: b keeps a decoder of its own
    assert b.protocol._decoder is not None
    assert factory.spare_decoder is not b.protocol._decoder
    a.send_raw(echo(0, 3, 10))  # a borrows another one meanwhile
    b.send_raw(whole[7:])
    assert b.protocol._decoder is None
    assert [r["id"] for r in a.received()] == [1, 3]
    assert [r["data"] for r in b.received()] == ["1:" + "x" * 10]


def test_a_broken_stream_keeps_its_decoder_and_the_spare_stays_clean() -> None:
    factory = server(max_frame_bytes=100)
    bad, good = Peer(factory), Peer(factory, port=40001)
    bad.send_raw(struct.pack("!I", 10_000))
    assert bad.received()[-1]["error"]["code"] == "frame_too_large"
    good.send_raw(echo(1, 1, 10))
    assert good.received()[0]["id"] == 1


def test_reload_gives_the_next_borrowed_decoder_the_new_limit() -> None:
    factory = server(max_frame_bytes=1000)
    peer = Peer(factory)
    peer.send_raw(echo(0, 1, 10))
    factory.apply_config(make_config(max_frame_bytes=50))
    peer.send_raw(echo(0, 2, 100))
    assert peer.received()[-1]["error"]["code"] == "frame_too_large"


@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=st.data())
def test_interleaved_partial_frames_of_many_connections_decode_exactly(data: Any) -> None:
    """Each connection gets exactly the replies to its own requests, whatever the order in
    which the connections' reads (split anywhere) arrive."""
    factory = server()
    peers = [Peer(factory, port=40000 + i) for i in range(4)]
    streams = {
        i: b"".join(
            echo(i, n, data.draw(st.integers(0, 300), label="size"))
            for n in range(data.draw(st.integers(1, 4), label="frames"))
        )
        for i in range(len(peers))
    }
    pending = {}
    for i, stream in streams.items():
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=5)))
        bounds = [0, *cuts, len(stream)]
        pending[i] = [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    while any(pending.values()):
        i = data.draw(st.sampled_from([i for i, reads in pending.items() if reads]))
        peers[i].send_raw(pending[i].pop(0))
    for i, peer in enumerate(peers):
        sent = [json.loads(body) for body in _bodies(streams[i])]
        got = peer.received()
        assert [(r["id"], r["data"]) for r in got] == [(s["id"], s["data"]) for s in sent]
        assert peer.protocol._decoder is None


def _bodies(stream: bytes) -> list[bytes]:
    out, offset = [], 0
    while offset < len(stream):
        (length,) = struct.unpack_from("!I", stream, offset)
        out.append(stream[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return out

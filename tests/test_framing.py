"""The int32 codec: round trips, every split point, coalesced reads, limits, fuzzing."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from heartbeatd.wire import FRAMINGS, FrameTooLarge, Int32Decoder, Int32Framing, get_framing
from heartbeatd.wire.int32 import LARGE_BODY

ENCODE = Int32Framing.encode
BODIES = [b'{"type":"ping"}', b"", b"x" * 300, "é€😀".encode(), b"\x00\xff" * 10]


def test_encode_is_length_prefix_then_body() -> None:
    assert ENCODE(b"abc") == b"\x00\x00\x00\x03abc"
    assert ENCODE(b"") == b"\x00\x00\x00\x00"


def test_one_read_with_many_frames_yields_them_in_order() -> None:
    decoder = Int32Decoder(1024)
    assert decoder.feed(b"".join(map(ENCODE, BODIES))) == BODIES
    assert decoder.buffered == 0 and decoder.error is None


def test_stream_split_at_every_byte_boundary() -> None:
    stream = b"".join(map(ENCODE, BODIES))
    for cut in range(len(stream) + 1):
        decoder = Int32Decoder(1024)
        got = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert got == BODIES, f"split at {cut}"


def test_stream_fed_one_byte_at_a_time() -> None:
    stream = b"".join(map(ENCODE, BODIES))
    decoder = Int32Decoder(1024)
    got = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
    assert got == BODIES
    assert decoder.buffered == 0


def test_large_body_in_many_reads_is_reassembled() -> None:
    body = bytes(range(256)) * 1000
    stream = ENCODE(body)
    decoder = Int32Decoder(len(body))
    got = []
    for i in range(0, len(stream), 4096):
        got += decoder.feed(stream[i : i + 4096])
    assert got == [body]


def test_frame_over_the_limit_is_refused_before_its_body_arrives() -> None:
    decoder = Int32Decoder(10)
    # Only the header: the decoder must not wait for (or buffer) 11 bytes of body.
    assert decoder.feed(ENCODE(b"ok") + struct.pack("!I", 11)) == [b"ok"]
    assert isinstance(decoder.error, FrameTooLarge)
    assert decoder.error.code == "frame_too_large"
    assert (decoder.error.length, decoder.error.limit) == (11, 10)
    assert decoder.buffered == 0
    assert decoder.feed(ENCODE(b"more")) == []  # the stream is dead


def test_frame_exactly_at_the_limit_is_accepted() -> None:
    decoder = Int32Decoder(10)
    assert decoder.feed(ENCODE(b"0123456789")) == [b"0123456789"]
    assert decoder.error is None


def test_a_length_of_four_gigabytes_is_refused() -> None:
    decoder = Int32Decoder(2**32 - 1)
    decoder.feed(b"\xff\xff\xff")
    assert decoder.error is None
    decoder.feed(b"\xff")
    assert decoder.error is None  # 2**32-1 is within this (maximal) limit: wait for the body
    assert decoder.buffered == 4


def test_framing_registry() -> None:
    assert get_framing("int32") is FRAMINGS["int32"]
    assert get_framing("int32").heartbeat_token is None
    with pytest.raises(ValueError, match="unknown framing 'nope'"):
        get_framing("nope")


@pytest.mark.parametrize("large_body", [LARGE_BODY, 1], ids=["buffered", "gathered"])
@given(bodies=st.lists(st.binary(max_size=200), max_size=20), data=st.data())
def test_any_split_of_valid_frames_decodes_to_the_same_frames(large_body, bodies, data) -> None:
    """Both ways of holding an unfinished body: the buffer, and gathered reads joined once."""
    stream = b"".join(map(ENCODE, bodies))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = Int32Decoder(200, large_body)
    got = []
    last = 0
    for cut in [*cuts, len(stream)]:
        got += decoder.feed(stream[last:cut])
        last = cut
    assert got == bodies
    assert decoder.buffered == 0


@given(st.binary(max_size=2000), st.integers(0, 64))
def test_any_byte_stream_decodes_or_fails_cleanly(stream, limit) -> None:
    """Arbitrary bytes yield frames that re-encode to a prefix of the stream, or an error."""
    decoder = Int32Decoder(limit)
    frames = decoder.feed(stream)
    consumed = b"".join(map(ENCODE, frames))
    assert stream.startswith(consumed)
    assert all(len(f) <= limit for f in frames)
    if decoder.error is None:
        assert decoder.buffered == len(stream) - len(consumed)
        assert decoder.buffered < 4 or struct.unpack_from("!I", stream, len(consumed))[0] <= limit
    else:
        assert isinstance(decoder.error, FrameTooLarge)
        assert decoder.buffered == 0


PATTERN = bytes(range(256)) * 1300  # 332,800 bytes, no two neighbouring windows alike


@given(
    sizes=st.lists(st.sampled_from([0, 5, 70_000, 100_000, 300_000]), min_size=1, max_size=4),
    data=st.data(),
)
def test_large_bodies_split_anywhere_decode_exactly(sizes, data) -> None:
    """Large bodies are gathered read by read (short reads into one bytearray) and joined."""
    bodies = [PATTERN[i : i + n] for i, n in enumerate(sizes)]
    stream = b"".join(map(ENCODE, bodies))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    decoder = Int32Decoder(len(PATTERN))
    got = []
    last = 0
    for cut in [*cuts, len(stream)]:
        got += decoder.feed(stream[last:cut])
        last = cut
        assert decoder.buffered == len(stream[:last]) - len(b"".join(map(ENCODE, got)))
    assert got == bodies
    assert decoder.buffered == 0


def test_a_large_body_trickled_a_byte_at_a_time_costs_its_bytes_not_an_object_per_read() -> None:
    body = PATTERN[:200_000]
    stream = ENCODE(body)
    decoder = Int32Decoder(len(body))
    tracemalloc.start()
    try:
        got = [f for i in range(len(stream)) for f in decoder.feed(stream[i : i + 1])]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == [body]
    # The body, joined, and its bytearray while gathered: about twice its size. One object
    # per one-byte read would be about 40 times.
    assert peak < 3 * len(body)

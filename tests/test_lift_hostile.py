"""A hostile review of the lift (heartbeatd/wire/_lift.h), beside tests/test_lift.py.

The scan must find exactly the runs `_lift.h` defines (a byte it misses would be lifted into
a string the parser would have refused), at every offset of a 64-byte block, on both vector
loops and in the tail; the stack's room and the heap's must both hold every run a body can
have; and the parsed value must never carry the nonce out to a peer.  What the guarantee rests
on is shown too: a body that holds a token parses otherwise, so the nonce must stay secret.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_lift import MIN_BODY, MIN_RUN, counted, parsed, run, same

import heartbeatd.server.connection  # noqa: F401  (configures the C module's JSON functions)

try:
    from heartbeatd.wire import _speedups  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - test_speedups.test_the_extension_is_built says so
    _speedups = None

pytestmark = pytest.mark.skipif(_speedups is None, reason="the C module is not built")

#: A run as _lift.h defines it: plain bytes, at least MIN_RUN, a '"' on each side.
_RUN = re.compile(rb'(?<=")[\x20\x21\x23-\x5b\x5d-\x7e]{%d,}(?=")' % MIN_RUN)
#: One byte of each kind that ends a run.
ODD = [b"\x00", b"\x1f", b'"', b"\\", b"\x7f", b"\x80", b"\xff", b"\n"]


def runs(body: bytes) -> int:
    return sum(1 for _ in _RUN.finditer(body))


@contextmanager
def both_loops() -> Iterator[list[bool]]:
    """Yields the AVX2 setting to use (where the CPU has it, both; else the SSE2 loop only)."""
    have = _speedups.use_avx2(True)
    try:
        yield [True, False] if have else [False]
    finally:
        _speedups.use_avx2(True)


def tried(body: bytes) -> None:
    """The body parses as the parser parses it, and a lift is tried iff it has a run."""
    expected = parsed(body)
    with both_loops() as settings_:
        for avx2 in settings_:
            _speedups.use_avx2(avx2)
            with counted() as count:
                assert _lifted(body) == expected
            assert count[0] + count[1] == (len(body) >= MIN_BODY and runs(body) > 0), avx2


def _lifted(body: bytes) -> tuple[str, Any]:
    try:
        return "value", _speedups.loads(body)
    except Exception as e:  # the very error is what is compared
        return "error", (type(e), str(e))


FILLER = run(MIN_BODY)  # makes any body long enough to be scanned (and is lifted itself)


@pytest.mark.parametrize("odd", ODD)
def test_one_odd_byte_at_every_block_offset_ends_the_run(odd: bytes) -> None:
    """A string of MIN_RUN + 130 bytes with one odd byte in it, the string at each of the 64
    offsets of a block and the odd byte at each place a block's edge can fall: the halves
    are too short to lift, so only the filler is, and the value is the parser's."""
    for offset in range(64):
        head = b"[" + b" " * offset + b'"'
        for at in sorted({0, 1, 62, 63, 64, 65, MIN_RUN - 1, MIN_RUN, MIN_RUN + 129}):
            edge = (64 - (len(head) + at) % 64) % 64  # `at`, moved to a block's first byte
            for where in {at, min(at + edge, MIN_RUN + 129)}:
                text = bytearray(run(MIN_RUN + 130).encode())
                text[where : where + 1] = odd
                tried(head + bytes(text) + b'", "' + FILLER.encode() + b'"]')


@pytest.mark.parametrize("length", [MIN_RUN - 1, MIN_RUN, MIN_RUN + 1, MIN_RUN + 63])
def test_a_run_at_the_threshold_at_every_offset_in_blocks_and_tail(length: int) -> None:
    """Lifted at MIN_RUN bytes, not one byte less, wherever it starts, whether it ends in a
    whole 64-byte block or in the tail the byte loop reads."""
    text = run(length).encode()
    for offset in range(64):
        for tail in (b"]", b"]" + b" " * 200):  # the closing quote in the tail, or in a block
            pad = b" " * (MIN_BODY - length)
            tried(b"[" + pad + b" " * offset + b'"' + text + b'"' + tail)


@pytest.mark.parametrize("count", [1, 255, 256, 257, 258, 1000])
def test_as_many_runs_as_a_body_can_hold(count: int) -> None:
    """Runs of MIN_RUN bytes, one quote apart: the most a body of that size can have, on the
    stack (up to 1 MiB) and past it on the heap; every one lifted."""
    body = b'"' + b'"'.join([run(MIN_RUN).encode()] * count) + b'"'
    assert runs(body) == count
    tried(body)  # one quote apart, they do not parse: refused
    body = json.dumps([run(MIN_RUN, k % 50) for k in range(count)]).encode()
    body = body + b" " * max(0, MIN_BODY - len(body))
    assert runs(body) == count
    with counted() as counts:
        same(body)
    assert counts == [2, 0]


@st.composite
def _odd_bodies(draw: st.DrawFn) -> bytes:
    """Long plain strings cut by odd bytes anywhere, between and inside JSON around them."""
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        text = bytearray(run(draw(st.integers(MIN_RUN - 2, MIN_RUN + 200))).encode())
        for _ in range(draw(st.integers(0, 2))):
            at = draw(st.integers(0, len(text) - 1))
            text[at : at + 1] = draw(st.sampled_from([*ODD, b'\\"', b"\\\\", b"\\u0041"]))
        before = draw(st.sampled_from([b'"', b'\\"', b'\\\\"', b'{"', b'"k": "', b' "', b'["']))
        after = draw(st.sampled_from([b'"', b'":1', b'" ', b'"]', b'"}', b'\\"', b"", b'"x']))
        parts.append(before + bytes(text) + after)
    sep = draw(st.sampled_from([b", ", b",", b":", b" "]))
    body = b" " * draw(st.integers(0, 63)) + b"[" + sep.join(parts) + b"]"
    if len(body) < MIN_BODY:
        body = body[:-1] + b', "' + FILLER.encode() + b'"]'
    return body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_odd_bodies())
def test_the_scan_finds_exactly_the_runs_the_rule_names(body: bytes) -> None:
    tried(body)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_odd_bodies())
def test_no_value_carries_the_nonce_out(body: bytes) -> None:
    """What a peer gets back never holds a token (it would learn the nonce): not as a value,
    not as a key, not inside a longer string."""
    nonce = _speedups.lift_token(0)[:32]
    kind, value = _lifted(body)
    assert nonce not in (json.dumps(value) if kind == "value" else str(value))


def test_the_answer_rests_on_the_nonce_being_secret() -> None:
    """A peer who knew a token could place it where the parser keeps it while the run's own
    token is dropped, or sits in a longer string: the lift would then answer otherwise.  So
    the nonce is 128 bits from os.urandom, and never sent (test_no_value_carries_the_nonce_out)."""
    token, text = _speedups.lift_token(0), "y" * 20000
    for body in (
        json.dumps(['"' + text, token]),  # run 0 ends a longer string
        json.dumps({text: 1, "x": token}),  # run 0 is a key
        f'{{"a": "{text}", "a": 1, "b": "{token}"}}',  # run 0 is dropped by a duplicate key
    ):
        assert _lifted(body.encode()) != parsed(body.encode())


def test_no_path_leaks() -> None:
    """Lifted, refused after the walk, refused by the parser, the body one string, and a
    token seen twice: a thousand of each leave no memory behind (refcounts on every path)."""
    import tracemalloc

    text = run(MIN_RUN + 7)
    bodies = [
        json.dumps({"a": [text, {"b": text}], "c": text, "d": [1, {"e": text}]}).encode(),
        json.dumps({text: 1, "x": [text] * 3}).encode(),
        json.dumps([text] * 4).encode()[:-1],
        json.dumps(text * 4).encode(),
        json.dumps([text] * 4 + [_speedups.lift_token(2)]).encode(),
    ]
    tracemalloc.start()
    try:
        for round_ in range(3):
            for _ in range(300):
                for body in bodies:
                    _lifted(body)
            if round_ == 0:
                before = tracemalloc.get_traced_memory()[0]
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 16 * 1024, grown  # a 40-byte token lost per body would be 50 KiB

"""Long plain strings lifted out of a body before it is parsed (heartbeatd/wire/_lift.h).

`_speedups.loads` must give, for any bytes, the value or the error the JSON parser gives for
the whole body.  Hypothesis builds bodies around the cases the lift must not get wrong: a run
that is a string's whole text (lifted), a run between two strings (whitespace, numbers), a run
after an escaped quote, a run as a dict key (duplicate keys), a peer who knows a token, runs
across every 64-byte block boundary, invalid JSON around a run, and both vector loops.  The
counters prove each case took the branch it was written for; the connection tests prove the
C loop answers large bodies as the Python loop does.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_speedups import _c_path, _python_path, _run

import heartbeatd.server.connection  # noqa: F401  (configures the C module's JSON functions)
from heartbeatd.wire import envelope

try:
    from heartbeatd.wire import _speedups  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - test_speedups.test_the_extension_is_built says so
    _speedups = None

pytestmark = pytest.mark.skipif(_speedups is None, reason="the C module is not built")

MIN_RUN = 4096  # LIFT_MIN_RUN
MIN_BODY = 16384  # LIFT_MIN_BODY
PLAIN = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"\\')


def parsed(body: bytes) -> tuple[str, Any]:
    """What the parser makes of ``body``: ("value", value) or ("error", type and message)."""
    try:
        return "value", envelope.decode_json_unchecked(body)
    except Exception as e:  # the very error is what is compared
        return "error", (type(e), str(e))


def lifted(body: bytes) -> tuple[str, Any]:
    try:
        return "value", _speedups.loads(body)
    except Exception as e:
        return "error", (type(e), str(e))


@contextmanager
def counted() -> Iterator[list[int]]:
    """The lifted and refused counts added inside the block: [lifted, refused]."""
    before = _speedups.lift_stats()
    out = [0, 0]
    yield out
    after = _speedups.lift_stats()
    out[:] = [after[0] - before[0], after[1] - before[1]]


def same(body: bytes) -> None:
    """The lift's answer is the whole parse's, on both vector loops."""
    expected = parsed(body)
    assert lifted(body) == expected
    _speedups.use_avx2(False)
    try:
        assert lifted(body) == expected
    finally:
        _speedups.use_avx2(True)


def run(n: int, start: int = 0) -> str:
    return (PLAIN * (n // len(PLAIN) + 2))[start : start + n]


def test_a_long_string_is_lifted_and_is_the_same_str() -> None:
    text = run(300_000)
    body = json.dumps({"type": "echo", "id": 1, "data": text}).encode()
    with counted() as count:
        value = _speedups.loads(body)
    assert value == {"type": "echo", "id": 1, "data": text}
    assert type(value["data"]) is str and value["data"].isascii()
    assert count == [1, 0]


@pytest.mark.parametrize(
    ("body", "lifts"),
    [
        # At the thresholds: a run of MIN_RUN is lifted, one byte less is not.
        (b'["' + b"a" * MIN_RUN + b'", "' + b"b" * (MIN_BODY - MIN_RUN) + b'"]', 2),
        (b'["' + b"a" * (MIN_RUN - 1) + b'", "' + b"b" * MIN_BODY + b'"]', 1),
        (b'"' + b"a" * (MIN_BODY - 2) + b'"', 1),  # the body is one string
        (b'"' + b"a" * (MIN_BODY - 3) + b'"', 0),  # one byte short of MIN_BODY: parsed whole
        # Nested, in lists and dicts, several per body.
        (json.dumps({"a": [run(5000), {"b": run(6000, 3)}], "c": run(7000, 9)}).encode(), 3),
    ],
)
def test_what_is_lifted(body: bytes, lifts: int) -> None:
    with counted() as count:
        same(body)
    assert count == [2 * bool(lifts), 0]


@pytest.mark.parametrize(
    "body",
    [
        # A run between two strings, not in one: the shortened body does not parse.
        b'["a",' + b" " * 20000 + b'"b"]',
        b'{"a":' + b" " * 9000 + b'1, "b":' + b" " * 9000 + b'"c"}',
        # After an escaped quote the run is the end of a longer string.
        b'["\\"' + b"x" * 20000 + b'"]',
        b'["\\\\\\"' + b"x" * 20000 + b'"]',
        # A key: two equal long keys collapse to the last one, as the parser collapses them.
        b'{"' + b"k" * 9000 + b'": 1, "' + b"k" * 9000 + b'": 2}',
        # Invalid around a run: the whole body's error, not the shortened one's.
        b'["' + b"x" * 20000 + b'", nope]',
        b'["' + b"x" * 20000 + b'"',
        b'["' + b"x" * 20000 + b'",\xff]',
    ],
)
def test_a_run_that_is_not_a_whole_string_value_is_parsed_whole(body: bytes) -> None:
    with counted() as count:
        same(body)
    assert count == [0, 2]


@pytest.mark.parametrize(
    "body",
    [
        b"[1,\n" + b" " * 20000 + b'"b"]',  # no quote on the left
        b'["a",' + b" " * 20000 + b"\n1]",  # no quote on the right
        b'["' + b"x" * 20000,  # runs to the end
        b'["' + "é".encode() * 10000 + b'"]',  # not ASCII
    ],
)
def test_a_run_not_between_two_quotes_is_not_tried(body: bytes) -> None:
    with counted() as count:
        same(body)
    assert count == [0, 0]


def test_an_escaped_backslash_before_the_quote_leaves_a_string_to_lift() -> None:
    body = b'["\\\\", "' + b"x" * 20000 + b'"]'
    with counted() as count:
        same(body)
    assert count == [2, 0]


@pytest.mark.parametrize(
    "where",
    ["value", "key", "twice", "beyond", "in a longer string", "in place of another"],
)
def test_a_peer_who_knows_a_token_gets_the_whole_parse(where: str) -> None:
    """The token is secret.  A peer who guessed it still gets the parser's answer here (refused,
    or its token left where the parser put it); where it would not, and why that rests on the
    nonce staying secret: test_lift_hostile.test_the_answer_rests_on_the_nonce_being_secret."""
    token = _speedups.lift_token(0)
    text = "y" * 20000
    value: Any = {
        "value": [text, token],
        "key": {"a": text, token: 1},
        "twice": [text, text],  # both runs' tokens: the second must not match the first
        "beyond": [text, _speedups.lift_token(5)],
        "in a longer string": [text, token + "!"],
        # Run 1 ends a longer string (after an escaped quote), so its token is not found;
        # run 0's token twice must not pass for two tokens found.
        "in place of another": [text, '"' + text, token],
    }[where]
    body = json.dumps(value).encode()
    with counted() as count:
        same(body)
    if where in ("value", "in place of another"):
        assert count == [0, 2]  # run 0's token seen twice
    elif where == "twice":
        assert count == [2, 0]
    else:  # a key or a near token is not a token: the run is lifted, the rest left alone
        assert count == [2, 0]


@pytest.mark.parametrize(("depth", "lifts"), [(1000, True), (1100, False)])
def test_a_string_deep_in_lists(depth: int, lifts: bool) -> None:
    """Lifted as deep as the parser goes (1,024 levels); past that, the parser's own error."""
    body = b"[" * depth + b'"' + b"z" * 20000 + b'"' + b"]" * depth
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + 2 * depth)  # comparing nested lists recurses
    try:
        with counted() as count:
            same(body)
    finally:
        sys.setrecursionlimit(limit)
    assert count == ([2, 0] if lifts else [0, 2])


_special = st.sampled_from(['"', "\\", "\x7f", "\x00", "\x1f", "\x80", "é", "😀", "\n"])


@st.composite
def _long_text(draw: st.DrawFn) -> str:
    """A long string, plain or with odd characters anywhere (block edges included)."""
    n = draw(st.integers(MIN_RUN - 70, MIN_RUN * 3))
    text = run(n, draw(st.integers(0, 50)))
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, n))
        text = text[:at] + draw(_special) + text[at:]
    return text


_leaves = st.one_of(
    _long_text(),
    st.text(max_size=8),
    st.integers(-(2**63), 2**64),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
)
_values = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=4) | _long_text(), inner, max_size=4)
    ),
    max_leaves=8,
)


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    value = draw(_values)
    text = json.dumps(
        value, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1]))
    )
    body = (" " * draw(st.integers(0, 63)) + text).encode()  # every offset in a 64-byte block
    while len(body) < MIN_BODY:
        body = json.dumps([value, run(MIN_BODY)]).encode()
    if draw(st.integers(0, 5)) == 0:  # damage it: a byte changed, or cut short
        at = draw(st.integers(0, len(body) - 1))
        if draw(st.booleans()):
            body = body[:at]
        else:
            body = body[:at] + bytes([draw(st.integers(0, 255))]) + body[at + 1 :]
    return body


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_bodies())
def test_any_body_parses_as_the_parser_parses_it_whole(body: bytes) -> None:
    same(body)


@st.composite
def _large_requests(draw: st.DrawFn) -> bytes:
    data = draw(_values | _long_text())
    id_ = draw(st.integers(0, 9) | st.text(max_size=3))
    type_ = draw(st.sampled_from(["echo", "nope"]))
    # One string to lift in each: the counters then prove the C loop scanned every body.
    return json.dumps({"type": type_, "id": id_, "data": [data, run(MIN_BODY)]}).encode()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_large_requests(), min_size=1, max_size=3), st.data())
def test_the_c_loop_answers_large_bodies_as_the_python_loop(bodies: list[bytes], data: Any) -> None:
    stream = b"".join(struct.pack("!I", len(b)) + b for b in bodies)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=4))
    with _python_path():
        expected = _run(stream, cuts, 1 << 20)
    with counted() as count, _c_path():
        got = _run(stream, cuts, 1 << 20)
    assert got == expected
    assert count[0] + count[1] >= len(bodies)

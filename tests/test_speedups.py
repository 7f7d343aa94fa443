"""The C hot path (heartbeatd.wire._speedups) answers exactly as its Python twin, the reference.

For any frames and any read splits: the C decoder returns the same bodies, holds the same
``buffered`` count and refuses with the same error as `PyInt32Decoder`; and a connection on
the C loop writes the same bytes, counts the same errors and makes the same close decision as
one on the Python loop.  These tests compare the two in one process whatever
``HEARTBEATD_NO_EXTENSIONS`` says (`make test` builds the module; ``test_the_extension_is_built``
fails if it did not).
"""

from __future__ import annotations

import gc
import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon, RawClient
from helpers import make_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_admin import ADMIN, http
from test_protocol_paths import _bodies, _FixedIdFactory, _registry
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

import heartbeatd.server.connection as connection_module
import heartbeatd.wire.int32 as int32_module
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.protocol import ServerProtocol
from heartbeatd.wire import envelope
from heartbeatd.wire.int32 import PyInt32Decoder

try:
    from heartbeatd.wire import _speedups  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - test_the_extension_is_built says so
    _speedups = None

needs_extension = pytest.mark.skipif(_speedups is None, reason="the C module is not built")


def test_the_extension_is_built() -> None:
    """`make test` builds it (gcc is on the CI machine): the comparisons below must run."""
    assert _speedups is not None, "heartbeatd/wire/_speedups.c was not compiled (see hatch_build)"


@pytest.mark.parametrize(
    ("env", "expected"), [({}, "c"), ({"HEARTBEATD_NO_EXTENSIONS": "1"}, "python")]
)
def test_the_environment_selects_the_path(env: dict[str, str], expected: str) -> None:
    environ = {k: v for k, v in os.environ.items() if k != "HEARTBEATD_NO_EXTENSIONS"}
    code = (
        "from heartbeatd.wire import _accelerated, int32; from heartbeatd.server import connection;"
        "print(_accelerated.ACCELERATED, int32.Int32Decoder.__module__, connection._serve is None)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    if expected == "c":
        assert out.stdout.split() == ["c", "heartbeatd.wire._speedups", "False"]
    else:
        assert out.stdout.split() == ["python", "heartbeatd.wire.int32", "True"]


# -- the decoder -------------------------------------------------------------------------


def _state(decoder: Any) -> tuple[Any, ...]:
    error = decoder.error
    described = None if error is None else (type(error), str(error), error.code, error.length)
    return decoder.buffered, described


def _feed_both(reads: list[bytes], limit: int, large_body: int) -> None:
    py = PyInt32Decoder(limit, large_body)
    c = _speedups.Int32Decoder(limit, large_body)
    for data in reads:
        expected = py.feed(data)
        got = c.feed(data)
        assert got == expected
        assert all(type(frame) is bytes for frame in got)
        assert _state(c) == _state(py)


_frames = st.lists(
    st.one_of(
        st.binary(max_size=40).map(lambda b: struct.pack("!I", len(b)) + b),
        st.integers(0, 2**32 - 1).map(lambda n: struct.pack("!I", n)),  # a bare header
        st.binary(max_size=6),  # anything
    ),
    max_size=10,
)


@needs_extension
@settings(max_examples=500, deadline=None)
@given(
    _frames, st.data(), st.sampled_from([-1, 0, 10, 30, 2**32 - 1]), st.sampled_from([1, 8, 65536])
)
def test_the_c_decoder_decodes_as_the_python_one(
    frames: list[bytes], data: Any, limit: int, large_body: int
) -> None:
    stream = b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reads = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    _feed_both(reads, limit, large_body)


@needs_extension
def test_the_c_decoder_with_large_bodies_in_many_reads() -> None:
    body = bytes(range(256)) * 1100  # 281,600 bytes, past LARGE_BODY
    stream = (struct.pack("!I", len(body)) + body) * 3 + struct.pack("!I", 5) + b"ab"
    for step in (1000, 4096, 65536, 100_000, len(stream)):
        reads = [stream[i : i + step] for i in range(0, len(stream), step)]
        _feed_both(reads, len(body), 64 * 1024)
        _feed_both(reads, len(body) - 1, 64 * 1024)  # refused at its header


@needs_extension
def test_the_c_decoder_refuses_at_the_header_and_keeps_nothing() -> None:
    decoder = _speedups.Int32Decoder(100)
    assert decoder.feed(struct.pack("!I", 3) + b"abc" + struct.pack("!I", 2**32 - 1)) == [b"abc"]
    assert decoder.error.code == "frame_too_large" and decoder.buffered == 0
    assert decoder.feed(b"more") == []
    # A lowered limit (live reload) applies to a frame still arriving, as in Python.
    for cls in (PyInt32Decoder, _speedups.Int32Decoder):
        d = cls(100)
        assert d.feed(struct.pack("!I", 50) + b"x" * 10) == []
        d.max_frame_bytes = 20
        assert d.feed(b"y" * 40) == []
        assert d.error.code == "frame_too_large"


# -- the connection's loop ---------------------------------------------------------------


@contextmanager
def _python_path() -> Iterator[None]:
    saved = connection_module._serve, int32_module.Int32Decoder
    connection_module._serve, int32_module.Int32Decoder = None, PyInt32Decoder
    try:
        yield
    finally:
        connection_module._serve, int32_module.Int32Decoder = saved


@contextmanager
def _c_path() -> Iterator[None]:
    saved = connection_module._serve, int32_module.Int32Decoder
    _speedups.configure(
        connection_module.Request,
        envelope.decode_json_unchecked,
        envelope.encode_json,
        envelope.exceeds_depth,
    )
    connection_module._serve, int32_module.Int32Decoder = _speedups.serve, _speedups.Int32Decoder
    try:
        yield
    finally:
        connection_module._serve, int32_module.Int32Decoder = saved


def _run(stream: bytes, cuts: list[int], max_frame_bytes: int) -> tuple[Any, ...]:
    held: list[Deferred[Any]] = []
    registry = _registry()
    registry.add("hold", lambda r: held.append(Deferred()) or held[-1])
    registry.add(ODD_TYPE, lambda r: [r.type, r.id, r.data])
    registry.add("deep", _deep)
    factory = _FixedIdFactory(make_config(max_frame_bytes=max_frame_bytes), registry, Clock())
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol = factory.buildProtocol(transport.getPeer())
    protocol.makeConnection(transport)
    start = 0
    for cut in [*sorted(cuts), len(stream)]:
        if cut > start:
            protocol.dataReceived(stream[start:cut])
            start = cut
        if held and cut % 3 == 0:  # some replies finish between reads, some after
            held.pop(0).callback({"late": cut})
    for d in held:
        d.callback("late")
    return (
        transport.value(),
        transport.disconnecting,
        protocol.close_reason,
        protocol.frames_in,
        protocol.frames_out,
        protocol.bytes_out,
        dict(factory.errors),
        factory.partial_bytes,
    )


#: A message type whose JSON needs escapes (the C loop caches each type's encoding).
ODD_TYPE = 'q"\\\x01\u2028é😀'


def _deep(request: Any) -> Any:
    """A result nested ``data`` levels deep: around the encoder's own limit (255)."""
    value: Any = "x"
    for _ in range(request.data if type(request.data) is int and 0 < request.data < 300 else 1):
        value = [value]
    return value


@st.composite
def _hot_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 9:  # strings the C loop writes itself (plain ASCII) and near misses
        special = st.sampled_from(['"', "\\", "\x7f", "\x00", "\x1f", " ", "~", "\x80", "é"])
        text = draw(
            st.text(st.characters(min_codepoint=0, max_codepoint=0x80), max_size=40)
            | st.sampled_from(["x" * 4096, "x" * 4097, "y" * 4095 + '"', "\x7f", "\\", ""])
            | st.builds(  # one odd character anywhere in a long run (16- and 64-byte steps,
                # the tail; from 1,024 characters on, the string is checked while copied)
                lambda n, at, c: ("abc~ " * 700)[:n][:at] + c + ("abc~ " * 700)[:n][at:],
                st.integers(0, 3000),
                st.integers(0, 3000),
                special,
            )
        )
        return json.dumps({"type": "echo", "id": draw(st.integers(-3, 3)), "data": text}).encode()
    if kind == 7:
        return json.dumps({"type": "deep", "id": 1, "data": draw(st.integers(250, 258))}).encode()
    if kind == 8:
        ids = st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 0])
        id_ = draw(ids | st.text(max_size=4))
        return json.dumps({"type": ODD_TYPE, "id": id_, "data": draw(st.text(max_size=4))}).encode()
    if kind == 0:  # deeper than limits.max_json_depth (64), or just within it
        depth = draw(st.integers(60, 70))
        return b'{"type":"echo","id":1,"data":' + b"[" * depth + b"]" * depth + b"}"
    if kind == 1:
        return json.dumps({"type": "hold", "id": draw(st.integers(0, 9))}).encode()
    if kind == 2:  # odd but valid: big and bool ids, unicode, NaN is not JSON
        return draw(
            st.sampled_from(
                [
                    b'{"type":"echo","id":18446744073709551616,"data":1}',
                    b'{"type":"echo","id":true}',
                    b'{"type":"echo","id":"\\u00e9","data":"\\ud83d\\ude00"}',
                    b'{"type":"echo","data":NaN}',
                    b'{"type":"echo","type":"ping"}',
                    b'{"id":1}',
                    b'[{"type":"echo"}]',
                    b'{"type":"echo","data":"\xff"}',
                ]
            )
        )
    return draw(_bodies())


@needs_extension
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(_hot_bodies(), min_size=1, max_size=12),
    st.data(),
    st.sampled_from([None, 8, 4096]),
)
def test_the_c_loop_answers_as_the_python_loop(
    bodies: list[bytes], data: Any, tail: int | None
) -> None:
    stream = b"".join(struct.pack("!I", len(b)) + b for b in bodies)
    if tail is not None:  # a header past max_frame_bytes (1000 here) ends the stream
        stream += struct.pack("!I", 1000 + tail) + b"x" * min(tail, 20)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    with _python_path():
        expected = _run(stream, cuts, 1000)
    with _c_path():
        got = _run(stream, cuts, 1000)
    assert got == expected
    # Long strings are checked while copied with AVX2 where the CPU has it, else SSE2:
    # both must write what the encoder writes.
    _speedups.use_avx2(False)
    try:
        with _c_path():
            assert _run(stream, cuts, 1000) == expected
    finally:
        _speedups.use_avx2(True)  # the default: on where the CPU has it


@needs_extension
def test_the_c_loop_is_taken_and_passes_exceptions_to_failure(monkeypatch: Any) -> None:
    """Guards the comparison: the C loop runs, and a crashing handler's Failure holds the
    handler's own exception (the log shows the real traceback)."""
    failures: list[Any] = []
    original = ServerProtocol._error_frame
    monkeypatch.setattr(
        ServerProtocol,
        "_error_frame",
        lambda self, failure, message: (failures.append(failure), original(self, failure, message))[
            1
        ],
    )
    calls: list[Any] = []
    serve = _speedups.serve
    with _c_path():
        connection_module._serve = lambda *args: (calls.append(args), serve(*args))[1]
        body = b'{"type":"crash","id":7}'
        _run(struct.pack("!I", len(body)) + body, [], 1000)
    assert calls
    (failure,) = failures
    assert isinstance(failure.value, RuntimeError)
    assert "handler bug" in str(failure.value)
    assert failure.tb is not None or failure.frames


@needs_extension
def test_the_c_loop_leaks_no_references(monkeypatch: Any) -> None:
    """Many reads through the C decoder and loop (good, bad and failing frames) grow the
    interpreter's allocated blocks no more than the Python loop does (a leaked reference
    per message would keep thousands of blocks more)."""
    # A logged Failure stays in Twisted's log history, on either path: not a leak.
    monkeypatch.setattr(ServerFactory, "log_allowed", lambda self, cause: False)
    bodies = [
        b'{"type":"echo","id":1,"data":"x"}',
        b'{"type":"crash","id":2}',
        b'{"type":"unencodable","id":3}',
        b"not json",
        b'{"type":"nosuch","id":4}',
        b'{"type":"later","id":5,"data":[1,2]}',
        b'{"type":"hold","id":6,"data":{"a":[1,2]}}',
        b'{"type":"refuse"}',
        b"[1,2]",
        b'{"type":"echo","id":7,"data":' + b"[" * 70 + b"]" * 70 + b"}",
    ]
    stream = b"".join(struct.pack("!I", len(b)) + b for b in bodies)
    stream += struct.pack("!I", 5000)

    def growth(path: Any) -> int:
        with path():
            for _ in range(20):
                _run(stream, [7, 30, 31, 90], 1000)
            gc.collect()
            before = sys.getallocatedblocks()
            for _ in range(300):
                _run(stream, [7, 30, 31, 90], 1000)
            gc.collect()
            return sys.getallocatedblocks() - before

    growth(_python_path)  # warm both up: what earlier tests left may be freed meanwhile
    growth(_c_path)
    python = growth(_python_path)
    c = growth(_c_path)
    assert c < 1000 and c - python < 1000, (c, python)


@pytest.mark.parametrize(
    ("env", "expected"), [({}, "c"), ({"HEARTBEATD_NO_EXTENSIONS": "1"}, "python")]
)
def test_the_daemon_says_which_path_runs(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    """The start-up line and /metrics' build info name the path; both paths echo alike."""
    config = {"admin": {"listen": "tcp:0:interface=127.0.0.1"}}
    daemon = Daemon(tmp_path, config, env=env)
    daemon.env.pop("HEARTBEATD_NO_EXTENSIONS", None)
    daemon.env.update(env)
    with daemon:
        words = {"c": "hot path in C", "python": "hot path in pure Python"}
        daemon.wait_for(re.escape(words[expected]))
        admin = int(daemon.wait_for(ADMIN).group(1))
        with RawClient(daemon.port) as client:
            assert client.recv()["type"] == "hello"
            client.send({"type": "echo", "id": 1, "data": "é"})
            assert client.recv() == {"type": "echo", "id": 1, "data": "é"}
        status, text = http(admin, "GET", "/metrics")
    assert status == 200
    (info,) = [line for line in text.splitlines() if line.startswith("heartbeatd_build_info{")]
    assert f'accelerated="{expected}"' in info


@needs_extension
def test_the_c_loop_builds_requests_as_request_init_does() -> None:
    """serve() fills Request's four slots itself rather than running __init__: that is right
    only while __init__ does nothing else. If this fails, Request changed: either keep its
    __init__ to these four stores, or let _speedups call the class (builds_requests False)."""
    import ast
    import inspect
    import textwrap

    from heartbeatd.server.handlers import Request

    tree = ast.parse(textwrap.dedent(inspect.getsource(Request.__init__)))
    body = [n for n in tree.body[0].body if not isinstance(n, ast.Expr)]  # type: ignore[attr-defined]
    stores = [(n.targets[0].attr, n.value.id) for n in body]  # type: ignore[attr-defined]
    assert stores == [
        ("type", "type"),
        ("id", "id"),
        ("data", "data"),
        ("_connection", "connection"),
    ]
    assert Request.__slots__ == ("_connection", "data", "id", "type")
    with _c_path():
        assert _speedups.builds_requests()
        seen: list[Any] = []
        registry = _registry()
        registry.add("look", lambda r: seen.append(r) or "ok")
        factory = _FixedIdFactory(make_config(), registry, Clock())
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol = factory.buildProtocol(transport.getPeer())
        protocol.makeConnection(transport)
        body = b'{"type":"look","id":"a","data":[1]}'
        protocol.dataReceived(struct.pack("!I", len(body)) + body)
    (request,) = seen
    assert type(request) is Request
    assert (request.type, request.id, request.data) == ("look", "a", [1])
    assert request.session.session_id == protocol.session_id
    assert repr(request) == "Request(type='look', id='a', data=[1])"


def test_the_doctor_says_which_path_runs() -> None:
    from heartbeatd.daemon.doctor import check_hot_path
    from heartbeatd.wire import ACCELERATED

    (check,) = check_hot_path()
    assert check.level == "ok"  # built here, or pure Python because the environment asks
    assert ("compiled (C)" in check.text) == (ACCELERATED == "c")


@needs_extension
def test_the_c_loop_reuses_only_requests_nobody_kept() -> None:
    """serve() fills a Request again for the next body only when the handler kept no
    reference to it: kept ones keep their own values, and what a dropped one held is freed
    when its handler is done, as on the Python path."""
    import weakref

    kept: list[Any] = []
    freed: list[int] = []

    class Data(dict):  # type: ignore[type-arg]
        """orjson makes plain dicts; a subclass to watch the data's lifetime."""

    def keep(request: Any) -> Any:
        kept.append(request)
        return request.id

    def drop(request: Any) -> Any:
        data = Data(n=request.id)
        weakref.finalize(data, freed.append, request.id)
        request.data = data  # the Request holds it; freed when the request is emptied
        return request.id

    registry = _registry()
    registry.add("keep", keep)
    registry.add("drop", drop)
    with _c_path():
        factory = _FixedIdFactory(make_config(), registry, Clock())
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol = factory.buildProtocol(transport.getPeer())
        protocol.makeConnection(transport)
        transport.clear()
        bodies = [
            json.dumps({"type": t, "id": i, "data": [i]}).encode()
            for i, t in enumerate(["drop", "keep", "drop", "drop", "keep", "echo", "keep"])
        ]
        protocol.dataReceived(b"".join(struct.pack("!I", len(b)) + b for b in bodies))
        assert freed == [0, 2, 3]
    assert [(r.type, r.id, r.data) for r in kept] == [
        ("keep", 1, [1]),
        ("keep", 4, [4]),
        ("keep", 6, [6]),
    ]
    assert len({id(r) for r in kept}) == 3
    assert protocol.frames_in == 7 and transport.value().count(b'"id":') == 7


@needs_extension
def test_the_c_loop_with_any_lookup_and_a_pending_property() -> None:
    """serve() reads a dict's ``get`` and the ``_pending`` slot directly; any other lookup
    callable is called, and a subclass whose ``_pending`` is not the plain slot is asked
    for it each time, with the same replies."""

    class Watched(ServerProtocol):
        reads = 0

        @property  # type: ignore[misc]
        def _pending(self) -> Any:
            Watched.reads += 1
            return None

        @_pending.setter
        def _pending(self, value: Any) -> None:
            pass

    bodies = [json.dumps({"type": "echo", "id": i, "data": "x" * i}).encode() for i in range(5)]
    stream = b"".join(struct.pack("!I", len(b)) + b for b in bodies)

    def replies(protocol_class: Any, wrap_lookup: bool) -> bytes:
        factory = _FixedIdFactory(make_config(), _registry(), Clock())
        factory.protocol = protocol_class
        if wrap_lookup:
            handlers = factory.registry.get
            factory.registry.get = lambda type_: handlers(type_)  # type: ignore[method-assign]
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol = factory.buildProtocol(transport.getPeer())
        protocol.makeConnection(transport)
        protocol.dataReceived(stream)
        return transport.value()

    with _python_path():
        expected = replies(ServerProtocol, False)
    with _c_path():
        assert replies(ServerProtocol, True) == expected
        assert replies(Watched, False) == expected
    assert Watched.reads >= len(bodies)


@needs_extension
@pytest.mark.parametrize("avx2", [True, False], ids=["avx2", "sse2"])
def test_a_long_string_with_one_odd_character_anywhere_is_written_as_the_encoder_writes_it(
    avx2: bool,
) -> None:
    """From 1,024 characters on, a string result is checked while it is copied (64 bytes a
    step, AVX2 or SSE2, then the tail): one character needing an escape, at any position of
    the first and last blocks and of a block in the middle, must send it to the encoder."""
    stream = b""
    for length in (1024, 1100):
        base = ("abc~ " * 1000)[:length]
        positions = {  # the first two blocks, two in the middle, the last one and the tail
            *range(0, 130),
            *range(length // 2 - 64, length // 2 + 64),
            *range(length - 80, length),
        }
        for odd in ['"', "\\", "\x7f", "\x00", "\x1f", "\x80", "é"]:
            for at in sorted(positions):
                text = base[:at] + odd + base[at + 1 :]
                body = json.dumps({"type": "echo", "id": at, "data": text}).encode()
                stream += struct.pack("!I", len(body)) + body
    with _python_path():
        expected = _run(stream, [], 1 << 20)
    _speedups.use_avx2(avx2)
    try:
        with _c_path():
            assert _run(stream, [], 1 << 20) == expected
    finally:
        _speedups.use_avx2(True)

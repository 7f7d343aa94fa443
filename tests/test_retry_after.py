"""A ``rate_limited`` refusal of a token bucket says when to try again (``retry_after``).

The per-connection subscribe bucket (``channels.subscribe_rate``, ``subscribe_burst``) is the
server's token bucket that answers requests ``rate_limited``: its error object carries
``retry_after``, the seconds until the bucket's next token rounded up to the millisecond.
The per-address accept bucket (``limits.accepts_per_second_per_address``) says it in its
``too_many_connections`` refusal the same way.  Refusals that do not refill with time (16 resume
attempts, a count of connections or channels reached) carry none.  Driven on a Clock over
StringTransport, and over real loopback sockets into a factory on a Clock (both transports of
the daemon), so every value is exact.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon, RawClient
from helpers import Peer, failureResultOf, frame, make_config, successResultOf
from test_jwt import jwt_factory, login, token
from twisted.internet.task import Clock

from heartbeatd.client.errors import ServerError
from heartbeatd.server import leantcp
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import HandlerError, HandlerRegistry, default_registry
from heartbeatd.server.ratelimit import MAX_RETRY_AFTER, has_token, refill, retry_after
from heartbeatd.testing import ServerClientPair
from heartbeatd.wire.envelope import encode_error

reactor: Any
from twisted.internet import reactor  # noqa: E402  (the socket tests drive it by hand)

MESSAGE = (
    "too many subscribes: at most {rate} per second "
    "(channels.subscribe_rate, burst channels.subscribe_burst)"
)


def refusal(id: int, wait: float, rate: str = "4") -> bytes:
    """The exact error frame (int32 header and body) of a subscribe refused by the bucket."""
    message = MESSAGE.format(rate=rate)
    body = (
        f'{{"type":"error","id":{id},"error":{{"code":"rate_limited","message":"{message}",'
        f'"retry_after":{json.dumps(wait)}}}}}'
    ).encode()
    return struct.pack("!I", len(body)) + body


def factory_on(clock: Clock, rate: float = 4.0, burst: int = 1, **sections: Any) -> ServerFactory:
    config = make_config(
        channels={"subscribe_rate": rate, "subscribe_burst": burst},
        heartbeat={"interval": 3600, "timeout": 7200},
        **sections,
    )
    return ServerFactory(config, default_registry(), clock)


def subscribe(peer: Peer, id: int, channel: str) -> bytes:
    peer.transport.clear()
    peer.send({"type": "subscribe", "id": id, "data": {"channel": channel}})
    peer.factory.clock.advance(0)  # type: ignore[attr-defined]
    data = peer.transport.value()
    peer.transport.clear()
    return data


def answered(data: bytes) -> str:
    """The type of the one frame in ``data``."""
    (length,) = struct.unpack_from("!I", data)
    assert len(data) == 4 + length, data
    return json.loads(data[4:])["type"]


# -- the value -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "rate", "expected"),
    [
        (0.0, 4.0, 0.25),
        (0.0, 10.0, 0.1),
        (0.0, 3.0, 0.334),  # 1/3 s, rounded up
        (0.5, 1.0, 0.5),
        (0.4, 4.0, 0.15),
        (0.0, 0.01, 100.0),
        (0.0, 1e9, 0.001),  # never 0: "now" would be a busy loop
        (1.0 - 1e-6, 1.0, 0.001),
        (0.0, 1e-306, MAX_RETRY_AFTER),  # an absurd rate: capped (was an OverflowError)
        (0.0, 1e-5, MAX_RETRY_AFTER),
    ],
)
def test_retry_after_is_the_wait_for_one_token_rounded_up_to_the_millisecond(
    tokens: float, rate: float, expected: float
) -> None:
    assert retry_after(tokens, rate) == expected


def test_the_error_object_carries_retry_after_only_when_given() -> None:
    assert encode_error("nope", "x", 3) == (
        b'{"type":"error","id":3,"error":{"code":"nope","message":"x"}}'
    )
    assert encode_error("rate_limited", "x", 3, 0.25) == (
        b'{"type":"error","id":3,"error":{"code":"rate_limited","message":"x","retry_after":0.25}}'
    )
    assert HandlerError("nope", "x").retry_after is None


# -- over StringTransport, on a Clock ----------------------------------------------------------


def test_a_refused_subscribe_says_when_the_next_token_comes(clock: Clock) -> None:
    peer = Peer(factory_on(clock, rate=4.0, burst=1))
    assert answered(subscribe(peer, 1, "a")) == "subscribe"  # the burst
    assert subscribe(peer, 2, "b") == refusal(2, 0.25)
    clock.advance(0.1)
    assert subscribe(peer, 3, "b") == refusal(3, 0.15)  # the bucket's real wait, not 0.25
    clock.advance(0.149)
    assert subscribe(peer, 4, "b") == refusal(4, 0.001)
    clock.advance(0.001)  # exactly retry_after later: the token is there
    assert answered(subscribe(peer, 5, "b")) == "subscribe"
    assert subscribe(peer, 6, "c") == refusal(6, 0.25)
    assert peer.factory.errors["rate_limited"] == 4
    assert peer.protocol.connected and peer.protocol.close_reason is None


def test_waiting_retry_after_always_gets_the_token(clock: Clock) -> None:
    """Whatever the float arithmetic rounds: odd rates, odd waits, many rounds."""
    peer = Peer(factory_on(clock, rate=3.0, burst=2))
    for id in range(1, 3):
        assert answered(subscribe(peer, id, f"c{id}")) == "subscribe"
    steps = [0.0, 0.07, 0.1234567, 0.3, 0.0001]
    for id in range(3, 60):
        clock.advance(steps[id % len(steps)])
        data = subscribe(peer, id, f"c{id}")
        if answered(data) == "subscribe":
            continue
        wait = json.loads(data[4:])["error"]["retry_after"]
        assert 0.001 <= wait <= 0.334 and round(wait, 3) == wait
        clock.advance(wait)
        assert answered(subscribe(peer, 1000 + id, f"d{id}")) == "subscribe", (id, wait)
        peer.send({"type": "unsubscribe", "id": 2000 + id, "data": {"channel": f"d{id}"}})


def test_waiting_retry_after_gets_the_token_at_epoch_time_too() -> None:
    """At today's epoch seconds the clock's float steps are about 2.4e-7 s, so a measured
    wait of exactly retry_after may come out short.  The buckets' arithmetic must still give
    the token.  Worst case: a bucket that lacks a whole number of milliseconds' refill; a
    slack of 1e-9 tokens (the first version) refused about a third of these."""
    rnd = random.Random(20261206)
    for _ in range(5000):
        rate = rnd.choice([3.0, 4.0, 7.0, 10.0, 100.0])
        tokens = 1.0 - rate * rnd.randint(1, 200) / 1000.0
        if tokens < 0:
            continue
        now = 1.7e9 + rnd.random() * 1e6
        later = now + retry_after(tokens, rate)  # what a reactor's clock reads then
        assert has_token(refill(tokens, 1.0, rate, later - now), rate), (rate, tokens, now)


def test_a_clock_stepped_back_empties_no_bucket(clock: Clock) -> None:
    """reactor.seconds() is the wall clock: an NTP step back of an hour used to leave every
    bucket 3,600 s x rate tokens short, and refusals said retry_after 3595."""
    clock.advance(10_000)
    peer = Peer(factory_on(clock, rate=4.0, burst=1))
    assert answered(subscribe(peer, 1, "a")) == "subscribe"
    clock.rightNow -= 3600  # the step back
    assert subscribe(peer, 2, "b") == refusal(2, 0.25)  # the bucket's own wait, no more
    clock.advance(0.25)
    assert answered(subscribe(peer, 3, "b")) == "subscribe"
    assert refill(0.5, 1.0, 4.0, -3600) == 0.5


def test_other_subscribe_refusals_carry_no_retry_after(clock: Clock) -> None:
    config = make_config(
        channels={"subscribe_rate": 4.0, "subscribe_burst": 1, "max_per_connection": 1}
    )
    peer = Peer(ServerFactory(config, default_registry(), clock))
    assert answered(subscribe(peer, 1, "a")) == "subscribe"
    for id, channel, code in [(2, "b", "too_many_channels"), (3, "a", "already_subscribed")]:
        error = json.loads(subscribe(peer, id, channel)[4:])["error"]
        assert error["code"] == code and "retry_after" not in error


def test_a_handler_may_give_retry_after_and_both_hot_paths_write_it(clock: Clock) -> None:
    """The C loop hands a handler's exception to Python, which writes every error frame:
    test_speedups and test_protocol_paths compare both loops with such a handler too."""
    registry = HandlerRegistry()

    def slow(request: Any) -> Any:
        raise HandlerError("rate_limited", "later", retry_after=1.5)

    registry.add("slow", slow)
    factory = ServerFactory(make_config(), registry, clock)
    peer = Peer(factory)
    peer.transport.clear()
    peer.send({"type": "slow", "id": "x"})
    body = (
        b'{"type":"error","id":"x","error":'
        b'{"code":"rate_limited","message":"later","retry_after":1.5}}'
    )
    assert peer.transport.value() == struct.pack("!I", len(body)) + body


def test_a_claimed_channel_refused_by_the_bucket_is_pushed_with_retry_after(
    clock: Clock, tmp_path: Path
) -> None:
    factory = jwt_factory(clock, tmp_path, channels={"subscribe_rate": 2.0, "subscribe_burst": 1})
    _, frames = login(factory, token(channels=["news", "sport", "user#bob"]))
    pushes = [f["data"] for f in frames if f["type"] in ("subscribed", "subscribe_refused")]
    assert pushes[0]["channel"] == "news" and "code" not in pushes[0]
    assert pushes[1:] == [
        {"channel": "sport", "code": "rate_limited", "retry_after": 0.5},
        {"channel": "user#bob", "code": "forbidden"},
    ]


def test_the_resume_flood_refusal_is_not_time_based_and_has_no_retry_after(
    clock: Clock,
) -> None:
    config = make_config(sessions={"enabled": True})
    peer = Peer(ServerFactory(config, default_registry(), clock))
    peer.received()
    resume = {"session": "0" * 16, "key": "k", "ack": 0}
    peer.send(*({"type": "resume", "id": i, "data": resume} for i in range(17)))
    clock.advance(0)
    errors = [f["error"] for f in peer.received() if f["type"] == "error"]
    assert errors[-1]["code"] == "rate_limited" and "retry_after" not in errors[-1]


def test_a_numbered_subscribe_of_a_session_is_refused_with_retry_after(clock: Clock) -> None:
    """A resumable session's requests take the general path and are numbered: the same
    error object, with seq and ack around it."""
    peer = Peer(factory_on(clock, rate=4.0, burst=1, sessions={"enabled": True}))
    peer.send({"type": "session", "id": 1, "data": {}})
    clock.advance(0)
    assert peer.received()[0]["type"] == "session"
    peer.send(
        {"type": "subscribe", "id": 2, "seq": 1, "data": {"channel": "a"}},
        {"type": "subscribe", "id": 3, "seq": 2, "data": {"channel": "b"}},
    )
    clock.advance(0)
    answer, refused = peer.received()
    assert answer["type"] == "subscribe"
    assert refused == {
        "seq": 2,
        "ack": 2,
        "type": "error",
        "id": 3,
        "error": {"code": "rate_limited", "message": MESSAGE.format(rate="4"), "retry_after": 0.25},
    }


# -- clients that ignore the field ---------------------------------------------------------------


def test_a_client_that_ignores_retry_after_still_works(clock: Clock) -> None:
    """The Python client of this release reads code and message only: it sees the refusal
    as before, and the connection goes on."""
    config = make_config(channels={"subscribe_rate": 4.0, "subscribe_burst": 1})
    pair = ServerClientPair(config=config, clock=clock)
    try:
        first = pair.client.request("subscribe", {"channel": "a"})
        second = pair.client.request("subscribe", {"channel": "b"})
        echo = pair.client.request("echo", "still here")
        pair.flush()
        assert successResultOf(first)["channel"] == "a"
        error = failureResultOf(second, ServerError).value
        assert (error.code, error.message) == ("rate_limited", MESSAGE.format(rate="4"))
        assert successResultOf(echo) == "still here"
        clock.advance(0.25)
        again = pair.client.request("subscribe", {"channel": "b"})
        pair.flush()
        assert successResultOf(again)["channel"] == "b"
    finally:
        pair.close()


# -- over real sockets -------------------------------------------------------------------------


def spin_until(done: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "timed out"
        reactor.runUntilCurrent()
        reactor.doIteration(0.01)


class Listening:
    """``factory`` on 127.0.0.1 port 0 (lean transport or Twisted's), one client socket."""

    def __init__(self, factory: ServerFactory, lean: bool) -> None:
        self.factory = factory
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        if lean:
            assert leantcp.adopt(self.port)
        else:
            leantcp.uninstall_dispatch(reactor)
        self.sock = socket.create_connection(("127.0.0.1", self.port.getHost().port), timeout=10)
        self.sock.setblocking(False)
        self.buffer = b""
        spin_until(lambda: bool(factory.clients))
        self.frames(1)  # the hello

    def frames(self, count: int) -> bytes:
        """The next ``count`` whole frames, exactly as received."""
        end = 0
        deadline = time.monotonic() + 10
        while True:
            end, got = 0, 0
            while got < count and len(self.buffer) >= end + 4:
                (length,) = struct.unpack_from("!I", self.buffer, end)
                if len(self.buffer) < end + 4 + length:
                    break
                end, got = end + 4 + length, got + 1
            if got == count:
                out, self.buffer = self.buffer[:end], self.buffer[end:]
                return out
            try:
                chunk = self.sock.recv(1 << 16)
                assert chunk, "the server closed the connection"
                self.buffer += chunk
            except BlockingIOError:
                assert time.monotonic() < deadline, "timed out"
                reactor.runUntilCurrent()
                reactor.doIteration(0.01)

    def send(self, *objs: Any) -> None:
        self.sock.sendall(b"".join(frame(o) for o in objs))

    def close(self) -> None:
        self.sock.close()
        spin_until(lambda: not self.factory.clients)
        self.port.stopListening()
        spin_until(lambda: not self.port.connected)
        leantcp.uninstall_dispatch(reactor)


@pytest.fixture(params=[True, False], ids=["lean", "stock"])
def listening(request: pytest.FixtureRequest) -> Iterator[tuple[Listening, Clock]]:
    if request.param and type(reactor).__name__ != "EPollReactor":
        pytest.skip("the lean transport is for epoll")  # pragma: no cover - CI has epoll
    clock = Clock()
    server = Listening(factory_on(clock, rate=4.0, burst=1), request.param)
    try:
        yield server, clock
    finally:
        server.close()


def test_the_exact_frame_over_a_real_socket(listening: tuple[Listening, Clock]) -> None:
    server, clock = listening
    server.send(
        {"type": "subscribe", "id": 1, "data": {"channel": "a"}},
        {"type": "subscribe", "id": 2, "data": {"channel": "b"}},
    )
    first, refused = server.frames(1), server.frames(1)
    assert json.loads(first[4:])["type"] == "subscribe"
    assert refused == refusal(2, 0.25)
    clock.advance(0.2)
    server.send({"type": "subscribe", "id": 3, "data": {"channel": "b"}})
    assert server.frames(1) == refusal(3, 0.05)
    clock.advance(0.05)
    server.send({"type": "subscribe", "id": 4, "data": {"channel": "b"}}, {"type": "ping", "id": 5})
    answer, pong = (json.loads(body) for body in _bodies(server.frames(2)))
    assert (answer["type"], answer["id"], answer["data"]["channel"]) == ("subscribe", 4, "b")
    assert pong == {"type": "pong", "id": 5}


def _bodies(data: bytes) -> list[bytes]:
    out, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("!I", data, offset)
        out.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return out


def test_the_daemon_answers_retry_after_on_the_wall_clock(tmp_path: Path) -> None:
    """The real twistd: the value is the bucket's wait on its own clock (a hair under 100 s
    here, as the bucket refilled for the few milliseconds the subscribes took)."""
    config = {"channels": {"subscribe_rate": 0.01, "subscribe_burst": 2}}
    with Daemon(tmp_path, config) as daemon, RawClient(daemon.port) as client:
        assert client.recv()["type"] == "hello"
        for id, channel in enumerate(["a", "b", "c"], 1):
            client.send({"type": "subscribe", "id": id, "data": {"channel": channel}})
        answers = [client.recv() for _ in range(3)]
        assert [a["type"] for a in answers] == ["subscribe", "subscribe", "error"]
        error = answers[2]["error"]
        assert error["code"] == "rate_limited"
        assert (
            90 < error["retry_after"] <= 100
            and round(error["retry_after"], 3) == (error["retry_after"])
        )


# -- the per-address accept bucket ---------------------------------------------------------------


def test_a_connection_refused_by_the_accept_rate_says_when_to_come_back(clock: Clock) -> None:
    """The other token bucket of the server: ``limits.accepts_per_second_per_address``.  Its
    refusal is ``too_many_connections`` (then closed), with ``retry_after``; the refusals of a
    count (per address, in total) carry none."""
    limits = {
        "accepts_per_second_per_address": 2,
        "accept_burst_per_address": 1,
        "max_connections_per_address": 2,
        "per_address_exempt": [],
    }
    factory = ServerFactory(make_config(limits=limits), default_registry(), clock)
    first = Peer(factory, 40000)
    refused = Peer(factory, 40001)
    message = (
        "127.0.0.1 opens connections too fast for the per-address limit "
        "(limits.accepts_per_second_per_address is 2, burst 1)"
    )
    body = (
        '{"type":"error","id":null,"error":{"code":"too_many_connections",'
        f'"message":"{message}","retry_after":0.5}}}}'
    ).encode()
    assert refused.transport.value() == struct.pack("!I", len(body)) + body
    assert refused.transport.disconnecting
    clock.advance(0.3)
    error = json.loads(Peer(factory, 40002).transport.value()[4:])["error"]
    assert error["retry_after"] == 0.2  # the bucket's real wait
    clock.advance(0.2)  # exactly then: admitted
    second = Peer(factory, 40003)
    assert second.hello is not None
    clock.advance(10)  # the bucket is full again; the address holds its 2 connections
    error = json.loads(Peer(factory, 40004).transport.value()[4:])["error"]
    assert error["code"] == "too_many_connections" and "retry_after" not in error
    assert factory.refusals == {"per_address_rate": 2, "per_address_connections": 1}
    first.disconnect()
    second.disconnect()


def test_the_total_connection_limit_carries_no_retry_after(clock: Clock) -> None:
    factory = ServerFactory(make_config(limits={"max_connections": 1}), default_registry(), clock)
    Peer(factory, 40000)
    error = json.loads(Peer(factory, 40001).transport.value()[4:])["error"]
    assert error["code"] == "too_many_connections" and "retry_after" not in error

"""The server protocol over StringTransport: hello, dispatch, every error code, ordering, limits."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import Peer, frame, make_config
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import NO_REPLY, HandlerError, HandlerRegistry, Reply, Request


def test_hello_announces_session_heartbeat_and_limits(factory: ServerFactory) -> None:
    peer = Peer(factory)
    assert peer.hello["type"] == "hello"
    data = peer.hello["data"]
    assert data["server"] == "heartbeatd"
    assert data["version"]
    assert data["session"] == peer.protocol.session_id
    assert data["heartbeat"] == {"interval": 10, "timeout": 30}
    assert data["max_frame_bytes"] == 1024 * 1024
    assert data["framing"] == "int32"


def test_client_is_registered_with_address_and_counters(
    factory: ServerFactory, clock: Clock
) -> None:
    clock.advance(100)
    peer = Peer(factory, port=51234)
    proto = peer.protocol
    assert factory.clients[proto.session_id] is proto
    assert proto.peer == "127.0.0.1:51234"
    assert proto.connected_at == 100
    clock.advance(5)
    peer.send({"type": "echo", "id": 1, "data": "x"})
    assert proto.last_seen == 105
    assert (proto.frames_in, proto.frames_out) == (1, 2)  # hello + reply
    assert proto.bytes_in == len(frame({"type": "echo", "id": 1, "data": "x"}))
    assert proto.bytes_out > 0
    peer.disconnect()
    assert proto.session_id not in factory.clients


def test_echo_and_ping_reply_with_type_and_id(factory: ServerFactory) -> None:
    peer = Peer(factory)
    peer.send({"type": "echo", "id": "a", "data": {"n": [1, 2]}}, {"type": "ping", "id": 9})
    peer.send({"type": "ping"})
    assert peer.received() == [
        {"type": "echo", "id": "a", "data": {"n": [1, 2]}},
        {"type": "pong", "id": 9},
        {"type": "pong"},
    ]


@pytest.mark.parametrize(
    ("raw", "code", "id"),
    [
        (frame({"type": "nope", "id": 3}), "unknown_type", 3),
        (frame(b"{not json"), "bad_json", None),
        (frame(b'{"type":"echo","data":"\xff"}'), "bad_json", None),
        (frame([1, 2]), "bad_message", None),
        (frame({"id": 4}), "bad_message", 4),
    ],
)
def test_bad_messages_get_an_error_and_the_connection_stays(
    factory: ServerFactory, raw: bytes, code: str, id: Any
) -> None:
    peer = Peer(factory)
    peer.send_raw(raw)
    (error,) = peer.received()
    assert error["type"] == "error" and error["id"] == id
    assert error["error"]["code"] == code and error["error"]["message"]
    assert not peer.transport.disconnecting
    peer.send({"type": "echo", "id": 1, "data": 1})
    assert peer.received() == [{"type": "echo", "id": 1, "data": 1}]
    assert factory.errors[code] == 1


def test_oversized_frame_gets_an_error_then_close(clock: Clock, registry: HandlerRegistry) -> None:
    factory = ServerFactory(make_config(max_frame_bytes=64), registry, clock)
    peer = Peer(factory)
    ok = frame({"type": "echo", "id": 1})
    peer.send_raw(ok + b"\x00\x00\x00\x41" + b"x" * 10)
    replies = peer.received()
    assert replies[0] == {"type": "echo", "id": 1, "data": None}
    assert replies[1]["error"]["code"] == "frame_too_large"
    assert "65 bytes exceeds the limit of 64" in replies[1]["error"]["message"]
    assert peer.transport.disconnecting
    assert peer.protocol.close_reason == "frame_too_large"
    assert factory.closes["frame_too_large"] == 1
    assert factory.recent_closes[-1].reason == "frame_too_large"


def test_failing_handler_is_internal_error_with_traceback_only_in_log(
    factory: ServerFactory, log_events: list
) -> None:
    @factory.registry.handler("boom")
    def boom(request: Request) -> None:
        raise RuntimeError("secret detail")

    peer = Peer(factory)
    peer.send({"type": "boom", "id": 1})
    (error,) = peer.received()
    assert error == {
        "type": "error",
        "id": 1,
        "error": {"code": "internal_error", "message": "the handler failed"},
    }
    failures = [e for e in log_events if "log_failure" in e]
    assert failures and failures[-1]["log_failure"].check(RuntimeError)
    assert not peer.transport.disconnecting


def test_handler_error_is_sent_with_its_code(factory: ServerFactory) -> None:
    @factory.registry.handler("auth")
    def auth(request: Request) -> None:
        raise HandlerError("forbidden", "not allowed")

    peer = Peer(factory)
    peer.send({"type": "auth", "id": "x"})
    assert peer.received()[0]["error"] == {"code": "forbidden", "message": "not allowed"}


def test_unserialisable_result_is_internal_error(factory: ServerFactory) -> None:
    factory.registry.add("weird", lambda request: object())
    peer = Peer(factory)
    peer.send({"type": "weird", "id": 1})
    assert peer.received()[0]["error"]["code"] == "internal_error"


def test_reply_type_override_and_no_reply(factory: ServerFactory) -> None:
    factory.registry.add("ask", lambda request: Reply("answer", 42))
    factory.registry.add("note", lambda request: NO_REPLY)
    peer = Peer(factory)
    peer.send({"type": "note", "id": 1}, {"type": "ask", "id": 2})
    assert peer.received() == [{"type": "answer", "id": 2, "data": 42}]


def test_pipelined_replies_keep_request_order(factory: ServerFactory) -> None:
    slow: list[Deferred] = []

    def later(request: Request) -> Deferred:
        d: Deferred = Deferred()
        slow.append(d)
        return d

    factory.registry.add("slow", later)
    factory.registry.add("ready", lambda request: succeed(request.data))
    peer = Peer(factory)
    peer.send(
        {"type": "slow", "id": 1},
        {"type": "echo", "id": 2},
        {"type": "ready", "id": 3, "data": "r"},
        {"type": "nope", "id": 4},
        {"type": "slow", "id": 5},
        {"type": "echo", "id": 6},
    )
    assert peer.received() == []
    slow[1].callback("second")  # later request finishes first: still held back
    assert peer.received() == []
    slow[0].callback("first")
    got = peer.received()
    assert [m["id"] for m in got] == [1, 2, 3, 4, 5, 6]
    assert got[0]["data"] == "first" and got[4]["data"] == "second"
    assert got[3]["error"]["code"] == "unknown_type"


def test_async_failure_is_an_error_reply_in_order(factory: ServerFactory) -> None:
    pending: list[Deferred] = []
    factory.registry.add("slow", lambda request: pending.append(Deferred()) or pending[-1])
    peer = Peer(factory)
    peer.send({"type": "slow", "id": 1}, {"type": "echo", "id": 2})
    pending[0].errback(HandlerError("not_found", "no such thing"))
    got = peer.received()
    assert got[0]["error"] == {"code": "not_found", "message": "no such thing"}
    assert got[1]["id"] == 2


def test_coroutine_handlers_are_awaited(factory: ServerFactory) -> None:
    gate: Deferred = Deferred()

    async def handler(request: Request) -> Any:
        value = await gate
        return {"got": value, "sent": request.data}

    factory.registry.add("co", handler)
    peer = Peer(factory)
    peer.send({"type": "co", "id": 1, "data": "in"})
    assert peer.received() == []
    gate.callback("out")
    assert peer.received() == [{"type": "co", "id": 1, "data": {"got": "out", "sent": "in"}}]


def test_request_exposes_the_session(factory: ServerFactory) -> None:
    seen = []
    factory.registry.add("who", lambda request: seen.append(request) or request.session.session_id)
    peer = Peer(factory)
    peer.send({"type": "who", "id": 1, "data": [1]})
    assert peer.received()[0]["data"] == peer.protocol.session_id
    assert (seen[0].type, seen[0].id, seen[0].data) == ("who", 1, [1])


class CountingTransportPeer(Peer):
    def __init__(self, factory: ServerFactory) -> None:
        super().__init__(factory)
        self.writes = 0
        original_write, original_seq = self.transport.write, self.transport.writeSequence

        def write(data: bytes) -> None:
            self.writes += 1
            original_write(data)

        def write_sequence(seq: list) -> None:
            self.writes += 1
            original_seq(seq)

        self.transport.write = write  # type: ignore[method-assign]
        self.transport.writeSequence = write_sequence  # type: ignore[method-assign]


def test_replies_to_one_read_go_out_in_one_write(factory: ServerFactory) -> None:
    peer = CountingTransportPeer(factory)
    peer.send(*[{"type": "echo", "id": i} for i in range(50)])
    assert peer.writes == 1
    assert [m["id"] for m in peer.received()] == list(range(50))


def test_too_many_pending_requests_pause_reading(clock: Clock, registry: HandlerRegistry) -> None:
    factory = ServerFactory(make_config(limits={"max_pending_requests": 3}), registry, clock)
    pending: list[Deferred] = []
    factory.registry.add("slow", lambda request: pending.append(Deferred()) or pending[-1])
    peer = Peer(factory)
    peer.send({"type": "slow", "id": 1}, {"type": "slow", "id": 2})
    assert peer.transport.producerState == "producing"
    peer.send({"type": "slow", "id": 3})
    assert peer.transport.producerState == "paused"
    pending[0].callback(None)
    assert peer.transport.producerState == "producing"
    assert [m["id"] for m in peer.received()] == [1]


def test_full_write_buffer_pauses_reading_and_slow_consumer_is_closed(
    clock: Clock, registry: HandlerRegistry
) -> None:
    factory = ServerFactory(
        make_config(limits={"max_outbound_buffer_bytes": 2048}), registry, clock
    )
    peer = Peer(factory)
    proto = peer.protocol
    proto.pauseProducing()  # what a TCP transport does when its buffer passes 64 KiB
    assert peer.transport.producerState == "paused"
    proto.resumeProducing()
    assert peer.transport.producerState == "producing"
    proto.pauseProducing()
    for _ in range(20):
        factory.send(proto.session_id, "news", "x" * 100)
    assert peer.transport.disconnected  # aborted, not politely closed
    assert proto.close_reason == "slow_consumer"
    assert factory.closes["slow_consumer"] == 1
    assert peer.transport.producer is None


def test_server_push_to_one_and_broadcast_encodes_once(factory: ServerFactory, monkeypatch) -> None:
    peers = [Peer(factory, port=40000 + i) for i in range(3)]
    assert factory.send(peers[1].protocol.session_id, "note", {"k": 1})
    assert not factory.send("no-such-session", "note", 1)
    assert [p.received() for p in peers] == [[], [{"type": "note", "data": {"k": 1}}], []]

    import heartbeatd.server.factory as factory_module

    calls = []
    real = factory_module.encode_message
    monkeypatch.setattr(
        factory_module, "encode_message", lambda *a, **k: calls.append(a) or real(*a, **k)
    )
    assert factory.broadcast("news", [1, 2]) == 3
    assert len(calls) == 1
    assert all(p.received() == [{"type": "news", "data": [1, 2]}] for p in peers)


def test_pong_and_error_from_the_client_are_not_dispatched(factory: ServerFactory, clock) -> None:
    peer = Peer(factory)
    proto = peer.protocol
    proto.send_heartbeat(b"", clock.seconds())
    clock.advance(0.25)
    peer.send({"type": "pong", "id": "hb-1"}, {"type": "error", "error": {"code": "x"}})
    assert peer.received() == []
    assert proto.last_rtt == pytest.approx(0.25)
    assert proto.pings_unanswered == 0


@pytest.mark.parametrize("reserved", ["pong", "error"])
def test_types_the_protocol_answers_itself_cannot_get_handlers(
    registry: HandlerRegistry, reserved: str
) -> None:
    # Both the hot path and the general path rely on this: a client's pong or error report
    # is never dispatched.
    with pytest.raises(ValueError, match="cannot have a handler"):
        registry.add(reserved, lambda request: None)


def test_a_polite_close_the_peer_never_lets_finish_is_aborted_after_close_timeout(
    clock: Clock, registry: HandlerRegistry
) -> None:
    # loseConnection waits for the peer to read what is queued: one that never reads kept
    # its slot for ever.  shutdown.close_timeout bounds every polite close.
    config = make_config(max_frame_bytes=64, shutdown={"close_timeout": 3})
    factory = ServerFactory(config, registry, clock)
    peer = Peer(factory)
    peer.send_raw(b"\x00\x00\x00\x41")  # too large: an error, then a polite close
    assert peer.transport.disconnecting and not peer.transport.disconnected
    clock.advance(2.9)
    assert not peer.transport.disconnected
    clock.advance(0.2)
    assert peer.transport.disconnected
    assert factory.close_timeouts == 1
    # A close that finishes in time cancels its deadline.
    other = Peer(factory, port=40001)
    other.protocol.close("admin")
    other.disconnect()
    assert not clock.getDelayedCalls()
    assert not other.transport.disconnected and factory.close_timeouts == 1

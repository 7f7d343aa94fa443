"""The WebSocket listener on the real daemon, over real sockets: the handshake's rules, message
semantics and close codes, and hostile peers (docs/websocket.md).

The behaviour that every transport shares (hello, requests, errors, auth, limits, channels)
is tests/test_transports.py's; this file covers what only WebSocket has.  One daemon serves
most tests (module scope); tests that need their own limits start their own.
"""

from __future__ import annotations

import json
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest
from daemon import Daemon, RawClient
from wsclient import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    PONG,
    TEXT,
    WSClient,
    frame,
    handshake_request,
)

from heartbeatd.websocket.protocol import retry_after_header

ORIGIN = "http://127.0.0.1:8000"
CONFIG = {
    "websocket": {
        "listen": "tcp:0:interface=127.0.0.1",
        "allowed_origins": [ORIGIN],
        "handshake_timeout": 1,
        "path": "/ws",
    },
    "max_frame_bytes": 4096,
    "limits": {"frame_timeout": 0.5, "first_frame_timeout": 1},
    "heartbeat": {"interval": 0.25, "timeout": 60},
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with Daemon(tmp_path_factory.mktemp("ws"), CONFIG) as daemon:
        yield daemon
        assert daemon.stop() == 0
    # No hostile peer of this module made the daemon fail.
    assert "Traceback" not in daemon.log and "Unhandled" not in daemon.log


def client(daemon: Daemon, **options: Any) -> WSClient:
    options.setdefault("path", "/ws")
    ws = WSClient(daemon.ws_port, **options)
    ws.skip_pings = True  # the daemon pings every 0.25 s: tests here look past them
    assert ws.status == 101, ws.response_head
    assert ws.recv()["type"] == "hello"
    return ws


def test_hello_and_request_reply_over_websocket(daemon: Daemon) -> None:
    with client(daemon) as ws:
        ws.send({"type": "echo", "id": 1, "data": {"text": "héllo"}})
        assert ws.recv() == {"type": "echo", "id": 1, "data": {"text": "héllo"}}


def test_the_hello_names_the_websocket_framing(daemon: Daemon) -> None:
    with WSClient(daemon.ws_port, path="/ws") as ws:
        hello = ws.recv()
    assert hello["data"]["framing"] == "websocket"
    assert hello["data"]["max_frame_bytes"] == 4096


def test_a_browser_from_an_allowed_origin_is_accepted_others_get_403(daemon: Daemon) -> None:
    with client(daemon, headers={"Origin": ORIGIN}) as ws:
        ws.send({"type": "echo", "id": 1, "data": 1})
        assert ws.recv()["data"] == 1
    with WSClient(daemon.ws_port, path="/ws", headers={"Origin": "http://evil.example"}) as ws:
        assert ws.status == 403
        assert b"allowed_origins" in ws.read_rest()


def test_wrong_path_is_404_and_a_plain_get_is_426(daemon: Daemon) -> None:
    with WSClient(daemon.ws_port, path="/other") as ws:
        assert ws.status == 404
        ws.send_frame(TEXT, b"{}")  # after the refusal: ignored, never a traceback
        ws.read_rest()
    with socket.create_connection(("127.0.0.1", daemon.ws_port), timeout=10) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 426 ") and b"Upgrade: websocket" in answer


def test_fragmented_message_with_a_ping_in_between(daemon: Daemon) -> None:
    with client(daemon) as ws:
        body = b'{"type":"echo","id":7,"data":"abcdef"}'
        ws.send_frame(TEXT, body[:10], fin=False)
        ws.send_frame(PING, b"mid")
        ws.send_frame(CONTINUATION, body[10:20], fin=False)
        ws.send_frame(CONTINUATION, body[20:])
        while (got := ws.recv_frame())[0] == TEXT:  # past any heartbeat ping of ours
            pass
        assert got[:2] == (PONG, b"mid")
        assert ws.recv() == {"type": "echo", "id": 7, "data": "abcdef"}


def test_utf8_split_across_fragments_is_fine(daemon: Daemon) -> None:
    with client(daemon) as ws:
        body = '{"type":"echo","id":1,"data":"€"}'.encode()
        cut = body.index("€".encode()) + 1  # inside the three bytes of the euro sign
        ws.send_frame(TEXT, body[:cut], fin=False)
        ws.send_frame(CONTINUATION, body[cut:])
        assert ws.recv()["data"] == "€"


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        pytest.param([(BINARY, b"\x00\x01", {})], 1003, id="binary"),
        pytest.param([(TEXT, b'"\xff"', {})], 1007, id="bad-utf8"),
        pytest.param(
            [(TEXT, b'"\xe2\x82', {"fin": False}), (CONTINUATION, b'\x28"', {})],
            1007,
            id="bad-utf8-across-fragments",
        ),
        pytest.param([(TEXT, b"{}", {"mask": False})], 1002, id="unmasked"),
        pytest.param([(0x3, b"", {})], 1002, id="reserved-opcode"),
        pytest.param([(TEXT, b"{}", {"rsv": 4})], 1002, id="rsv1-without-extension"),
        pytest.param([(CONTINUATION, b"x", {})], 1002, id="continuation-first"),
        pytest.param(
            [(TEXT, b"{", {"fin": False}), (TEXT, b"}", {})], 1002, id="text-inside-a-message"
        ),
        pytest.param([(PING, b"x", {"fin": False})], 1002, id="fragmented-control"),
        pytest.param([(PING, b"x" * 126, {})], 1002, id="long-control"),
    ],
)
def test_framing_faults_get_their_close_codes(
    daemon: Daemon, frames: list[tuple[int, bytes, dict[str, Any]]], code: int
) -> None:
    with client(daemon) as ws:
        for opcode, payload, options in frames:
            ws.send_frame(opcode, payload, **options)
        assert ws.wait_closed()[0] == code


def test_oversized_message_is_closed_with_1009_from_its_header(daemon: Daemon) -> None:
    with client(daemon) as ws:
        # Only the header: the server refuses what it announces, before any of it arrives.
        ws.sock.sendall(struct.pack("!BBQ", 0x81, 0x80 | 127, 1 << 40) + b"\0\0\0\0")
        assert ws.recv()["error"] == {
            "code": "frame_too_large",
            "message": "frame of 1099511627776 bytes exceeds the limit of 4096 bytes",
        }
        assert ws.wait_closed()[0] == 1009


def test_oversized_fragmented_message_is_closed_with_1009(daemon: Daemon) -> None:
    with client(daemon) as ws:
        ws.send_frame(TEXT, b"x" * 3000, fin=False)
        ws.send_frame(CONTINUATION, b"x" * 3000, fin=False)
        assert ws.recv()["error"]["code"] == "frame_too_large"
        assert ws.wait_closed()[0] == 1009


def test_oversized_handshake_head_gets_400(daemon: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", daemon.ws_port), timeout=10) as s:
        s.sendall(handshake_request("/ws", {"X-Junk": "x" * 70_000}))
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"X-Junk": "x" * 20_000}, id="one-long-header"),
        pytest.param({f"X-H{i}": "v" for i in range(3000)}, id="3000-headers"),
    ],
)
def test_a_whole_oversized_head_in_one_read_gets_400(
    daemon: Daemon, headers: dict[str, str]
) -> None:
    # h11 bounds only a head still incomplete after a read: one that came whole in one
    # read (up to 64 KiB) was accepted.
    request = handshake_request("/ws", headers)
    assert 16 * 1024 < len(request) < 60_000
    with socket.create_connection(("127.0.0.1", daemon.ws_port), timeout=10) as s:
        s.sendall(request)
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"request head over 16384 bytes" in answer


def test_a_head_just_under_the_limit_with_a_message_behind_it_is_accepted(
    daemon: Daemon,
) -> None:
    request = handshake_request("/ws", {"X-Pad": "p" * 15_000})
    message = frame(TEXT, b'{"type":"echo","id":1,"data":"' + b"m" * 3000 + b'"}')
    with socket.create_connection(("127.0.0.1", daemon.ws_port), timeout=10) as s:
        ws = WSClient(daemon.ws_port, handshake=False, sock=s)
        s.sendall(request + message)
        while b"\r\n\r\n" not in ws._buffer:
            ws._buffer += s.recv(4096)
        head, ws._buffer = ws._buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert ws.recv()["type"] == "hello"
        assert ws.recv()["data"] == "m" * 3000


@pytest.mark.parametrize("key", [b"not base64 at all!", b"c2hvcnQ=", b"%%%%%%%%%%%%%%%%%%%%%%=="])
def test_a_key_that_is_not_16_bytes_of_base64_gets_400(daemon: Daemon, key: bytes) -> None:
    request = handshake_request("/ws")
    good = request.split(b"Sec-WebSocket-Key: ", 1)[1].split(b"\r\n", 1)[0]
    with socket.create_connection(("127.0.0.1", daemon.ws_port), timeout=10) as s:
        s.sendall(request.replace(good, key))
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Sec-WebSocket-Key" in answer


def test_a_close_from_the_client_is_answered_with_its_code(daemon: Daemon) -> None:
    with client(daemon) as ws:
        ws.send_frame(CLOSE, struct.pack("!H", 1000) + b"bye")
        assert ws.wait_closed() == (1000, "bye")


def test_a_ping_frame_gets_a_pong_with_its_payload(daemon: Daemon) -> None:
    with client(daemon) as ws:
        ws.send_frame(PING, b"12345")
        while (got := ws.recv_frame())[0] == TEXT:
            pass
        assert got[:2] == (PONG, b"12345")


def test_a_handshake_that_never_finishes_is_dropped_by_its_deadline(daemon: Daemon) -> None:
    # One byte a second would take minutes: the deadline (1 s here) ends it first.
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", daemon.ws_port), timeout=10) as s:
        request = handshake_request("/ws")
        s.sendall(request[:1])
        assert read_all(s) == b""
    assert time.monotonic() - began < 5


def test_a_fragmented_message_that_never_ends_is_closed_by_frame_timeout(daemon: Daemon) -> None:
    with client(daemon) as ws:
        ws.send_frame(TEXT, b'{"type":"echo"', fin=False)
        began = time.monotonic()
        while ws.recv_frame_or_close():  # pings come, then the server drops the connection
            pass
        assert time.monotonic() - began < 5
    daemon.wait_for("frame_timeout")


def test_a_silent_websocket_peer_is_dropped_by_first_frame_timeout(daemon: Daemon) -> None:
    with WSClient(daemon.ws_port, path="/ws") as ws:
        assert ws.recv()["type"] == "hello"
        while ws.recv_frame_or_close():  # never answers our pings
            pass
    daemon.wait_for("first_frame_timeout")


def test_forty_peers_holding_partial_messages_are_bounded(tmp_path: Path) -> None:
    """40 x 2001 bytes of unfinished messages against a 40 KiB bound: 20 are held, and each
    peer past the bound is answered ``overloaded`` and closed with 1013."""
    config = {
        **CONFIG,
        "max_frame_bytes": 65536,
        "limits": {"max_partial_frame_bytes": 40 * 1024, "frame_timeout": 30},
    }
    with Daemon(tmp_path, config) as daemon:
        peers = [client(daemon) for _ in range(40)]
        try:
            for ws in peers:
                ws.send_frame(TEXT, b"[" + b"1," * 1000, fin=False)
            refused = wait_for_closes(peers, want=20, deadline=time.monotonic() + 10)
            assert len(refused) == 20 and set(refused.values()) == {1013}
            held = [ws for ws in peers if ws not in refused]
            held[0].send_frame(CONTINUATION, b"1]")  # a held message is whole again
            assert held[0].recv()["error"]["code"] == "bad_message"
        finally:
            for ws in peers:
                ws.sock.close()


def wait_for_closes(peers: list[WSClient], want: int, deadline: float) -> dict[WSClient, int]:
    """Read every peer until ``want`` of them were closed; their close codes."""
    selector = selectors.DefaultSelector()
    for ws in peers:
        ws.sock.setblocking(False)
        selector.register(ws.sock, selectors.EVENT_READ, ws)
    closed: dict[WSClient, int] = {}
    while len(closed) < want and time.monotonic() < deadline:
        for key, _ in selector.select(0.1):
            ws = key.data
            try:
                chunk = ws.sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                chunk = b""
            ws._buffer += chunk
            if not chunk:
                selector.unregister(ws.sock)
                ws.sock.setblocking(True)
                messages = []
                while (message := ws.recv()) is not None:
                    messages.append(message)
                assert messages[0]["error"]["code"] == "overloaded"
                closed[ws] = ws.close_code[0] if ws.close_code else 0
    selector.close()
    for ws in peers:
        ws.sock.setblocking(True)
    return closed


def test_compression_is_negotiated_and_bounded(tmp_path: Path) -> None:
    import zlib

    config = {**CONFIG, "websocket": {**CONFIG["websocket"], "compression": True}}
    with Daemon(tmp_path, config) as daemon:
        headers = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
        with WSClient(daemon.ws_port, path="/ws", headers=headers) as ws:
            assert b"permessage-deflate" in ws.response_head
            assert ws.recv()["type"] == "hello"
            ws.send({"type": "echo", "id": 1, "data": "y" * 1000})
            assert ws.recv()["data"] == "y" * 1000  # compressed, and inflated by the client
            # A 60-byte compressed frame that inflates far past max_frame_bytes.
            bomb = zlib.compressobj(9, zlib.DEFLATED, -12)
            data = bomb.compress(b'"' + b"z" * 100_000) + bomb.flush(zlib.Z_SYNC_FLUSH)
            ws.send_frame(TEXT, data[:-4], rsv=4)
            # As for a message whose header announces too much: the envelope, then 1009.
            assert ws.recv()["error"] == {
                "code": "frame_too_large",
                "message": "message inflates past the limit of 4096 bytes",
            }
            assert ws.wait_closed()[0] == 1009
        # Data that does not inflate is closed 1007 under its own reason, not invalid_utf8.
        with WSClient(daemon.ws_port, path="/ws", headers=headers) as ws:
            assert ws.recv()["type"] == "hello"
            ws.send_frame(TEXT, b"\xff\xff\xff\xff garbage", rsv=4)
            assert ws.wait_closed()[0] == 1007
        daemon.wait_for(r"Closing client .*: bad_deflate")
        # A client that cannot shrink its window compresses with 32 KiB: inflated with it.
        headers = {"Sec-WebSocket-Extensions": "permessage-deflate"}
        with WSClient(daemon.ws_port, path="/ws", headers=headers) as ws:
            assert ws.recv()["type"] == "hello"
            text = b'{"type":"echo","id":2,"data":"' + b"ab" * 1500 + b'"}'
            deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
            data = deflate.compress(text) + deflate.flush(zlib.Z_SYNC_FLUSH)
            ws.send_frame(TEXT, data[:-4], rsv=4)
            _, payload, first = ws.recv_frame()
            assert first & 0x40  # a large reply comes compressed
            inflated = zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
            assert json.loads(inflated)["data"] == "ab" * 1500


@pytest.mark.parametrize(
    "offer",
    [
        "client_max_window_bits=abc",
        "client_max_window_bits=",
        "client_max_window_bits=0x0f",
        'client_max_window_bits="10"',
        "server_max_window_bits=x",
    ],
)
def test_a_malformed_deflate_offer_gets_400_not_a_traceback(tmp_path: Path, offer: str) -> None:
    # wsproto parses the window bits with int(): each of these raised from the upgrade, an
    # unhandled traceback per handshake and no answer.
    config = {**CONFIG, "websocket": {**CONFIG["websocket"], "compression": True}}
    with Daemon(tmp_path, config) as daemon:
        headers = {"Sec-WebSocket-Extensions": "permessage-deflate; " + offer}
        with WSClient(daemon.ws_port, path="/ws", headers=headers) as ws:
            assert ws.status == 400
            assert b"malformed permessage-deflate offer" in ws.read_rest()
        with client(daemon) as ws:  # the listener goes on
            ws.send({"type": "echo", "id": 1, "data": 1})
            assert ws.recv()["data"] == 1
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.log and "Unhandled" not in daemon.log
    assert "websocket_bad_extension" in daemon.log or "malformed permessage" in daemon.log


def test_peer_text_in_refusals_is_escaped_and_bounded(daemon: Daemon) -> None:
    # A long path was echoed whole into the 404 body and the log line; raw bytes and
    # U+0085 (a line break to some log readers) in Origin were logged as they came.
    with socket.create_connection(("127.0.0.1", daemon.ws_port), timeout=10) as s:
        s.sendall(handshake_request("/" + "p" * 10_000))
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 404 ") and len(answer) < 1000
    assert b"... (10001 characters)" in answer
    line = daemon.wait_for(r"no WebSocket at /p+\.\.\. \(10001 characters\)").string
    assert len(line) < 1000
    request = handshake_request("/ws", {"Origin": "http://x"})
    request = request.replace(b"http://x", b"http://x\x80\xff\xc2\x85y")
    with socket.create_connection(("127.0.0.1", daemon.ws_port), timeout=10) as s:
        s.sendall(request)
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"origin http://x\\x80\\xff\\xc2\\x85y is not" in answer
    line = daemon.wait_for(r"origin http://x.*y is not in").string
    assert "http://x\\x80\\xff\\xc2\\x85y" in line and "\x85" not in line


def test_a_frame_sent_with_the_handshake_is_answered_after_the_hello(daemon: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", daemon.ws_port), timeout=10) as s:
        ws = WSClient(daemon.ws_port, handshake=False, sock=s)
        request = handshake_request("/ws")
        s.sendall(request + frame(TEXT, b'{"type":"echo","id":1,"data":"early"}'))
        while b"\r\n\r\n" not in ws._buffer:
            ws._buffer += s.recv(4096)
        ws._buffer = ws._buffer.split(b"\r\n\r\n", 1)[1]
        assert ws.recv()["type"] == "hello"
        assert ws.recv() == {"type": "echo", "id": 1, "data": "early"}


def test_another_protocol_at_the_websocket_port_gets_400(daemon: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", daemon.ws_port), timeout=10) as s:
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64)  # a TLS hello
        assert read_all(s).startswith(b"HTTP/1.1 400 ")


def test_the_tcp_listener_is_unaffected(daemon: Daemon) -> None:
    with RawClient(daemon.port) as tcp:
        assert tcp.recv()["data"]["framing"] == "int32"


def recv_type(ws: WSClient, type_: str) -> dict[str, Any]:
    """The next message of ``type_`` (heartbeat pings skipped)."""
    while True:
        message = ws.recv()
        assert message is not None, f"closed while waiting for {type_}"
        if message["type"] == type_:
            return message


def read_all(s: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def test_websocket_without_the_extra_is_a_config_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from heartbeatd.daemon.tap import Options

    monkeypatch.setitem(sys.modules, "wsproto", None)  # as if wsproto were not installed
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"websocket": {"listen": "tcp:0"}}))
    with pytest.raises(SystemExit) as raised:
        Options().parseOptions(["--config", str(path)])
    assert "websocket.listen: 'tcp:0': " in str(raised.value)
    assert "pip install 'heartbeatd[websocket]'" in str(raised.value)


def test_bad_websocket_keys_are_config_errors(tmp_path: Path) -> None:
    from daemon import run_twistd

    path = tmp_path / "c.yaml"
    bad = {"listen": ["tcp:0", "nonsense:1"], "path": "ws", "allowed_origins": ["example.org"]}
    path.write_text(json.dumps({"websocket": bad}))
    result = run_twistd("heartbeatd", "--config", str(path))
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "websocket.path: 'ws' is not allowed; expected a URL path starting with /" in out
    assert "websocket.allowed_origins: ['example.org'] is not allowed" in out


def test_trusted_proxies_name_the_client_for_limits_and_logs(tmp_path: Path) -> None:
    config = {
        **CONFIG,
        "websocket": {**CONFIG["websocket"], "trusted_proxies": ["127.0.0.1"]},
        "limits": {"max_connections_per_address": 1, "per_address_exempt": []},
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
        # Anonymous sessions are counted per client address: the named client's, not the
        # proxy's, which every client behind it shares.
        "sessions": {"max_per_identity": 1},
    }
    with Daemon(tmp_path, config) as daemon:
        via = {"X-Forwarded-For": "198.51.100.7, 127.0.0.1"}  # client, then a proxy of ours
        with client(daemon, headers=via) as first:
            first.send({"type": "echo", "id": 1})
            assert first.recv()["id"] == 1
            first.send({"type": "session", "id": 2})
            assert first.recv()["data"]["session"]
            # The same client again through the proxy: over its per-address limit.
            with WSClient(daemon.ws_port, path="/ws", headers=via) as second:
                assert second.status == 429
                assert b"198.51.100.7 holds 1 connections" in second.read_rest()
            # Another client through the same proxy is a different address.
            other = {"X-Forwarded-For": "203.0.113.9"}
            with client(daemon, headers=other) as third:
                third.send({"type": "session", "id": 1})
                assert third.recv()["data"]["session"], "counted under the proxy's address"
                admin = int(daemon.wait_for(r"admin API listening on 127\.0\.0\.1:(\d+)")[1])
                clients = json.loads(urlopen(f"http://127.0.0.1:{admin}/clients").read())
                with RawClient(daemon.port) as tcp:
                    tcp.recv()
                    metrics = urlopen(f"http://127.0.0.1:{admin}/metrics").read().decode()
        assert 'heartbeatd_connections_by_listener{listener="websocket"} 2.0' in metrics
        assert 'heartbeatd_connections_by_listener{listener="tcp"} 1.0' in metrics
        peers = sorted(c["peer"] for c in clients["clients"])
        assert peers[0].startswith("198.51.100.7 (via 127.0.0.1:")
        assert peers[1].startswith("203.0.113.9 (via 127.0.0.1:")


def test_a_refusal_of_the_accept_rate_says_when_to_retry(tmp_path: Path) -> None:
    # HTTP's Retry-After (whole seconds, rounded up) for the per-address accept rate, on the
    # 503 before the handshake; none for a refusal that waiting does not lift.
    config = {
        **CONFIG,
        "limits": {
            "accepts_per_second_per_address": 0.5,
            "accept_burst_per_address": 1,
            "max_connections_per_address": 0,
            "per_address_exempt": [],
        },
    }
    with (
        Daemon(tmp_path, config) as daemon,
        socket.create_connection(("127.0.0.1", daemon.ws_port), timeout=10) as held,
    ):
        held.sendall(handshake_request("/ws"))
        with socket.create_connection(("127.0.0.1", daemon.ws_port), timeout=10) as s:
            answer = read_all(s)
    head = answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert head[0].startswith(b"HTTP/1.1 503 "), answer
    assert [h for h in head if h.lower().startswith(b"retry-after:")] in (
        [b"Retry-After: 1"],
        [b"Retry-After: 2"],
    ), answer
    assert retry_after_header(None) == b""
    assert retry_after_header(0.001) == b"Retry-After: 1\r\n"
    assert retry_after_header(1.2) == b"Retry-After: 2\r\n"


def test_forwarded_for_with_ports_repeated_headers_and_junk(tmp_path: Path) -> None:
    # ip:port and [v6]:port fell back to the proxy's (exempt) address, repeated headers
    # kept only the last, and junk lifted the per-address limits: now ports are read,
    # repeated headers are one list in order, and what names no client gets 400.
    config = {
        **CONFIG,
        "websocket": {**CONFIG["websocket"], "trusted_proxies": ["127.0.0.1"]},
        "limits": {"max_connections_per_address": 1, "per_address_exempt": ["127.0.0.1"]},
    }

    def request(*forwarded: str) -> bytes:
        lines = "".join(f"X-Forwarded-For: {value}\r\n" for value in forwarded)
        return handshake_request("/ws").replace(b"\r\n\r\n", b"\r\n" + lines.encode() + b"\r\n")

    def status(sock: socket.socket) -> int:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, head
            head += chunk
        return int(head.split(b" ", 2)[1])

    cases = [
        (("198.51.100.7:4711",), ("198.51.100.7",)),
        (("[2001:db8::1]:443",), ("2001:db8::1, 127.0.0.1",)),
        (("203.0.113.5", "127.0.0.1"), ("203.0.113.5",)),  # repeated: one list
    ]
    with Daemon(tmp_path, config) as daemon:
        for first, second in cases:
            with socket.create_connection(("127.0.0.1", daemon.ws_port), timeout=10) as held:
                held.sendall(request(*first))
                assert status(held) == 101
                with socket.create_connection(("127.0.0.1", daemon.ws_port), timeout=10) as s:
                    s.sendall(request(*second))
                    assert status(s) == 429, (first, second)
        for junk in ("unknown", "198.51.100.7:http", "[2001:db8::1", "", "198.51.100.7 x"):
            with socket.create_connection(("127.0.0.1", daemon.ws_port), timeout=10) as s:
                s.sendall(request(junk))
                answer = read_all(s)
            assert answer.startswith(b"HTTP/1.1 400 ") and b"names no client" in answer, junk


def test_wss_with_the_tls_keys_and_a_client_certificate(tmp_path: Path) -> None:
    from test_tls import WHOAMI, Certs, client_context, tls_config

    certs = Certs(tmp_path / "certs")
    (tmp_path / "whoami.py").write_text(WHOAMI)
    config = {**CONFIG, **tls_config(certs, client_ca=str(certs.ca_file)), "handlers": ["whoami"]}
    with Daemon(tmp_path, config, env={"PYTHONPATH": str(tmp_path)}) as daemon:
        context = client_context(certs, True)
        with client(daemon, tls=context) as ws:
            ws.send({"type": "whoami", "id": 1})
            assert "CN=alice" in ws.recv()["data"]
        with socket.create_connection(("127.0.0.1", daemon.ws_port), timeout=10) as s:
            s.sendall(handshake_request("/ws"))  # plain text at a wss:// port
            assert b"HTTP/1.1 101" not in read_all(s)


def test_shutdown_says_goaway_and_closes_with_1001(tmp_path: Path) -> None:
    config = {**CONFIG, "shutdown": {"drain_timeout": 0.5, "close_timeout": 5}}
    with Daemon(tmp_path, config) as daemon, client(daemon) as ws, client(daemon) as stays:
        daemon.process.send_signal(signal.SIGTERM)
        goaway = recv_type(ws, "goaway")
        assert goaway["data"]["reason"] == "shutdown"
        ws.send_frame(CLOSE, struct.pack("!H", 1000))  # leaves as asked
        assert ws.wait_closed() == (1000, "")
        recv_type(stays, "goaway")
        assert stays.wait_closed() == (1001, "shutdown")  # the drain is over
        assert daemon.process.wait(20) == 0


def test_websocket_listen_with_workers_is_a_config_error_naming_both_keys() -> None:
    """websocket.md's promise: the WebSocket listener runs in a single process."""
    from heartbeatd.config import ConfigError, parse_config

    raw = {"workers": 2, "cluster": {"redis": ""}, "websocket": {"listen": "tcp:0"}}
    with pytest.raises(ConfigError) as raised:
        parse_config(raw, {"cluster.redis": "redis://127.0.0.1:6379/0"})
    (line,) = [e for e in raised.value.errors if e.startswith("websocket.listen")]
    assert "'tcp:0'" in line and "workers: 2" in line
    parse_config(
        {**raw, "websocket": {"listen": ""}}, {"cluster.redis": "redis://127.0.0.1:6379/0"}
    )

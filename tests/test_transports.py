"""One behaviour suite, three transports: TCP, TLS and WebSocket, on the real daemon and real
sockets, with the same assertions (the connection core is one; only its adapters differ).

Each test takes ``server``-starting helpers that hide how a transport connects, sends a raw
body, announces an oversized one or leaves one unfinished; everything asserted is what a
client sees in envelopes.  A module-scoped daemon per transport serves the tests that need
nothing special; the others start their own with the limits they test.
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon, RawClient
from test_tls import Certs, TlsClient, client_context, tls_config
from wsclient import TEXT, WSClient
from wsclient import frame as ws_frame
from wsclient import header as ws_header

TRANSPORTS = ["tcp", "tls", "websocket"]
ADMIN = re.compile(r"admin API listening on 127\.0\.0\.1:(\d+)")
MAX_FRAME = 4096

HANDLERS = """
def register(registry):
    @registry.handler("fail")
    def fail(request):
        raise RuntimeError("boom")

    @registry.handler("whoami")
    def whoami(request):
        return request.session.identity

    @registry.handler("blob")
    def blob(request):
        return "x" * request.data
"""


class Client:
    """A client of one transport: envelopes in and out, plus the raw moves tests need."""

    def __init__(self, server: Server, source: str = "127.0.0.1") -> None:
        self.transport = server.transport
        port = server.daemon.ws_port if self.transport == "websocket" else server.daemon.port
        raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        if self.transport == "websocket":
            self.conn: Any = WSClient(port, sock=raw)
        elif self.transport == "tls":
            self.conn = TlsClient.__new__(TlsClient)
            self.conn.sock = client_context(server.certs).wrap_socket(
                raw, server_hostname="localhost"
            )
        else:
            self.conn = RawClient.__new__(RawClient)
            self.conn.sock = raw
        self.sock = self.conn.sock

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, obj: Any) -> None:
        self.conn.send(obj)

    def recv(self) -> Any:
        """The next envelope, or None once the server ended the connection."""
        try:
            if self.transport == "websocket":
                return self.conn.recv()
            return RawClient.recv(self.conn)
        except TimeoutError:
            raise
        except OSError:  # reset, or a TLS connection cut short
            return None

    def recv_type(self, type_: str) -> dict[str, Any]:
        """The next message of ``type_`` (heartbeat pings and other pushes skipped)."""
        while True:
            message = self.recv()
            assert message is not None, f"closed while waiting for {type_}"
            if message["type"] == type_:
                return message

    def send_body(self, body: bytes) -> None:
        """One frame/message carrying ``body`` as it is (invalid JSON, anything)."""
        if self.transport == "websocket":
            self.conn.send_frame(TEXT, body)
        else:
            self.sock.sendall(struct.pack("!I", len(body)) + body)

    def announce(self, size: int, sent: bytes = b"") -> None:
        """Start a frame/message of ``size`` bytes and send only ``sent`` of it."""
        if self.transport == "websocket":  # a frame of ``size`` whose rest never comes
            self.sock.sendall(ws_header(TEXT, size) + b"\0\0\0\0" + sent)
        else:
            self.sock.sendall(struct.pack("!I", size) + sent)

    def closed(self) -> bool:
        """True once the server ended the connection (read what it still sends)."""
        while self.recv() is not None:
            pass
        return True


class Server:
    """A daemon whose clients connect over ``transport``."""

    def __init__(
        self, tmp_path: Path, transport: str, certs: Certs, config: dict[str, Any]
    ) -> None:
        self.transport = transport
        self.certs = certs
        (tmp_path / "suite_handlers.py").write_text(HANDLERS)
        config = {"handlers": ["suite_handlers"], "max_frame_bytes": MAX_FRAME, **config}
        if transport == "tls":
            config.update(tls_config(certs))
        if transport == "websocket":
            config["websocket"] = {"listen": "tcp:0:interface=127.0.0.1"}
        self.daemon = Daemon(tmp_path, config, env={"PYTHONPATH": str(tmp_path)})

    def __enter__(self) -> Server:
        self.daemon.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemon.__exit__(*exc)

    def connect(self, *, hello: bool = True, source: str = "127.0.0.1") -> Client:
        client = Client(self, source)
        if hello:
            assert client.recv()["type"] == "hello"
        return client

    def refusal(self, source: str = "127.0.0.1") -> str:
        """Connect, expecting a refusal: the message the server answered with."""
        if self.transport == "websocket":
            address = ("127.0.0.1", self.daemon.ws_port)
            with socket.create_connection(address, 10, source_address=(source, 0)) as s:
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 503 "), data
            return data.split(b"\r\n\r\n", 1)[1].decode()
        with Client(self, source) as client:
            message = client.recv()
            assert message["error"]["code"] == "too_many_connections"
            assert client.closed()
            return message["error"]["message"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module", params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def standard(
    transport: str, certs: Certs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    config = {
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
        "channels": {"client_publish": True},
        "limits": {"max_outbound_buffer_bytes": 64 * 1024},
    }
    with Server(tmp_path_factory.mktemp(transport), transport, certs, config) as server:
        yield server
        assert server.daemon.stop() == 0
    # The only tracebacks are the failing handler's (internal_error): nothing unhandled.
    assert "Unhandled Error" not in server.daemon.log


@contextlib.contextmanager
def own_server(
    tmp_path: Path, transport: str, certs: Certs, config: dict[str, Any]
) -> Iterator[Server]:
    with Server(tmp_path, transport, certs, config) as server:
        yield server


# -- the suite -------------------------------------------------------------------------------


def test_hello_then_requests_answered_in_order(standard: Server) -> None:
    with standard.connect(hello=False) as client:
        hello = client.recv()
        assert hello["type"] == "hello" and hello["data"]["max_frame_bytes"] == MAX_FRAME
        for i in range(5):
            client.send({"type": "echo", "id": i, "data": {"n": i, "text": "é€"}})
        assert [client.recv() for _ in range(5)] == [
            {"type": "echo", "id": i, "data": {"n": i, "text": "é€"}} for i in range(5)
        ]
        client.send({"type": "ping", "id": "p"})
        assert client.recv() == {"type": "pong", "id": "p"}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"type":', "bad_json"),
        (b"[1, 2]", "bad_message"),
        (b'{"type": "nope", "id": 1}', "unknown_type"),
        (b'{"type": "fail", "id": 1}', "internal_error"),
        (b"[" * 100 + b"]" * 100, "too_deep"),
    ],
)
def test_error_codes_that_keep_the_connection(standard: Server, body: bytes, code: str) -> None:
    with standard.connect() as client:
        client.send_body(body)
        assert client.recv_type("error")["error"]["code"] == code
        client.send({"type": "echo", "id": 2, "data": "still here"})
        assert client.recv_type("echo")["data"] == "still here"


def test_frame_too_large_is_answered_then_closed(standard: Server) -> None:
    with standard.connect() as client:
        client.announce(MAX_FRAME + 1)
        error = client.recv_type("error")["error"]
        assert error["code"] == "frame_too_large"
        assert error["message"] == f"frame of {MAX_FRAME + 1} bytes exceeds the limit of 4096 bytes"
        assert client.closed()


def test_a_client_that_stops_reading_is_closed_as_slow_consumer(standard: Server) -> None:
    from test_hostile_peers import post

    admin = int(standard.daemon.wait_for(ADMIN).group(1))
    with standard.connect() as sleeper:
        sleeper.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sleeper.send({"type": "echo", "id": 0})  # speaks, then never reads again
        chunk = "x" * (256 * 1024)
        for _ in range(100):
            sent = post(admin, "/broadcast", {"type": "news", "data": chunk})["sent"]
            if sent == 0:
                break
        standard.daemon.wait_for("slow_consumer")
        assert sent == 0


def test_a_polite_close_to_a_peer_that_stops_reading_is_aborted_by_its_deadline(
    tmp_path: Path, transport: str, certs: Certs
) -> None:
    # A 16 MiB reply (more than loopback's buffers hold) the peer never reads, then in the
    # same read an oversized frame: the server closes politely, and loseConnection waits for
    # the unread bytes, so the slot was held for ever.  shutdown.close_timeout (1 s here)
    # bounds that wait.
    config = {
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
        "limits": {"max_outbound_buffer_bytes": 32 * 1024 * 1024},
        "shutdown": {"close_timeout": 1},
    }
    with own_server(tmp_path, transport, certs, config) as server:
        admin = int(server.daemon.wait_for(ADMIN).group(1))
        with server.connect() as sleeper:
            sleeper.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            body = b'{"type":"blob","id":1,"data":16777216}'
            if transport == "websocket":
                data = ws_frame(TEXT, body) + ws_header(TEXT, MAX_FRAME + 1) + b"\0\0\0\0"
            else:
                data = struct.pack("!I", len(body)) + body + struct.pack("!I", MAX_FRAME + 1)
            sleeper.sock.sendall(data)
            server.daemon.wait_for("frame_too_large", timeout=10)
            began = time.monotonic()
            server.daemon.wait_for(r"did not finish within 1s", timeout=10)
            assert time.monotonic() - began < 5
            sleeper.sock.settimeout(10)
            assert sleeper.closed()  # what got out, then the end (a reset)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as answer:
            assert "heartbeatd_close_timeouts_total 1.0" in answer.read().decode()


def test_channels_publish_and_recover_after_a_reconnect(standard: Server) -> None:
    channel = f"news-{standard.transport}"
    with standard.connect() as a, standard.connect() as b:
        a.send({"type": "subscribe", "id": 1, "data": {"channel": channel}})
        epoch = a.recv_type("subscribe")["data"]["epoch"]
        b.send({"type": "publish", "id": 2, "data": {"channel": channel, "data": {"n": 1}}})
        assert b.recv_type("publish")["data"]["offset"] == 1
        publication = a.recv_type("publication")["data"]
        assert (publication["offset"], publication["data"]) == (1, {"n": 1})
        a.sock.close()  # a leaves, misses two, comes back with since
        for n in (2, 3):
            b.send({"type": "publish", "id": n, "data": {"channel": channel, "data": n}})
            b.recv_type("publish")
        b.send({"type": "subscribe", "id": 9, "data": {"channel": "bad name"}})
        assert b.recv_type("error")["error"]["code"] == "bad_channel"
    with standard.connect() as again:
        since = {"epoch": epoch, "offset": 1}
        again.send({"type": "subscribe", "id": 1, "data": {"channel": channel, "since": since}})
        answer = again.recv_type("subscribe")["data"]
        assert answer == {"channel": channel, "epoch": epoch, "offset": 3, "recovered": True}
        assert [again.recv_type("publication")["data"]["data"] for _ in range(2)] == [2, 3]


def test_auth_tokens(transport: str, certs: Certs, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:alice-secret\n")
    config = {"auth": {"mode": "token", "tokens_file": str(tokens)}}
    with own_server(tmp_path, transport, certs, config) as server:
        with server.connect(hello=False) as client:
            assert client.recv()["data"]["auth"] == "required"
            client.send({"type": "echo", "id": 1})
            assert client.recv_type("error")["error"]["code"] == "unauthenticated"
            assert client.closed()
        with server.connect() as client:
            client.send({"type": "auth", "id": 1, "data": {"token": "wrong"}})
            assert client.recv_type("error")["error"]["code"] == "auth_failed"
            assert client.closed()
        with server.connect() as client:
            client.send({"type": "auth", "id": 1, "data": {"token": "alice-secret"}})
            assert client.recv_type("auth")["data"] == {"identity": "alice"}
            client.send({"type": "whoami", "id": 2})
            assert client.recv_type("whoami")["data"] == "alice"


def test_heartbeat_evicts_a_silent_client_and_keeps_one_that_answers(
    transport: str, certs: Certs, tmp_path: Path
) -> None:
    config = {"heartbeat": {"interval": 0.2, "timeout": 0.5}}
    with own_server(tmp_path, transport, certs, config) as server:
        with server.connect() as silent, server.connect() as alive:
            silent.send({"type": "echo", "id": 1})  # then ignores our pings
            began = time.monotonic()
            while time.monotonic() - began < 1.5:  # answers every ping for 1.5 s
                alive.sock.settimeout(0.3)
                with contextlib.suppress(TimeoutError):
                    message = alive.recv()
                    assert message is not None, "the answering client was dropped"
                    if message["type"] == "ping":
                        alive.send({"type": "pong", "id": message["id"]})
            assert silent.closed()
            alive.sock.settimeout(10)
            alive.send({"type": "echo", "id": 2, "data": "alive"})
            assert alive.recv_type("echo")["data"] == "alive"
        server.daemon.wait_for("heartbeat_timeout")


def test_connection_and_per_address_limits(transport: str, certs: Certs, tmp_path: Path) -> None:
    """127.0.0.2 is limited per address (127.0.0.1 is exempt, as by default); the total
    counts every listener's connections together."""
    config = {
        "limits": {
            "max_connections": 3,
            "max_connections_per_address": 2,
            "max_partial_frame_bytes": 1024,
        }
    }
    with own_server(tmp_path, transport, certs, config) as server:
        with server.connect(source="127.0.0.2"), server.connect(source="127.0.0.2"):
            refusal = server.refusal(source="127.0.0.2")
            assert refusal.startswith("127.0.0.2 holds 2 connections, the per-address limit")
            if transport == "websocket":  # a TCP client takes the last place
                third: Any = RawClient(server.daemon.port)
                assert third.recv()["type"] == "hello"
            else:
                third = server.connect()
            with third:
                assert "maximum of 3 connections" in server.refusal()
        with server.connect() as holder:
            # A frame left unfinished holds more than limits.max_partial_frame_bytes.
            holder.announce(3000, b"x" * 2000)
            assert holder.recv_type("error")["error"]["code"] == "overloaded"
            assert holder.closed()

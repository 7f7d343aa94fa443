"""The admin API in-process: resources on DummyRequest, and the channel's header-stage checks
on a real loopback socket driven by hand (so the bytes the server read can be counted)."""

from __future__ import annotations

import io
import json
import select
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import Peer, make_config
from twisted.internet import tcp
from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from heartbeatd.daemon.admin import AdminPolicy, AdminRoot, AdminSite, LocalBackend, admin_site
from heartbeatd.daemon.admin_routes import ROUTES, AdminApi, Answer, ApiError, Call
from heartbeatd.daemon.channels_admin import ClusterBackend
from heartbeatd.daemon.supervisor_admin import SupervisorBackend
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import HandlerError, default_registry
from heartbeatd.wire import ACCELERATED

TOKEN = "t0ken"


@pytest.fixture
def factory() -> ServerFactory:
    return ServerFactory(make_config(), default_registry(), MemoryReactorClock())


def call(
    root: AdminRoot,
    method: str,
    path: str,
    body: Any = None,
    token: str = "",
    query: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """Traverse and render ``root`` as twisted.web would; return (status, decoded body)."""
    segments = [s.encode() for s in path.lstrip("/").split("/")]
    request = DummyRequest(segments)
    request.method = method.encode()
    request.uri = request.path = path.encode()
    request.content = io.BytesIO(b"" if body is None else json.dumps(body).encode())
    for key, value in (query or {}).items():
        request.addArg(key.encode(), value.encode())
    if token:
        request.requestHeaders.addRawHeader(b"authorization", f"Bearer {token}".encode())
    resource = getChildForRequest(root, request)
    result = resource.render(request)
    assert isinstance(result, bytes)
    kind = request.responseHeaders.getRawHeaders(b"content-type", [b""])[0]
    decoded = json.loads(result) if kind == b"application/json" else result.decode()
    return request.responseCode or 200, decoded


def test_health_serving_then_draining(factory: ServerFactory) -> None:
    root = AdminRoot(factory)
    Peer(factory)
    assert call(root, "GET", "/healthz") == (200, {"status": "serving", "clients": 1})
    factory.draining = True
    assert call(root, "GET", "/healthz") == (503, {"status": "draining"})


def test_health_is_public_and_the_rest_needs_the_token(factory: ServerFactory) -> None:
    root = AdminRoot(factory, AdminPolicy(TOKEN))
    assert call(root, "GET", "/healthz")[0] == 200
    assert call(root, "GET", "/clients")[0] == 401
    assert call(root, "GET", "/clients", token="wrong")[0] == 401
    assert call(root, "GET", "/clients", token=TOKEN)[0] == 200
    assert call(root, "POST", "/healthz")[0] == 401  # only reading health is public
    private = AdminRoot(factory, AdminPolicy(TOKEN, health_public=False))
    assert call(private, "GET", "/healthz")[0] == 401
    assert call(private, "GET", "/healthz", token=TOKEN)[0] == 200


def test_unknown_paths_and_wrong_methods_answer_json(factory: ServerFactory) -> None:
    root = AdminRoot(factory)
    assert call(root, "GET", "/nope") == (404, {"error": "no such resource: /nope"})
    assert call(root, "GET", "/clients/abc/nope")[0] == 404
    status, body = call(root, "PUT", "/healthz")
    assert (status, body) == (405, {"error": "method PUT not allowed; allowed: GET, HEAD"})
    assert call(root, "GET", "/broadcast")[0] == 405
    assert call(root, "GET", "/")[1]["paths"][0] == "/healthz"


def test_a_wrong_method_is_not_asked_for_a_json_content_type() -> None:
    """The header stage asks for ``Content-Type: application/json`` only where a route takes
    the method: ``POST /healthz`` goes on to its 405 (review finding), ``POST /broadcast``
    without it is still refused with 415."""
    from twisted.web.http import Headers

    policy = AdminPolicy()
    plain = Headers({b"host": [b"127.0.0.1"], b"content-type": [b"text/plain"]})
    for method in (b"POST", b"PUT", b"PATCH", b"DELETE"):
        assert policy.refusal(method, b"/healthz", plain, 2) is None, method
        assert policy.refusal(method, b"/healthz?x=1", Headers(), None) is None, method
    assert policy.refusal(b"POST", b"/nope", plain, 2) is None  # its 404
    assert policy.refusal(b"POST", b"/broadcast", plain, 2)[:1] == (415,)  # type: ignore[index]
    assert policy.refusal(b"POST", b"/broadcast", Headers(), 0)[:1] == (415,)  # type: ignore[index]
    assert policy.refusal(b"GET", b"/healthz", plain, 2)[:1] == (415,)  # type: ignore[index]


def test_clients_send_kick_and_evictions_say_session(factory: ServerFactory) -> None:
    root = AdminRoot(factory)
    peer = Peer(factory)
    session = peer.hello["data"]["session"]
    status, listing = call(root, "GET", "/clients")
    assert status == 200 and [c["session"] for c in listing["clients"]] == [session]
    assert call(root, "POST", f"/clients/{session}/send", {"type": "n", "data": 1}) == (
        200,
        {"sent": 1},
    )
    assert peer.received() == [{"type": "n", "data": 1}]
    assert call(root, "POST", "/broadcast", {"type": "b"}) == (200, {"sent": 1})
    assert call(root, "POST", "/broadcast", [1])[0] == 400
    assert call(root, "POST", "/clients/nobody/send", {"type": "n"})[0] == 404
    assert call(root, "DELETE", f"/clients/{session}") == (200, {"disconnected": session})
    peer.disconnect()
    assert call(root, "DELETE", f"/clients/{session}")[0] == 404
    _, listing = call(root, "GET", "/clients", query={"recent_evictions": "3"})
    (record,) = listing["recent_evictions"]
    assert record["session"] == session and record["reason"] == "admin"
    assert "session_id" not in record
    assert call(root, "GET", "/clients", query={"recent_evictions": "x"})[0] == 400


def test_metrics_have_process_build_info_and_zero_labels(factory: ServerFactory) -> None:
    status, text = call(AdminRoot(factory), "GET", "/metrics")
    assert status == 200
    for line in (
        'heartbeatd_evicted_total{reason="heartbeat_timeout"} 0.0',
        'heartbeatd_evicted_total{reason="slow_consumer"} 0.0',
        'heartbeatd_errors_total{code="bad_json"} 0.0',
        'heartbeatd_admin_refused_total{status="413"} 0.0',
        'heartbeatd_foreign_protocol_total{kind="http"} 0.0',
    ):
        assert line in text.splitlines()
    (info,) = [line for line in text.splitlines() if line.startswith("heartbeatd_build_info{")]
    assert 'python="' in info and 'version="' in info and 'twisted="' in info
    # Which hot path runs: the compiled one, or pure Python (HEARTBEATD_NO_EXTENSIONS=1).
    assert f'accelerated="{ACCELERATED}"' in info
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ):
        assert f"\n{name} " in text, name


# -- the channel, on a real socket -----------------------------------------------------------


class Wire:
    """A server-side twisted tcp.Server around an AdminSite's channel, read by hand.

    The reactor never runs: each `read()` is one ``recv`` the reactor would have made, so
    the test knows exactly what the server took off the socket.
    """

    def __init__(self, site: AdminSite) -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            self.peer = socket.create_connection(listener.getsockname())
            accepted, address = listener.accept()
        accepted.setblocking(False)
        self.peer.settimeout(10)
        self.reactor = MemoryReactorClock()
        site.reactor = self.reactor
        channel = site.buildProtocol(address)
        self.read_bytes = 0
        received = channel.dataReceived

        def counting(data: bytes) -> None:
            self.read_bytes += len(data)
            received(data)

        channel.dataReceived = counting  # type: ignore[method-assign]
        self.transport = tcp.Server(accepted, channel, address, None, 1, self.reactor)
        channel.makeConnection(self.transport)
        self.closed = False

    def read(self) -> None:
        """One readable event, as the reactor would deliver it (if still reading)."""
        if self.transport in self.reactor.getReaders():
            readable, _, _ = select.select([self.transport.socket], [], [], 10)
            assert readable, "nothing arrived within 10 s"
            why = self.transport.doRead()
            if why is not None:
                self._lost(why)

    def flush(self) -> None:
        """Write out what is queued; close the socket if the channel asked to."""
        for _ in range(100):
            if self.closed or not (self.transport.dataBuffer or self.transport._tempDataBuffer):
                if self.transport.disconnecting and not self.closed:
                    self._lost(self.transport.doWrite())
                return
            why = self.transport.doWrite()
            if why is not None:
                self._lost(why)

    def _lost(self, why: Any) -> None:
        self.closed = True
        self.transport.connectionLost(Failure(why))

    def response(self) -> bytes:
        chunks = []
        while chunk := self.peer.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.fixture
def wire(factory: ServerFactory) -> Iterator[Any]:
    wires: list[Wire] = []

    def make(site: AdminSite) -> Wire:
        wires.append(Wire(site))
        return wires[-1]

    yield make
    for w in wires:
        w.peer.close()
        if not w.closed:
            w.transport.socket.close()


HUGE = 64 * 1024 * 1024


def test_unauthenticated_64_mib_post_is_refused_before_its_body(factory, wire) -> None:
    site = admin_site(factory, make_config(admin={"token": TOKEN}).admin)
    w = wire(site)
    head = (
        b"POST /broadcast HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % HUGE
    )
    w.peer.sendall(head)
    w.read()
    assert w.read_bytes == len(head)  # headers only: not one body byte was read
    assert w.transport not in w.reactor.getReaders()  # and reading stopped
    w.flush()
    response = w.response()  # then EOF: the server closed the connection
    assert response.startswith(b"HTTP/1.1 401 ")
    assert b"Connection: close" in response and b"bearer token" in response
    with pytest.raises(OSError):  # the peer cannot push its 64 MiB into a closed connection
        for _ in range(HUGE // 65536):
            w.peer.sendall(b"x" * 65536)
    assert w.read_bytes == len(head)
    assert site.refused["401"] == 1


def test_oversized_content_length_gets_413_even_with_the_token(factory, wire) -> None:
    site = admin_site(factory, make_config(admin={"token": TOKEN, "max_body_bytes": 100}).admin)
    w = wire(site)
    head = (
        b"POST /broadcast HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\n"
        b"Expect: 100-continue\r\nContent-Length: 101\r\n\r\n" % TOKEN.encode()
    )
    w.peer.sendall(head)
    w.read()
    w.flush()
    response = w.response()
    assert response.startswith(b"HTTP/1.1 413 ")  # and no "100 Continue" before it
    assert b"max_body_bytes (100)" in response
    assert w.read_bytes == len(head)


def test_chunked_body_over_the_cap_is_refused(factory, wire) -> None:
    site = admin_site(factory, make_config(admin={"max_body_bytes": 100}).admin)
    w = wire(site)
    w.peer.sendall(
        b"POST /broadcast HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    w.read()
    w.peer.sendall(b"%x\r\n%s\r\n" % (150, b"x" * 150))
    w.read()
    w.flush()
    assert w.response().startswith(b"HTTP/1.1 413 ")
    assert site.refused["413"] == 1
    assert factory.broadcast("probe") == 0  # nothing was rendered


def test_a_body_within_the_cap_is_served(factory, wire) -> None:
    site = admin_site(factory, make_config(admin={"token": TOKEN, "max_body_bytes": 100}).admin)
    Peer(factory)
    w = wire(site)
    body = json.dumps({"type": "news", "data": "x"}).encode()
    w.peer.sendall(
        b"POST /broadcast HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        b"Connection: close\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
        % (TOKEN.encode(), len(body), body)
    )
    w.read()
    w.flush()
    response = w.response()
    assert response.startswith(b"HTTP/1.1 200 ") and response.endswith(b'{"sent": 1}\n')


# -- one routing table over three backends ----------------------------------------------------


class Recorder:
    """A backend that answers every route with its name and params (or what a test sets)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.next: Any = None

    def __getattr__(self, name: str) -> Any:
        if name not in {route.handler for route in ROUTES}:
            raise AttributeError(name)

        def answer(call: Call) -> Any:
            self.calls.append((name, dict(call.params)))
            if self.next is not None:
                result, self.next = self.next, None
                if isinstance(result, Exception):
                    raise result
                return result
            return Answer({"route": name, **call.params})

        return answer


def render(api: AdminApi, method: str, path: str, token: str = "") -> tuple[Any, DummyRequest]:
    request = DummyRequest(path.lstrip("/").split("/"))
    request.method = method.encode()
    request.uri = request.path = path.encode()
    request.content = io.BytesIO(b"")
    if token:
        request.requestHeaders.addRawHeader(b"authorization", f"Bearer {token}".encode())
    return api.render(request), request


def test_every_backend_answers_every_route() -> None:
    for backend in (LocalBackend, ClusterBackend, SupervisorBackend):
        for route in ROUTES:
            assert callable(getattr(backend, route.handler, None)), (backend, route)


def test_the_table_routes_params_methods_and_errors() -> None:
    backend = Recorder()
    api = AdminApi(backend, AdminPolicy(TOKEN))  # type: ignore[arg-type]
    body, request = render(api, "DELETE", "/clients/abc", TOKEN)
    assert json.loads(body) == {"route": "disconnect", "session": "abc"}
    assert json.loads(render(api, "POST", "/clients/abc/send", TOKEN)[0])["route"] == "send"
    assert json.loads(render(api, "GET", "/clients/", TOKEN)[0])["route"] == "clients"
    assert json.loads(render(api, "HEAD", "/metrics", TOKEN)[0])["route"] == "metrics"
    assert json.loads(render(api, "GET", "/healthz")[0])["route"] == "health"  # public
    # The token is checked before anything is routed, and nothing is called.
    calls = len(backend.calls)
    body, request = render(api, "GET", "/clients")
    assert request.responseCode == 401 and len(backend.calls) == calls
    # A known path with another method: 405 and Allow; an unknown one: 404.
    body, request = render(api, "GET", "/clients/abc", TOKEN)
    assert request.responseCode == 405
    assert request.responseHeaders.getRawHeaders(b"allow") == [b"DELETE"]
    body, request = render(api, "PUT", "/healthz", TOKEN)
    assert request.responseHeaders.getRawHeaders(b"allow") == [b"GET, HEAD"]
    body, request = render(api, "GET", "/clients/abc/nope", TOKEN)
    assert (request.responseCode, json.loads(body)) == (
        404,
        {"error": "no such resource: /clients/abc/nope"},
    )
    assert len(backend.calls) == calls


def test_answers_later_and_typed_failures() -> None:
    backend = Recorder()
    api = AdminApi(backend, AdminPolicy())  # type: ignore[arg-type]
    later: Deferred[Answer] = Deferred()
    backend.next = later
    result, request = render(api, "GET", "/clients")
    assert result == NOT_DONE_YET and not request.finished
    later.callback(Answer({"count": 0}))
    assert request.finished and json.loads(b"".join(request.written)) == {"count": 0}

    backend.next = fail(HandlerError("unavailable", "Redis is unreachable"))
    body, request = render(api, "POST", "/broadcast")
    assert (request.responseCode, json.loads(body)) == (
        503,
        {"error": "Redis is unreachable", "code": "unavailable"},
    )
    backend.next = ApiError(400, "bad", "bad_json")
    body, request = render(api, "POST", "/publish")
    assert (request.responseCode, json.loads(body)) == (400, {"error": "bad", "code": "bad_json"})
    backend.next = ZeroDivisionError()
    body, request = render(api, "GET", "/metrics")
    assert (request.responseCode, json.loads(body)["code"]) == (500, "internal_error")


def test_parse_body_maps_the_decoders_codes() -> None:
    """decode_json tells nesting from bad JSON itself (at our walk's depth, the parser's own
    limit, or a RecursionError): the admin body keeps its code, no text search."""
    from heartbeatd.daemon.admin_guard import BadBody, parse_body

    assert parse_body(b"") is None and parse_body(b'{"a": [1]}') == {"a": [1]}
    for depth in (65, 2_000, 200_000):
        with pytest.raises(BadBody) as raised:
            parse_body(b"[" * depth + b"]" * depth)
        assert raised.value.code == "too_deep"
    with pytest.raises(BadBody) as raised:
        parse_body(b"{nope")
    assert raised.value.code == "bad_json"

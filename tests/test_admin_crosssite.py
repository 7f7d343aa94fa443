"""The admin API refuses what a web page or a rebound DNS name could send (issue 22, finding 1).

Raw sockets, so each test controls the exact ``Host``, ``Origin`` and ``Content-Type``; the
browser test (a real page on another origin) is `test_browser_page_cannot_broadcast`.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from browser import dump_dom, serve_page
from daemon import Daemon, RawClient
from test_admin import ADMIN, ADMIN_ON


def raw_http(port: int, request: bytes) -> tuple[int, Any]:
    """Send ``request`` as is; the status and the decoded JSON body."""
    status, _, body = raw_http_head(port, request)
    return status, body


def raw_http_head(port: int, request: bytes) -> tuple[int, bytes, Any]:
    """Send ``request`` as is; the status, the raw head and the decoded JSON body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            body, rest = body + rest[:n], rest[n + 2 :]
    decoded = json.loads(body) if b"application/json" in head.lower() else body.decode()
    return status, head, decoded


def request(method: str, path: str, host: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


BROADCAST = json.dumps({"type": "evil", "data": 1}).encode()


@pytest.fixture
def admin(tmp_path: Path) -> Any:
    with Daemon(tmp_path, ADMIN_ON) as daemon:
        yield daemon, int(daemon.wait_for(ADMIN).group(1))


def test_rebound_host_is_refused(admin: Any) -> None:
    _, port = admin
    assert raw_http(port, request("GET", "/clients", "rebind.evil.example"))[1]["code"] == (
        "forbidden_host"
    )
    status, answer = raw_http(port, request("GET", "/clients", f"rebind.evil.example:{port}"))
    assert (status, answer["code"]) == (421, "forbidden_host")
    assert raw_http(port, request("GET", "/clients", ""))[0] == 421
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "[::1]", "127.0.0.1"):
        assert raw_http(port, request("GET", "/clients", host))[0] == 200, host


def test_allowed_hosts_are_answered(tmp_path: Path) -> None:
    config = {"admin": {"listen": "tcp:0:interface=127.0.0.1", "allowed_hosts": ["ops.internal"]}}
    with Daemon(tmp_path, config) as daemon:
        port = int(daemon.wait_for(ADMIN).group(1))
        assert raw_http(port, request("GET", "/clients", "ops.internal:9100"))[0] == 200
        assert raw_http(port, request("GET", "/clients", "other.internal"))[0] == 421


def test_foreign_origin_is_refused_and_nobody_hears_it(admin: Any) -> None:
    daemon, port = admin
    with RawClient(daemon.port) as client:
        client.recv()  # hello
        for origin in ("http://evil.example", f"http://127.0.0.1:{port + 1}", "null"):
            status, answer = raw_http(
                port,
                request(
                    "POST",
                    "/broadcast",
                    f"127.0.0.1:{port}",
                    BROADCAST,
                    Origin=origin,
                    Content_Type="application/json",
                ),
            )
            assert (status, answer["code"]) == (403, "forbidden_origin"), origin
        same = request(
            "POST",
            "/broadcast",
            f"127.0.0.1:{port}",
            BROADCAST,
            Origin=f"http://127.0.0.1:{port}",
            Content_Type="application/json",
        )
        assert raw_http(port, same) == (200, {"sent": 1})
        assert client.recv() == {"type": "evil", "data": 1}  # the first push to arrive


def test_body_must_be_json(admin: Any) -> None:
    _, port = admin
    host = f"127.0.0.1:{port}"
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x"):
        status, answer = raw_http(
            port, request("POST", "/broadcast", host, BROADCAST, Content_Type=kind)
        )
        assert (status, answer["code"]) == (415, "unsupported_media_type"), kind
    assert raw_http(port, request("POST", "/broadcast", host, BROADCAST))[0] == 415
    ok = request(
        "POST", "/broadcast", host, BROADCAST, Content_Type="application/json; charset=utf-8"
    )
    assert raw_http(port, ok) == (200, {"sent": 0})


def assert_wrong_methods_get_405(port: int) -> None:
    """docs/admin.md: a wrong method is a JSON 405 with ``Allow``, whatever its body's type
    (``curl -X POST .../healthz`` got 415 before the review's fix)."""
    host = f"127.0.0.1:{port}"
    for method, kind in [("POST", ""), ("PUT", "text/plain"), ("PATCH", ""), ("DELETE", "")]:
        headers = {"Content_Type": kind} if kind else {}
        status, head, answer = raw_http_head(
            port, request(method, "/healthz", host, b"x" if kind else b"", **headers)
        )
        assert (status, answer) == (
            405,
            {"error": f"method {method} not allowed; allowed: GET, HEAD"},
        ), method
        assert b"\r\nallow: get, head\r\n" in head.lower(), head
    assert raw_http(port, request("POST", "/nope", host, b"x", Content_Type="text/plain")) == (
        404,
        {"error": "no such resource: /nope"},
    )


def test_a_wrong_method_gets_405_not_415(admin: Any) -> None:
    assert_wrong_methods_get_405(admin[1])


PAGE = """<!doctype html><html><body><p id="out">waiting</p><script>
fetch("http://127.0.0.1:%(port)d/broadcast", {
  method: "POST", mode: "no-cors", body: JSON.stringify({type: "evil", data: 1})
}).then(() => { document.getElementById("out").textContent = "fetch-done"; },
        (e) => { document.getElementById("out").textContent = "fetch-failed " + e; });
</script></body></html>"""


def test_browser_page_cannot_broadcast(admin: Any) -> None:
    """A page on another origin does a ``no-cors`` POST /broadcast: no client hears it."""
    daemon, port = admin
    with RawClient(daemon.port) as client:
        client.recv()  # hello
        with serve_page(PAGE % {"port": port}) as url:
            dom = dump_dom(url)
        assert "fetch-done" in dom, dom  # the browser did send the request
        _, metrics = raw_http(port, request("GET", "/metrics", f"127.0.0.1:{port}"))
        assert 'heartbeatd_admin_refused_total{status="403"} 1.0' in metrics
        legit = request(
            "POST",
            "/broadcast",
            f"127.0.0.1:{port}",
            b'{"type": "ok"}',
            Content_Type="application/json",
        )
        assert raw_http(port, legit) == (200, {"sent": 1})
        assert client.recv()["type"] == "ok"  # the first push to arrive: not "evil"


def test_the_workers_supervisor_admin_is_guarded_too(tmp_path: Path) -> None:
    """workers: N serves admin.listen from the supervisor: the same guard, and it forwards."""
    from redis_server import RedisServer
    from test_workers import workers
    from test_workers_admin import wait_health

    with RedisServer(tmp_path / "redis") as redis, workers(tmp_path, redis, 2) as daemon:
        port = daemon.admin  # type: ignore[attr-defined]
        # A broadcast needs every worker's Redis link, which comes up after READY.
        wait_health(daemon, lambda b: b.get("broker") == "up")
        assert raw_http(port, request("GET", "/clients", "rebind.evil.example"))[0] == 421
        host = f"127.0.0.1:{port}"
        origin = request(
            "POST",
            "/broadcast",
            host,
            BROADCAST,
            Origin="http://evil.example",
            Content_Type="application/json",
        )
        assert raw_http(port, origin)[1]["code"] == "forbidden_origin"
        plain = request("POST", "/broadcast", host, BROADCAST, Content_Type="text/plain")
        assert raw_http(port, plain)[0] == 415
        assert_wrong_methods_get_405(port)
        ok = request("POST", "/broadcast", host, BROADCAST, Content_Type="application/json")
        assert raw_http(port, ok)[0] == 200  # forwarded to a worker over its private socket
        assert raw_http(port, request("GET", "/clients", host))[0] == 200

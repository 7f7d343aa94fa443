"""The admin HTTP API against the real daemon: every endpoint, metrics that move, the token."""

from __future__ import annotations

import json
import re
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon, RawClient, run_twistd

ADMIN = re.compile(r"admin API listening on 127\.0\.0\.1:(\d+)")


def http(port: int, method: str, path: str, body: Any = None, token: str = "") -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if data is not None:  # the admin API refuses other body types (cross-site guard)
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw, kind = response.status, response.read(), response.headers["content-type"]
    except urllib.error.HTTPError as e:
        status, raw, kind = e.code, e.read(), e.headers["content-type"]
    return status, json.loads(raw) if "json" in kind else raw.decode()


def metric(text: str, name: str, worker: str = "0") -> float:
    """``name``'s value; with workers (every series labelled), worker ``worker``'s."""
    labels = rf'(?:\{{worker="{re.escape(worker)}"\}})?'
    match = re.search(rf"^{re.escape(name)}{labels} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in metrics"
    return float(match.group(1))


ADMIN_ON = {"admin": {"listen": "tcp:0:interface=127.0.0.1"}}


def test_every_endpoint(tmp_path: Path) -> None:
    with Daemon(tmp_path, ADMIN_ON) as daemon, RawClient(daemon.port) as client:
        port = int(daemon.wait_for(ADMIN).group(1))
        session = client.recv()["data"]["session"]

        assert http(port, "GET", "/healthz") == (200, {"status": "serving", "clients": 1})

        _, before = http(port, "GET", "/metrics")
        assert metric(before, "heartbeatd_connections") == 1
        assert metric(before, "heartbeatd_connections_accepted_total") == 1
        client.send({"type": "echo", "id": 1, "data": "x" * 100})
        client.recv()
        client.send({"type": "nope", "id": 2})
        client.recv()
        _, after = http(port, "GET", "/metrics")
        assert metric(after, 'heartbeatd_frames_total{direction="in"}') == 2
        assert metric(after, 'heartbeatd_bytes_total{direction="in"}') > 100
        assert metric(after, 'heartbeatd_errors_total{code="unknown_type"}') == 1
        assert "heartbeatd_ping_rtt_seconds_bucket" in after
        assert "heartbeatd_reactor_lag_seconds" in after

        status, listing = http(port, "GET", "/clients")
        assert status == 200 and listing["count"] == 1
        (entry,) = listing["clients"]
        assert entry["session"] == session and entry["frames_in"] == 2
        assert entry["peer"].startswith("127.0.0.1:")

        assert http(port, "POST", f"/clients/{session}/send", {"type": "note", "data": 7}) == (
            200,
            {"sent": 1},
        )
        assert client.recv() == {"type": "note", "data": 7}
        assert http(port, "POST", "/clients/nobody/send", {"type": "x"})[0] == 404
        assert http(port, "POST", "/broadcast", {"type": "news", "data": [1]}) == (200, {"sent": 1})
        assert client.recv() == {"type": "news", "data": [1]}
        assert http(port, "POST", "/broadcast", {"data": 1})[0] == 400

        assert http(port, "DELETE", f"/clients/{session}") == (200, {"disconnected": session})
        assert client.recv() is None
        status, listing = http(port, "GET", "/clients?recent_evictions=5")
        assert listing["count"] == 0
        (record,) = listing["recent_evictions"]
        assert record["reason"] == "admin" and record["session"] == session
        assert "session_id" not in record  # one name for one thing, as in /clients
        assert record["silent_for"] >= 0 and record["pings_unanswered"] == 0
        _, final = http(port, "GET", "/metrics")
        assert metric(final, 'heartbeatd_evicted_total{reason="admin"}') == 1
        assert daemon.stop() == 0


def test_bearer_token_is_required_and_never_logged(tmp_path: Path) -> None:
    config = {"admin": {"listen": "tcp:0:interface=127.0.0.1", "token": "s3cret-t0ken"}}
    with Daemon(tmp_path, config) as daemon:
        port = int(daemon.wait_for(ADMIN).group(1))
        assert http(port, "GET", "/healthz")[0] == 200  # public: probes call it bare
        assert http(port, "GET", "/metrics")[0] == 401
        assert http(port, "GET", "/metrics", token="wrong")[0] == 401
        assert http(port, "GET", "/clients", token="s3cret-t0ken")[0] == 200
        daemon.process.send_signal(signal.SIGHUP)  # a reload logs a diff: still no token
        daemon.wait_for("Configuration reloaded")
        assert daemon.stop() == 0
        assert "s3cret-t0ken" not in daemon.log


def test_healthz_reports_draining(tmp_path: Path) -> None:
    config = {**ADMIN_ON, "shutdown": {"drain_timeout": 30}}
    with Daemon(tmp_path, config) as daemon, RawClient(daemon.port) as client:
        port = int(daemon.wait_for(ADMIN).group(1))
        assert client.recv()["type"] == "hello"
        daemon.process.send_signal(signal.SIGTERM)
        assert client.recv()["type"] == "goaway"
        assert http(port, "GET", "/healthz") == (503, {"status": "draining"})
        client.sock.close()
        assert daemon.process.wait(20) == 0


def test_unauthenticated_huge_post_is_refused_before_the_body(tmp_path: Path) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("from-a-file\n")
    config = {"admin": {"listen": "tcp:0:interface=127.0.0.1", "token_file": str(token_file)}}
    with Daemon(tmp_path, config) as daemon:
        port = int(daemon.wait_for(ADMIN).group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /broadcast HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 67108864\r\n\r\n"
            )
            response = b""
            while chunk := sock.recv(65536):  # answered and closed without a body byte sent
                response += chunk
            assert response.startswith(b"HTTP/1.1 401 ") and b"Connection: close" in response
            sent = 0
            with pytest.raises(OSError):  # the 64 MiB cannot go into a closed connection
                while sent < 64 * 1024 * 1024:
                    sock.sendall(b"x" * 65536)
                    sent += 65536
            assert sent < 32 * 1024 * 1024
        assert http(port, "GET", "/clients", token="from-a-file")[0] == 200
        _, text = http(port, "GET", "/metrics", token="from-a-file")
        assert metric(text, 'heartbeatd_admin_refused_total{status="401"}') == 1
        assert daemon.stop() == 0
        assert "from-a-file" not in daemon.log


def test_operator_log_is_quiet_and_ordered(tmp_path: Path) -> None:
    config = {**ADMIN_ON, "shutdown": {"drain_timeout": 5}}
    with Daemon(tmp_path, config) as daemon, RawClient(daemon.port) as client:
        port = int(daemon.wait_for(ADMIN).group(1))
        assert client.recv()["type"] == "hello"
        for _ in range(3):
            assert http(port, "GET", "/healthz")[0] == 200
        assert http(port, "GET", "/nope")[0] == 404
        daemon.process.send_signal(signal.SIGTERM)
        assert client.recv()["type"] == "goaway"
        client.sock.close()
        daemon.wait_for("Server Shut Down")
        assert daemon.process.wait(20) == 0
    log = daemon.log
    assert "Handlers: built-in; message types: echo, message, ping" in log
    for noise in (r"starting on \d+", "Starting factory", r"\(TCP Port \d+ Closed\)", "/healthz"):
        assert re.search(noise, log) is None, noise  # Twisted's stock lines, no access log
    order = [
        "Received SIGTERM",
        "Stopped listening on 127.0.0.1:",
        "Draining: sent goaway to 1 client(s)",
        "Drain over; every client has left",
        "Admin API closed",
        "heartbeatd stopped after",
    ]
    positions = [log.index(line) for line in order]
    assert positions == sorted(positions), log


def test_access_log_when_asked(tmp_path: Path) -> None:
    config = {"admin": {"listen": "tcp:0:interface=127.0.0.1", "access_log": True}}
    with Daemon(tmp_path, config) as daemon:
        port = int(daemon.wait_for(ADMIN).group(1))
        assert http(port, "GET", "/healthz")[0] == 200
        daemon.wait_for(r"admin GET /healthz 200 \d+ bytes from 127\.0\.0\.1:\d+")
        assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("admin", "message"),
    [
        (
            {"listen": "tcp:0:interface=0.0.0.0"},
            "admin.listen: 'tcp:0:interface=0.0.0.0' is not allowed without a token",
        ),
        ({"token_file": "/nonexistent/admin-token"}, "admin.token_file: '/nonexistent/"),
        ({"token": "a", "token_file": "b"}, "admin.token_file: 'b' is not allowed together"),
    ],
)
def test_admin_config_errors_stop_the_daemon(tmp_path: Path, admin: dict, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"listen": "tcp:0:interface=127.0.0.1", "admin": admin}))
    result = run_twistd("heartbeatd", "--config", str(path))
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout

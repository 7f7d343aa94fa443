"""Interop with Node.js peers of the seed tutorial's kind (``tests/interop/*.js``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from daemon import Daemon

NODE = shutil.which("node")
INTEROP = Path(__file__).resolve().parent / "interop"

pytestmark = pytest.mark.skipif(NODE is None, reason="node (Node.js) is not installed")


def run_node(script: str, *args: str, timeout: float = 30) -> list[dict]:
    assert NODE is not None
    result = subprocess.run(
        [NODE, str(INTEROP / script), *args], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_seed_js_client_against_the_daemon(tmp_path: Path) -> None:
    config = {"framing": "seed", "heartbeat": {"interval": 0.2, "timeout": 1}}
    with Daemon(tmp_path, config) as daemon:
        events = run_node("seed_client.js", str(daemon.port), "chat", "20")
        assert events[0]["event"] == "hello"
        assert events[0]["data"]["framing"] == "seed"
        data = [e["value"] for e in events if e["event"] == "data"]
        assert len([e for e in events if e["event"] == "heartbeat"]) >= 20  # ours, answered
        assert data == [f"Thu, 01 Jan 2026 00:00:{i:02d} GMT" for i in range(20)]
        assert events[-1] == {"event": "close"}
        assert not [e for e in events if e["event"] == "error"]
        assert daemon.stop() == 0  # reads the log to its end
    assert "Received SIGTERM, shutting down gracefully" in daemon.log  # read past the session
    assert "bad_frame" not in daemon.log and "heartbeat_timeout" not in daemon.log


def test_silent_seed_js_client_gets_heartbeats_then_is_evicted(tmp_path: Path) -> None:
    config = {"framing": "seed", "heartbeat": {"interval": 0.2, "timeout": 0.5}}
    with Daemon(tmp_path, config) as daemon:
        events = run_node("seed_client.js", str(daemon.port), "silent")
        kinds = [e["event"] for e in events]
        assert kinds[0] == "hello"
        # Evicted at the first sweep past the timeout, so at least one heartbeat arrived.
        assert kinds.count("heartbeat") >= 1
        assert kinds[-1] == "close"
        errors = [e["message"] for e in events if e["event"] == "error"]
        assert all("ECONNRESET" in m for m in errors)  # an abort, not a polite close
        daemon.wait_for(r"Closing client \w+ \(127\.0\.0\.1:\d+\): heartbeat_timeout")
        assert daemon.stop() == 0


def test_python_client_and_pool_against_a_seed_js_server() -> None:
    assert NODE is not None
    server = subprocess.Popen(
        [NODE, str(INTEROP / "seed_server.js"), "200"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = json.loads(server.stdout.readline())["port"]
        result = subprocess.run(
            [sys.executable, str(INTEROP / "seed_python_driver.py"), str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["first"] == '服务端的数据数据:"Thu, 01 Jan 2026 00:00:00 GMT"'
        assert report["pipelined_ok"] and report["pooled_ok"]
        assert report["alive_after_heartbeats"]
        assert report["after"] == "服务端的数据数据:[1,2]"  # the raw text we sent, compact
        assert 1 <= report["pool_created"] <= 3
    finally:
        server.terminate()
        server.wait(10)

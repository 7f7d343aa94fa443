"""Regression tests for the security review of issue 22 that need a daemon (or Redis)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon import Daemon, RawClient
from test_admin import ADMIN, http


def token_config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:alice-secret\n")
    return {
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
        "auth": {"mode": "token", "tokens_file": str(tokens)},
        **extra,
    }


# -- finding 2 -------------------------------------------------------------------------------


def test_admin_pushes_skip_unauthenticated_connections(tmp_path: Path) -> None:
    with Daemon(tmp_path, token_config(tmp_path)) as daemon:
        port = int(daemon.wait_for(ADMIN).group(1))
        with RawClient(daemon.port) as stranger, RawClient(daemon.port) as alice:
            session = stranger.recv()["data"]["session"]
            alice.recv()
            alice.send({"type": "auth", "id": 1, "data": {"token": "alice-secret"}})
            assert alice.recv()["type"] == "auth"
            assert http(port, "POST", "/broadcast", {"type": "news"}) == (200, {"sent": 1})
            status, answer = http(port, "POST", f"/clients/{session}/send", {"type": "dm"})
            assert (status, answer["code"]) == (409, "not_authenticated")
            assert alice.recv()["type"] == "news"
            stranger.send({"type": "ping", "id": "p"})
            assert stranger.recv() == {"type": "pong", "id": "p"}  # nothing came before it

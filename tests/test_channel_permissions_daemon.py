"""Who may hear what, tried as a hostile client would, on a running daemon (issue 22).

One daemon (auth.mode jwt, namespaces, personal channels, an application authorizer) with a
TCP and a WebSocket listener.  Over TCP each attempt is made three times and must be refused
with its typed error each time, and logged once (``log.rate_limit_lines: 1``: the other two
are counted in one "2 more ... suppressed" line, which also ends the window before the next
attempt).  The same refusals are checked over WebSocket: both transports share the connection
core, so the permissions must be the same.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from daemon import Daemon, RawClient
from wsclient import WSClient

SECRET = "daemon-test-secret-" + "z" * 50
ORIGIN = "http://127.0.0.1:8000"

HANDLERS = """
from twisted.internet.defer import Deferred


def register(registry):
    @registry.authorize("subscribe")
    def team_member(session, channel, data):
        return channel == "team:" + str(session.claims.get("team"))

    @registry.authorize("publish")
    def may_publish(session, channel, data):
        if channel == "team:boom":
            raise RuntimeError("the membership database is down")
        if channel == "team:hang":
            return Deferred()  # never answers
        if channel == "team:junk":
            return {"yes": "please"}
        return session.identity == "alice"
"""


def make_token(**claims: Any) -> str:
    body = {"sub": "alice", "aud": "chat", "exp": int(time.time()) + 300, "team": "red", **claims}
    key = body.pop("key", SECRET)
    algorithm = body.pop("algorithm", "HS256")
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=algorithm)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("perm")
    (tmp / "perm_handlers.py").write_text(HANDLERS)
    (tmp / "secret").write_text(SECRET)
    config = {
        "handlers": ["perm_handlers"],
        "auth": {
            "mode": "jwt",
            "jwt": {
                "hmac_secret_file": str(tmp / "secret"),
                "audience": "chat",
                "refresh_before": 1,
            },
        },
        "channels": {
            "authorize_timeout": 0.3,
            "namespaces": {
                "team": {"subscribe": "authorizer", "publish": "authorizer"},
                "private": {"subscribe": "token"},
                "quiet": {"presence": "none"},
            },
        },
        "websocket": {"listen": "tcp:0:interface=127.0.0.1", "allowed_origins": [ORIGIN]},
        "heartbeat": {"interval": 0.25, "timeout": 60},
        "log": {"rate_limit_lines": 1, "rate_limit_window": 0.3},
    }
    with Daemon(tmp, config, env={"PYTHONPATH": str(tmp)}) as daemon:
        yield daemon


class Conn:
    """One client over TCP or WebSocket: envelopes in and out, the server's pings skipped."""

    def __init__(self, daemon: Daemon, transport: str) -> None:
        if transport == "tcp":
            self.raw: Any = RawClient(daemon.port)
        else:
            self.raw = WSClient(daemon.ws_port, headers={"Origin": ORIGIN})
            self.raw.skip_pings = True
        assert self.recv()["type"] == "hello"
        self.next_id = 0

    def recv(self) -> Any:
        while True:
            message = self.raw.recv()
            if message is None or message.get("type") != "ping":
                return message

    def request(self, type: str, data: Any) -> Any:
        self.next_id += 1
        self.raw.send({"type": type, "id": self.next_id, "data": data})
        while True:
            message = self.recv()
            if message is None or message.get("id") == self.next_id:
                return message

    def requests(self, type: str, data: Any, n: int) -> list[Any]:
        """``n`` requests sent together; their replies, in order."""
        ids = []
        for _ in range(n):
            self.next_id += 1
            ids.append(self.next_id)
            self.raw.send({"type": type, "id": self.next_id, "data": data})
        replies = {}
        while len(replies) < n:
            message = self.recv()
            assert message is not None, replies
            if message.get("id") in ids:
                replies[message["id"]] = message
        return [replies[i] for i in ids]

    def close(self) -> None:
        self.raw.__exit__(None, None, None)


def logged_in(daemon: Daemon, transport: str, **claims: Any) -> Conn:
    conn = Conn(daemon, transport)
    reply = conn.request("auth", {"token": make_token(**claims)})
    assert reply["type"] == "auth", reply
    return conn


def error_code(reply: Any) -> str:
    assert reply is not None and reply["type"] == "error", reply
    return reply["error"]["code"]


def logged_once(daemon: Daemon, cause: str, line: str, attempt: Any, times: int = 3) -> None:
    """``attempt()`` (``times`` times) makes three refused attempts; the log has one ``line``
    and "2 more <cause> ... suppressed"."""
    suppressed = re.compile(rf"2 more '{re.escape(cause)}' log lines suppressed")
    before = sum(1 for x in daemon.lines if suppressed.search(x))
    start = len(daemon.lines)
    for _ in range(times):
        attempt()
    daemon.wait_for(suppressed, count=before + 1)
    assert sum(1 for x in daemon.lines[start:] if re.search(line, x)) == 1, daemon.lines[start:]


# -- channel requests ------------------------------------------------------------------------

SINCE = {"epoch": "e", "offset": 0}

#: (what a hostile alice sends, the code, the limiter's cause, the log line)
CHANNEL_ATTEMPTS = [
    (
        "subscribe",
        {"channel": "user#bob"},
        "forbidden",
        "channel_refused:subscribe:forbidden",
        r"Refused subscribe of user#bob for alice .*: forbidden \(personal channel\)",
    ),
    (
        "subscribe",
        {"channel": "dm#bob,carol", "since": SINCE},
        "forbidden",
        "channel_refused:subscribe:forbidden",
        r"Refused subscribe of dm#bob,carol for alice",
    ),
    (
        "presence",
        {"channel": "quiet:room"},
        "forbidden",
        "channel_refused:presence:forbidden",
        r"Refused presence of quiet:room for alice",
    ),
    (
        "publish",
        {"channel": "news", "data": "spam"},
        "forbidden",
        "channel_refused:publish:forbidden",
        r"Refused publish of news for alice",
    ),
    (
        "subscribe",
        {"channel": "private:b", "token": make_token(channel="private:a")},
        "forbidden",
        "channel_refused:subscribe:forbidden",
        r"Refused subscribe of private:b for alice .*another channel",
    ),
    (
        "subscribe",
        {"channel": "private:a", "token": make_token(channel="private:a", sub="bob")},
        "forbidden",
        "channel_refused:subscribe:forbidden",
        r"Refused subscribe of private:a for alice .*another identity",
    ),
    (
        "subscribe",
        {"channel": "team:blue"},
        "forbidden",
        "channel_refused:subscribe:forbidden",
        r"Refused subscribe of team:blue for alice .*the authorizer said no",
    ),
    (
        "publish",
        {"channel": "team:boom", "data": 1},
        "authorization_failed",
        "channel_refused:publish:authorization_failed",
        r"Refused publish of team:boom .*it raised RuntimeError: the membership database",
    ),
    (
        "publish",
        {"channel": "team:hang", "data": 1},
        "authorization_timeout",
        "channel_refused:publish:authorization_timeout",
        r"Refused publish of team:hang .*authorization_timeout",
    ),
    (
        "publish",
        {"channel": "team:junk", "data": 1},
        "authorization_failed",
        "channel_refused:publish:authorization_failed",
        r"Refused publish of team:junk .*it returned \{'yes': 'please'\}",
    ),
]


def test_hostile_channel_requests_over_tcp_are_refused_and_logged_once(daemon: Daemon) -> None:
    alice = logged_in(daemon, "tcp")
    try:
        for type_, data, code, cause, line in CHANNEL_ATTEMPTS:

            def attempt(type_: str = type_, data: Any = data, code: str = code) -> None:
                # Three at once (pipelined): a hanging authorizer's refusals come together.
                assert [error_code(r) for r in alice.requests(type_, data, 3)] == [code] * 3

            logged_once(daemon, cause, line, attempt, times=1)
        # Still connected, and what is allowed still works.
        assert alice.request("ping", None)["type"] == "pong"
        assert alice.request("subscribe", {"channel": "team:red"})["type"] == "subscribe"
        token = make_token(channel="private:a")
        assert alice.request("subscribe", {"channel": "private:a", "token": token})["type"] == (
            "subscribe"
        )
        assert alice.request("subscribe", {"channel": "user#alice", "since": SINCE})["data"][
            "recovered"
        ] in (True, False)
    finally:
        alice.close()


def test_the_same_refusals_over_websocket(daemon: Daemon) -> None:
    alice = logged_in(daemon, "websocket")
    try:
        for type_, data, code, _, _ in CHANNEL_ATTEMPTS:
            assert error_code(alice.request(type_, data)) == code, (type_, data)
        assert alice.request("subscribe", {"channel": "team:red"})["type"] == "subscribe"
        assert alice.request("ping", None)["type"] == "pong"
    finally:
        alice.close()


# -- connect tokens ---------------------------------------------------------------------------

#: (the token, the code, the log line's cause)
TOKEN_ATTEMPTS = [
    (lambda: make_token(exp=int(time.time()) - 5), "token_expired"),
    (lambda: make_token(key=None, algorithm="none"), "auth_failed"),
    (lambda: make_token(key="another-secret-" + "q" * 60), "auth_failed"),
    (lambda: make_token(aud="billing"), "auth_failed"),
]


@pytest.mark.parametrize("transport", ["tcp", "websocket"])
def test_bad_connect_tokens_are_refused(daemon: Daemon, transport: str) -> None:
    for make, code in TOKEN_ATTEMPTS:

        def attempt(make: Any = make, code: str = code) -> None:
            conn = Conn(daemon, transport)
            try:
                assert error_code(conn.request("auth", {"token": make()})) == code
                assert conn.recv() is None  # closed
            finally:
                conn.close()

        if transport == "tcp":
            logged_once(
                daemon,
                f"auth.token:{code}",
                rf"Refused the token of client .*: {code}",
                attempt,
            )
        else:
            attempt()


@pytest.mark.parametrize("transport", ["tcp", "websocket"])
def test_no_refresh_before_expiry_closes_with_token_expired(daemon: Daemon, transport: str) -> None:
    conn = logged_in(daemon, transport, exp=int(time.time()) + 3)
    try:
        assert conn.recv() == {"type": "refresh"}
        closing = conn.recv()
        assert error_code(closing) == "token_expired"
        assert conn.recv() is None
    finally:
        conn.close()
    daemon.wait_for(r"Closing client .*alice\): token_expired")


def test_a_refreshed_connection_outlives_its_first_token(daemon: Daemon) -> None:
    first_exp = int(time.time()) + 3
    conn = logged_in(daemon, "tcp", exp=first_exp)
    try:
        assert conn.recv() == {"type": "refresh"}
        reply = conn.request("refresh", {"token": make_token(exp=first_exp + 300)})
        assert reply["type"] == "refresh"
        while time.time() < first_exp + 1:  # a round trip per 0.25 s beat, past the first exp
            assert conn.request("ping", None)["type"] == "pong"
    finally:
        conn.close()


def test_garbage_from_an_authorizer_never_reaches_the_log_as_a_traceback(
    daemon: Daemon, tmp_path: Path
) -> None:
    alice = logged_in(daemon, "tcp")
    try:
        assert error_code(alice.request("publish", {"channel": "team:boom", "data": 1})) == (
            "authorization_failed"
        )
    finally:
        alice.close()
    assert not any("Traceback" in line for line in daemon.lines)

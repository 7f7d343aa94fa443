"""The example chat page (examples/chat/) in a real browser: headless Chromium, the JavaScript
client over ws:// to a real daemon, through a daemon restart.

Two daemons share a Redis (``cluster.redis``), so channel history outlives a daemon.  The page,
served over HTTP from an allowed origin, subscribes to its room, receives publications (its
own and another node's), loses its daemon (killed), misses a publication made meanwhile on
the other node, comes back with ``recovered: true`` and gets exactly that one, and finally
makes a request that gets a ``ServerError``.  The test reads the page's own record of all
this (``window.chat.events``) and its DOM over the DevTools protocol.
"""

from __future__ import annotations

import functools
import http.server
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from browser import DevToolsBrowser
from daemon import Daemon, RawClient
from redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "chat"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def static_server(directory: Path) -> Iterator[int]:
    """Serve ``directory`` over HTTP on a loopback port; yields the port."""
    handler = functools.partial(_Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def node_config(redis_url: str, origin: str, node: str, ports: tuple[int, int] = (0, 0)) -> dict:
    """The example's own config, on loopback ports, as one node of a cluster."""
    config = yaml.safe_load((EXAMPLE / "heartbeatd.yaml").read_text())
    config["listen"] = f"tcp:{ports[0]}:interface=127.0.0.1"
    config["websocket"] |= {"listen": f"tcp:{ports[1]}:interface=127.0.0.1"}
    config["websocket"]["allowed_origins"] = [origin]
    config["admin"] = {"listen": ""}
    config["cluster"] = {"redis": redis_url, "node_id": node}
    return config


def say(port: int, text: str) -> int:
    """Say ``text`` in the test's room through the node on ``port``; the publication's offset."""
    with RawClient(port) as client:
        assert client.recv()["type"] == "hello"
        client.send({"type": "say", "id": 1, "data": {"room": "it", "nick": "py", "text": text}})
        reply = client.recv()
    assert reply["type"] == "say", reply
    return reply["data"]


def test_the_example_page_recovers_across_a_daemon_restart_in_chromium(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(EXAMPLE)}
    for name in ("a", "b", "a2"):
        (tmp_path / name).mkdir()
    with (
        RedisServer(tmp_path / "redis") as redis,
        static_server(ROOT) as http_port,
        DevToolsBrowser(tmp_path / "profile") as browser,
    ):
        origin = f"http://127.0.0.1:{http_port}"
        config_b = node_config(redis.url, origin, "node-b")
        with (
            Daemon(tmp_path / "a", node_config(redis.url, origin, "node-a"), env=env) as a,
            Daemon(tmp_path / "b", config_b, env=env) as b,
        ):
            ws_url = f"ws://127.0.0.1:{a.ws_port}/"
            page = browser.open(f"{origin}/examples/chat/?ws={ws_url}&room=it&nick=pat")
            first = page.evaluate("chat.when('subscribed', 1).then((e) => e[0])")
            assert (first["recovered"], first["wasRecovering"]) == (False, False)

            # The page's own message, then one said on the other node.
            assert page.evaluate("chat.say('hello from the browser')") == 1
            assert say(b.port, "hello from node b") == 2
            page.evaluate("chat.when('publication', 2)")

            # Its daemon dies; meanwhile a message is said on the other node.
            a.stop(signal.SIGKILL)
            page.evaluate("chat.when('disconnected', 1)")
            assert say(b.port, "said while you were away") == 3

            # The daemon comes back on the same ports: the page recovers exactly what it missed.
            again = node_config(redis.url, origin, "node-a2", (a.port, a.ws_port))
            with Daemon(tmp_path / "a2", again, env=env):
                second = page.evaluate("chat.when('subscribed', 2).then((e) => e[1])")
                assert (second["recovered"], second["wasRecovering"]) == (True, True)
                publications = page.evaluate("chat.when('publication', 3)")
                assert [(p["offset"], p["from"], p["text"]) for p in publications] == [
                    (1, "pat", "hello from the browser"),
                    (2, "py", "hello from node b"),
                    (3, "py", "said while you were away"),
                ]

                # A request the server refuses: a ServerError with its code, in the page.
                error = page.evaluate(
                    "chat.say('   ').then(() => null,"
                    " (e) => ({name: e.name, code: e.code, message: e.message}))"
                )
                assert error == {
                    "name": "ServerError",
                    "code": "empty_message",
                    "message": "say something",
                }
                assert page.evaluate("chat.say('still talking')") == 4
                page.evaluate("chat.when('publication', 4)")

                events = page.evaluate("chat.events")
                offsets = [e["offset"] for e in events if e["kind"] == "publication"]
                assert offsets == [1, 2, 3, 4]  # each once, in order
                assert [e["kind"] for e in events if e["kind"] != "publication"] == [
                    "connected",
                    "subscribed",
                    "disconnected",
                    "connected",
                    "subscribed",
                    "error",
                ]
                shown = page.evaluate(
                    "[...document.querySelectorAll('#messages li')].map((li) => li.textContent)"
                )
                assert shown[:2] == ["pathello from the browser", "pyhello from node b"]
                assert "Reconnected; nothing was lost." in shown
                assert "empty_message: say something" in shown
                page.screenshot(tmp_path / "chat.png")

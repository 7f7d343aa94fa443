"""``heartbeat subscribe``, ``publish`` and ``presence`` as the real command against real daemons:
exit codes, recovery with ``--since``, and a subscription that follows a restart."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

from daemon import Daemon
from test_admin import ADMIN, http
from test_cli import HEARTBEAT, Command

CHANNELS = {
    "channels": {"client_publish": True, "history_size": 50},
    "shutdown": {"drain_timeout": 10, "reconnect_after": 1},
}
SUBSCRIBED = re.compile(r"heartbeat: subscribed to news at (\w+):(\d+)$")


def heartbeat(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HEARTBEAT, *args], capture_output=True, text=True, timeout=30)


def publish(port: int, data: str, channel: str = "news") -> dict[str, Any]:
    result = heartbeat("publish", f"127.0.0.1:{port}", channel, data)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_publish_subscribe_presence_and_since(tmp_path: Path) -> None:
    with Daemon(tmp_path, CHANNELS) as daemon:
        target = f"127.0.0.1:{daemon.port}"
        assert publish(daemon.port, '"one"') == {"channel": "news", "offset": 1}
        with Command("subscribe", target, "news") as sub:
            epoch, offset = SUBSCRIBED.match(sub.next_line("stderr")).groups()  # type: ignore[union-attr]
            assert offset == "1"
            assert publish(daemon.port, '{"n": 2}') == {"channel": "news", "offset": 2}
            assert json.loads(sub.next_line()) == {
                "channel": "news",
                "epoch": epoch,
                "offset": 2,
                "data": {"n": 2},
            }
            who = heartbeat("presence", target, "news")
            assert who.returncode == 0
            (member,) = json.loads(who.stdout)["clients"]
            assert set(member) >= {"session", "node", "identity"}
            sub.process.send_signal(signal.SIGINT)
            assert sub.finish() == 0

        # --since: what followed that position, in order, then the live ones; -n stops it.
        again = heartbeat("subscribe", target, "news", "--since", f"{epoch}:0", "-n", "2")
        assert again.returncode == 0, again.stderr
        assert [json.loads(line)["data"] for line in again.stdout.splitlines()] == [
            "one",
            {"n": 2},
        ]
        assert again.stderr == f"heartbeat: subscribed to news from {epoch}:0 (recovered)\n"

        # A position the server cannot give back: said on stderr, then the live stream.
        with Command("subscribe", target, "news", "--since", "0ld3p0ch:7", "-n", "1") as late:
            assert late.next_line("stderr") == (
                f"heartbeat: news: publications were lost (not_recovered); recovery failed, "
                f"continuing from {epoch}:2"
            )
            assert SUBSCRIBED.match(late.next_line("stderr"))
            publish(daemon.port, "3")
            assert late.finish() == 0
            assert json.loads(late.out[0])["offset"] == 3

        # The usual exit codes.
        bad = heartbeat("publish", target, "no spaces", "1")
        assert bad.returncode == 1 and "server error bad_channel" in bad.stderr
        assert heartbeat("subscribe", target, "news", "--since", "nope").returncode == 2
        assert heartbeat("presence", "127.0.0.1:1", "news").returncode == 3
        assert daemon.stop() == 0


def test_publish_without_client_publish_is_forbidden(tmp_path: Path) -> None:
    with Daemon(tmp_path, {}) as daemon:
        result = heartbeat("publish", f"127.0.0.1:{daemon.port}", "news", "1")
        assert result.returncode == 1
        assert result.stderr.startswith("heartbeat: server error forbidden: ")
        assert daemon.stop() == 0


def test_subscribe_follows_a_restart_and_says_what_could_not_be_recovered(
    tmp_path: Path,
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with Daemon(tmp_path / "a", CHANNELS) as first:
        port = first.port
        publish(port, "1")
        with Command("subscribe", f"127.0.0.1:{port}", "news") as sub:
            epoch, _ = SUBSCRIBED.match(sub.next_line("stderr")).groups()  # type: ignore[union-attr]
            first.process.send_signal(signal.SIGTERM)
            assert "server going away; reconnecting in" in sub.next_line("stderr")
            assert first.process.wait(20) == 0
            listen = f"tcp:{port}:interface=127.0.0.1"
            with Daemon(tmp_path / "b", {**CHANNELS, "listen": listen}) as second:
                assert sub.next_line("stderr").startswith(
                    f"heartbeat: reconnected to 127.0.0.1:{port}"
                )
                # One daemon's channels live in its memory: the new one has a new epoch.
                lost = sub.next_line("stderr")
                assert lost.startswith("heartbeat: news: publications were lost (not_recovered)")
                new_epoch, offset = SUBSCRIBED.match(sub.next_line("stderr")).groups()  # type: ignore[union-attr]
                assert new_epoch != epoch and offset == "0"
                publish(port, '"after"')
                assert json.loads(sub.next_line()) == {
                    "channel": "news",
                    "epoch": new_epoch,
                    "offset": 1,
                    "data": "after",
                }
                sub.process.send_signal(signal.SIGINT)
                assert sub.finish() == 0
                assert second.stop() == 0


def test_watch_prints_the_pushes_of_a_jwt_channels_claim(tmp_path: Path) -> None:
    """The claim's ``subscribed``/``subscribe_refused`` come right after the auth reply; the
    CLI used to lose them (written before the reply, read before ``connect`` resolved)."""
    import time

    import jwt

    secret = "watch-claim-secret-" + "q" * 40
    (tmp_path / "secret").write_text(secret)
    body = {"sub": "alice", "exp": int(time.time()) + 300, "channels": ["news", "user#bob"]}
    (tmp_path / "token").write_text(jwt.encode(body, secret, algorithm="HS256"))
    config = {"auth": {"mode": "jwt", "jwt": {"hmac_secret_file": str(tmp_path / "secret")}}}
    with Daemon(tmp_path, config) as daemon:
        run = heartbeat(
            "watch", f"127.0.0.1:{daemon.port}", "--token-file", str(tmp_path / "token"), "-n", "2"
        )
        assert run.returncode == 0, run.stderr
        pushes = [json.loads(line) for line in run.stdout.splitlines()]
        assert [p["type"] for p in pushes] == ["subscribed", "subscribe_refused"]
        assert pushes[0]["data"]["channel"] == "news"
        assert pushes[1]["data"] == {"channel": "user#bob", "code": "forbidden"}


def test_sigterm_stops_watch_and_subscribe_cleanly(tmp_path: Path) -> None:
    """SIGTERM (``kill``, a service manager) ends them as Ctrl-C does: exit 0, nothing on
    stderr; the reactor's own SIGTERM handler used to stop it as a lost connection (exit 3)."""
    config = {
        **CHANNELS,
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
        "log": {"level": "debug"},  # for the "connected" lines
    }
    with Daemon(tmp_path, config) as daemon:
        admin = int(daemon.wait_for(ADMIN).group(1))
        target = f"127.0.0.1:{daemon.port}"
        with Command("watch", target) as watch, Command("subscribe", target, "news") as sub:
            assert SUBSCRIBED.match(sub.next_line("stderr"))
            # Both are registered (the hello is sent with the "connected" line), so watch
            # hears the broadcast, and is past its connect once it prints it.
            daemon.wait_for(r"Client \S+ connected from", count=2)
            sent = http(admin, "POST", "/broadcast", {"type": "news", "data": 1})
            assert sent == (200, {"sent": 2})
            assert json.loads(watch.next_line()) == {"type": "news", "data": 1}
            for command in (watch, sub):
                command.process.send_signal(signal.SIGTERM)
                assert command.finish() == 0, command.err
            assert watch.err == [] and len(watch.out) == 1
            assert len(sub.err) == 1 and sub.out == []
        assert daemon.stop() == 0

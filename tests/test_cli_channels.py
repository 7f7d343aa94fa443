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

"""SIGHUP reload against the real daemon: live connections take the new heartbeat, no drop."""

from __future__ import annotations

import signal
from pathlib import Path

import yaml
from daemon import Daemon, RawClient
from helpers import make_config

from heartbeatd.daemon.reload import config_diff


def test_config_diff_lists_changed_keys() -> None:
    old = make_config(heartbeat={"interval": 10, "timeout": 30})
    new = make_config(heartbeat={"interval": 2, "timeout": 30}, log={"level": "debug"})
    assert config_diff(old, new) == [
        "heartbeat.interval 10.0 -> 2.0",
        "log.level 'info' -> 'debug'",
    ]


def test_sighup_applies_new_heartbeat_to_live_connections(tmp_path: Path) -> None:
    with Daemon(tmp_path, {"heartbeat": {"interval": 60, "timeout": 120}}) as daemon:
        with RawClient(daemon.port) as client:
            assert client.recv()["data"]["heartbeat"] == {"interval": 60, "timeout": 120}
            config = yaml.safe_load(daemon.config_path.read_text())

            # A broken file is rejected with the start-up message; the daemon keeps serving.
            daemon.config_path.write_text(yaml.safe_dump({**config, "heartbeat": {"interval": -1}}))
            daemon.process.send_signal(signal.SIGHUP)
            daemon.wait_for("Reload rejected; still running on the previous configuration")
            daemon.wait_for(r"heartbeat\.interval: -1 is not allowed")
            client.send({"type": "echo", "id": 1})
            assert client.recv() == {"type": "echo", "id": 1, "data": None}

            new = {
                **config,
                "listen": "tcp:1:interface=127.0.0.1",
                "heartbeat": {"interval": 0.2, "timeout": 0.5},
                "malloc": {"mmap_threshold": 1 << 20, "trim_threshold": 1 << 22},
            }
            daemon.config_path.write_text(yaml.safe_dump(new))
            daemon.process.send_signal(signal.SIGHUP)
            daemon.wait_for("listen cannot change while running")
            daemon.wait_for("malloc cannot change while running")  # set once, at start
            daemon.wait_for(
                r"Configuration reloaded from .*heartbeat\.interval 60\.0 -> 0\.2; "
                r"heartbeat\.timeout 120\.0 -> 0\.5"
            )
            # The same connection now gets pings at the new interval, then is evicted by the
            # new timeout: it was never dropped by the reload itself.
            received = []
            while (message := client.recv()) is not None:
                received.append(message["type"])
            assert received and set(received) == {"ping"}
            daemon.wait_for("heartbeat_timeout")
        with RawClient(daemon.port) as fresh:  # still listening on the original port
            assert fresh.recv()["data"]["heartbeat"] == {"interval": 0.2, "timeout": 0.5}
        assert daemon.stop() == 0

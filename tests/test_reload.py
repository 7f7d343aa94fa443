"""SIGHUP reload: live connections take the new heartbeat, no drop (against the real daemon);
restart-only keys keep their running value, per key (a Reloader on an in-memory factory)."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import yaml
from daemon import Daemon, RawClient
from helpers import make_config
from twisted.internet.task import Clock
from twisted.logger import formatEvent

from heartbeatd.config import Config
from heartbeatd.daemon.reload import (
    FIXED_KEYS,
    Reloader,
    _leaves,
    config_diff,
    keep_restart_keys,
    restart_only,
)
from heartbeatd.daemon.sdnotify import Notifier
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import default_registry

ROOT = Path(__file__).resolve().parent.parent


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
                "tcp": {"lean_transport": False},
            }
            daemon.config_path.write_text(yaml.safe_dump(new))
            daemon.process.send_signal(signal.SIGHUP)
            daemon.wait_for("listen cannot change while running")
            daemon.wait_for(  # set once, at start; named per key
                r"malloc\.mmap_threshold cannot change while running; keeping 33554432 "
                r"\(restart to use 1048576\)"
            )
            daemon.wait_for(
                r"tcp\.lean_transport cannot change while running; keeping true "
                r"\(restart to use false\)"
            )
            reloaded = daemon.wait_for(
                r"Configuration reloaded from .*heartbeat\.interval 60\.0 -> 0\.2; "
                r"heartbeat\.timeout 120\.0 -> 0\.5"
            )
            assert "lean_transport" not in reloaded.string  # the diff claims no kept key
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


def reload_to(
    tmp_path: Path, running: Config, raw: dict[str, Any]
) -> tuple[ServerFactory, list[str]]:
    """Reload a factory running ``running`` from a file holding ``raw``; the log lines."""
    from twisted.logger import globalLogPublisher

    path = tmp_path / "heartbeatd.yaml"
    path.write_text(yaml.safe_dump(raw))
    factory = ServerFactory(running, default_registry(), Clock())
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert Reloader(str(path), {}, factory, Notifier({})).reload()
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [formatEvent(e) for e in events if e.get("log_namespace", "").endswith("reload")]
    return factory, lines


def test_restart_only_keys_keep_their_running_value_per_key(tmp_path: Path) -> None:
    """Review finding: ``tcp.lean_transport: false`` and SIGHUP logged ``tcp.lean_transport
    True -> False`` and the running config said False while the listener stayed lean."""
    running = make_config(admin={"token": "old-s3cret"}, heartbeat={"interval": 10, "timeout": 30})
    raw = {
        "heartbeat": {"interval": 5, "timeout": 30},
        "tcp": {"lean_transport": False, "nodelay": False},
        "admin": {"token": "new-s3cret", "access_log": True},
        "handlers": ["json"],
        "websocket": {"path": "/ws"},
        "malloc": {"mmap_threshold": 1 << 20, "trim_threshold": 1 << 22},
        "log": {"format": "json"},
        "name": "renamed",
    }
    factory, lines = reload_to(tmp_path, running, raw)
    config = factory.config
    assert config.tcp.lean_transport is True and config.tcp.nodelay is False  # one key of tcp
    assert config.admin == running.admin and config.websocket == running.websocket
    assert config.malloc == running.malloc and config.handlers == ()
    assert config.log.format == "text" and config.heartbeat.interval == 5
    assert config.name == "heartbeatd"
    text = "\n".join(lines)
    for line in (
        "tcp.lean_transport cannot change while running; keeping true (restart to use false)",
        "name cannot change while running; keeping 'heartbeatd' (restart to use 'renamed')",
        "admin.token cannot change while running; keeping '***' (restart to use '***')",
        "admin.access_log cannot change while running; keeping false (restart to use true)",
        "handlers cannot change while running; keeping [] (restart to use ['json'])",
        "websocket.path cannot change while running; keeping '/' (restart to use '/ws')",
        "malloc.trim_threshold cannot change while running; keeping 67108864 "
        "(restart to use 4194304)",
        "log.format cannot change while running; keeping 'text' (restart to use 'json')",
    ):
        assert line in lines, text
    (reloaded,) = [line for line in lines if line.startswith("Configuration reloaded")]
    assert reloaded.endswith(": heartbeat.interval 10.0 -> 5.0; tcp.nodelay true -> false")
    assert "s3cret" not in text and "AdminConfig(" not in text and "('" not in text, text


def test_secrets_kept_by_a_reload_are_never_shown() -> None:
    old = make_config(cluster={"redis": "redis://:pw-old@h:1/0"})
    new = make_config(cluster={"redis": "redis://:pw-new@h:2/0", "sentinel": {}})
    config, kept = keep_restart_keys(old, new)
    assert config == old
    assert kept == [("cluster.redis", "'redis://:***@h:1/0'", "'redis://:***@h:2/0'")]
    sentinel = {
        "addresses": ["h:26379"],
        "service": "m",
        "password": "pw",
        "sentinel_password": "spw",
    }
    config, kept = keep_restart_keys(make_config(), make_config(cluster={"sentinel": sentinel}))
    assert config == make_config()
    assert ("cluster.sentinel.password", "''", "'***'") in kept
    assert "pw" not in repr([k for k in kept if "password" in k[0]])


def test_a_new_channel_namespace_is_listed_not_a_crash() -> None:
    lines = config_diff(make_config(), make_config(channels={"namespaces": {"team": {}}}))
    assert "channels.namespaces.team.subscribe added" in lines


def test_every_fixed_key_is_a_config_key() -> None:
    keys = _leaves(make_config())
    for fixed in FIXED_KEYS:
        assert any(k == fixed or k.startswith(fixed + ".") for k in keys), fixed


def test_deployment_reload_lists_the_restart_only_keys() -> None:
    """docs/deployment.md#reload names exactly `FIXED_KEYS`, in their order."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    section = text.split("\n## Reload\n", 1)[1].split("\n## ", 1)[0]
    listed = re.search(r"Keys bound at start need a restart: (.*?)\.\s", section, re.S)
    assert listed, section
    assert tuple(re.findall(r"`([a-z_.]+)(?:\.\*)?`", listed.group(1))) == FIXED_KEYS


def test_keys_documented_as_restart_only_are_kept() -> None:
    """A key whose docs say a reload does not change it is one `restart_only` keeps, and
    the reverse for the single keys of `FIXED_KEYS` (configuration.md's table rows)."""
    table = (ROOT / "docs" / "configuration.md").read_text()
    rows = re.findall(r"^\| `([a-z_.]+)` \|", table, re.M)
    says = {
        key
        for key in rows
        if re.search(
            rf"^\| `{re.escape(key)}` \|.*(reload does not change|needs? a restart)", table, re.M
        )
    }
    assert says and all(restart_only(key) for key in says), says
    dotted = {key for key in FIXED_KEYS if "." in key}
    assert dotted <= says, dotted - says
    lines = (ROOT / "config" / "heartbeatd.yaml").read_text().splitlines()
    for key in dotted:  # the shipped file's comment above the key says it too
        section, name = key.split(".")
        start = lines.index(f"{section}:")
        at = next(i for i in range(start, len(lines)) if lines[i].startswith(f"  {name}:"))
        above = []
        while lines[at - 1 - len(above)].lstrip().startswith("#"):
            above.append(lines[at - 1 - len(above)])
        assert "a reload does not change it" in " ".join(above), key

"""The shipped systemd units: what an operator relies on, systemd-analyze's verdict, and both
set-ups started the way systemd starts them (socket activation through
``systemd-socket-activate``; direct bind with ``NOTIFY_SOCKET``)."""

from __future__ import annotations

import configparser
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from daemon import TWISTD, RawClient

CONFIG = Path(__file__).resolve().parent.parent / "config"
DROP_IN = "heartbeatd.service.d/socket-activation.conf"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(CONFIG / name)
    return parser


def test_service_unit_has_what_operations_needs() -> None:
    service = unit("heartbeatd.service")["Service"]
    assert service["Type"] == "notify"
    assert "--nodaemon" in service["ExecStart"] and "--pidfile=" in service["ExecStart"]
    assert "heartbeatd --config" in service["ExecStart"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert int(service["WatchdogSec"]) > 0
    assert int(service["LimitNOFILE"]) >= 65536
    for hardening in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectHome"):
        assert hardening in service
    assert service["User"] == "heartbeatd"


def test_socket_unit_listens_on_the_default_address() -> None:
    socket_unit = unit("heartbeatd.socket")["Socket"]
    assert socket_unit["ListenStream"] == "127.0.0.1:9000"
    assert socket_unit["FileDescriptorName"] == "heartbeatd.socket"


def test_the_service_alone_does_not_pull_in_the_socket() -> None:
    """Set-up 1 binds `listen` itself: a socket unit started with it would take the same port
    first ("Address already in use", restart loop), as the old Wants=heartbeatd.socket did."""
    text = (CONFIG / "heartbeatd.service").read_text()
    directives = [line for line in text.splitlines() if not line.startswith("#")]
    assert not any("heartbeatd.socket" in line for line in directives)


def test_the_drop_in_pairs_the_socket_with_adopting_it() -> None:
    drop_in = unit(DROP_IN)
    assert drop_in["Unit"]["Requires"] == "heartbeatd.socket"
    assert drop_in["Unit"]["After"] == "heartbeatd.socket"
    name = unit("heartbeatd.socket")["Socket"]["FileDescriptorName"]
    assert exec_start(DROP_IN)[-2:] == ["--listen", f"systemd:domain=INET:name={name}"]
    # Same command otherwise: the drop-in only adds the listen override.
    assert exec_start(DROP_IN)[:-2] == exec_start("heartbeatd.service")


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian package 'systemd')",
)
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    for name in ("heartbeatd.service", "heartbeatd.socket"):
        shutil.copy(CONFIG / name, tmp_path / name)
    result = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            str(tmp_path / "heartbeatd.service"),
            str(tmp_path / "heartbeatd.socket"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # The binary path and the user exist only on a deployed host; anything else is a defect.
    problems = [
        line
        for line in result.stderr.splitlines()
        if line.strip()
        and "/opt/heartbeatd/bin/twistd" not in line
        and "heartbeatd.service: Command" not in line
    ]
    assert problems == [], result.stderr


# -- both set-ups, launched as systemd would ----------------------------------------------------


def exec_start(name: str) -> list[str]:
    """The effective ExecStart= of a unit file (the last non-empty one, as systemd reads it)."""
    lines = [
        line.split("=", 1)[1]
        for line in (CONFIG / name).read_text().splitlines()
        if line.startswith("ExecStart=")
    ]
    return shlex.split([line for line in lines if line][-1])


def local_command(name: str, config: Path) -> list[str]:
    """The unit's command with this machine's twistd and a test config in place of /etc's."""
    paths = {"/opt/heartbeatd/bin/twistd": TWISTD, "/etc/heartbeatd/heartbeatd.yaml": str(config)}
    return [paths.get(arg, arg) for arg in exec_start(name)]


def shipped_config(tmp_path: Path, listen: str) -> Path:
    """config/heartbeatd.yaml as shipped, with test ports (never the fixed 9000/9100)."""
    raw = yaml.safe_load((CONFIG / "heartbeatd.yaml").read_text())
    raw["listen"] = listen
    raw["admin"]["listen"] = ""
    raw["websocket"]["listen"] = ""
    raw["shutdown"]["drain_timeout"] = 0.2
    path = tmp_path / "heartbeatd.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Launched:
    """A process started like a systemd unit: NOTIFY_SOCKET set, log lines collected."""

    def __init__(self, tmp_path: Path, argv: list[str]) -> None:
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp_path / "notify"))
        self.notify.settimeout(20)
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            assert line is not None, "process ended:\n" + "\n".join(self.log)
            self.log.append(line)
            if match := regex.search(line):
                return match

    def notified(self) -> list[str]:
        return self.notify.recv(4096).decode().split("\n")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.notify.close()


def test_setup_1_direct_bind(tmp_path: Path) -> None:
    config = shipped_config(tmp_path, "tcp:0:interface=127.0.0.1")
    daemon = Launched(tmp_path, local_command("heartbeatd.service", config))
    try:
        port = int(daemon.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        assert "READY=1" in daemon.notified()  # Type=notify: ready once bound
        with RawClient(port) as client:
            assert client.recv()["type"] == "hello"
        daemon.process.send_signal(signal.SIGTERM)  # what `systemctl stop` sends
        assert daemon.process.wait(20) == 0
    finally:
        daemon.close()


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed (Debian package 'systemd')",
)
def test_setup_2_socket_activation(tmp_path: Path) -> None:
    config = shipped_config(tmp_path, "tcp:9000:interface=127.0.0.1")  # overridden by the unit
    name = unit("heartbeatd.socket")["Socket"]["FileDescriptorName"]
    for _attempt in range(5):  # a port found free may be taken before the launcher binds it
        with socket.create_server(("127.0.0.1", 0)) as probe:
            port = probe.getsockname()[1]
        launcher = [
            "systemd-socket-activate",
            f"--listen=127.0.0.1:{port}",
            f"--fdname={name}",
            "--setenv=NOTIFY_SOCKET",  # it passes on only what it is told to
            *local_command(DROP_IN, config),
        ]
        daemon = Launched(tmp_path, launcher)
        try:
            listening = daemon.wait_for(r"Listening on|Failed to|already in use")
            if "Listening on" not in listening.group(0):
                daemon.close()
                (tmp_path / "notify").unlink()
                continue
            # The daemon starts on the first connection, which systemd's socket holds meanwhile.
            with RawClient(port) as client:
                assert client.recv()["type"] == "hello"
                daemon.wait_for(rf"heartbeatd \S+ listening on 127\.0\.0\.1:{port} ")
                assert "READY=1" in daemon.notified()
                client.send({"type": "echo", "id": 1, "data": "activated"})
                assert client.recv()["data"] == "activated"
            daemon.process.send_signal(signal.SIGTERM)
            assert daemon.process.wait(20) == 0
            return
        finally:
            daemon.close()
    pytest.fail("no free port for systemd-socket-activate in 5 attempts")

"""The shipped systemd units: what an operator relies on, and systemd-analyze's verdict."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

CONFIG = Path(__file__).resolve().parent.parent / "config"


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
    assert unit("heartbeatd.socket")["Socket"]["ListenStream"] == "127.0.0.1:9000"


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

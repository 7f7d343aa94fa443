"""docs/deployment.md's "Without systemd" and "Monitoring" examples, run as written.

The daemonized twistd commands run with the documented paths moved under tmp_path; the
logrotate snippet's ``postrotate`` script runs after the file was renamed, as logrotate does,
and the daemon must then write a new file.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import yaml
from test_daemonized import wait_exit
from test_docs_ops import EXPECT, blocks
from test_monitoring import promtool


def free_port() -> int:
    # Two daemons must ask for the same port (the second one fails): a concrete one.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(
    line: str, replace: dict[str, str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    match = EXPECT.search(line)
    command = line[: match.start()] if match else line
    for old, new in replace.items():
        command = command.replace(old, new)
    result = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=30, env=env
    )
    expected = int(match.group(1)) if match and match.group(1) else 0
    assert result.returncode == expected, (line, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_without_systemd_start_fail_reload_rotate_stop(tmp_path: Path) -> None:
    (run_dir := tmp_path / "run").mkdir()
    (log_dir := tmp_path / "log").mkdir()
    port = free_port()
    config = tmp_path / "heartbeatd.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": f"tcp:{port}:interface=127.0.0.1",
                "admin": {"listen": ""},
                "shutdown": {"drain_timeout": 0.2},
            }
        )
    )
    replace = {
        "/run/heartbeatd": str(run_dir),
        "/var/log/heartbeatd": str(log_dir),
        "/etc/heartbeatd/heartbeatd.yaml": str(config),
    }
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    (block,) = blocks("deployment.md", "nosystemd")
    start, second, reload, reopen, stop = [
        line for line in block.splitlines() if line.strip() and not line.startswith("#")
    ]
    (snippet,) = blocks("deployment.md", "logrotate")
    assert snippet.startswith("/var/log/heartbeatd/heartbeatd.log {")
    postrotate = re.search(r"postrotate\n(.*?)\n\s*endscript", snippet, re.DOTALL)
    assert postrotate is not None
    log = log_dir / "heartbeatd.log"
    pidfile = run_dir / "heartbeatd.pid"
    run(start, replace, env)
    pid = int(pidfile.read_text())
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as client:
            assert client.recv(4)  # the hello: the reactor runs, signals are handled
        failed = run(second, replace, env)
        assert "cannot listen on" in failed.stderr.splitlines()[0]
        assert "Address already in use" in failed.stderr.splitlines()[0]
        assert not (run_dir / "second.pid").exists()
        run(reload, replace, env)
        # logrotate: rename, then the snippet's postrotate script.
        log.rename(log_dir / "heartbeatd.log.1")
        run(postrotate.group(1).strip(), replace, env)
        run(reopen, replace, env)
    finally:
        run(stop, replace, env)  # after the SIGUSR1s: the shutdown goes to the new file
        wait_exit(pid)
    assert not pidfile.exists()
    rotated = (log_dir / "heartbeatd.log.1").read_text()
    assert "heartbeatd is ready" in rotated and "stopped after" not in rotated
    assert "stopped after" in log.read_text()
    assert "Configuration reloaded" in rotated + log.read_text()


def test_monitoring_example(tmp_path: Path) -> None:
    (etc := tmp_path / "prometheus").mkdir()
    replace = {
        "/opt/heartbeatd/bin/python": sys.executable,
        "/etc/prometheus": str(etc),
        "/tmp/heartbeatd-dashboard.json": str(tmp_path / "dashboard.json"),
        "promtool ": f"{promtool()} ",
    }
    (block,) = blocks("deployment.md", "monitoring")
    for line in block.splitlines():
        if line.strip():
            run(line, replace, dict(os.environ))
    assert (tmp_path / "dashboard.json").read_text().startswith("{")


def test_tuning_doctor_example(tmp_path: Path) -> None:
    config = tmp_path / "heartbeatd.yaml"
    config.write_text(yaml.safe_dump({"limits": {"max_connections": 1000}}))
    replace = {"/etc/heartbeatd/heartbeatd.yaml": str(config)}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    (block,) = blocks("tuning.md", "doctor")
    outputs = [run(line, replace, env) for line in block.splitlines() if line.strip()]
    assert "Nothing would break the daemon" in outputs[0].stdout
    assert "FAIL  open files" in outputs[1].stdout and "cap it to 192" in outputs[1].stdout
    assert "open-file limit 65,536" in outputs[2].stdout


def test_tuning_lists_the_shipped_sysctl_values() -> None:
    root = Path(__file__).resolve().parents[1]
    shipped = {}
    for line in (root / "config" / "sysctl.d" / "60-heartbeatd.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            shipped[key.strip()] = value.strip()
    rows = re.findall(
        r"^\| `([a-z0-9_.-]+)` \| `([^`]+)` \|", (root / "docs" / "tuning.md").read_text(), re.M
    )
    assert dict(rows) == shipped

"""A daemonized ``twistd heartbeatd`` (no ``-n``): start-up failures, pidfile, log file.

twistd forks twice and the launching process waits on a pipe for the daemon's word; a start-up
failure must reach it (exit non-zero at once, the reason on stderr) and leave no pidfile.
The daemons that do start are stopped by the pid in their pidfile (each test started them).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from daemon import TWISTD

#: A failing start must be reported within this (it takes well under a second).
DEADLINE = 15.0
OUR_LOGGER = "--logger=heartbeatd.daemon.logs.observer"


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port held by a listening socket of ours, so the daemon cannot bind it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def write_config(tmp_path: Path, **config: object) -> Path:
    path = tmp_path / "hb.yaml"
    base = {"listen": "tcp:0:interface=127.0.0.1", "admin": {"listen": ""}}
    path.write_text(yaml.safe_dump({**base, **config}))
    return path


def launch(tmp_path: Path, config: Path, *twistd_args: str) -> subprocess.CompletedProcess[str]:
    """``twistd --pidfile=hb.pid --logfile=hb.log ... heartbeatd --config FILE`` in tmp_path."""
    argv = [TWISTD, "--pidfile=hb.pid", "--logfile=hb.log", *twistd_args]
    return subprocess.run(
        [*argv, "heartbeatd", "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )


def hello(path: Path, timeout: float = DEADLINE) -> dict:
    """Connect to a daemon's ``unix:`` listener and read its first frame.

    A hello means the reactor runs, so the daemon's signal handlers are installed (a SIGHUP
    sent before that would kill it: the default action).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        data = b""
        while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
            chunk = sock.recv(65536)
            assert chunk, "closed before the hello"
            data += chunk
        return json.loads(data[4:])


def wait_exit(pid: int, timeout: float = DEADLINE) -> None:
    """Wait for a process that is not our child (a daemon) to end: its pidfd turns readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        assert readable, f"process {pid} still running after {timeout}s"
    finally:
        os.close(fd)


def stop_daemon(tmp_path: Path) -> None:
    """SIGTERM the daemon this test started (its pidfile), wait for it; the pidfile is gone."""
    pidfile = tmp_path / "hb.pid"
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGTERM)
    wait_exit(pid)
    assert not pidfile.exists()


@pytest.mark.parametrize("logger", [[], [OUR_LOGGER]], ids=["twistd-logger", "our-logger"])
@pytest.mark.parametrize("which", ["admin", "listen"])
def test_a_port_in_use_fails_the_daemonized_start(
    tmp_path: Path, busy_port: int, which: str, logger: list[str]
) -> None:
    endpoint = f"tcp:{busy_port}:interface=127.0.0.1"
    if which == "admin":
        config = write_config(tmp_path, admin={"listen": endpoint, "token": "t" * 32})
    else:
        config = write_config(tmp_path, listen=endpoint)
    began = time.monotonic()
    result = launch(tmp_path, config, *logger)  # raises TimeoutExpired on the old hang
    assert time.monotonic() - began < DEADLINE
    assert result.returncode != 0
    # The whole reason on stderr (twistd's own 100-byte excerpt follows it).
    assert f"heartbeatd: cannot listen on {endpoint!r}" in result.stderr
    assert "Address already in use" in result.stderr.splitlines()[0]
    assert not (tmp_path / "hb.pid").exists(), "stale pidfile"
    assert "cannot listen on" in (tmp_path / "hb.log").read_text()  # and in the log


def test_a_port_in_use_fails_the_foreground_start_without_a_traceback(
    tmp_path: Path, busy_port: int
) -> None:
    config = write_config(tmp_path, listen=f"tcp:{busy_port}:interface=127.0.0.1")
    result = launch(tmp_path, config, "--nodaemon", OUR_LOGGER)
    assert result.returncode != 0
    assert "cannot listen on" in result.stderr and "Address already in use" in result.stderr
    assert "Traceback" not in result.stderr + (tmp_path / "hb.log").read_text()
    assert not (tmp_path / "hb.pid").exists(), "stale pidfile"


@pytest.mark.parametrize("logger", [[], [OUR_LOGGER]], ids=["twistd-logger", "our-logger"])
def test_a_foreground_start_failure_is_printed_once(
    tmp_path: Path, busy_port: int, logger: list[str]
) -> None:
    """``make run`` (--nodaemon, the log on the terminal): the log line is the report; the
    copy written to the launching stderr made the terminal show it twice."""
    endpoint = f"tcp:{busy_port}:interface=127.0.0.1"
    config = write_config(tmp_path, listen=endpoint)
    result = subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", *logger, "heartbeatd", "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count(f"cannot listen on {endpoint!r}") == 1, output
    assert "Traceback" not in output


def test_supervisor_port_in_use_fails_the_daemonized_start(tmp_path: Path, busy_port: int) -> None:
    endpoint = f"tcp:{busy_port}:interface=127.0.0.1"
    # The supervisor binds before any worker starts, so Redis is never reached here.
    redis = {"redis": "redis://127.0.0.1:1/0"}
    admin = {"listen": endpoint, "token": "t" * 32}
    config = write_config(tmp_path, workers=2, cluster=redis, admin=admin)
    result = launch(tmp_path, config, OUR_LOGGER)
    assert result.returncode != 0
    assert f"cannot listen on {endpoint!r}" in result.stderr
    assert not (tmp_path / "hb.pid").exists(), "stale pidfile"


def test_daemonized_start_writes_json_to_logfile_and_sigusr1_reopens_it(tmp_path: Path) -> None:
    """``--logger`` with ``--logfile``: the daemon's log goes to the file (not /dev/null), in
    log.format; after logrotate renames it, SIGUSR1 makes the daemon write a new file."""
    listener = tmp_path / "s"
    config = write_config(tmp_path, listen=f"unix:{listener}", log={"format": "json"})
    result = launch(tmp_path, config, OUR_LOGGER)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""  # the parent returns at once, silent
    log = tmp_path / "hb.log"
    pid = int((tmp_path / "hb.pid").read_text())
    try:
        assert hello(listener)["type"] == "hello"
        first = [json.loads(line) for line in log.read_text().splitlines()]
        assert any(r["text"].startswith("heartbeatd is ready") for r in first)
        log.rename(tmp_path / "hb.log.1")  # what logrotate does, then its postrotate:
        os.kill(pid, signal.SIGUSR1)
    finally:
        # SIGTERM after SIGUSR1: handled in that order, so the shutdown lines are the new
        # file's (both handlers queue their work for the reactor, first come first served).
        stop_daemon(tmp_path)
    after = [json.loads(line) for line in log.read_text().splitlines()]
    # The new file has the first one's mode, not what twistd's daemon umask (077) gives.
    assert stat.S_IMODE(log.stat().st_mode) == stat.S_IMODE((tmp_path / "hb.log.1").stat().st_mode)
    assert any("stopped after" in r["text"] for r in after)
    assert not any("is ready" in r["text"] for r in after)
    assert "stopped after" not in (tmp_path / "hb.log.1").read_text()


def test_daemonized_start_with_twistd_logger_writes_logfile(tmp_path: Path) -> None:
    listener = tmp_path / "s"
    result = launch(tmp_path, write_config(tmp_path, listen=f"unix:{listener}"))
    assert result.returncode == 0, result.stderr
    try:
        assert hello(listener)["type"] == "hello"
    finally:
        stop_daemon(tmp_path)
    text = (tmp_path / "hb.log").read_text()
    assert "heartbeatd is ready" in text and "stopped after" in text


if sys.platform != "linux":  # pragma: no cover - twistd daemonizes on every Unix we test
    pytestmark = pytest.mark.skip("Linux only")


def test_an_unwritable_logfile_is_one_line_and_no_pidfile(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = subprocess.run(
        [
            TWISTD,
            "--pidfile=hb.pid",
            f"--logfile={tmp_path}/no/such/dir/hb.log",
            OUR_LOGGER,
            "heartbeatd",
            "--config",
            str(config),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert result.returncode != 0
    assert "heartbeatd: cannot open the log file" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "hb.pid").exists()

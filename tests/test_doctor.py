"""``heartbeat doctor --config FILE``: the machine against the config, on states it can check.

Subprocesses run the real command (through the ``heartbeat`` entry point, which hands it to
``python -m heartbeatd.daemon.doctor``) with a low ``ulimit -n`` or a config asking for more
than the machine has; the rest drives `diagnose` with a made-up machine.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from daemon import Daemon
from redis_server import RedisServer

from heartbeatd.config import LOW_CONNECTION_LIMIT, parse_config
from heartbeatd.daemon.doctor import FAIL, OK, WARN, Machine, diagnose

HEARTBEAT = str(Path(sys.executable).parent / "heartbeat")
SHIPPED = Path(__file__).resolve().parent.parent / "config" / "heartbeatd.yaml"


def doctor(
    tmp_path: Path, config: dict, *args: str, nofile: int | None = None
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "doctor.yaml"
    path.write_text(yaml.safe_dump(config))

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return subprocess.run(
        [HEARTBEAT, "doctor", "--config", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit,
    )


def lines(result: subprocess.CompletedProcess[str], level: str, topic: str) -> list[str]:
    return [
        line
        for line in result.stdout.splitlines()
        if line.strip().startswith(level) and f"{topic}:" in line
    ]


def test_a_low_ulimit_fails_the_open_files_check(tmp_path: Path) -> None:
    result = doctor(tmp_path, {"limits": {"max_connections": 1000}}, nofile=256)
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = lines(result, FAIL, "open files")
    assert "open-file limit 256" in line and "cap it to 192" in line
    assert "LimitNOFILE" in line and "1,064" in line
    assert "1 problem(s) would break the daemon" in result.stdout


def test_a_low_ulimit_warns_with_the_shipped_config(tmp_path: Path) -> None:
    # limits.max_connections 0 (the shipped default) takes its count from the open-file
    # limit: 192 connections is a forgotten LimitNOFILE, said as a warning (exit 0: it works).
    shipped = yaml.safe_load(SHIPPED.read_text())
    result = doctor(tmp_path, shipped, nofile=256)
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = lines(result, WARN, "open files")
    assert "only 192 connections per process" in line and "LimitNOFILE" in line
    assert not lines(result, OK, "open files")


def test_the_same_config_passes_under_a_sufficient_limit(tmp_path: Path) -> None:
    result = doctor(tmp_path, {"limits": {"max_connections": 1000}}, nofile=2048)
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines(result, OK, "open files") and lines(result, OK, "memory")
    assert "Nothing would break the daemon" in result.stdout


def test_a_config_asking_for_more_memory_than_the_machine_has(tmp_path: Path) -> None:
    config = {"limits": {"max_connections": 10**9}}
    result = doctor(tmp_path, config, "--limit-nofile", str(2 * 10**9))
    assert result.returncode == 1
    (memory,) = lines(result, FAIL, "memory")
    assert "1,000,000,000 idle connections" in memory and "not enough memory" in memory
    assert lines(result, FAIL, "open files")  # fs.nr_open cannot allow that many either


def test_an_unreadable_config_exits_2(tmp_path: Path) -> None:
    result = doctor(tmp_path, {"limits": {"max_connections": -1}})
    assert result.returncode == 2
    assert "limits.max_connections: -1" in result.stderr


def test_redis_reachable_and_not(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis:
        up = doctor(tmp_path, {"cluster": {"redis": redis.url}})
    assert up.returncode == 0, up.stdout
    assert lines(up, OK, "redis")
    down = doctor(tmp_path, {"cluster": {"redis": f"redis://127.0.0.1:{redis.port}/0"}})
    assert down.returncode == 1
    (line,) = lines(down, FAIL, "redis")
    assert "unreachable" in line


def test_with_a_daemon_running_it_reads_the_kernel_drop_counters(tmp_path: Path) -> None:
    with Daemon(tmp_path, {}) as daemon:
        config = {"listen": f"tcp:{daemon.port}:interface=127.0.0.1"}
        result = doctor(tmp_path, config, "--sample", "0.2")
        assert daemon.stop() == 0
    assert result.returncode == 0, result.stdout
    (since_boot,) = [line for line in lines(result, OK, "kernel drops") if "since boot" in line]
    assert "ListenOverflows" in since_boot and "TCPReqQFullDrop" in since_boot
    assert lines(result, OK, "kernel drops")[-1].endswith("not growing over 0.2s") or lines(
        result, WARN, "kernel drops"
    )


# -- diagnose, on a made-up machine --------------------------------------------------------


def machine(
    nofile: int = 65536,
    sysctl: dict[str, str] | None = None,
    available: int = 8 * 2**30,
    netstat: list[dict[str, int]] | None = None,
) -> Machine:
    values = {
        "net.core.somaxconn": "4096",
        "net.ipv4.tcp_max_syn_backlog": "8192",
        "fs.nr_open": "1048576",
        "fs.file-max": "9999999",
        **(sysctl or {}),
    }
    readings = list(netstat or [{}])
    return Machine(
        nofile,
        nofile,
        values.get,
        {"MemAvailable": available},
        lambda: readings.pop(0) if len(readings) > 1 else readings[0],
        4,
    )


def levels(checks: list, topic: str) -> list[str]:
    return [c.level for c in checks if c.topic == topic]


def test_a_backlog_above_somaxconn_is_capped_silently_and_said() -> None:
    config = parse_config({"listen": "tcp:0:interface=127.0.0.1:backlog=8192"})
    checks = diagnose(config, machine(sysctl={"net.core.somaxconn": "4096"}))
    (warning,) = [c for c in checks if c.topic == "backlog" and c.level == WARN]
    assert "caps it to 4096" in warning.text
    small = diagnose(
        parse_config({"listen": "tcp:0", "limits": {"max_connections": 50_000}}), machine()
    )
    assert "reconnect storm" in next(c.text for c in small if c.topic == "backlog")


def test_max_connections_0_warns_below_the_low_mark_only() -> None:
    auto = parse_config({})
    low = [c for c in diagnose(auto, machine(nofile=1000), sample=0) if c.topic == "open files"]
    assert [c.level for c in low] == [WARN] and "only 936 connections" in low[0].text
    fine = diagnose(auto, machine(nofile=LOW_CONNECTION_LIMIT + 64), sample=0)
    assert levels(fine, "open files") == [OK]
    chosen = parse_config({"limits": {"max_connections": 500}})
    assert levels(diagnose(chosen, machine(nofile=1000), sample=0), "open files") == [OK]


def test_workers_multiply_the_memory_and_the_descriptors() -> None:
    config = parse_config(
        {"workers": 4, "cluster": {"redis": ""}, "limits": {"max_connections": 500_000}},
        {"cluster.redis": "redis://127.0.0.1:6379/0"},
    )
    checks = diagnose(config, machine(nofile=600_000, available=4 * 2**30), sample=0)
    assert levels(checks, "open files") == [OK]
    memory = next(c for c in checks if c.topic == "memory")
    assert memory.level == FAIL and "2,000,000 idle connections" in memory.text


def test_growing_drop_counters_warn(monkeypatch) -> None:
    from heartbeatd.daemon import doctor as module

    monkeypatch.setattr(module, "daemon_running", lambda config: True)
    readings = [{"ListenOverflows": 5}, {"ListenOverflows": 9}]
    checks = module.check_kernel_drops(parse_config({}), machine(netstat=readings), 0.01)
    assert [c.level for c in checks] == [OK, WARN]
    assert "ListenOverflows +4" in checks[1].text


def test_the_heartbeat_command_hands_doctor_over_without_loading_the_daemon() -> None:
    """The layout holds: ``heartbeat doctor`` execs ``python -m heartbeatd.daemon.doctor``,
    and the ``heartbeat`` process itself never loads the daemon's room or YAML."""
    code = (
        "import json, os, sys\n"
        "from heartbeatd.client import cli\n"
        "def execv(exe, argv):\n"
        "    print(json.dumps({'argv': argv[1:], 'modules': sorted(sys.modules)}))\n"
        "    raise SystemExit(0)\n"
        "os.execv = execv\n"
        "cli.main(['doctor', '--config', 'x.yaml'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["argv"] == ["-m", "heartbeatd.daemon.doctor", "--config", "x.yaml"]
    loaded = seen["modules"]
    assert "heartbeatd.client.cli" in loaded
    assert [
        m for m in loaded if m.startswith(("heartbeatd.daemon", "heartbeatd.server", "yaml"))
    ] == []


def test_bad_sample_and_limit_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    """``--sample inf`` used to end in a traceback and ``--limit-nofile 0`` was accepted."""
    from heartbeatd.daemon.doctor import main

    bad = [
        ("--sample", "inf"),
        ("--sample", "nan"),
        ("--sample", "-1"),
        ("--sample", "3601"),
        ("--sample", "soon"),
        ("--limit-nofile", "0"),
        ("--limit-nofile", "-5"),
    ]
    for option, value in bad:
        with pytest.raises(SystemExit) as exit:
            main([f"{option}={value}"])
        assert exit.value.code == 2, (option, value)
        err = capsys.readouterr().err
        assert f"argument {option}: " in err and repr(value) in err, err


def test_daemon_address_reads_endpoint_strings_as_twisted_does() -> None:
    from heartbeatd.daemon.doctor import daemon_address

    def address(listen: str) -> tuple[str, int] | None:
        return daemon_address(parse_config({"listen": listen}))

    assert address("tcp:9000") == ("127.0.0.1", 9000)
    assert address("tcp:9000:interface=0.0.0.0") == ("127.0.0.1", 9000)
    assert address(r"tcp6:9000:interface=\:\:1") == ("::1", 9000)
    assert address("tcp:interface=127.0.0.2:port=9000") == ("127.0.0.2", 9000)
    assert address("tcp:port=9000:interface=127.0.0.3") == ("127.0.0.3", 9000)
    assert address("tcp6:9000") == ("::1", 9000)
    assert address("tcp:0") is None
    assert address("unix:/run/heartbeatd.sock") is None

"""The benchmark harness runs and reports sanely.

The smoke run has tiny durations, so what it measures depends on how busy the machine is: it
asserts only what does not (the harness finishes, every phase reports, the report is
well-formed).  A zero measurement must come out as a zero with its reason, never a crash:
that is checked on a made-up report, deterministically.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_runner() -> Any:
    spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build the load generator")
def test_quick_benchmark_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "latest.json").read_text())
    table = report["throughput"]["table"]
    assert set(table) == {"W1", "W2", "W3"}
    assert {"heartbeatd", "twisted", "c"} <= set(table["W1"])
    for workload, runs in report["throughput"]["runs"].items():
        for server, results in runs.items():
            for run in results:  # whatever the machine's load made of them, they agree:
                # a run with replies measured a rate, one without measured zero...
                assert (run["replies"] > 0) == (run["msgs_per_s"] > 0), (workload, server, run)
                # ...and the load generator had requests out (a loaded machine may answer all
                # of them outside the measured window: then replies and unanswered are 0).
                assert run["sent"] > 0 and run["unanswered"] <= run["sent"], (
                    workload,
                    server,
                    run,
                )
            if table[workload][server]["msgs_per_s"]["median"] == 0:
                assert table[workload][server]["zero_reason"]  # a zero says why
    idle = report["idle"]["heartbeatd"]
    assert idle["connections"] == 50 and 0 <= idle["pinged"] <= 50
    assert idle["bytes_per_conn_before_ping"] > 0
    pool = report["pool"]
    assert pool["pool_rps"] > 0, pool  # its connections are open: some request completes
    # A new connection per request may measure nothing on a loaded machine: then it says so.
    explained = "connect per request measured 0" in (tmp_path / "latest.md").read_text()
    assert pool["connect_rps"] > 0 or explained, pool
    workers = report["workers"]
    assert workers["workers"] == 2 and workers["hello"] == 200
    assert workers["broadcast_status"] == 200 and workers["supervisor_exit"] == 0
    markdown = (tmp_path / "latest.md").read_text()
    assert "WORKERS (2 workers, 200 idle clients" in markdown
    assert "| closed by the server, by reason |" in markdown
    assert "| W2 msgs/s |" in markdown and "heartbeatd / plain Twisted + json" in markdown
    assert "bytes/conn before any ping" in markdown


def test_a_zero_is_reported_with_its_reason_not_divided_by() -> None:
    run = load_runner()
    zero = {"median": 0.0, "min": 0.0, "max": 0.0}
    some = {"median": 1000.0, "min": 900.0, "max": 1100.0}
    results = [{"replies": 0, "unanswered": 3}]

    def row(value: dict[str, float], **extra: Any) -> dict[str, Any]:
        return {k: value for k in ("msgs_per_s", "mb_per_s", "p50_ms", "p99_ms", "p999_ms")} | extra

    reason = run.zero_reason(results, 0.3)
    assert "no reply inside the 0.3 s measuring window" in reason and "3 request(s)" in reason
    report = {
        "machine": "test",
        "repeat": 1,
        "duration": 0.3,
        "throughput": {
            "table": {
                "W1": {"heartbeatd": row(some), "twisted": row(zero, zero_reason=reason)},
            }
        },
        "pool": {"pool_size": 4, "pool_rps": 10.0, "connect_rps": 0.0},
    }
    text = run.markdown(report)
    assert f"n/a (plain Twisted + json measured 0: {reason})" in text
    assert "| ratio | n/a (connect per request measured 0) |" in text
    assert run.ratio(2.0, 1.0, "x") == "2.00x"


def test_hotpath_measures_every_shape() -> None:
    """bench/hotpath.py (W1, W2 and W3 through dataReceived, no sockets) runs and reports."""
    result = subprocess.run(
        [sys.executable, str(BENCH / "hotpath.py"), "--messages", "64"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["W1", "W2", "W3"]
    assert all(float(line.split(": ")[1].split()[0]) > 0 for line in lines)


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is needed for the ws peer")
def test_websocket_benchmark_runs_both_servers(tmp_path: Path) -> None:
    """bench/websocket.py: heartbeatd and Node's ws, echo at depth 1 and 32, idle bytes."""
    out = tmp_path / "ws.json"
    result = subprocess.run(
        [sys.executable, str(BENCH / "websocket.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"depth 1", "depth 32"}
    for by_server in report["runs"].values():
        assert set(by_server) == {"heartbeatd", "node ws"}
        assert all(len(rates) == 1 for rates in by_server.values())
    assert set(report["idle"]) == {"heartbeatd", "node ws"} and report["idle_conns"] == 50
    for by_server in report["cpu_us"].values():  # server CPU per message, from /proc
        assert all(len(us) == 1 and us[0] > 0 for us in by_server.values()), by_server
    assert "| depth 32, msgs/s (median of 1) |" in result.stdout
    assert "| depth 1, server CPU per message |" in result.stdout


def test_sessions_benchmark_reports_costs_on_and_off_and_memory() -> None:
    """bench/sessions.py: W1/W2 with sessions off and on, memory per session, Redis bytes."""
    argv = [sys.executable, str(BENCH / "sessions.py"), "--messages", "64", "--sessions", "20"]
    redis = shutil.which("redis-server") is not None
    result = subprocess.run(
        argv + (["--redis"] if redis else []), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["W1", "W2"]
    assert all("sessions off" in line and "on" in line for line in lines[:2])
    assert lines[2].startswith("daemon memory per idle session")
    if redis:
        assert lines[3].startswith("Redis memory per idle session")

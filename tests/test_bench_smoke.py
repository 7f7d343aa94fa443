"""The benchmark harness runs and reports sanely: a smoke test with tiny durations, no timing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


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
    for workload, runs in report["throughput"]["runs"].items():
        for server, results in runs.items():
            for run in results:
                assert run["unanswered"] == 0, (workload, server, run)  # every request answered
                assert run["replies"] > 0, (workload, server, run)
    assert {"heartbeatd", "twisted", "c"} <= set(table["W1"])
    idle = report["idle"]["heartbeatd"]
    assert idle["pinged"] == idle["connections"] == 50
    assert idle["bytes_per_conn_before_ping"] > 0
    assert report["pool"]["pool_rps"] > 0 and report["pool"]["connect_rps"] > 0
    markdown = (tmp_path / "latest.md").read_text()
    assert "| W2 msgs/s |" in markdown and "heartbeatd / plain Twisted + json" in markdown
    assert "bytes/conn before any ping" in markdown

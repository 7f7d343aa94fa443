"""The fan-out benchmark (bench/fanout.py) runs for a couple of seconds and reports sanely.

Its figures depend on how busy the machine is, so this asserts only what does not: every
server under test started, every subscriber got every publication once and in order, and the
report has each measure.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc builds the C subscribers")
def test_quick_fanout_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / "fanout.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    runs = json.loads((tmp_path / "fanout.json").read_text())
    servers = {r["server"] for r in runs}
    assert "heartbeatd" in servers
    if shutil.which("node"):
        assert "node" in servers
    for run in runs:
        assert run["complete"] and run["out_of_order"] == 0, run
        assert run["deliveries"] == run["expected"] == 50 * (5 + 20), run
        assert run["burst_deliveries_per_s"] > 0, run
        assert run["rate_p99_ms"] >= run["rate_p50_ms"] > 0, run
        assert isinstance(run["bytes_per_subscriber"], float), run
    table = (tmp_path / "fanout.md").read_text()
    assert "| heartbeatd | 50 |" in table

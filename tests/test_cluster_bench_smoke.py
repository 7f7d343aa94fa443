"""bench/cluster.py runs end to end (tiny durations) and reports no silent loss.

Only the harness is checked; speed is never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "cluster.py"


def test_quick_cluster_bench(tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    (latency,) = result["latency"]
    assert latency["published"] > 0 and latency["not_delivered"] == 0
    assert result["kill"]["lost_silently"] == 0 and result["kill"]["duplicated"] == 0
    assert result["kill"]["sessions_gone_after_s"] is not None
    assert result["redis_restart"]["lost_silently"] == 0

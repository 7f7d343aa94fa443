"""bench/workers_idle.py runs end to end on a tiny load: every client served, pinged, reached.

Only the harness is checked; speed is never asserted.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent / "bench" / "workers_idle.py"


def load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("workers_idle", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    assert result["server_closes"] == [{}, {}] and result["client_closes"] == {}
    assert result["evicted_metric"] == [{}, {}]
    assert sum(result["per_worker_conns"]) >= 300  # each worker's descriptors beyond its own


def test_closes_are_counted_per_worker_and_reason_from_the_log() -> None:
    bench = load_bench()
    lines = [
        "t [heartbeatd.daemon.workers#warn] [worker 1] Closing client 0a1b (127.0.0.2:4000): "
        "heartbeat_timeout: silent for 31.0s (timeout 30s), 2 ping(s) unanswered; silent 31.0s",
        "t [heartbeatd.daemon.workers#warn] [worker 1] Closing client 0a1c (127.0.0.3:4001, "
        "alice): slow_reader; silent 0.0s",
        "t [heartbeatd.daemon.workers#warn] [worker 1] 40 more 'close:heartbeat_timeout' log "
        "lines suppressed in 10s",
        "t [heartbeatd.daemon.workers#warn] [worker 0] Refused a connection from "
        "127.0.0.2:5000: too many connections from 127.0.0.2",
        "t [heartbeatd.daemon.workers#info] [worker 0] Worker full (19872 clients)",
    ]
    metrics = (
        'heartbeatd_evicted_total{reason="heartbeat_timeout",worker="1"} 41.0\n'
        'heartbeatd_evicted_total{reason="slow_consumer",worker="0"} 0.0\n'
    )
    assert bench.evicted_by_worker(metrics, 2) == [{}, {"heartbeat_timeout": 41}]
    by_worker = bench.closes_by_reason(lines, 2)
    assert by_worker[1]["closes"] == {"heartbeat_timeout": 41, "slow_reader": 1}
    assert by_worker[0]["closes"] == {}
    assert by_worker[0]["refusals"] == {"too many connections from N": 1}

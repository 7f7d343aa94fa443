"""The JavaScript client's own suite (js/test/, `node --test`) against this checkout's daemon.

The Node tests start their own daemons (this venv's twistd, through HEARTBEATD_TWISTD),
redis-server and fake servers, over TCP, TLS and, where the daemon has it, WebSocket. Each
test file runs as its own pytest test, so pytest-xdist spreads them over its workers (one
`node --test` run of them all takes over a minute on one core); each fails with its report.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from js_tools import JS, require_node

TWISTD = str(Path(sys.executable).parent / "twistd")
FILES = sorted(str(p.relative_to(JS)) for p in (JS / "test").glob("*.test.js"))


def test_every_test_file_is_collected() -> None:
    assert len(FILES) >= 11, FILES


@pytest.mark.parametrize("test_file", FILES)
def test_the_javascript_client_suite_passes(test_file: str) -> None:
    node = require_node()
    env = {**os.environ, "HEARTBEATD_TWISTD": TWISTD}
    result = subprocess.run(
        [node, "--test", "--test-reporter=tap", test_file],
        cwd=JS,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-20000:]
    counts = dict(re.findall(r"^# (pass|fail|cancelled|todo|skipped) (\d+)$", report, re.MULTILINE))
    assert counts.get("fail") == "0" and counts.get("cancelled") == "0", report[-5000:]
    # A `todo` test's failure does not fail `node --test`: none may hide one here.
    assert counts.get("todo", "0") == "0", report[-5000:]
    assert int(counts["pass"]) >= 1, report[-5000:]

"""The shipped monitoring: Prometheus rules (promtool) and the Grafana dashboard.

* ``promtool check rules`` and ``promtool test rules`` (tests/prometheus/), where every alert
  has a case that fires it and a series beside it that does not;
* every series the dashboard or the rules name is exported by a real daemon's ``/metrics``,
  single process and ``workers: 2`` (only the supervisor's own are workers-only).

promtool comes from PATH or ``.tools/`` (``make promtool`` puts it there; ``make test`` runs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from daemon import Daemon, RawClient
from redis_server import RedisServer
from test_admin import ADMIN, http
from test_workers import workers
from wsclient import WSClient

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "config" / "heartbeatd.rules.yml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "heartbeatd.rules.test.yml"
DASHBOARD = ROOT / "config" / "heartbeatd-dashboard.json"
#: A series name in PromQL: ours and the process collector's (recorded names have colons).
SERIES = re.compile(r"(?<![\w:])((?:heartbeatd|process)_[a-z0-9_]+)(?![\w:])")
#: ``name{...}`` selectors, for their exact-match labels.
SELECTOR = re.compile(r"(?<![\w:])((?:heartbeatd|process)_[a-z0-9_]+)\{([^}]*)\}")
EXACT_LABEL = re.compile(r'(\w+)="([^"$]*)"')
#: Series only a supervisor exports (``workers > 1``).
WORKERS_ONLY = {
    "heartbeatd_workers",
    "heartbeatd_workers_serving",
    "heartbeatd_worker_restarts_total",
}


def promtool() -> str:
    found = shutil.which("promtool") or str(ROOT / ".tools" / "promtool")
    if not Path(found).is_file():
        pytest.fail("promtool is missing: run `make promtool` (make test does)")
    return found


def run_promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules() -> None:
    result = run_promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_case_that_fires_and_one_that_does_not() -> None:
    alerts = [
        rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]
    fires: dict[str, int] = dict.fromkeys(alerts, 0)
    quiet: dict[str, int] = dict.fromkeys(alerts, 0)
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        instances = {
            m.group(1)
            for series in case["input_series"]
            if (m := re.search(r'instance="([^"]+)"', series["series"]))
        }
        for check in case.get("alert_rule_test", []):
            firing = {a["exp_labels"]["instance"] for a in check["exp_alerts"]}
            fires[check["alertname"]] += bool(firing)
            quiet[check["alertname"]] += bool(instances - firing)  # a series left quiet
    assert all(fires.values()), f"alerts no test fires: {[a for a, n in fires.items() if not n]}"
    assert all(quiet.values()), (
        f"alerts without a quiet case: {[a for a, n in quiet.items() if not n]}"
    )


def exprs() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every expression of the rules and the dashboard."""
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield rule.get("alert") or rule["record"], rule["expr"]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield f"variable {variable['name']}", variable["definition"]


def test_dashboard_is_grafana_json_with_the_asked_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in (
        "connections by listener and worker",
        "refusals",
        "evictions",
        "messages",
        "bytes",
        "round trip",
        "sweep",
        "redis",
        "publishes refused",
        "worker restarts",
        "log lines suppressed",
    ):
        assert topic in titles, topic
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def exported(text: str) -> dict[str, list[dict[str, str]]]:
    """Sample name -> the label sets it is exported with, from a text exposition."""
    out: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        name = name.split(" ")[0]
        labels = dict(EXACT_LABEL.findall(rest.split("}")[0])) if rest else {}
        out.setdefault(name, []).append(labels)
    return out


def missing(text: str, allowed_absent: set[str]) -> list[str]:
    series = exported(text)
    problems = []
    for where, expr in exprs():
        for name in SERIES.findall(expr):
            if name not in series and name not in allowed_absent:
                problems.append(f"{where}: {name}")
        for name, matchers in SELECTOR.findall(expr):
            for label, value in EXACT_LABEL.findall(matchers):
                if name in series and not any(s.get(label) == value for s in series[name]):
                    problems.append(f"{where}: {name}{{{label}={value!r}}}")
    return sorted(set(problems))


def test_every_series_named_is_exported_by_a_single_daemon(tmp_path: Path) -> None:
    config = {
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
        "websocket": {"listen": "tcp:0:interface=127.0.0.1", "path": "/ws"},
    }
    with (
        Daemon(tmp_path, config) as daemon,
        RawClient(daemon.port) as plain,
        WSClient(daemon.ws_port, path="/ws") as ws,  # type: ignore[attr-defined]
    ):
        assert plain.recv()["type"] == "hello" and ws.recv()["type"] == "hello"
        port = int(daemon.wait_for(ADMIN).group(1))
        status, text = http(port, "GET", "/metrics")
        assert status == 200
    assert missing(text, WORKERS_ONLY) == []
    by_listener = {
        labels["listener"]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("heartbeatd_connections_by_listener{")
        for labels in [dict(EXACT_LABEL.findall(line))]
    }
    assert by_listener == {"tcp": 1, "tls": 0, "websocket": 1, "websocket+tls": 0}


def test_every_series_named_is_exported_by_workers(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis, workers(tmp_path, redis, 2) as daemon:
        status, text = http(daemon.admin, "GET", "/metrics")  # type: ignore[attr-defined]
        assert status == 200
        assert 'worker="1"' in text
        assert daemon.stop() == 0
    assert missing(text, set()) == []

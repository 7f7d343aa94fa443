"""``workers: N``: the admin API answers for the whole daemon (the supervisor asks every worker).

The aggregation (metrics merge, health verdict) is tested without processes; the rest with a
real supervisor, real workers and a real redis-server, as in test_workers.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections import Counter
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from redis_server import RedisServer
from test_admin import http
from test_cluster import Client
from test_workers import _FakeProcessReactor, _Port, nodes_of, worker_pids, workers
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from heartbeatd.config import parse_config
from heartbeatd.daemon.admin import AdminPolicy
from heartbeatd.daemon.supervisor_admin import (
    Reply,
    SupervisorAdmin,
    daemon_health,
    exposition,
    supervisor_families,
)
from heartbeatd.daemon.worker_metrics import MetricsMerger, WorkerAnswer, parse
from heartbeatd.daemon.workers import STATUS_FD, Supervisor

# -- the aggregation, without processes ------------------------------------------------------


def worker_text(accepted: float, connections: float, errors: float = 0) -> str:
    """A worker's exposition, as its own /metrics writes it."""
    families = [
        CounterMetricFamily("heartbeatd_connections_accepted", "Accepted.", value=accepted),
        GaugeMetricFamily("heartbeatd_connections", "Connected now.", value=connections),
        CounterMetricFamily("heartbeatd_admin_refused", "Refused.", labels=["status"]),
    ]
    labelled = CounterMetricFamily("heartbeatd_errors", "Errors.", labels=["code"])
    labelled.add_metric(["bad_json"], errors)
    families.append(labelled)
    families[2].add_metric(["401"], 5)
    return exposition(families).decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value; fails on a series exposed twice."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def merged(merger: MetricsMerger, answers: dict[str, WorkerAnswer]) -> dict[Any, float]:
    families = merger.merge(answers, skip=["heartbeatd_admin_refused"])
    return samples(exposition(families).decode())


def test_every_worker_series_gets_a_worker_label_and_none_is_duplicated() -> None:
    merger = MetricsMerger()
    out = merged(
        merger,
        {
            "0": WorkerAnswer(100, parse(worker_text(3, 2, errors=1))),
            "1": WorkerAnswer(101, parse(worker_text(7, 4))),
        },
    )
    assert out[("heartbeatd_connections_accepted_total", (("worker", "0"),))] == 3
    assert out[("heartbeatd_connections_accepted_total", (("worker", "1"),))] == 7
    assert out[("heartbeatd_connections", (("worker", "1"),))] == 4
    assert out[("heartbeatd_errors_total", (("code", "bad_json"), ("worker", "0")))] == 1
    # The workers' private sites refuse nothing the operator sent: the supervisor's counts.
    assert not any(name.startswith("heartbeatd_admin_refused") for name, _ in out)


def test_a_replaced_worker_counters_stay_monotonic_and_its_gauges_do_not_carry() -> None:
    merger = MetricsMerger()
    one = "heartbeatd_connections_accepted_total", (("worker", "1"),)
    gauge = "heartbeatd_connections", (("worker", "1"),)
    zero = {"0": WorkerAnswer(100, parse(worker_text(1, 1)))}
    assert merged(merger, {**zero, "1": WorkerAnswer(101, parse(worker_text(10, 5)))})[one] == 10
    # Worker 1 misses a scrape (stopped, slow): its series are left out, nothing is forgotten.
    assert one not in merged(merger, zero)
    assert merged(merger, {**zero, "1": WorkerAnswer(101, parse(worker_text(12, 5)))})[one] == 12
    # Replaced (a new pid, counting from zero): the old process's last total is the floor.
    out = merged(merger, {**zero, "1": WorkerAnswer(202, parse(worker_text(2, 1, errors=3)))})
    assert out[one] == 14 and out[gauge] == 1
    out = merged(merger, {**zero, "1": WorkerAnswer(202, parse(worker_text(5, 0, errors=4)))})
    assert out[one] == 17
    errors = ("heartbeatd_errors_total", (("code", "bad_json"), ("worker", "1")))
    assert out[errors] == 4  # its predecessor had none
    # Replaced again: both predecessors' totals carry.
    out = merged(merger, {**zero, "1": WorkerAnswer(303, parse(worker_text(1, 0)))})
    assert out[one] == 18 and out[errors] == 4
    assert out[("heartbeatd_connections_accepted_total", (("worker", "0"),))] == 1


def test_supervisor_families_name_every_configured_worker() -> None:
    families = supervisor_families(3, 2, 4, {0: True, 1: False, 2: True}, {"401": 2})  # type: ignore[arg-type]
    out = samples(exposition(families).decode())
    assert out[("heartbeatd_workers", ())] == 3
    assert out[("heartbeatd_workers_serving", ())] == 2
    assert out[("heartbeatd_worker_restarts_total", ())] == 4
    assert out[("heartbeatd_worker_scrape_ok", (("worker", "1"),))] == 0
    assert out[("heartbeatd_worker_scrape_ok", (("worker", "2"),))] == 1
    assert out[("heartbeatd_admin_refused_total", (("status", "401"),))] == 2
    assert out[("heartbeatd_admin_refused_total", (("status", "413"),))] == 0


SERVING = {"status": "serving", "clients": 2, "node": "n-w0", "broker": "up"}


def test_health_is_serving_only_when_every_worker_serves() -> None:
    states = {0: "serving", 1: "serving", 2: "serving"}
    code, body = daemon_health(3, states, dict.fromkeys(states, SERVING), node="n")
    assert (code, body) == (
        200,
        {
            "status": "serving",
            "workers": 3,
            "serving": 3,
            "missing": {},
            "clients": 6,
            "node": "n",
            "broker": "up",
        },
    )


def test_health_names_the_missing_workers_and_why() -> None:
    states = {0: "serving", 1: "restarting", 2: "serving", 3: "starting"}
    answers = {0: SERVING}  # worker 2 is READY but did not answer in time
    code, body = daemon_health(4, states, answers)
    assert code == 200 and body["status"] == "degraded"
    assert body["serving"] == 1 and body["clients"] == 2
    assert body["missing"] == {"1": "restarting", "2": "not answering", "3": "starting"}


def test_health_broker_down_degrades_none_serving_and_stopping_answer_503() -> None:
    states = {0: "serving", 1: "serving"}
    down = {**SERVING, "status": "degraded", "broker": "down"}
    code, body = daemon_health(2, states, {0: SERVING, 1: down})
    assert (code, body["status"], body["broker"], body["serving"]) == (200, "degraded", "down", 2)
    code, body = daemon_health(2, {0: "restarting", 1: "starting"}, {})
    assert (code, body["status"], body["serving"]) == (503, "unavailable", 0)
    code, body = daemon_health(2, states, {0: {"status": "draining"}, 1: SERVING}, stopping=True)
    assert (code, body["status"], body["missing"]) == (503, "draining", {"0": "draining"})


def test_worker_states_follow_a_crash_and_the_replacement() -> None:
    config = parse_config(
        {"workers": 2, "cluster": {"redis": "redis://127.0.0.1:1/0", "node_id": "n"}}
    )
    reactor = _FakeProcessReactor()
    supervisor = Supervisor(config, "c.yaml", {}, reactor)
    supervisor.port = _Port()  # type: ignore[assignment]
    supervisor._spawn(0)
    supervisor._spawn(1)
    assert supervisor.worker_states() == {0: "starting", 1: "starting"}
    for worker, _ in reactor.spawned:
        worker.childDataReceived(STATUS_FD, b'{"READY": 1}\n')
    assert supervisor.worker_states() == {0: "serving", 1: "serving"}
    reactor.spawned[1][0].processEnded(Failure(ProcessTerminated(exitCode=1)))
    assert supervisor.worker_states() == {0: "serving", 1: "restarting"}
    assert supervisor.worker_pid(1) is None and supervisor.admin_socket(1) is None
    reactor.advance(60)
    assert supervisor.worker_states() == {0: "serving", 1: "starting"}
    assert supervisor.worker_pid(1) == 1002


class FakeSupervisor:
    count = 2
    restarts = 0
    stopping = False
    node_base = "n"

    def __init__(self, states: dict[int, str]) -> None:
        self.states = states

    def worker_states(self) -> dict[int, str]:
        return dict(self.states)

    def worker_pid(self, index: int) -> int | None:
        return 100 + index

    def admin_socket(self, index: int) -> str | None:
        return f"w{index}.sock"


class FakeChannel:
    """Records each question; the test answers it by firing its Deferred."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, bytes, bytes, Deferred[Reply]]] = []

    def request(self, path: str, method: bytes, uri: bytes, timeout: float, **kw: Any) -> Any:
        d: Deferred[Reply] = Deferred()
        self.asked.append((path, method, uri, d))
        return d


def admin_request(method: bytes, uri: bytes) -> DummyRequest:
    request = DummyRequest(uri.split(b"/")[1:])
    request.method, request.uri, request.path = method, uri, uri.split(b"?")[0]
    request.content = BytesIO(b"")
    request._disconnected = False
    return request


def admin_for(states: dict[int, str]) -> tuple[SupervisorAdmin, FakeChannel]:
    channel = FakeChannel()
    admin = SupervisorAdmin(
        FakeSupervisor(states),  # type: ignore[arg-type]
        channel,  # type: ignore[arg-type]
        AdminPolicy(),
        Counter(),
        Clock(),
    )
    return admin, channel


def render(admin: SupervisorAdmin, request: DummyRequest) -> None:
    """As twisted.web does: an answer rendered at once is written and the request finished."""
    result = admin.render(request)
    if isinstance(result, bytes):
        request.write(result)
        request.finish()


def answer(request: DummyRequest) -> tuple[int, Any]:
    assert request.finished
    return request.responseCode or 200, json.loads(b"".join(request.written))


def test_concurrent_probes_share_one_question_per_worker_and_a_late_one_is_named() -> None:
    admin, channel = admin_for({0: "serving", 1: "serving"})
    first, second = admin_request(b"GET", b"/healthz"), admin_request(b"GET", b"/healthz")
    render(admin, first)
    render(admin, second)
    assert [(path, uri) for path, _, uri, _ in channel.asked] == [
        ("w0.sock", b"/healthz"),
        ("w1.sock", b"/healthz"),
    ]
    assert not first.finished
    channel.asked[0][3].callback(Reply(200, {}, json.dumps(SERVING).encode()))
    channel.asked[1][3].errback(TimeoutError("no answer within 2s"))
    for request in (first, second):
        code, body = answer(request)
        assert code == 200 and body["missing"] == {"1": "not answering"}


def test_kick_asks_every_serving_worker_and_the_holder_answers() -> None:
    admin, channel = admin_for({0: "serving", 1: "serving"})
    request = admin_request(b"DELETE", b"/clients/abc")
    render(admin, request)
    assert [(m, u) for _, m, u, _ in channel.asked] == [
        (b"DELETE", b"/clients/abc?scope=local")
    ] * 2
    channel.asked[0][3].callback(Reply(404, {}, b'{"error": "no client"}'))
    channel.asked[1][3].callback(Reply(200, {}, b'{"disconnected": "abc"}'))
    assert answer(request) == (200, {"disconnected": "abc", "worker": 1})


def test_kick_held_by_no_worker_is_forwarded_to_find_it_on_another_node() -> None:
    admin, channel = admin_for({0: "serving", 1: "serving"})
    request = admin_request(b"DELETE", b"/clients/abc")
    render(admin, request)
    for asked in channel.asked[:2]:
        asked[3].callback(Reply(404, {}, b'{"error": "no client on this node"}'))
    # Held by none: the first worker is asked without ?scope=local (the whole cluster).
    assert [(p, m, u) for p, m, u, _ in channel.asked[2:]] == [
        ("w0.sock", b"DELETE", b"/clients/abc")
    ]
    assert not request.finished
    channel.asked[2][3].callback(Reply(200, {}, b'{"disconnected": "abc"}'))
    assert answer(request) == (200, {"disconnected": "abc"})


def test_with_no_worker_serving_requests_get_503_and_only_healthz_asks_nobody() -> None:
    admin, channel = admin_for({0: "restarting", 1: "starting"})
    for method, uri in [(b"GET", b"/clients"), (b"DELETE", b"/clients/x"), (b"GET", b"/healthz")]:
        request = admin_request(method, uri)
        render(admin, request)
        code, body = answer(request)
        assert code == 503, (uri, body)
    assert body["status"] == "unavailable" and body["missing"] == {
        "0": "restarting",
        "1": "starting",
    }
    assert channel.asked == []


# -- real workers ----------------------------------------------------------------------------


def scrape(daemon: Any) -> dict[Any, float]:
    status, text = http(daemon.admin, "GET", "/metrics")
    assert status == 200
    return samples(text)


def health(daemon: Any) -> tuple[int, dict[str, Any]]:
    return http(daemon.admin, "GET", "/healthz")  # type: ignore[no-any-return]


def wait_health(daemon: Any, check: Any, timeout: float = 20) -> dict[str, Any]:
    """Ask /healthz until ``check(body)`` holds (each answer is an event: no sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        _, body = health(daemon)
        if check(body):
            return body
        assert time.monotonic() < deadline, f"/healthz never matched; last {body}"


def per_worker(found: dict[Any, float], name: str) -> dict[str, float]:
    return {dict(labels)["worker"]: v for (n, labels), v in found.items() if n == name}


@pytest.mark.scenario
def test_metrics_and_health_cover_every_worker_through_a_stop_and_a_kill(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis, workers(tmp_path, redis, 3) as daemon:
        # READY comes once every worker serves; each links to Redis in the background.
        wait_health(daemon, lambda b: b.get("broker") == "up")
        assert health(daemon) == (
            200,
            {
                "status": "serving",
                "workers": 3,
                "serving": 3,
                "missing": {},
                "clients": 0,
                "node": "wk",
                "broker": "up",
            },
        )
        found = scrape(daemon)
        assert set(per_worker(found, "heartbeatd_connections")) == {"0", "1", "2"}
        assert set(per_worker(found, "process_resident_memory_bytes")) == {
            "0",
            "1",
            "2",
            "supervisor",
        }
        assert found[("heartbeatd_workers", ())] == 3
        assert found[("heartbeatd_workers_serving", ())] == 3
        assert found[("heartbeatd_worker_restarts_total", ())] == 0
        assert per_worker(found, "heartbeatd_worker_scrape_ok") == {"0": 1, "1": 1, "2": 1}
        cpu_before = per_worker(found, "process_cpu_seconds_total")["1"]

        # A worker that stops answering (SIGSTOP): both answer in bounded time and name it.
        victim = worker_pids(daemon)[1]
        os.kill(victim, signal.SIGSTOP)
        try:
            status, body = health(daemon)
            assert status == 200 and body["status"] == "degraded"
            assert body["serving"] == 2 and body["missing"] == {"1": "not answering"}
            found = scrape(daemon)
            assert set(per_worker(found, "heartbeatd_connections")) == {"0", "2"}
            assert per_worker(found, "heartbeatd_worker_scrape_ok") == {"0": 1, "1": 0, "2": 1}
            daemon.wait_for(r"Worker 1 did not answer the admin API's /healthz: no answer within")
        finally:
            os.kill(victim, signal.SIGKILL)

        # Killed: 2 of 3 until the replacement serves, then 3 of 3 again.
        daemon.wait_for(rf"Worker 1 \(pid {victim}\) exited unexpectedly")
        body = wait_health(daemon, lambda b: b["serving"] < 3 and "1" in b["missing"])
        assert body["missing"]["1"] in ("restarting", "starting")
        daemon.wait_for(r"Worker 1 \(pid (\d+)\) serving again")
        # "serving" once the new worker's Redis link is up too (until then it is "degraded").
        body = wait_health(daemon, lambda b: b["serving"] == 3 and b["status"] == "serving")
        assert body["missing"] == {}
        found = scrape(daemon)
        assert found[("heartbeatd_worker_restarts_total", ())] == 1
        # The new process's counters continue from the old one's last scrape.
        assert per_worker(found, "process_cpu_seconds_total")["1"] >= cpu_before


def test_kick_reaches_the_worker_holding_the_client_and_the_rest_is_forwarded(
    tmp_path: Path,
) -> None:
    clients: list[Client] = []
    with RedisServer(tmp_path / "redis") as redis, workers(tmp_path, redis, 2) as daemon:
        try:
            # Connect until some client is held by worker 1 (the shared socket decides).
            target = None
            for _ in range(20):
                clients += [Client(daemon.port) for _ in range(4)]
                nodes = nodes_of(daemon, clients)  # GET /clients, forwarded: cluster-wide
                target = next((c for c in clients if nodes[c.session] == "wk-w1"), None)
                if target is not None:
                    break
            assert target is not None
            for index in (0, 1):  # each worker sets glibc's thresholds itself (malloc.*)
                daemon.wait_for(rf"\[worker {index}\].*glibc malloc: mmap_threshold 33554432")
            status, body = http(daemon.admin, "DELETE", f"/clients/{target.session}")
            assert (status, body) == (200, {"disconnected": target.session, "worker": 1})
            while target.raw.recv() is not None:
                pass  # read up to the server's close: the kick happened
            status, body = http(daemon.admin, "DELETE", "/clients/nobody")
            # Held by no worker: forwarded, and no node of the cluster has it either.
            assert status == 404 and body["error"] == "no client 'nobody' in the cluster"
            # Send and the index are forwarded to a worker: cluster-wide with Redis.
            other = next(c for c in clients if c is not target)
            status, body = http(
                daemon.admin, "POST", f"/clients/{other.session}/send", {"type": "hi"}
            )
            assert (status, body) == (200, {"sent": 1})
            assert other.expect("hi")["type"] == "hi"
            status, body = http(daemon.admin, "GET", "/nowhere")
            assert status == 404 and "error" in body
        finally:
            for client in clients:
                client.close()


def test_the_admin_token_guards_the_supervisor_and_reaches_the_workers(tmp_path: Path) -> None:
    admin = {"token": "s3cret"}
    with RedisServer(tmp_path / "redis") as redis, workers(tmp_path, redis, 2, admin=admin) as d:
        assert health(d)[0] == 200  # public by default, as in a single daemon
        assert http(d.admin, "GET", "/metrics")[0] == 401
        assert http(d.admin, "GET", "/clients")[0] == 401
        assert http(d.admin, "GET", "/clients", token="s3cret")[0] == 200
        status, text = http(d.admin, "GET", "/metrics", token="s3cret")
        assert status == 200
        found = samples(text)
        assert set(per_worker(found, "heartbeatd_connections")) == {"0", "1"}
        assert found[("heartbeatd_admin_refused_total", (("status", "401"),))] == 2


def test_sighup_changing_workers_warns_that_a_restart_is_needed(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis, workers(tmp_path, redis, 2) as daemon:
        config = yaml.safe_load(daemon.config_path.read_text())
        config["workers"] = 3
        config["listen"] = "tcp:1:interface=127.0.0.1"
        config["heartbeat"] = {"interval": 4, "timeout": 12}
        daemon.config_path.write_text(yaml.safe_dump(config))
        daemon.process.send_signal(signal.SIGHUP)
        line = daemon.wait_for(r"workers cannot change while running; keeping (\d+) \(restart")
        assert line.group(1) == "2" and "restart to use 3" in line.string
        daemon.wait_for("Reload done in every worker")  # the rest applied as usual
        for index in range(2):
            # Each worker says what it keeps, as a single daemon does.
            daemon.wait_for(rf"\[worker {index}\] listen cannot change while running; keeping")
            daemon.wait_for(rf"\[worker {index}\] Configuration reloaded .*heartbeat.interval")
        assert health(daemon)[1]["workers"] == 2
        assert not re.search(r"Worker 2 started", "\n".join(daemon.lines))


def test_delete_identity_is_forwarded_to_a_worker_which_reaches_every_node() -> None:
    """Workers are nodes of one cluster: the first serving worker kicks the identity's sessions
    on all of them (tests/test_identities.py shows it across daemons)."""
    admin, channel = admin_for({0: "restarting", 1: "serving"})
    request = admin_request(b"DELETE", b"/identities/alice")
    render(admin, request)
    assert [(p, m, u) for p, m, u, _ in channel.asked] == [
        ("w1.sock", b"DELETE", b"/identities/alice")
    ]
    channel.asked[0][3].callback(Reply(200, {}, b'{"identity": "alice", "disconnected": 3}'))
    assert answer(request) == (200, {"identity": "alice", "disconnected": 3})

"""``workers: N``: a supervisor, real worker processes on one port, a real redis-server.

See heartbeatd/daemon/workers.py and docs/deployment.md#workers.  Every worker pid a test
learns from the log is checked gone (or killed) before the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon import Daemon, RawClient, run_twistd
from helpers import Peer, make_config
from redis_server import RedisServer
from test_admin import ADMIN, http
from test_cluster import Client
from test_sdnotify import messages
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from heartbeatd.config import ConfigError, parse_config
from heartbeatd.daemon.workers import (
    ADMIN_FD,
    LISTEN_FD,
    STATUS_FD,
    Supervisor,
    WorkerFactory,
    WorkerProcess,
)

ALL_READY = re.compile(r"heartbeatd is ready: (\d+) workers serving \(supervisor pid (\d+)\)")
STARTED = re.compile(r"Worker (\d+) started \(pid (\d+)\)")


# -- the configuration ---------------------------------------------------------------------


def test_workers_default_to_one_process() -> None:
    assert parse_config({}).workers == 1


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"workers": 2}, "workers: 2 is not allowed without cluster.redis; expected 1, or set"),
        ({"workers": 0}, "workers: 0 is not allowed; expected an integer 1..256"),
        ({"workers": "x"}, "workers: 'x' is not allowed; expected an integer 1..256"),
        (
            {"workers": 2, "listen": "unix:/tmp/x.sock", "cluster": {"redis": "redis://h:1/0"}},
            "listen: 'unix:/tmp/x.sock' is not allowed with workers: 2; expected a tcp:",
        ),
        (
            {"workers": 3, "cluster": {"redis": "redis://h:1/0", "node_id": "n" * 63}},
            "cluster.node_id: '" + "n" * 63 + "' is too long for workers: 3; expected at most 61",
        ),
    ],
)
def test_bad_workers_settings_name_key_value_and_what_is_allowed(
    raw: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert any(line.startswith(expected) for line in info.value.errors), info.value.errors


def test_workers_without_redis_stop_twistd_before_anything_listens(tmp_path: Path) -> None:
    # A port we hold: had the daemon tried to listen, it would fail with "address in use".
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        config = tmp_path / "c.yaml"
        port = held.getsockname()[1]
        config.write_text(yaml.safe_dump({"listen": f"tcp:{port}:interface=127.0.0.1"}))
        result = run_twistd("heartbeatd", "--config", str(config), "--workers", "2")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "invalid configuration" in output
    assert "workers: 2 is not allowed without cluster.redis" in output
    assert "listening" not in output and "in use" not in output


# -- real workers ----------------------------------------------------------------------------


def wait_exited(pids: list[int] | set[int], timeout: float, what: str) -> None:
    """Wait for processes we did not start (the supervisor's workers) to exit.

    A pidfd becomes readable when its process ends: an event waited for with a deadline.
    """
    deadline = time.monotonic() + timeout
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue  # gone already
        try:
            remaining = max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([fd], [], [], remaining)
            assert readable, f"timed out waiting for {what} (pid {pid})"
        finally:
            os.close(fd)


@contextlib.contextmanager
def workers(
    tmp_path: Path,
    redis: RedisServer,
    count: int,
    env: dict[str, str] | None = None,
    listen_socket: socket.socket | None = None,
    **extra: Any,
) -> Iterator[Daemon]:
    """A supervisor with ``count`` workers; afterwards no worker it started is left running."""
    config = {
        **extra,
        "workers": count,
        "admin": {"listen": "tcp:0:interface=127.0.0.1", **extra.get("admin", {})},
        "channels": {"client_publish": True},
        "cluster": {"redis": redis.url, "node_id": "wk", "node_timeout": 2.0},
    }
    daemon = Daemon(tmp_path, config, env=env, ready=ALL_READY, listen_socket=listen_socket)
    pids: set[int] = set()
    try:
        with daemon:
            daemon.admin = int(daemon.wait_for(ADMIN).group(1))  # type: ignore[attr-defined]
            yield daemon
    finally:
        pids = {int(m.group(2)) for line in daemon.lines if (m := STARTED.search(line))}
        try:
            wait_exited(pids, 20, "the workers to exit")
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def seen(daemon: Daemon, pattern: str) -> bool:
    """Whether the log (read so far, plus what is ready now) has a line matching ``pattern``."""
    try:
        daemon.wait_for(pattern, timeout=0.05)
    except AssertionError:
        return False
    return True


def worker_pids(daemon: Daemon) -> dict[int, int]:
    """index -> pid of the latest start of each worker, from the supervisor's log so far."""
    found: dict[int, int] = {}
    for line in daemon.lines:
        if m := STARTED.search(line):
            found[int(m.group(1))] = int(m.group(2))
    return found


def nodes_of(daemon: Daemon, clients: list[Client]) -> dict[str, str]:
    """session -> cluster node, from the admin API (worker 0, cluster-wide view)."""
    wanted = {c.session for c in clients}
    # A node writes a new client to Redis on its one command connection; a presence
    # request goes through that same connection, so its answer means the write is done.
    # A worker that has just started may still be linking to Redis: it answers `unavailable`
    # until the link is up (each answer is an event: no sleep).
    deadline = time.monotonic() + 20
    for client in clients:
        while (reply := client.request("presence", {"channel": "sync"}))["type"] != "presence":
            assert reply["error"]["code"] == "unavailable", reply
            assert time.monotonic() < deadline, reply
    # The clients may all be on one worker: the one the supervisor asks (worker 0) must be
    # linked too, or it answers `unavailable` (503), as a busy machine showed.
    for index in worker_pids(daemon):
        daemon.wait_for(rf"Cluster node wk-w{index} registered", timeout=20)
    status, body = http(daemon.admin, "GET", "/clients")  # type: ignore[attr-defined]
    assert status == 200, body
    found = {c["session"]: c["node"] for c in body["clients"]}
    assert wanted <= set(found)
    return found


def test_workers_share_one_port_publish_and_broadcast_reach_all_and_sigterm_drains(
    tmp_path: Path,
) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = str(tmp_path / "notify.sock")
    notify.bind(notify_path)
    notify.settimeout(20)
    clients: list[Client] = []
    with (
        notify,
        RedisServer(tmp_path / "redis") as redis,
        workers(tmp_path, redis, 3, env={"NOTIFY_SOCKET": notify_path}) as daemon,
    ):
        ready = messages(notify, until="READY")[-1]
        assert ready["STATUS"].startswith("3/3 workers serving")
        before = daemon.lines[: next(i for i, x in enumerate(daemon.lines) if ALL_READY.search(x))]
        workers_ready = {re.search(r"\[worker (\d)\] heartbeatd is ready", x) for x in before}
        assert {m.group(1) for m in workers_ready if m} == {"0", "1", "2"}  # all before READY
        # The inherited socket is a plain TCP port: workers accept into the lean transport.
        lean = {re.search(r"\[worker (\d)\] Accepting into the lean TCP", x) for x in before}
        assert {m.group(1) for m in lean if m} == {"0", "1", "2"}
        try:
            # Connections land on different workers: keep connecting until two nodes hold some.
            for _ in range(10):
                clients += [Client(daemon.port) for _ in range(6)]
                sessions = nodes_of(daemon, clients)
                if len(set(sessions.values())) >= 2:
                    break
            nodes = set(sessions.values())
            assert len(nodes) >= 2 and nodes <= {"wk-w0", "wk-w1", "wk-w2"}, nodes

            for client in clients:
                client.request("subscribe", {"channel": "news"})
            status, answer = http(
                daemon.admin,  # type: ignore[attr-defined]
                "POST",
                "/publish",
                {"channel": "news", "data": "hi"},
            )
            assert (status, answer) == (200, {"channel": "news", "offset": 1})
            for client in clients:
                assert client.publications(1) == [(1, "hi")]

            status, answer = http(
                daemon.admin,  # type: ignore[attr-defined]
                "POST",
                "/broadcast",
                {"type": "notice", "data": 7},
            )
            assert status == 200 and answer["nodes"] >= 3
            for client in clients:
                assert client.expect("notice")["data"] == 7

            daemon.process.send_signal(signal.SIGTERM)
            # Each worker drains: its clients are told to go away, then closed.
            for client in clients:
                assert client.expect("goaway")
            assert daemon.process.wait(30) == 0
        finally:
            for client in clients:
                client.close()
        daemon.read_to_end()
        for index in range(3):
            assert f"Worker {index} (pid" in daemon.log
        assert daemon.log.count(") exited: exit status 0") == 3
        assert "All workers stopped" in daemon.log
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", daemon.port), timeout=2).close()


def test_a_killed_worker_is_replaced_sighup_reloads_all_and_orphans_stop(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis, workers(tmp_path, redis, 2) as daemon:
        victim = worker_pids(daemon)[1]
        os.kill(victim, signal.SIGKILL)
        daemon.wait_for(rf"Worker 1 \(pid {victim}\) exited unexpectedly \(killed by signal 9\)")
        replaced = daemon.wait_for(r"Worker 1 \(pid (\d+)\) serving again")
        assert int(replaced.group(1)) != victim
        # The port never stopped serving, and the new worker takes connections too.
        for _ in range(20):
            with RawClient(daemon.port) as raw:
                assert raw.recv()["type"] == "hello"

        config = yaml.safe_load(daemon.config_path.read_text())
        config["heartbeat"] = {"interval": 4, "timeout": 12}
        daemon.config_path.write_text(yaml.safe_dump(config))
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for("Reload done in every worker")
        for index in range(2):
            daemon.wait_for(rf"\[worker {index}\] Configuration reloaded .*heartbeat.interval")

        # A supervisor that dies without a word: its workers see their stdin close and stop.
        pids = list(worker_pids(daemon).values())
        daemon.process.kill()
        daemon.process.wait(10)
        wait_exited(pids, 20, "orphaned workers to stop")


def test_a_full_worker_stops_accepting_so_another_takes_the_client(tmp_path: Path) -> None:
    with (
        RedisServer(tmp_path / "redis") as redis,
        # The clients stay silent until all are in: on a loaded machine that took longer than
        # first_frame_timeout (10 s), and the first ones were closed under the test.
        workers(
            tmp_path, redis, 2, limits={"max_connections": 20, "first_frame_timeout": 0}
        ) as daemon,
    ):
        clients: list[Client] = []
        try:
            # One at a time, each waiting for its hello, until both workers paused (at 18 of
            # 20, or 19-20 when the accept loop took one more): none is ever refused.
            while not all(seen(daemon, rf"\[worker {i}\] Worker full") for i in range(2)):
                assert len(clients) < 40, "both workers should have paused by now"
                clients.append(Client(daemon.port))
            held = list(nodes_of(daemon, clients).values())
            assert held.count("wk-w0") + held.count("wk-w1") == len(clients) >= 36
            assert max(held.count("wk-w0"), held.count("wk-w1")) <= 20
        finally:
            for client in clients:
                client.close()
        daemon.wait_for(r"\[worker \d\] Worker accepting again")


class _AcceptingPort:
    """What a worker's factory touches of its listening port."""

    numberAccepts = 500  # what Twisted's accept loop grows to under a long ramp
    reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


def test_a_worker_keeps_the_accept_batch_within_its_pause_margin() -> None:
    factory = WorkerFactory(make_config(limits={"max_connections": 1000}), clock=Clock())
    port = _AcceptingPort()
    factory.service = type("Service", (), {"port": port})()
    peers = [Peer(factory, 40000 + i) for i in range(factory.pause_at() - 1)]
    # The loop that runs on after the pause takes at most one batch (+20 as it grows).
    assert port.numberAccepts == factory.ACCEPT_BATCH
    assert factory.max_connections - factory.pause_at() >= factory.ACCEPT_BATCH + 20
    assert port.reading
    peers.append(Peer(factory, 39999))
    assert not port.reading and len(factory.clients) == factory.pause_at()
    for peer in peers[: factory.pause_at() - factory.resume_below() + 1]:
        peer.disconnect()
    assert port.reading


class _FakeProcessReactor(Clock):
    """A Clock that records spawnProcess calls and hands each a pid (no process is started)."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[WorkerProcess, dict[int, Any]]] = []

    def spawnProcess(self, proto: Any, executable: str, argv: Any, env: Any, childFDs: Any) -> Any:
        transport = StringTransport()
        transport.pid = 1000 + len(self.spawned)  # type: ignore[attr-defined]
        proto.makeConnection(transport)
        self.spawned.append((proto, childFDs))
        return transport


class _Port:
    closed = False

    def fileno(self) -> int:
        return 42

    def stopListening(self) -> None:
        self.closed = True


def test_a_crash_loop_backs_off_and_a_stable_worker_starts_afresh() -> None:
    config = parse_config(
        {"workers": 2, "cluster": {"redis": "redis://127.0.0.1:1/0", "node_id": "n"}}
    )
    reactor = _FakeProcessReactor()
    supervisor = Supervisor(config, "c.yaml", {}, reactor)
    supervisor._policy = lambda attempt: 0.5 * 2**attempt  # no jitter: exact delays
    supervisor.port = port = _Port()  # type: ignore[assignment]
    supervisor._spawn(0)
    supervisor._spawn(1)
    first, fds = reactor.spawned[1]
    assert fds[LISTEN_FD] == 42 and ADMIN_FD not in fds
    crash = Failure(ProcessTerminated(exitCode=1))
    delays = []
    worker = first
    for _ in range(4):  # dies at once, every time: 0.5, 1, 2, 4 s
        before = len(reactor.spawned)
        worker.processEnded(crash)
        delay = reactor.getDelayedCalls()[0].getTime() - reactor.seconds()
        delays.append(delay)
        reactor.advance(delay)
        assert len(reactor.spawned) == before + 1
        worker = reactor.spawned[-1][0]
        assert worker.index == 1 and supervisor.workers[1] is worker
    assert delays == [0.5, 1.0, 2.0, 4.0]
    # A worker that served for STABLE_AFTER seconds before dying is replaced at once again.
    worker.childDataReceived(STATUS_FD, b'{"READY": 1, "STATUS": "serving 0 clients"}\n')
    reactor.advance(Supervisor.STABLE_AFTER)
    worker.processEnded(crash)
    assert reactor.getDelayedCalls()[0].getTime() - reactor.seconds() == 0.5
    assert supervisor.restarts == 5
    # Stopping cancels the pending replacement and asks every live worker to stop.
    d = supervisor.stopService()
    assert not reactor.getDelayedCalls()[1:] and len(supervisor.workers) == 1
    zero = supervisor.workers[0]
    assert zero.transport.value() == b"stop\n"  # type: ignore[attr-defined]
    zero.processEnded(Failure(ProcessDone(0)))
    assert d.called and port.closed


def test_workers_serve_a_socket_systemd_passed_to_the_supervisor(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        with (
            RedisServer(tmp_path / "redis") as redis,
            workers(
                tmp_path,
                redis,
                2,
                listen="systemd:domain=INET:index=0",
                listen_socket=listener,
                log={"format": "json"},
            ) as daemon,
        ):
            assert daemon.port == port
            # Worker events come out as the supervisor's JSON lines, with the worker's fields.
            line = daemon.wait_for(r'"text": "\[worker 1\] heartbeatd is ready').string
            record = json.loads(line)
            assert record["worker"] == 1 and record["worker_namespace"].startswith("heartbeatd")
            assert record["level"] == "info" and record["worker_pid"] > 0
            for _ in range(10):
                with RawClient(port) as raw:
                    assert raw.recv()["type"] == "hello"
            assert daemon.stop() == 0

"""Resumable sessions end to end: the Python client against the real daemon, on real sockets.

The client runs in a subprocess on the real reactor (`session_driver.py`, or a script here);
the subprocess timeout is each test's deadline.  Between them sits a `ChaosProxy` that resets
the connection at random moments (seeded).  The server's handler appends every run to a file
(``n`` and whether it was redelivered), so the test counts handler runs on the server side.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from daemon import Daemon
from session_driver import plan
from tcp_proxy import ChaosProxy

HERE = Path(__file__).resolve().parent

#: The test's handlers: ``work`` records its run, pushes and publishes as asked, answers n.
SESSION_HANDLERS = """
import os

RUNS = os.path.join(os.environ["SESSION_RUNS_DIR"], "runs-%d.log" % os.getpid())


def register(registry):
    fd = os.open(RUNS, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    @registry.handler("work")
    def work(request):
        data = request.data
        again = int(bool(getattr(request, "redelivered", False)))
        os.write(fd, b"%d %d\\n" % (data["n"], again))
        if data.get("push"):
            request.session.send("pushed", data["n"])
        if data.get("pub"):
            return request.server.publish("chaos", data["n"]).addCallback(lambda _: data["n"])
        return data["n"]

    @registry.handler("hang")
    def hang(request):
        from twisted.internet.defer import Deferred

        return Deferred()  # never answered: the request waits for its own timeout
"""


def session_daemon(tmp_path: Path, **config: Any) -> Daemon:
    (tmp_path / "session_handlers.py").write_text(SESSION_HANDLERS)
    runs = tmp_path / "runs"
    runs.mkdir(exist_ok=True)
    env = {"PYTHONPATH": str(tmp_path), "SESSION_RUNS_DIR": str(runs)}
    settings = {"handlers": ["session_handlers"], "heartbeat": {"interval": 1, "timeout": 3}}
    return Daemon(tmp_path, {**settings, **config}, env=env)


def handler_runs(tmp_path: Path) -> list[list[tuple[int, int]]]:
    """Each daemon's handler runs, in the order they ran: (n, redelivered)."""
    out = []
    for log in sorted((tmp_path / "runs").glob("runs-*.log")):
        rows = [line.split() for line in log.read_text().splitlines()]
        out.append([(int(n), int(again)) for n, again in rows])
    return out


def drive(endpoints: list[str], timeout: float = 60, **options: Any) -> dict[str, Any]:
    run = subprocess.run(
        [sys.executable, str(HERE / "session_driver.py"), json.dumps(
            {"endpoints": endpoints, **options}
        )],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def assert_exactly_once(result: dict[str, Any], count: int, seed: int) -> None:
    work = plan(count, seed)
    assert result["outcomes"] == {"ok": count}, result
    assert result["wrong_replies"] == []
    assert result["pushes_exact"], result
    assert result["pushes"] == sum(1 for w in work if w["push"])
    assert result["pubs_exact"] and result["offsets_consecutive"], result
    assert result["pubs"] == sum(1 for w in work if w["pub"])
    assert result["not_recovered"] == [] and result["lost_reasons"] == []
    assert result["unacked_left"] == 0


def test_chaos_every_message_exactly_once_in_order_both_ways(tmp_path: Path) -> None:
    """The issue's chaos test: 10,000 requests one way; their replies, pushes and
    publications the other; the connection reset every 50-500 ms (seeded)."""
    count, seed = 10_000, 18
    with session_daemon(tmp_path) as daemon, ChaosProxy(daemon.port, seed=seed) as proxy:
        proxy.start_chaos()
        result = drive([f"tcp:host=127.0.0.1:port={proxy.port}"], count=count, seed=seed)
        proxy.stop_chaos()
        cuts = proxy.cuts
        assert daemon.stop() == 0
    assert_exactly_once(result, count, seed)
    assert cuts >= 3, cuts  # it was cut, more than once, while the messages flowed
    assert result["events"]["started"] == 1 and result["events"]["resumed"] >= 3, result
    (runs,) = handler_runs(tmp_path)
    assert [n for n, _ in runs] == list(range(count))  # each handler ran once, in order

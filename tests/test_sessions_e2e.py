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

import pytest
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

    @registry.handler("announce")
    def announce(request):
        return request.server.broadcast("announcement", request.data)

    @registry.handler("hang")
    def hang(request):
        from twisted.internet.defer import Deferred

        return Deferred()  # never answered: the request waits for its own timeout
"""


#: For a test whose request hangs: replies (pong included) go back in request order, so a
#: hung handler silences the connection, and a short heartbeat would drop it.
SLOW_HEARTBEAT = {"interval": 10, "timeout": 60}


def session_daemon(tmp_path: Path, **config: Any) -> Daemon:
    (tmp_path / "session_handlers.py").write_text(SESSION_HANDLERS)
    runs = tmp_path / "runs"
    runs.mkdir(exist_ok=True)
    env = {"PYTHONPATH": str(tmp_path), "SESSION_RUNS_DIR": str(runs)}
    settings = {"handlers": ["session_handlers"], "heartbeat": {"interval": 1, "timeout": 3}}
    return Daemon(tmp_path, {**settings, **config}, env=env)


def handler_runs_by_pid(tmp_path: Path) -> dict[int, list[tuple[int, int]]]:
    """Each daemon's handler runs, by its pid, in the order they ran: (n, redelivered)."""
    out = {}
    for log in sorted((tmp_path / "runs").glob("runs-*.log")):
        rows = [line.split() for line in log.read_text().splitlines()]
        out[int(log.stem.split("-")[1])] = [(int(n), int(again)) for n, again in rows]
    return out


def handler_runs(tmp_path: Path) -> list[list[tuple[int, int]]]:
    """Each daemon's handler runs, in the order they ran: (n, redelivered)."""
    out = []
    for log in sorted((tmp_path / "runs").glob("runs-*.log")):
        rows = [line.split() for line in log.read_text().splitlines()]
        out.append([(int(n), int(again)) for n, again in rows])
    return out


def drive(endpoints: list[str], timeout: float = 60, **options: Any) -> dict[str, Any]:
    run = subprocess.run(
        [
            sys.executable,
            str(HERE / "session_driver.py"),
            json.dumps({"endpoints": endpoints, **options}),
        ],
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


@pytest.mark.scenario
def test_chaos_every_message_exactly_once_in_order_both_ways(tmp_path: Path) -> None:
    """The issue's chaos test: 10,000 requests one way; their replies, pushes and
    publications the other; the connection reset every 50-500 ms (seeded)."""
    count, seed = 10_000, 18
    with session_daemon(tmp_path) as daemon, ChaosProxy(daemon.port, seed=seed) as proxy:
        proxy.start_chaos()
        result = drive(
            [f"tcp:host=127.0.0.1:port={proxy.port}"], count=count, seed=seed, min_seconds=3
        )
        proxy.stop_chaos()
        cuts = proxy.cuts
        assert daemon.stop() == 0
    assert_exactly_once(result, count, seed)
    assert cuts >= 6, cuts  # 3 s at least, cut every 50-500 ms
    assert result["events"]["started"] == 1 and result["events"]["resumed"] >= 6, result
    (runs,) = handler_runs(tmp_path)
    assert [n for n, _ in runs] == list(range(count))  # each handler ran once, in order


#: A resumable client that reports, one JSON line at a time, what the application sees while
#: the test takes its session over, then kills and restarts the daemon under it.
LOST_SCRIPT = """
import json, sys
from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred
from heartbeatd.client import ReconnectingClient, SessionLost

def say(obj):
    print(json.dumps(obj), flush=True)

async def main(reactor, port):
    client = ReconnectingClient(
        reactor, f"tcp:host=127.0.0.1:port={port}", resumable=True,
        backoff_initial=0.05, backoff_max=0.2,
    )
    started = []
    def event(e):
        say({"event": e})
        if e["event"] == "started" and started and not started[-1].called:
            started[-1].callback(None)
    client.on_session(event)
    pushes = []
    client.on("pushed", lambda data, conn: pushes.append(data))
    client.start()
    await client.when_connected()
    for phase in ("takeover", "restart"):
        pending = client.request("hang", timeout=30)  # (replies are in order: the last)
        state = client.session.state
        started.append(Deferred())
        say({"phase": phase, "sid": state.sid, "key": state.key, "ack": state.delivered})
        try:
            await pending
            say({"failed": None})
        except SessionLost as e:
            say({"failed": type(e).__name__, "reason": e.reason})
        await started[-1]
        reply = await client.request("work", {"n": 1, "push": True}, timeout=10)
        say({"reply": reply})
    say({"pushes": pushes})
    await client.stop()

task.react(lambda reactor: ensureDeferred(main(reactor, int(sys.argv[1]))))
"""


class Lines:
    """A subprocess's stdout, one JSON line at a time, each wait with a deadline."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        import queue
        import threading

        self.process = process
        self.queue: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                self.queue.put(line)
            self.queue.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def next(self, timeout: float = 20) -> Any:
        line = self.queue.get(timeout=timeout)
        if line is None:
            assert self.process.stderr is not None
            raise AssertionError(f"the client script ended: {self.process.stderr.read()[-3000:]}")
        return json.loads(line)


def test_takeover_and_a_restarted_daemon_lose_the_session_and_the_app_is_told(
    tmp_path: Path,
) -> None:
    from daemon import RawClient

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = session_daemon(tmp_path / "a", heartbeat=SLOW_HEARTBEAT).__enter__()
    port = first.port
    script = subprocess.Popen(
        [sys.executable, "-c", LOST_SCRIPT, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = Lines(script)
    try:
        assert lines.next() == {"event": {"event": "started"}}
        told = lines.next()
        assert told.get("phase") == "takeover", told
        # Someone else resumes the session: the client's live connection is taken over.
        with RawClient(port) as thief:
            assert thief.recv()["type"] == "hello"
            thief.send(
                {
                    "type": "resume",
                    "id": 1,
                    "data": {"session": told["sid"], "key": told["key"], "ack": told["ack"]},
                }
            )
            assert thief.recv()["data"]["resumed"] is True
            assert lines.next() == {
                "event": {"event": "session_lost", "reason": "session_taken_over"}
            }
            assert lines.next() == {"failed": "SessionLost", "reason": "session_taken_over"}
            assert lines.next() == {"event": {"event": "started"}}  # a fresh session
            assert lines.next() == {"reply": 1}
        told = lines.next()
        assert told["phase"] == "restart"
        first.process.kill()  # sessions live in its memory: a restart loses them
        first.process.wait(10)
        listen = f"tcp:{port}:interface=127.0.0.1"
        with session_daemon(tmp_path / "b", listen=listen, heartbeat=SLOW_HEARTBEAT) as second:
            assert lines.next(30) == {
                "event": {"event": "session_lost", "reason": "unknown_session"}
            }
            assert lines.next() == {"failed": "SessionLost", "reason": "unknown_session"}
            assert lines.next() == {"event": {"event": "started"}}
            assert lines.next() == {"reply": 1}
            assert lines.next() == {"pushes": [1, 1]}
            assert script.wait(20) == 0
            assert second.stop() == 0
    finally:
        if script.poll() is None:
            script.kill()
            script.wait(10)
        first.__exit__(None, None, None)


#: A pool whose subscription connection is resumable, through a chaos proxy, while another
#: connection (straight to the daemon) has ``count`` publications made.
POOL_SCRIPT = """
import json, sys
from twisted.internet import task
from twisted.internet.defer import ensureDeferred
from heartbeatd.client import Pool, PoolConfig, connect

async def main(reactor, proxied, direct, count):
    pool = Pool(
        reactor,
        PoolConfig(endpoint=f"tcp:host=127.0.0.1:port={proxied}", min_idle=0,
                   backoff_initial=0.02, backoff_max=0.2),
        resumable=True,
    )
    events, pubs, lost = [], [], []
    pool.on_session(events.append)
    await pool.subscribe(
        "chaos", lambda data, offset, sub: pubs.append(data),
        lambda sub, reason: lost.append(reason),
    )
    publisher = await connect(reactor, f"tcp:host=127.0.0.1:port={direct}")
    for n in range(count):
        await publisher.request("work", {"n": n, "pub": True})
        if n % 20 == 0:
            await task.deferLater(reactor, 0.01, lambda: None)
    deadline = reactor.seconds() + 15
    while len(pubs) < count and reactor.seconds() < deadline:
        await task.deferLater(reactor, 0.05, lambda: None)
    publisher.close()
    await pool.close()
    kinds = [e["event"] for e in events]
    print(json.dumps({"exact": pubs == list(range(count)), "got": len(pubs), "lost": lost,
                      "started": kinds.count("started"), "resumed": kinds.count("resumed"),
                      "session_lost": kinds.count("session_lost")}))

task.react(lambda reactor, *a: ensureDeferred(main(reactor, *map(int, sys.argv[1:]))))
"""


def test_the_pool_subscription_connection_resumes(tmp_path: Path) -> None:
    with session_daemon(tmp_path) as daemon, ChaosProxy(daemon.port, seed=7) as proxy:
        proxy.start_chaos()
        run = subprocess.run(
            [sys.executable, "-c", POOL_SCRIPT, str(proxy.port), str(daemon.port), "2000"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        proxy.stop_chaos()
        cuts = proxy.cuts
        assert daemon.stop() == 0
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["exact"] and result["lost"] == [], result  # every publication, once, in order
    assert result["started"] == 1 and result["session_lost"] == 0, result
    assert result["resumed"] >= 1 and cuts >= 1, (result, cuts)


@pytest.mark.scenario
def test_chaos_on_a_three_node_cluster_with_one_node_killed(tmp_path: Path) -> None:
    """The chaos test again, on three nodes sharing sessions through Redis, each behind its
    own chaos proxy; mid-way the node holding the session is killed (-9)."""
    import contextlib

    from redis_server import RedisServer
    from test_cluster import LINK_UP, NODE_TIMEOUT

    count, seed = 10_000, 33
    (tmp_path / "session_handlers.py").write_text(SESSION_HANDLERS)
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {"PYTHONPATH": str(tmp_path), "SESSION_RUNS_DIR": str(runs)}
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer(tmp_path / "redis"))
        daemons, proxies = [], []
        for i in range(3):
            (tmp_path / f"node{i}").mkdir()
            config = {
                "name": f"node{i}",
                "handlers": ["session_handlers"],
                "heartbeat": {"interval": 1, "timeout": 3},
                # After kill -9 a session's subscription resumes from the offset Redis had
                # last: the history must reach back that far (else a resync says so).
                "channels": {"history_size": 1000},
                "cluster": {
                    "redis": redis.url,
                    "node_id": f"node{i}",
                    "node_timeout": NODE_TIMEOUT,
                },
            }
            daemons.append(stack.enter_context(Daemon(tmp_path / f"node{i}", config, env=env)))
            proxies.append(stack.enter_context(ChaosProxy(daemons[-1].port, seed=seed + i)))
        for daemon in daemons:
            daemon.wait_for(LINK_UP)
        options = {
            "endpoints": [f"tcp:host=127.0.0.1:port={p.port}" for p in proxies],
            "count": count,
            "seed": seed,
            "min_seconds": 4,
            "progress_at": count // 2,
            "window": 64,
            "raw": True,
        }
        driver = subprocess.Popen(
            [sys.executable, str(HERE / "session_driver.py"), json.dumps(options)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        stack.callback(lambda: (driver.poll() is None and driver.kill(), driver.wait(10)))
        for proxy in proxies:
            proxy.start_chaos()
        lines = Lines(driver)
        assert lines.next(60) == {"progress": count // 2}
        # Kill the node the session is on now (the one whose proxy carries a connection).
        holder = max(range(3), key=lambda i: len(proxies[i]._peers))
        daemons[holder].process.kill()
        daemons[holder].process.wait(10)
        result = lines.next(60)
        assert driver.wait(20) == 0
        for proxy in proxies:
            proxy.stop_chaos()
        cuts = sum(p.cuts for p in proxies)
    assert cuts >= 6 and result["events"]["resumed"] >= 6, (cuts, result["events"])
    # What may run twice: only a request run again flagged ``redelivered`` (a node runs a
    # request once Redis holds its receipt, so one the killed node ran is never resent and
    # run again unflagged).
    by_pid = handler_runs_by_pid(tmp_path)
    per_node = list(by_pid.values())
    may_repeat = {n for node_runs in per_node for n, redelivered in node_runs if redelivered}
    # Client side: exactly once and in order, except the pushes and publications of a handler
    # that ran again.
    work = plan(count, seed)
    assert result["outcomes"] == {"ok": count} and result["wrong_replies"] == [], result
    assert result["not_recovered"] == [] and result["lost_reasons"] == [], (
        result["not_recovered"],
        result["events"],
    )
    for got, want in (
        (result["raw_pushes"], [w["n"] for w in work if w["push"]]),
        (result["raw_pubs"], [w["n"] for w in work if w["pub"]]),
    ):
        firsts = list(dict.fromkeys(got))
        if firsts != want:
            at = next(
                (i for i, (a, b) in enumerate(zip(firsts, want, strict=False)) if a != b),
                len(firsts),
            )
            raise AssertionError(
                f"a message was lost or out of order at {at}: got {firsts[at - 3 : at + 6]}, "
                f"want {want[at - 3 : at + 6]}; missing {sorted(set(want) - set(got))[:10]}; "
                f"on the wire {result['wire_pubs']} ending {result['wire_pubs_last']}; "
                f"{result['events']}; a probe publication afterwards: {result['probe']}"
            )
        repeated = {n for n in got if got.count(n) > 1} if len(got) != len(want) else set()
        assert repeated <= may_repeat, (sorted(repeated - may_repeat)[:10], sorted(may_repeat))
    assert result["offsets_consecutive"] and result["unacked_left"] == 0
    # Server side: every request ran, in order on each node, and at most once but for those.
    assert len(per_node) >= 2
    for node_runs in per_node:
        ns = [n for n, redelivered in node_runs if n not in may_repeat]
        assert ns == sorted(ns), "a node ran requests out of order"
    seen = [n for node_runs in per_node for n, _ in node_runs]
    assert sorted(set(seen)) == list(range(count))
    twice = {n for n in seen if seen.count(n) > 1}
    assert twice <= may_repeat, (sorted(twice - may_repeat)[:10], sorted(may_repeat))


def test_cli_watch_resumable_prints_what_was_pushed_while_it_was_cut_off(tmp_path: Path) -> None:
    from daemon import RawClient
    from test_cli import Command

    with (
        session_daemon(tmp_path) as daemon,
        ChaosProxy(daemon.port) as proxy,
        RawClient(daemon.port) as sender,
    ):
        assert sender.recv()["type"] == "hello"
        endpoint = f"tcp:host=127.0.0.1:port={proxy.port}"
        with Command("watch", "--resumable", "-n", "3", endpoint) as watch:
            assert watch.next_line("stderr") == "heartbeat: session started"

            def broadcast(n: int) -> None:
                sender.send({"type": "announce", "id": n, "data": n})
                while sender.recv().get("id") != n:  # (it hears its own broadcast too)
                    pass

            broadcast(1)
            assert json.loads(watch.next_line()) == {"type": "announcement", "data": 1}
            proxy.cut_soon()
            assert "connection lost" in watch.next_line("stderr")  # reconnecting in ...
            broadcast(2)  # while it is cut off, or just back: either way, once
            broadcast(3)
            assert json.loads(watch.next_line()) == {"type": "announcement", "data": 2}
            assert json.loads(watch.next_line()) == {"type": "announcement", "data": 3}
            assert watch.finish() == 0
            assert any(line.startswith("heartbeat: session resumed (") for line in watch.err)
            assert not any("session lost" in line for line in watch.err)
        assert proxy.cuts == 1
        assert daemon.stop() == 0


#: A resumable client and a resumable pool's subscription connection, each stopped cleanly:
#: prints the sessions they held, and how long each stop took.
STOP_SCRIPT = """
import json, sys
from twisted.internet import task
from twisted.internet.defer import ensureDeferred
from heartbeatd.client import Pool, PoolConfig, ReconnectingClient

async def main(reactor, port):
    endpoint = f"tcp:host=127.0.0.1:port={port}"
    client = ReconnectingClient(reactor, endpoint, resumable=True)
    client.start()
    await client.when_connected()
    assert await client.request("work", {"n": 1}, timeout=10) == 1
    held = [(client.session.state.sid, client.session.state.key)]
    began = reactor.seconds()
    await client.stop()
    took = [reactor.seconds() - began]
    pool = Pool(reactor, PoolConfig(endpoint=endpoint, min_idle=0), resumable=True)
    await pool.subscribe("news", lambda data, offset, sub: None)
    state = pool._subscriber.session.state
    held.append((state.sid, state.key))
    began = reactor.seconds()
    await pool.close()
    took.append(reactor.seconds() - began)
    print(json.dumps({"held": held, "took": took, "active": state.active}))

task.react(lambda reactor: ensureDeferred(main(reactor, int(sys.argv[1]))))
"""


def test_a_clean_stop_ends_the_session_on_the_server(tmp_path: Path) -> None:
    """`ReconnectingClient.stop()` and `Pool.close()` send ``session_end`` and wait for its
    answer: the session cannot be resumed afterwards, and holds no slot of the identity."""
    from session_peer import SessionPeer

    with session_daemon(tmp_path) as daemon:
        run = subprocess.run(
            [sys.executable, "-c", STOP_SCRIPT, str(daemon.port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        result = json.loads(run.stdout)
        assert not result["active"], result
        assert all(took < 1.5 for took in result["took"]), result  # answered, not timed out
        for sid, key in result["held"]:
            with SessionPeer(daemon.port) as peer:
                answer = peer.resume(sid, key, ack=0)
                assert answer["data"] == {"resumed": False, "reason": "unknown_session"}, answer
        assert daemon.stop() == 0


#: Run as a script: a resumable client; once its session started it says so and waits for a
#: line on stdin (the test has stopped Redis), then asks ``echo``; it says "unavailable" once
#: a resume was answered so (the test restarts Redis), and prints what it saw at the end.
UNAVAILABLE_DRIVER = """
import json, sys
from twisted.internet import defer, task, threads
from heartbeatd.client import ReconnectingClient

async def main(reactor, endpoint):
    client = ReconnectingClient(reactor, endpoint, resumable=True, backoff_initial=0.05,
                                backoff_max=0.2, session_retry_timeout=20)
    events = []
    client.on_session(events.append)
    client.start()
    await client.when_connected(timeout=10)
    print("started", client.session.state.sid, flush=True)
    await threads.deferToThread(sys.stdin.readline)  # Redis is down now
    reply = client.request("echo", "kept", timeout=20)
    told = task.LoopingCall(lambda: client.session.unavailable and told.stop())
    await told.start(0.02)
    print("unavailable", flush=True)
    answer = await reply
    session = client.session
    print(json.dumps({"reply": answer, "events": events, "unavailable": session.unavailable,
                      "lost": session.lost, "sid": session.state.sid}), flush=True)
    await client.stop()

task.react(lambda r: defer.ensureDeferred(main(r, sys.argv[1])))
"""


def line_within(stream: Any, seconds: float) -> str:
    """The next line of a subprocess's output, or "" if none came within ``seconds``."""
    import select

    readable, _, _ = select.select([stream], [], [], seconds)
    return stream.readline() if readable else ""


def test_a_session_survives_its_redis_being_stopped_and_restarted(tmp_path: Path) -> None:
    """The Python client against a cluster node whose Redis goes away: the request it makes
    then closes its connection (``unavailable``), its resumes are answered ``unavailable``
    and retried, and once Redis is back (from its snapshot) the same session resumes: no
    ``session_lost``, the request answered once."""
    from redis_server import RedisServer
    from test_cluster import LINK_UP

    with RedisServer(tmp_path / "redis") as redis:
        cluster = {"redis": redis.url, "node_id": "node0"}
        with Daemon(tmp_path, {"cluster": cluster}) as daemon:
            daemon.wait_for(LINK_UP)
            endpoint = f"tcp:host=127.0.0.1:port={daemon.port}"
            with subprocess.Popen(
                [sys.executable, "-c", UNAVAILABLE_DRIVER, endpoint],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ) as driver:
                try:
                    assert driver.stdout is not None and driver.stdin is not None
                    started, sid = line_within(driver.stdout, 15).split()
                    assert started == "started"
                    assert redis.cli("SAVE") == "OK"  # the session, for the restart
                    redis.stop()
                    driver.stdin.write("go\n")
                    driver.stdin.flush()
                    assert line_within(driver.stdout, 15) == "unavailable\n"
                    redis.start()
                    out, err = driver.communicate(timeout=30)
                finally:
                    if driver.poll() is None:
                        driver.kill()
                assert driver.returncode == 0, err[-3000:]
    result = json.loads(out.splitlines()[-1])
    assert result["reply"] == "kept"
    assert result["events"] == [{"event": "started"}, {"event": "resumed", "replayed": 0}]
    assert result["unavailable"] >= 1 and result["lost"] == 0 and result["sid"] == sid

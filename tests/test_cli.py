"""The ``heartbeat`` command: usage errors, exit codes, Ctrl-C, watch across a restart, admin.

Argument errors run in-process (they fail before the reactor starts); name resolution is
driven on a MemoryReactorClock (no DNS query leaves the machine); the rest runs the real
console script against a real daemon on loopback.
"""

from __future__ import annotations

import io
import json
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon
from helpers import parse_frames
from test_admin import ADMIN, http
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectionDone, DNSLookupError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from heartbeatd.client import RequestTimeout
from heartbeatd.client._admin_cli import broadcast_summary
from heartbeatd.client.cli import Interrupt, main, parse_args, run

HEARTBEAT = str(Path(sys.executable).parent / "heartbeat")


# -- arguments, in-process -------------------------------------------------------------------


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("heartbeat: "), err  # one line
    return err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["ping", "nonsense"], "invalid endpoint 'nonsense'; expected host:port"),
        (["ping", "127.0.0.1:99999"], "invalid port '99999' in '127.0.0.1:99999'"),
        (["ping", "127.0.0.1:0"], "invalid port '0'"),
        (["ping", "tcp:host=x:port=abc"], "invalid endpoint 'tcp:host=x:port=abc'"),
        (["ping", "nope:1:2:3"], "invalid endpoint 'nope:1:2:3'"),
        (["ping", "tcp:host=127.0.0.1"], "invalid endpoint 'tcp:host=127.0.0.1': missing port=..."),
        (["ping", "tcp:port=9000"], "invalid endpoint 'tcp:port=9000': missing host=..."),
        (
            ["ping", "xyz:foo=bar"],
            "invalid endpoint 'xyz:foo=bar': unknown endpoint type 'xyz'; expected host:port or "
            "one of ",
        ),
        (["clients", "--admin", "ftp://x"], "expected http://HOST:PORT or HOST:PORT"),
        (["clients", "--admin", "127.0.0.1:abc"], "invalid port in --admin URL"),
        (["request", "127.0.0.1:1", "echo", "{bad"], "'{bad' is not valid JSON"),
        (["ping", "127.0.0.1:1", "-c", "-1"], "argument -c/--count"),
        (["ping", "127.0.0.1:1", "--timeout", "0"], "is not a number > 0"),
        (["ping"], "required: ENDPOINT"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "required: COMMAND"),
        (["send", "s1", "t", "x"], "'x' is not valid JSON"),
    ],
)
def test_usage_errors_are_one_line_exit_2(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert expected in usage_error(argv, capsys)


def test_endpoint_errors_after_parsing_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert "invalid endpoint 'tcp:host=x'" in usage_error(["ping", "tcp:host=x"], capsys)
    assert "missing port=..." in usage_error(["watch", "tcp:host=x"], capsys)


def test_options_after_the_subcommand_and_before_it() -> None:
    after = parse_args(["request", "127.0.0.1:9000", "echo", "--timeout", "1", "--framing", "seed"])
    before = parse_args(["--timeout", "2", "request", "127.0.0.1:9000", "echo"])
    default = parse_args(["ping", "127.0.0.1:9000"])
    assert (after.timeout, after.framing) == (1.0, "seed")
    assert (before.timeout, before.framing) == (2.0, "int32")
    assert (default.timeout, default.count, default.interval) == (5.0, 4, 1.0)


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert re.fullmatch(r"heartbeat \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for word in ("ping", "request", "watch", "subscribe", "publish", "presence", "clients", "kick"):
        assert word in text
    assert "exit status:" in text and "3    could not connect" in text
    with pytest.raises(SystemExit):
        main(["watch", "--help"])
    text = capsys.readouterr().out
    assert "--exit-on-goaway" in text and "exit status:" in text and "--timeout" in text
    assert "--tls-hostname NAME" in text and "--tls-ca FILE" in text


# -- connecting, in-process on a MemoryReactorClock --------------------------------------------


def start(argv: list[str]) -> tuple[MemoryReactorClock, Any, io.StringIO, io.StringIO, Any]:
    reactor = MemoryReactorClock()
    out, err = io.StringIO(), io.StringIO()
    result: list[Any] = []
    ensureDeferred(run(reactor, parse_args(argv), out, err, Interrupt())).addBoth(result.append)
    return reactor, result, out, err, reactor.tcpClients


def test_unresolvable_host_is_exit_3_in_one_line() -> None:
    reactor, result, _out, err, attempts = start(["ping", "no-such-host.invalid:9000"])
    ((host, port, factory, _timeout, _bind),) = attempts
    assert (host, port) == ("no-such-host.invalid", 9000)
    reason = Failure(DNSLookupError("address 'no-such-host.invalid' not found"))
    factory.clientConnectionFailed(reactor.connectors[0], reason)
    assert result == [3]
    assert err.getvalue().count("\n") == 1
    assert err.getvalue().startswith("heartbeat: cannot resolve host of 'no-such-host.invalid'")


def test_connect_deadline_is_exit_4() -> None:
    reactor, result, _out, err, _attempts = start(["ping", "127.0.0.1:9", "--timeout", "1"])
    reactor.advance(1.9)
    assert result == []
    reactor.advance(0.2)
    assert result == [4] and "timed out connecting to 127.0.0.1:9" in err.getvalue()


HELLO = {"type": "hello", "data": {"session": "s1", "heartbeat": {"interval": 10, "timeout": 30}}}


def frame(obj: Any) -> bytes:
    body = json.dumps(obj).encode()
    return len(body).to_bytes(4, "big") + body


def test_a_lost_connection_is_not_cannot_reach() -> None:
    _reactor, result, _out, err, attempts = start(["watch", "127.0.0.1:9000"])
    ((_h, _p, factory, _t, _b),) = attempts
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(frame(HELLO))
    protocol.dataReceived(frame({"type": "news", "data": 1}))
    protocol.connectionLost(Failure(ConnectionResetError("reset by peer")))
    assert result == [3]
    assert "connection to 127.0.0.1:9000 lost" in err.getvalue()
    assert "cannot reach" not in err.getvalue()


def test_interrupt_until_success_failure_and_ctrl_c() -> None:
    interrupt = Interrupt()
    work: Deferred[int] = Deferred()
    outcome: list[Any] = []
    interrupt.until(work).addBoth(outcome.append)
    work.callback(7)
    assert outcome == [(False, 7)]

    failing: Deferred[int] = Deferred()
    interrupt.until(failing).addBoth(outcome.append)
    failing.errback(RequestTimeout("late"))  # a failure is raised at once, not swallowed
    assert isinstance(outcome[-1], Failure) and outcome[-1].check(RequestTimeout)

    cancelled: list[bool] = []
    pending: Deferred[int] = Deferred(lambda d: cancelled.append(True))
    interrupt.until(pending).addBoth(outcome.append)
    interrupt.fire()
    assert outcome[-1] == (True, None) and cancelled == [True]
    interrupt.until(Deferred()).addBoth(outcome.append)  # after Ctrl-C: at once
    assert outcome[-1] == (True, None)


def test_ctrl_c_during_a_request_is_130() -> None:
    reactor = MemoryReactorClock()
    out, err = io.StringIO(), io.StringIO()
    interrupt = Interrupt()
    result: list[Any] = []
    args = parse_args(["request", "127.0.0.1:9000", "echo"])
    ensureDeferred(run(reactor, args, out, err, interrupt)).addBoth(result.append)
    ((_h, _p, factory, _t, _b),) = reactor.tcpClients
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(frame(HELLO))
    assert result == []  # the request is in flight
    interrupt.fire()
    assert result == [130] and err.getvalue() == "heartbeat: interrupted\n"


def test_subscribe_gives_up_on_unavailable_after_reconnect_timeout() -> None:
    """A re-subscribe answered ``unavailable`` is retried, but not for ever: for
    ``--reconnect-timeout`` seconds from the first such answer (like the library's
    ``subscribe_retry_timeout``), the last try at the deadline; then exit 1."""
    reactor, result, _out, err, attempts = start(
        ["subscribe", "127.0.0.1:9000", "news", "--reconnect-timeout", "3"]
    )

    def accept() -> tuple[Any, StringTransport]:
        protocol = attempts[-1][2].buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(frame(HELLO))
        return protocol, transport

    def answer(protocol: Any, transport: StringTransport, **reply: Any) -> None:
        (ask,) = parse_frames(transport.value())
        transport.clear()
        assert ask["type"] == "subscribe"
        protocol.dataReceived(frame({"type": "subscribe", "id": ask["id"], **reply}))

    protocol, transport = accept()
    answer(protocol, transport, data={"epoch": "e", "offset": 0})
    protocol.connectionLost(Failure(ConnectionDone("gone")))
    reactor.advance(0)  # reconnects at once (no goaway window)
    protocol, transport = accept()
    unavailable = {"code": "unavailable", "message": "the broker is down"}
    tries = 0
    while not result:
        for ask in parse_frames(transport.value()):
            assert ask["type"] == "subscribe"
            protocol.dataReceived(frame({"type": "error", "id": ask["id"], "error": unavailable}))
            tries += 1
        transport.clear()
        if not result:
            reactor.advance(0.5)
        assert reactor.seconds() < 10, err.getvalue()  # before the bound: for ever
    assert result == [1] and reactor.seconds() == 3
    assert tries == 4  # at 0, 0.5, 1.5 (the pause doubles) and 3 (the deadline, not 3.5)
    last = err.getvalue().splitlines()[-1]
    assert last == (
        "heartbeat: server error unavailable: the broker is down (every subscribe to news "
        "for 3s; --reconnect-timeout is 3s)"
    )


# -- the real command against a real daemon -------------------------------------------------------


class Command:
    """``heartbeat ...`` as a subprocess whose output lines are read with deadlines."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [HEARTBEAT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        # One queue per stream: lines of stdout and stderr have no order between them.
        self.queues: dict[str, queue.Queue[str | None]] = {
            "stdout": queue.Queue(),
            "stderr": queue.Queue(),
        }
        self.out: list[str] = []
        self.err: list[str] = []
        for name in self.queues:
            threading.Thread(target=self._pump, args=(name,), daemon=True).start()

    def _pump(self, name: str) -> None:
        stream = getattr(self.process, name)
        for line in stream:
            self.queues[name].put(line.rstrip("\n"))
        self.queues[name].put(None)

    def next_line(self, stream: str = "stdout", timeout: float = 20) -> str:
        line = self.queues[stream].get(timeout=timeout)
        assert line is not None, f"{stream} ended; stderr so far: {self.err}"
        (self.out if stream == "stdout" else self.err).append(line)
        return line

    def finish(self, timeout: float = 20) -> int:
        code = self.process.wait(timeout)
        for name, lines in (("stdout", self.out), ("stderr", self.err)):
            while (line := self.queues[name].get(timeout=timeout)) is not None:
                lines.append(line)
        return code

    def __enter__(self) -> Command:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


#: The daemon's (debug) log line for an accepted client: the event tests wait for.
CONNECTED = r"Client \S+ connected from"


ADMIN_ON = {
    "listen": "tcp:0:interface=127.0.0.1",
    "admin": {"listen": "tcp:0:interface=127.0.0.1"},
    "log": {"level": "debug"},  # for the CONNECTED line
}


def test_ping_stopped_with_ctrl_c_prints_the_summary_and_exits_0(tmp_path: Path) -> None:
    with (
        Daemon(tmp_path, {}) as daemon,
        Command("ping", f"127.0.0.1:{daemon.port}", "-c", "1000", "-i", "0.05") as ping,
    ):
        assert ping.next_line().startswith(f"pong from 127.0.0.1:{daemon.port}: seq=1 ")
        ping.process.send_signal(signal.SIGINT)
        assert ping.finish() == 0
        assert ping.out[-3] == f"--- 127.0.0.1:{daemon.port} ping statistics ---"
        assert re.match(r"\d+ pings sent, \d+ pongs received, 0% loss", ping.out[-2])
        assert ping.out[-1].startswith("rtt min/avg/max/mdev = ")
        assert ping.err == []
        assert daemon.stop() == 0


def test_watch_follows_a_restart_through_goaway(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    config = {**ADMIN_ON, "shutdown": {"drain_timeout": 10, "reconnect_after": 1}}
    with Daemon(tmp_path / "a", config) as first:
        port = first.port
        with Command("watch", f"127.0.0.1:{port}") as watch:
            first.wait_for(CONNECTED)
            first.process.send_signal(signal.SIGTERM)
            goaway = json.loads(watch.next_line())
            assert goaway == {
                "type": "goaway",
                "data": {"reason": "shutdown", "reconnect_after": 1},
            }
            assert "reconnecting in" in watch.next_line("stderr")
            assert first.process.wait(20) == 0  # the watcher left: no need for the full drain

            listen = f"tcp:{port}:interface=127.0.0.1"
            with Daemon(tmp_path / "b", {**config, "listen": listen}) as second:
                admin = int(second.wait_for(ADMIN).group(1))
                assert watch.next_line("stderr").startswith(
                    f"heartbeat: reconnected to 127.0.0.1:{port}"
                )
                assert http(admin, "POST", "/broadcast", {"type": "news", "data": 2})[1] == {
                    "sent": 1
                }
                assert json.loads(watch.next_line()) == {"type": "news", "data": 2}
                watch.process.send_signal(signal.SIGINT)
                assert watch.finish() == 0
                assert second.stop() == 0


def test_watch_exit_on_goaway(tmp_path: Path) -> None:
    config = {**ADMIN_ON, "shutdown": {"drain_timeout": 10, "reconnect_after": 3}}
    with (
        Daemon(tmp_path, config) as daemon,
        Command("watch", "--exit-on-goaway", f"127.0.0.1:{daemon.port}") as watch,
    ):
        daemon.wait_for(CONNECTED)
        daemon.process.send_signal(signal.SIGTERM)
        assert watch.finish() == 0
        assert json.loads(watch.out[0])["type"] == "goaway"
        assert daemon.process.wait(20) == 0


def test_watch_when_the_server_dies(tmp_path: Path) -> None:
    with (
        Daemon(tmp_path, ADMIN_ON) as daemon,
        Command("watch", f"127.0.0.1:{daemon.port}") as watch,
    ):
        daemon.wait_for(CONNECTED)
        # The server logs the accept before the client has read its hello: wait until watch
        # prints a push, so the kill lands after the handshake (else "cannot reach").
        admin = int(daemon.wait_for(ADMIN).group(1))
        assert http(admin, "POST", "/broadcast", {"type": "news", "data": 1})[1] == {"sent": 1}
        assert json.loads(watch.next_line())["type"] == "news"
        daemon.process.kill()
        assert watch.finish() == 3
        (line,) = watch.err
        assert line.startswith(f"heartbeat: connection to 127.0.0.1:{daemon.port} lost")


def test_admin_timeout_is_exit_4_and_admin_takes_host_port() -> None:
    """A listener that accepts and never answers: the deadline, not "the response failed"."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        result = subprocess.run(
            [HEARTBEAT, "clients", "--admin", f"127.0.0.1:{port}", "--timeout", "0.5"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 4
    assert result.stderr == (
        f"heartbeat: no answer from http://127.0.0.1:{port}/clients within 0.5s\n"
    )


def test_admin_subcommands(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("tok\n")
    config = {
        "admin": {"listen": "tcp:0:interface=127.0.0.1", "token": "tok"},
        "log": {"level": "debug"},  # for the CONNECTED line
    }
    with Daemon(tmp_path, config) as daemon, Command("watch", f"127.0.0.1:{daemon.port}") as watch:
        url = f"http://127.0.0.1:{int(daemon.wait_for(ADMIN).group(1))}"

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [HEARTBEAT, *args, "--admin", url, "--token-file", str(token)],
                capture_output=True,
                text=True,
                timeout=30,
            )

        daemon.wait_for(CONNECTED)
        assert "1 client(s)" in cli("clients").stdout
        listing = json.loads(cli("clients", "--json").stdout)
        session = listing["clients"][0]["session"]
        table = cli("clients").stdout.splitlines()
        assert table[0].split()[:2] == ["SESSION", "PEER"] and table[1].startswith(session)

        sent = cli("send", session, "note", '{"n": 1}')
        assert (sent.returncode, sent.stdout) == (0, f"sent note to {session}\n")
        assert json.loads(watch.next_line()) == {"type": "note", "data": {"n": 1}}
        assert cli("broadcast", "all", '"x"').stdout == "sent all to 1 client(s)\n"
        assert json.loads(watch.next_line()) == {"type": "all", "data": "x"}

        missing = cli("send", "nobody", "note")
        assert missing.returncode == 1 and "404" in missing.stderr and "nobody" in missing.stderr

        kicked = cli("kick", session)
        assert (kicked.returncode, kicked.stdout) == (0, f"disconnected {session}\n")
        assert watch.finish() == 3  # kicked: the watcher's connection was lost
        evictions = cli("clients", "--evictions", "1").stdout
        assert "admin" in evictions and session in evictions

        unauthenticated = subprocess.run(
            [HEARTBEAT, "clients", "--admin", url], capture_output=True, text=True, timeout=30
        )
        assert unauthenticated.returncode == 1
        assert (
            unauthenticated.stderr.count("\n") == 1
            and "give --token-file" in unauthenticated.stderr
        )
        assert daemon.stop() == 0


def test_the_cli_loads_neither_server_nor_daemon_nor_yaml() -> None:
    code = (
        "import sys, heartbeatd.client.cli, heartbeatd.client._admin_cli; "
        "bad = [m for m in sys.modules if m.startswith(('heartbeatd.server', "
        "'heartbeatd.daemon', 'yaml'))]; print(bad)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_a_closed_output_pipe_ends_the_command_quietly(tmp_path: Path) -> None:
    with Daemon(tmp_path, {}) as daemon:
        ping = subprocess.Popen(
            [HEARTBEAT, "ping", f"127.0.0.1:{daemon.port}", "-c", "0", "-i", "0.01"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert ping.stdout is not None and ping.stderr is not None
            assert ping.stdout.readline().startswith("pong from")  # like `| head -1`
            ping.stdout.close()
            assert ping.wait(20) == 0
            assert ping.stderr.read() == ""  # no traceback, no "Exception ignored"
        finally:
            if ping.poll() is None:
                ping.kill()
                ping.wait(10)
        assert daemon.stop() == 0


def test_broadcast_summary_counts_clients_on_one_daemon_and_nodes_in_a_cluster() -> None:
    # One daemon answers {"sent": clients}; a cluster's broadcast goes out through the
    # broker and answers {"nodes": N}, without a client count (docs/admin.md).
    assert broadcast_summary("all", {"sent": 3}) == "sent all to 3 client(s)"
    assert broadcast_summary("all", {"nodes": 2}) == "sent all to every client of 2 node(s)"


# -- request --no-reply ------------------------------------------------------------------------


def test_request_no_reply_sends_without_an_id_and_exits_0_once_written() -> None:
    reactor, result, out, err, _attempts = start(
        ["request", "127.0.0.1:9000", "announce", '"hi"', "--no-reply"]
    )
    ((_h, _p, factory, _t, _b),) = reactor.tcpClients
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(frame(HELLO))
    (length,) = [int.from_bytes(transport.value()[:4], "big")]
    assert json.loads(transport.value()[4 : 4 + length]) == {"type": "announce", "data": "hi"}
    assert transport.disconnecting  # closing: Twisted writes what is buffered first
    assert result == []
    protocol.connectionLost(Failure(ConnectionDone()))
    assert result == [0] and out.getvalue() == err.getvalue() == ""


def test_request_no_reply_that_cannot_be_written_in_time_is_exit_4() -> None:
    reactor, result, _out, err, _attempts = start(
        ["request", "127.0.0.1:9000", "announce", "--no-reply", "--timeout", "2"]
    )
    ((_h, _p, factory, _t, _b),) = reactor.tcpClients
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(frame(HELLO))
    assert json.loads(transport.value()[4:]) == {"type": "announce"}
    reactor.advance(2)  # the peer never reads: the close never completes
    assert result == [4]
    assert err.getvalue() == "heartbeat: could not write the message to 127.0.0.1:9000 within 2s\n"


def test_request_no_reply_to_a_handler_that_answers_nothing(tmp_path: Path) -> None:
    from docs_examples import example

    (tmp_path / "myapp_handlers.py").write_text(example("readme-handler"))
    config = {"handlers": ["myapp_handlers"], "log": {"level": "debug"}}
    with (
        Daemon(tmp_path, config, env={"PYTHONPATH": str(tmp_path)}) as daemon,
        Command("watch", f"127.0.0.1:{daemon.port}") as watch,
    ):
        daemon.wait_for(CONNECTED)
        target = f"127.0.0.1:{daemon.port}"
        sent = subprocess.run(
            [HEARTBEAT, "request", "--no-reply", target, "announce", '"hello all"'],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (sent.returncode, sent.stdout, sent.stderr) == (0, "", "")
        assert json.loads(watch.next_line()) == {"type": "announcement", "data": "hello all"}
        # Without --no-reply, the same request waits for a reply that never comes.
        waited = subprocess.run(
            [HEARTBEAT, "request", target, "announce", "--timeout", "0.5"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert waited.returncode == 4 and "no reply within 0.5s" in waited.stderr
        watch.process.send_signal(signal.SIGINT)
        assert watch.finish() == 0
        assert daemon.stop() == 0

"""End to end: the real ``twistd -n heartbeatd`` on an ephemeral port, over real sockets."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

import pytest
from daemon import Daemon, RawClient, run_twistd
from docs_examples import example


def test_hello_echo_ping_and_errors(tmp_path: Path) -> None:
    with Daemon(tmp_path, {"name": "e2e"}) as daemon, RawClient(daemon.port) as client:
        hello = client.recv()
        assert hello["type"] == "hello" and hello["data"]["server"] == "e2e"
        client.send({"type": "echo", "id": 1, "data": {"k": "é"}})
        assert client.recv() == {"type": "echo", "id": 1, "data": {"k": "é"}}
        client.send({"type": "ping", "id": "p"})
        assert client.recv() == {"type": "pong", "id": "p"}
        client.send({"type": "nope", "id": 2})
        assert client.recv()["error"]["code"] == "unknown_type"
        client.send({"type": "echo", "id": 3})
        assert client.recv()["id"] == 3
        assert daemon.stop() == 0


def test_silent_client_is_pinged_then_evicted(tmp_path: Path) -> None:
    config = {"heartbeat": {"interval": 0.2, "timeout": 0.5}}
    with Daemon(tmp_path, config) as daemon, RawClient(daemon.port) as silent:
        assert silent.recv()["type"] == "hello"
        received = []
        while (message := silent.recv()) is not None:  # until the server drops us
            received.append(message)
        assert received and all(m["type"] == "ping" for m in received)
        daemon.wait_for(r"Closing client \w+ \(127\.0\.0\.1:\d+\): heartbeat_timeout")
        assert daemon.stop() == 0


def test_answering_client_is_kept(tmp_path: Path) -> None:
    config = {"heartbeat": {"interval": 0.1, "timeout": 0.3}}
    with Daemon(tmp_path, config) as daemon, RawClient(daemon.port) as client:
        assert client.recv()["type"] == "hello"
        for _ in range(8):  # about a second of heartbeats, each answered
            ping = client.recv()
            assert ping["type"] == "ping"
            client.send({"type": "pong", "id": ping["id"]})
        client.send({"type": "echo", "id": "still-here"})
        message = client.recv()
        while message["type"] == "ping":
            message = client.recv()
        assert message["id"] == "still-here"
        assert daemon.stop() == 0  # reads the log to its end
    # Still connected at the end (shut down, not evicted), and never timed out.
    assert "closing 1 client(s)" in daemon.log
    assert "heartbeat_timeout" not in daemon.log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_closes_clients_and_exits_zero(tmp_path: Path, sig: int) -> None:
    with Daemon(tmp_path, {}) as daemon, RawClient(daemon.port) as client:
        assert client.recv()["type"] == "hello"
        assert daemon.stop(sig) == 0
        goaway = client.recv()
        assert goaway == {"type": "goaway", "data": {"reason": "shutdown", "reconnect_after": 5}}
        assert client.recv() is None  # this client ignored goaway: closed after the drain
        assert "closing 1 client(s)" in daemon.log
        assert f"Received {signal.Signals(sig).name}, shutting down gracefully" in daemon.log


def test_listen_on_the_command_line_overrides_the_file(tmp_path: Path) -> None:
    with Daemon(
        tmp_path, {"listen": "tcp:1:interface=127.0.0.1"}, "--listen", "tcp:0:interface=127.0.0.1"
    ) as daemon:
        assert daemon.port != 1
        assert daemon.stop() == 0


def test_unix_socket_endpoint(tmp_path: Path) -> None:
    path = tmp_path / "hb.sock"
    with Daemon(tmp_path, {"listen": f"unix:{path}"}) as daemon, RawClient(str(path)) as client:
        assert daemon.address == f"unix:{path}"
        assert client.recv()["type"] == "hello"
        client.send({"type": "echo", "id": 1, "data": "over unix"})
        assert client.recv()["data"] == "over unix"
        assert daemon.stop() == 0


def test_systemd_socket_activation(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        config = {"listen": "systemd:domain=INET:index=0"}
        with Daemon(tmp_path, config, listen_socket=listener) as daemon:
            assert daemon.port == port  # the inherited socket, not a new one
            with RawClient(port) as client:
                assert client.recv()["type"] == "hello"
            assert daemon.stop() == 0


def test_bad_config_exits_non_zero_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("heartbeat:\n  interval: -1\n  timeot: 5\n")
    result = run_twistd("heartbeatd", "--config", str(path))
    assert result.returncode != 0
    assert "heartbeat.interval: -1 is not allowed; expected a number > 0" in result.stderr
    assert "heartbeat.timeot: unknown key" in result.stderr
    assert "did you mean 'heartbeat.timeout'?" in result.stderr
    assert "Usage:" not in result.stderr + result.stdout


def test_missing_config_file_and_bad_endpoint(tmp_path: Path) -> None:
    missing = run_twistd("heartbeatd", "--config", str(tmp_path / "absent.yaml"))
    assert missing.returncode != 0 and "absent.yaml' does not exist" in missing.stderr
    bad = run_twistd("heartbeatd", "--listen", "bogus:1")
    assert bad.returncode != 0
    assert "listen: 'bogus:1' is not a valid server endpoint" in bad.stderr


def test_unloadable_handler_module_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("handlers: [no_such_module_here]\n")
    result = run_twistd("heartbeatd", "--config", str(path))
    assert result.returncode != 0
    assert "handlers[0]: cannot load 'no_such_module_here'" in result.stderr


def test_port_in_use_fails_at_once(tmp_path: Path) -> None:
    with Daemon(tmp_path, {}) as first:
        result = run_twistd("heartbeatd", "--listen", f"tcp:{first.port}:interface=127.0.0.1")
        assert result.returncode != 0
        output = result.stdout + result.stderr  # twistd's log has taken over stderr by then
        assert f"cannot listen on 'tcp:{first.port}:interface=127.0.0.1'" in output
        assert "Address already in use" in output
        assert first.stop() == 0


def test_readme_handler_example_works(tmp_path: Path) -> None:
    # tests/test_docs.py checks what it does in memory; here the real daemon loads it by name.
    (tmp_path / "myapp_handlers.py").write_text(example("readme-handler"))
    config = {"handlers": ["myapp_handlers"]}
    env = {"PYTHONPATH": str(tmp_path)}
    with (
        Daemon(tmp_path, config, env=env) as daemon,
        RawClient(daemon.port) as client,
        RawClient(daemon.port) as listener,
    ):
        assert client.recv()["type"] == "hello" and listener.recv()["type"] == "hello"
        client.send({"type": "sum", "id": 1, "data": [1, 2, 3]})
        assert client.recv() == {"type": "sum", "id": 1, "data": 6}
        client.send({"type": "sum", "id": 2, "data": "x"})
        assert client.recv()["error"]["code"] == "bad_request"
        client.send({"type": "announce", "data": "hello all"})
        assert listener.recv() == {"type": "announcement", "data": "hello all"}
        assert client.recv() == {"type": "announcement", "data": "hello all"}
        assert daemon.stop() == 0


def test_drain_lets_in_flight_requests_finish_and_exits_early(tmp_path: Path) -> None:
    (tmp_path / "slow_handlers.py").write_text(SLOW)
    config = {"handlers": ["slow_handlers"], "shutdown": {"drain_timeout": 30}}
    env = {"PYTHONPATH": str(tmp_path)}
    with Daemon(tmp_path, config, env=env) as daemon, RawClient(daemon.port) as client:
        assert client.recv()["type"] == "hello"
        client.send({"type": "slow", "id": 1})
        daemon.wait_for("slow request started")
        daemon.process.send_signal(signal.SIGTERM)
        assert client.recv()["type"] == "goaway"
        assert client.recv() == {"type": "slow", "id": 1, "data": "finished"}
        client.sock.close()  # the client leaves: the daemon need not wait the full 30 s
        assert daemon.process.wait(20) == 0
        daemon.wait_for("Draining: sent goaway to 1 client")


SLOW = """
from twisted.internet import reactor, task
from twisted.logger import Logger

log = Logger()


def register(registry):
    @registry.handler("slow")
    def slow(request):
        log.info("slow request started")
        return task.deferLater(reactor, 0.5, lambda: "finished")
"""


def test_json_log_format_is_one_event_per_line(tmp_path: Path) -> None:
    config = {"log": {"format": "json"}, "heartbeat": {"interval": 0.2, "timeout": 0.5}}
    with Daemon(tmp_path, config) as daemon, RawClient(daemon.port) as silent:
        assert silent.recv()["type"] == "hello"
        while silent.recv() is not None:
            pass
        daemon.wait_for("heartbeat_timeout")
        assert daemon.stop() == 0
    records = [json.loads(line) for line in daemon.lines if line.strip()]
    (eviction,) = [r for r in records if r.get("reason") == "heartbeat_timeout"]
    assert eviction["level"] == "warn"
    assert eviction["namespace"] == "heartbeatd.server.factory"
    assert eviction["peer"].startswith("127.0.0.1:") and len(eviction["session"]) == 16
    assert "heartbeat_timeout" in eviction["text"]
    assert all({"time", "level", "namespace", "text"} <= r.keys() for r in records)


def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    config = {"shutdown": {"drain_timeout": 60}}
    with Daemon(tmp_path, config) as daemon, RawClient(daemon.port) as client:
        assert client.recv()["type"] == "hello"
        daemon.process.send_signal(signal.SIGTERM)
        assert client.recv()["type"] == "goaway"  # draining, and would wait 60 s
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(10) == 128 + signal.SIGTERM


def test_large_pipelined_replies_arrive_whole_and_in_order(tmp_path: Path) -> None:
    """Replies far larger than the socket buffers: the write-through path sends part of each
    at once and queues the rest; order and content must survive, with backpressure on."""
    import threading

    payloads = [chr(ord("a") + i % 26) * (300_000 + i) for i in range(12)]
    with Daemon(tmp_path, {}) as daemon, RawClient(daemon.port, timeout=30) as client:
        assert client.recv()["type"] == "hello"
        sender = threading.Thread(
            target=lambda: [
                client.send({"type": "echo", "id": i, "data": p}) for i, p in enumerate(payloads)
            ]
        )
        sender.start()  # sending and reading at once, or both sides would block
        replies = [client.recv() for _ in payloads]
        sender.join(30)
        assert [r["id"] for r in replies] == list(range(len(payloads)))
        assert all(r["data"] == p for r, p in zip(replies, payloads, strict=True))
        assert daemon.stop() == 0

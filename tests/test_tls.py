"""TLS on real sockets against the real daemon: the documented ssl: listen, tls.* config, mutual
TLS identity, certificate reload on SIGHUP, no plaintext on the wire, config errors.

Certificates are made in the test by a throwaway CA (trustme); clients are the standard
library's ``ssl`` over blocking sockets with timeouts, so nothing here runs a reactor.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trustme
from daemon import Daemon, RawClient

from heartbeatd.config import parse_config
from heartbeatd.daemon.tls import check_tls

HEARTBEAT = str(Path(sys.executable).parent / "heartbeat")
ADMIN = re.compile(r"admin API listening on 127\.0\.0\.1:(\d+)")

WHOAMI = """
def register(registry):
    @registry.handler("whoami")
    def whoami(request):
        return request.session.identity
"""


class Certs:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, as files."""

    def __init__(self, folder: Path, name: str = "ca") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(organization_name=f"heartbeatd test {name}")
        server = self.ca.issue_cert("localhost", "127.0.0.1")
        client = self.ca.issue_cert(
            "alice@example.org", common_name="alice", organization_name="Example"
        )
        self.ca_file = folder / f"{name}.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.cert = folder / f"{name}-server.pem"
        self.key = folder / f"{name}-server.key"
        server.private_key_pem.write_to_path(str(self.key))
        self.cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
        self.server_der = ssl.PEM_cert_to_DER_cert(server.cert_chain_pems[0].bytes().decode())
        self.client_cert = folder / f"{name}-client.pem"
        self.client_key = folder / f"{name}-client.key"
        client.private_key_pem.write_to_path(str(self.client_key))
        self.client_cert.write_bytes(b"".join(blob.bytes() for blob in client.cert_chain_pems))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


def tls_config(certs: Certs, **extra: Any) -> dict[str, Any]:
    return {"tls": {"certificate": str(certs.cert), "private_key": str(certs.key), **extra}}


def client_context(certs: Certs, with_cert: bool = False, *cas: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca_file))
    for extra in cas:
        context.load_verify_locations(cafile=str(extra))
    if with_cert:
        context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    return context


class TlsClient(RawClient):
    """RawClient over TLS: the handshake is done (or has failed) when this returns."""

    def __init__(self, port: int, context: ssl.SSLContext, timeout: float = 10) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")

    def recv(self) -> Any:
        try:
            return super().recv()
        except (ssl.SSLError, OSError):
            return None


def test_the_documented_ssl_listen_completes_a_handshake(tmp_path: Path, certs: Certs) -> None:
    """Fault 5: the hello went out before the handshake and the paused reader never read it."""
    listen = f"ssl:0:interface=127.0.0.1:privateKey={certs.key}:certKey={certs.cert}"
    with Daemon(tmp_path, {"listen": listen}) as daemon:
        with TlsClient(daemon.port, client_context(certs)) as client:
            hello = client.recv()
            assert hello["type"] == "hello"
            client.send({"type": "echo", "id": 1, "data": "over TLS"})
            assert client.recv() == {"type": "echo", "id": 1, "data": "over TLS"}
        assert daemon.stop() == 0


class Proxy:
    """A loopback TCP proxy that keeps every byte it forwards, both ways."""

    def __init__(self, target: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = target
        self.upstream = bytearray()  # client -> server
        self.downstream = bytearray()  # server -> client
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self.threads.append(accept)

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        server = socket.create_connection(("127.0.0.1", self.target), timeout=10)
        self.sockets += [client, server]
        for src, dst, store in ((client, server, self.upstream), (server, client, self.downstream)):
            t = threading.Thread(target=self._pipe, args=(src, dst, store), daemon=True)
            t.start()
            self.threads.append(t)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, store: bytearray) -> None:
        try:
            while data := src.recv(65536):
                store += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()
        for t in self.threads:
            t.join(10)


def test_tls_config_wraps_listen_and_no_plaintext_crosses_the_wire(
    tmp_path: Path, certs: Certs
) -> None:
    """tls.* puts TLS on a plain tcp: listen; with tcp.direct_write on (the default), the
    direct writer must not bypass it: the echoed marker never appears on the wire."""
    marker = "PLAINTEXT-MARKER-" + "x" * 64
    config = {**tls_config(certs), "tcp": {"direct_write": True}}
    with Daemon(tmp_path, config) as daemon:
        proxy = Proxy(daemon.port)
        try:
            with TlsClient(proxy.port, client_context(certs)) as client:
                assert client.recv()["type"] == "hello"
                for n in range(20):  # many small replies: the write-through's favourite case
                    client.send({"type": "echo", "id": n, "data": marker})
                    assert client.recv() == {"type": "echo", "id": n, "data": marker}
        finally:
            proxy.close()
        assert daemon.stop() == 0
    wire = bytes(proxy.upstream) + bytes(proxy.downstream)
    assert len(proxy.downstream) > 20 * len(marker)  # the replies did cross the proxy...
    assert marker.encode() not in wire  # ...encrypted
    assert b'"hello"' not in wire


def test_mutual_tls_identity_reaches_handlers_and_clients_list(
    tmp_path: Path, certs: Certs
) -> None:
    (tmp_path / "whoami_handlers.py").write_text(WHOAMI)
    config = {
        **tls_config(certs, client_ca=str(certs.ca_file)),
        "handlers": ["whoami_handlers"],
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
    }
    with Daemon(tmp_path, config, env={"PYTHONPATH": str(tmp_path)}) as daemon:
        admin = int(daemon.wait_for(ADMIN).group(1))
        daemon.wait_for(
            r"TLS on tcp:0:interface=127\.0\.0\.1: TLS 1\.2\+, clients need a certificate"
        )
        # No client certificate: the handshake is refused, no hello is ever sent.
        try:
            anonymous = TlsClient(daemon.port, client_context(certs))
        except ssl.SSLError:
            pass  # TLS 1.2: the handshake itself fails
        else:
            with anonymous:  # TLS 1.3: the server's alert arrives after the client's finish
                assert anonymous.recv() is None
        with TlsClient(daemon.port, client_context(certs, True)) as alice:
            assert alice.recv()["type"] == "hello"
            alice.send({"type": "whoami", "id": 1})
            reply = alice.recv()
            assert reply["type"] == "whoami" and "CN=alice" in reply["data"]
            assert "O=Example" in reply["data"]
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/clients", timeout=10) as r:
                listing = json.loads(r.read())
            assert [c["identity"] for c in listing["clients"]] == [reply["data"]]
        assert daemon.stop() == 0


def test_sighup_picks_up_a_replaced_certificate(tmp_path: Path, certs: Certs) -> None:
    renewed = Certs(tmp_path / "renewed", "renewed")
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    cert.write_bytes(certs.cert.read_bytes())
    key.write_bytes(certs.key.read_bytes())
    config = {"tls": {"certificate": str(cert), "private_key": str(key)}}
    both = client_context(certs, False, renewed.ca_file)
    with Daemon(tmp_path, config) as daemon:
        with TlsClient(daemon.port, both) as old:
            assert old.recv()["type"] == "hello"
            assert old.sock.getpeercert(binary_form=True) == certs.server_der

            # A broken pair is rejected as a whole; the daemon keeps the old certificate.
            cert.write_bytes(renewed.cert.read_bytes())  # key still the old one: mismatch
            daemon.process.send_signal(signal.SIGHUP)
            daemon.wait_for("Reload rejected")
            daemon.wait_for(r"tls\.private_key: .* does not belong to the certificate")

            key.write_bytes(renewed.key.read_bytes())
            daemon.process.send_signal(signal.SIGHUP)
            daemon.wait_for("TLS certificate and key re-read")
            with TlsClient(daemon.port, both) as new:
                assert new.recv()["type"] == "hello"
                assert new.sock.getpeercert(binary_form=True) == renewed.server_der
            old.send({"type": "echo", "id": 1, "data": "still here"})  # open ones keep theirs
            assert old.recv() == {"type": "echo", "id": 1, "data": "still here"}
        assert daemon.stop() == 0


def test_cli_speaks_tls_with_a_client_certificate_and_a_token(tmp_path: Path, certs: Certs) -> None:
    (tmp_path / "whoami_handlers.py").write_text(WHOAMI)
    tokens = tmp_path / "tokens"
    tokens.write_text("# identity:token\nbob:s3cret-bob\n")
    token_file = tmp_path / "bob.token"
    token_file.write_text("s3cret-bob\n")
    config = {
        **tls_config(certs, client_ca=str(certs.ca_file)),
        "handlers": ["whoami_handlers"],
        "auth": {"mode": "token", "tokens_file": str(tokens)},
    }
    with Daemon(tmp_path, config, env={"PYTHONPATH": str(tmp_path)}) as daemon:
        tls_args = [
            f"--tls-ca={certs.ca_file}",
            f"--tls-cert={certs.client_cert}",
            f"--tls-key={certs.client_key}",
        ]
        address = f"localhost:{daemon.port}"
        ok = subprocess.run(
            [HEARTBEAT, *tls_args, f"--token-file={token_file}", "request", address, "whoami"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) == "bob"  # the token's identity wins over the subject
        # The channel verbs take the same options.
        who = subprocess.run(
            [HEARTBEAT, *tls_args, f"--token-file={token_file}", "presence", address, "news"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (who.returncode, json.loads(who.stdout)) == (0, {"channel": "news", "clients": []})

        token_file.write_text("n0t-the-t0ken\n")
        refused = subprocess.run(
            [HEARTBEAT, *tls_args, f"--token-file={token_file}", "request", address, "whoami"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.returncode == 1 and "auth_failed" in refused.stderr
        assert daemon.stop() == 0
    assert "s3cret-bob" not in daemon.log and "n0t-the-t0ken" not in daemon.log
    assert "authenticated as bob" in daemon.log


# -- configuration errors (no listener is started) ---------------------------------------------


def test_tls_config_errors_name_key_and_value(tmp_path: Path, certs: Certs) -> None:
    missing = parse_config(
        {"tls": {"certificate": str(tmp_path / "nope.pem"), "private_key": str(certs.key)}}
    )
    (error,) = check_tls(missing.tls)
    assert error.startswith("tls.certificate: ") and "nope.pem" in error

    other = Certs(tmp_path / "other", "other")
    mismatched = parse_config(
        {"tls": {"certificate": str(certs.cert), "private_key": str(other.key)}}
    )
    assert "does not belong to the certificate" in check_tls(mismatched.tls)[0]

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    bad_ca = parse_config(tls_config(certs, client_ca=str(garbage)))
    assert check_tls(bad_ca.tls)[0].startswith("tls.client_ca: ")


def test_tls_without_the_extra_is_a_config_error_naming_it(
    certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "OpenSSL", None)  # as if pyOpenSSL were not installed
    config = parse_config(tls_config(certs))
    (error,) = check_tls(config.tls)
    assert "heartbeatd[tls]" in error and error.startswith("tls.certificate: ")


def test_daemon_refuses_ssl_listen_with_tls_keys_before_listening(
    tmp_path: Path, certs: Certs
) -> None:
    from daemon import run_twistd

    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"listen": "ssl:0:privateKey=k:certKey=c", **tls_config(certs)}))
    result = run_twistd("heartbeatd", "--config", str(config))
    assert result.returncode != 0
    assert "listen: 'ssl:0:privateKey=k:certKey=c' is not allowed with tls.certificate" in (
        result.stdout + result.stderr
    )


def test_tls_frames_are_framed_like_plain_ones(tmp_path: Path, certs: Certs) -> None:
    """Many frames in one TLS record and one frame over many records both decode."""
    with Daemon(tmp_path, tls_config(certs)) as daemon:
        with TlsClient(daemon.port, client_context(certs)) as client:
            assert client.recv()["type"] == "hello"
            bodies = [json.dumps({"type": "echo", "id": n}).encode() for n in range(50)]
            client.sock.sendall(b"".join(struct.pack("!I", len(b)) + b for b in bodies))
            assert [client.recv()["id"] for _ in range(50)] == list(range(50))
            big = json.dumps({"type": "echo", "id": "big", "data": "y" * 200_000}).encode()
            client.sock.sendall(struct.pack("!I", len(big)) + big)
            assert client.recv()["data"] == "y" * 200_000
        assert daemon.stop() == 0


def test_a_client_that_never_shakes_hands_is_dropped(tmp_path: Path, certs: Certs) -> None:
    config = tls_config(certs, handshake_timeout=0.5)
    with Daemon(tmp_path, config) as daemon:
        with RawClient(daemon.port) as silent:  # plain TCP: never sends a ClientHello
            assert silent.recv() is None  # closed by the server, no hello in clear
        daemon.wait_for("tls_handshake_timeout: no TLS handshake within 0.5s")
        assert daemon.stop() == 0


POOL_SCRIPT = """
import json, sys
from twisted.internet import task
from twisted.internet.defer import ensureDeferred
from heartbeatd.client import ClientTLS, Pool, PoolConfig, ReconnectingClient

port, ca, token_file = sys.argv[1], sys.argv[2], sys.argv[3]

async def main(reactor):
    config = PoolConfig(
        endpoint=f"tcp:host=127.0.0.1:port={port}", min_idle=2, max_size=2,
        tls_ca=ca, tls_hostname="localhost", token_file=token_file,
    )
    pool = Pool(reactor, config)
    pool.start()
    answers = [await pool.request("whoami") for _ in range(4)]
    created = pool.stats()["created"]
    await pool.close()
    token = open(token_file).read().strip()
    client = ReconnectingClient(
        reactor, f"tcp:host=localhost:port={port}", tls=ClientTLS(ca_file=ca), token=token
    )
    client.start()
    answers.append(await client.request("whoami"))
    await client.stop()
    print(json.dumps({"answers": answers, "created": created}))

task.react(lambda reactor: ensureDeferred(main(reactor)))
"""


def test_pool_and_reconnecting_client_speak_tls_and_send_the_token(
    tmp_path: Path, certs: Certs
) -> None:
    (tmp_path / "whoami_handlers.py").write_text(WHOAMI)
    (tmp_path / "tokens").write_text("pool-user:pool-token\n")
    (tmp_path / "pool.token").write_text("pool-token\n")
    config = {
        **tls_config(certs),
        "handlers": ["whoami_handlers"],
        "auth": {"mode": "token", "tokens_file": str(tmp_path / "tokens")},
    }
    with Daemon(tmp_path, config, env={"PYTHONPATH": str(tmp_path)}) as daemon:
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                POOL_SCRIPT,
                str(daemon.port),
                str(certs.ca_file),
                str(tmp_path / "pool.token"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert result["answers"] == ["pool-user"] * 5
        assert result["created"] == 2  # the token went with each new connection
        assert daemon.stop() == 0
    assert daemon.log.count("authenticated as pool-user") == 3


def test_refusals_over_tls_are_readable_and_bounded(tmp_path: Path, certs: Certs) -> None:
    config = {
        **tls_config(certs, handshake_timeout=0.5),
        "limits": {"max_connections_per_address": 1, "per_address_exempt": []},
    }
    with Daemon(tmp_path, config) as daemon:
        with TlsClient(daemon.port, client_context(certs)) as first:
            assert first.recv()["type"] == "hello"
            with TlsClient(daemon.port, client_context(certs)) as refused:
                refusal = refused.recv()  # the error frame, after the handshake
                assert refusal["error"]["code"] == "too_many_connections"
                assert "per-address limit" in refusal["error"]["message"]
            with RawClient(daemon.port) as silent:  # refused, and never shakes hands
                assert silent.recv() is None  # dropped after tls.handshake_timeout
        assert daemon.stop() == 0


def test_tcp_options_reach_the_socket_under_tls(tmp_path: Path, certs: Certs) -> None:
    """keepalive timings and TCP_USER_TIMEOUT are set on the socket below the TLS layer."""
    from twisted.internet import tcp
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.testing import MemoryReactorClock
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from heartbeatd.daemon.tls import ServerTLS
    from heartbeatd.server.sockopts import configure_socket

    config = parse_config({**tls_config(certs), "tcp": {"user_timeout": 42}})
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        accepted, address = listener.accept()
    reactor = MemoryReactorClock()
    wrapper = TLSMemoryBIOFactory(ServerTLS(config.tls), False, Factory.forProtocol(Protocol))
    tls_protocol = wrapper.buildProtocol(address)
    transport = tcp.Server(accepted, tls_protocol, address, None, 1, reactor)
    try:
        tls_protocol.makeConnection(transport)
        configure_socket(tls_protocol, config.tcp)
        user_timeout = accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
        assert user_timeout == 42_000
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        peer.close()
        accepted.close()


def test_a_plain_cli_against_a_tls_port_is_told_to_give_tls_ca(
    tmp_path: Path, certs: Certs
) -> None:
    with Daemon(tmp_path, tls_config(certs)) as daemon:
        plain = subprocess.run(
            [HEARTBEAT, "ping", f"127.0.0.1:{daemon.port}", "-c", "1", "--timeout", "0.5"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert plain.returncode == 4
        assert plain.stderr == (
            f"heartbeat: timed out connecting to 127.0.0.1:{daemon.port}: no hello from the "
            "server within 0.5s; is it a TLS port (give --tls-ca), or an HTTP one (WebSocket, "
            "admin API: give the listen port)?\n"
        )
        secure = subprocess.run(
            [HEARTBEAT, "ping", f"localhost:{daemon.port}", "-c", "1", f"--tls-ca={certs.ca_file}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert secure.returncode == 0, secure.stderr
        assert daemon.stop() == 0
    # Twisted's stock port lines are left out of the log, TLS ones too (docs/admin.md).
    assert re.search(r"starting on|Port \d+ Closed", daemon.log) is None, daemon.log

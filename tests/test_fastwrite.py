"""Write-through on a real Twisted TCP transport over a real socket pair."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport

from heartbeatd._direct_write import direct_writer


@pytest.fixture
def pair() -> Iterator[tuple[tcp.Server, socket.socket]]:
    """A twisted.internet.tcp.Server on one end of a loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        accepted, address = listener.accept()
    accepted.setblocking(False)
    transport = tcp.Server(accepted, Protocol(), address, None, 1, MemoryReactor())
    yield transport, peer
    peer.close()
    accepted.close()


def read_exactly(peer: socket.socket, n: int) -> bytes:
    peer.settimeout(10)
    chunks = []
    while n:
        chunk = peer.recv(min(n, 1 << 20))
        assert chunk, "connection closed early"
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def test_small_writes_reach_the_peer_without_a_reactor_pass(pair) -> None:
    transport, peer = pair
    write = direct_writer(transport)
    assert write is not None
    write(b"hello")
    assert read_exactly(peer, 5) == b"hello"  # sent at once: the reactor never ran
    assert transport._tempDataLen == 0 and transport.dataBuffer == b""


def queued(transport: tcp.Server) -> int:
    return transport._tempDataLen + len(transport.dataBuffer) - transport.offset


def test_what_the_kernel_does_not_take_is_queued_in_order(pair) -> None:
    transport, peer = pair
    write = direct_writer(transport)
    assert write is not None
    blocks = [bytes([i + 1]) * 3_000_000 for i in range(3)]  # far beyond the socket buffers
    for block in blocks:
        write(block)
    assert queued(transport) > 0  # the kernel took part; the rest waits in Twisted's buffer
    expected = b"".join(blocks)
    received = bytearray()
    for _ in range(100_000):  # bounded: every pass moves bytes, or the test fails
        if len(received) == len(expected):
            break
        if queued(transport):
            transport.doWrite()  # what the reactor would do when the socket is writable
        ready, _, _ = select.select([peer], [], [], 10)
        assert ready, "no progress"
        received += peer.recv(1 << 20)
    assert bytes(received) == expected  # direct and queued bytes, in write order


def test_not_used_for_other_transports() -> None:
    assert direct_writer(StringTransport()) is None
    assert direct_writer(object()) is None


def _nothing_arrives(peer: socket.socket, marker: bytes) -> bool:
    """True when ``marker`` is not readable at ``peer`` (a loopback send() would already be).

    Waits up to one second for bytes, as an event with a deadline, and reads what came.
    """
    readable, _, _ = select.select([peer], [], [], 1.0)
    return not readable or marker not in peer.recv(1 << 16)


def test_never_bypasses_tls_started_later(pair, tmp_path) -> None:
    """startTLS on a plain tcp.Server: from then on the socket only gets Twisted's TLS bytes."""
    import trustme

    from heartbeatd.config import parse_config
    from heartbeatd.daemon.tls import ServerTLS

    transport, peer = pair
    write = direct_writer(transport)
    assert write is not None  # plain TCP when the writer was made
    cert = trustme.CA().issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    tls = {"certificate": str(tmp_path / "cert.pem"), "private_key": str(tmp_path / "key.pem")}
    transport.startTLS(ServerTLS(parse_config({"tls": tls}).tls))
    write(b"PLAINTEXT-MARKER")
    assert _nothing_arrives(peer, b"PLAINTEXT-MARKER")


def test_sends_nothing_after_a_half_close(pair) -> None:
    transport, peer = pair
    write = direct_writer(transport)
    assert write is not None
    transport.loseWriteConnection()
    transport.doWrite()  # what the reactor does next: the buffer is empty, so the FIN goes
    assert transport._writeDisconnected
    write(b"AFTER-FIN")  # no send() on a shut-down socket, no error either
    assert _nothing_arrives(peer, b"AFTER-FIN")

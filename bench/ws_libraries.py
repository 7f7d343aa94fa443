"""Which WebSocket library for the listener: echo messages per second through each candidate.

Each candidate runs a plain echo server (no heartbeatd code) in this process; a client in a
second process writes pre-masked 64-byte text frames at DEPTH in flight and counts the
echoes.  Only the server side differs, so the figures compare the libraries' per-message
cost on a Twisted reactor.  Also reports the bytes each holds per idle connection.

    python bench/ws_libraries.py [--seconds 3] [--idle 500]

Candidates: wsproto driven from a Twisted ``Protocol``, autobahn
(``autobahn.twisted.websocket``) and Twisted's own ``twisted.web.websocket`` (26.4+, itself
built on wsproto and twisted.web).  The result and the choice are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import socket
import struct
import subprocess
import sys
import time
import tracemalloc

HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + base64.b64encode(b"0123456789abcdef") + b"\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def masked_text(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + body


def client(port: int, depth: int, seconds: float) -> None:
    """The load: DEPTH frames in flight on one connection for SECONDS; prints msgs/s."""
    payload = b'{"type":"echo","id":1,"data":"' + b"x" * 32 + b'"}'
    frame = masked_text(payload)
    reply = 2 + len(payload)
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(HANDSHAKE)
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    extra = len(head.split(b"\r\n\r\n", 1)[1])
    s.sendall(frame * depth)
    done, pending = 0, extra
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        pending += len(s.recv(65536))
        n, pending = divmod(pending, reply)
        if n:
            done += n
            s.sendall(frame * n)
    elapsed = time.perf_counter() - started
    print(int(done / elapsed))
    s.close()


# -- the candidate servers ------------------------------------------------------------------


def wsproto_factory():
    from twisted.internet.protocol import Factory, Protocol
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Ping, Request, TextMessage

    class Echo(Protocol):
        def connectionMade(self):
            self.ws = WSConnection(ConnectionType.SERVER)
            self.parts: list[str] = []

        def dataReceived(self, data):
            ws = self.ws
            ws.receive_data(data)
            out = []
            for event in ws.events():
                if isinstance(event, TextMessage):
                    if event.message_finished and not self.parts:
                        out.append(ws.send(TextMessage(event.data)))
                    else:
                        self.parts.append(event.data)
                        if event.message_finished:
                            out.append(ws.send(TextMessage("".join(self.parts))))
                            self.parts = []
                elif isinstance(event, Request):
                    out.append(ws.send(AcceptConnection()))
                elif isinstance(event, Ping):
                    out.append(ws.send(event.response()))
            if out:
                self.transport.write(b"".join(out))

    return Factory.forProtocol(Echo)


def autobahn_factory():
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

    class Echo(WebSocketServerProtocol):
        def onMessage(self, payload, isBinary):
            self.sendMessage(payload, isBinary)

    factory = WebSocketServerFactory()
    factory.protocol = Echo
    factory.setProtocolOptions(utf8validateIncoming=True)
    return factory


def twisted_web_factory():
    from twisted.web.resource import Resource
    from twisted.web.server import Site
    from twisted.web.websocket import WebSocketResource

    class Echo:
        def negotiationStarted(self, transport):
            self.transport = transport

        def negotiationFinished(self):
            pass

        def textMessageReceived(self, message):
            self.transport.sendTextMessage(message)

        def bytesMessageReceived(self, data):
            pass

        def pongReceived(self, payload):
            pass

        def connectionLost(self, reason):
            pass

    class EchoFactory:
        def buildProtocol(self, request):
            return Echo()

    root = Resource()
    root.putChild(b"", WebSocketResource(EchoFactory()))
    site = Site(root)
    site.noisy = False
    return site


CANDIDATES = {
    "wsproto": wsproto_factory,
    "autobahn": autobahn_factory,
    "twisted.web.websocket": twisted_web_factory,
}


def idle_bytes(factory, reactor, count: int) -> float:
    """Bytes allocated per open, handshaken, idle connection (tracemalloc, server side)."""
    from twisted.internet.testing import StringTransport

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = []
    for _ in range(count):
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        proto.dataReceived(HANDSHAKE)
        kept.append(proto)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / count


def serve(name: str, args: argparse.Namespace) -> dict[str, float]:
    from twisted.internet import reactor

    factory = CANDIDATES[name]()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    results: dict[str, float] = {}

    def run_clients() -> None:
        for depth in (1, 32):
            argv = [sys.executable, __file__, "--client", str(port.getHost().port), str(depth)]
            proc = subprocess.Popen([*argv, "--seconds", str(args.seconds)], stdout=subprocess.PIPE)
            while proc.poll() is None:
                reactor.iterate(0.01)
            results[f"depth {depth}"] = int(proc.stdout.read())
        reactor.stop()

    reactor.callLater(0, run_clients)
    reactor.run()
    port.stopListening()
    results["B/idle conn"] = round(idle_bytes(factory, reactor, args.idle))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--idle", type=int, default=500)
    parser.add_argument("--client", nargs=2, type=int, metavar=("PORT", "DEPTH"))
    parser.add_argument("--only", choices=list(CANDIDATES))
    args = parser.parse_args()
    if args.client:
        client(args.client[0], args.client[1], args.seconds)
        return
    if args.only:
        print(args.only, serve(args.only, args))
        return
    for name in CANDIDATES:  # one process each: a reactor runs once
        argv = [sys.executable, __file__, "--only", name, "--seconds", str(args.seconds)]
        subprocess.run([*argv, "--idle", str(args.idle)], check=False, env=os.environ)


if __name__ == "__main__":
    main()

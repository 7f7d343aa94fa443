"""One load-generator process for bench/workers_idle.py: many idle int32 clients from one address.

Opens ``--conns`` connections from ``--source`` (a loopback address, so several processes
together exceed one address's ephemeral ports) to ``--port``, answers every ping with a pong,
and reads commands on stdin, answering with one JSON line on stdout:

    mark     forget the pings seen so far (the sweep timing starts now)
    report   {"connections", "hello", "pinged", "first_ping", "last_ping", "pinged_twice",
             "max_gap", "bench",
             "last_bench", "failed", "closes", "errors"}

``closes`` counts how connections ended, as this side saw it: ``connect_failed`` (refused or
reset before connecting), ``reset`` (the server aborted it: an eviction), ``eof`` (closed in
order), each split by whether its hello had arrived (``reset_after_hello``...); ``errors``
counts the server's error frames by code.  ``max_gap`` is the longest time between two pings
of one client since the mark: at most about one heartbeat interval when every sweep reaches
every client in time.

Times are ``time.monotonic()`` (CLOCK_MONOTONIC, shared by every process on the machine), so
the driver can compare them with its own.  A ``{"type": "bench"}`` message is counted as the
broadcast under test.  Plain epoll, no framework: the generator must cost less than the server.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import socket
import struct
import sys
import time

IP_BIND_ADDRESS_NO_PORT = 24  # Linux: pick the source port at connect(), per destination


class State:
    def __init__(self) -> None:
        self.hello = 0
        self.pinged = 0
        self.first_ping = 0.0
        self.last_ping = 0.0
        self.bench = 0
        self.last_bench = 0.0
        self.marked = False
        self.max_gap = 0.0
        self.closes: dict[str, int] = {}
        self.errors: dict[str, int] = {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--conns", type=int, required=True)
    parser.add_argument("--source", default="127.0.0.2")
    parser.add_argument("--concurrency", type=int, default=256)
    args = parser.parse_args()

    ep = select.epoll()
    socks: dict[int, socket.socket] = {}
    buffers: dict[int, bytearray] = {}
    pinged: set[int] = set()
    #: fd -> when it was last pinged since the mark (for the longest gap between two pings).
    last_pinged: dict[int, float] = {}
    greeted: set[int] = set()
    twice: set[int] = set()  # pinged at least twice since the mark
    connecting: set[int] = set()
    state = State()
    opened = failed = 0
    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)
    ep.register(stdin, select.EPOLLIN)
    command_buffer = b""

    def open_more() -> None:
        nonlocal opened, failed
        while opened < args.conns and len(connecting) < args.concurrency:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((args.source, 0))
            s.setblocking(False)
            code = s.connect_ex(("127.0.0.1", args.port))
            opened += 1
            if code not in (0, errno.EINPROGRESS):
                failed += 1
                state.closes["connect_failed"] = state.closes.get("connect_failed", 0) + 1
                s.close()
                continue
            fd = s.fileno()
            socks[fd] = s
            buffers[fd] = bytearray()
            connecting.add(fd)
            ep.register(fd, select.EPOLLIN | select.EPOLLOUT)

    def on_frame(fd: int, body: bytes) -> None:
        message = json.loads(body)
        kind = message.get("type")
        if kind == "ping":
            pong = json.dumps({"type": "pong", "id": message.get("id")}).encode()
            try:
                socks[fd].send(struct.pack("!I", len(pong)) + pong)
            except OSError:
                return  # closed by the server: the next read says so
            if state.marked:
                now = time.monotonic()
                previous = last_pinged.get(fd)
                last_pinged[fd] = now
                if previous is not None:
                    state.max_gap = max(state.max_gap, now - previous)
                    twice.add(fd)
                if fd not in pinged:
                    pinged.add(fd)
                    state.first_ping = state.first_ping or now
                    state.last_ping = now
        elif kind == "hello":
            state.hello += 1
            greeted.add(fd)
        elif kind == "error":
            code = str((message.get("error") or {}).get("code", "?"))
            state.errors[code] = state.errors.get(code, 0) + 1
        elif kind == "bench":
            state.bench += 1
            state.last_bench = time.monotonic()

    def close(fd: int, how: str) -> None:
        nonlocal failed
        failed += 1
        if how != "connect_failed":
            how += "_after_hello" if fd in greeted else "_before_hello"
        state.closes[how] = state.closes.get(how, 0) + 1
        ep.unregister(fd)
        socks.pop(fd).close()
        buffers.pop(fd, None)
        connecting.discard(fd)
        greeted.discard(fd)
        pinged.discard(fd)
        twice.discard(fd)
        last_pinged.pop(fd, None)

    def command(line: bytes) -> None:
        if line == b"mark":
            pinged.clear()
            twice.clear()
            last_pinged.clear()
            state.marked = True
            state.first_ping = state.last_ping = state.max_gap = 0.0
            return
        report = {
            "connections": len(socks),
            "failed": failed,
            "hello": state.hello,
            "pinged": len(pinged),
            "first_ping": state.first_ping,
            "last_ping": state.last_ping,
            "pinged_twice": len(twice),
            "max_gap": state.max_gap,
            "bench": state.bench,
            "last_bench": state.last_bench,
            "closes": state.closes,
            "errors": state.errors,
        }
        sys.stdout.write(json.dumps(report) + "\n")
        sys.stdout.flush()

    open_more()
    while True:
        for fd, events in ep.poll(0.2):
            if fd == stdin:
                data = os.read(stdin, 4096)
                if not data:
                    return
                command_buffer += data
                *lines, command_buffer = command_buffer.split(b"\n")
                for line in lines:
                    command(line.strip())
                continue
            if fd in connecting:
                if events & (select.EPOLLERR | select.EPOLLHUP):
                    close(fd, "connect_failed")
                    continue
                if events & select.EPOLLOUT:
                    connecting.discard(fd)
                    ep.modify(fd, select.EPOLLIN)
            if not events & select.EPOLLIN or fd not in socks:
                continue
            try:
                data = socks[fd].recv(65536)
            except OSError:
                close(fd, "reset")
                continue
            if not data:
                close(fd, "eof")
                continue
            buffer = buffers[fd]
            buffer += data
            while len(buffer) >= 4:
                (size,) = struct.unpack_from("!I", buffer)
                if len(buffer) < 4 + size:
                    break
                on_frame(fd, bytes(buffer[4 : 4 + size]))
                del buffer[: 4 + size]
        open_more()


if __name__ == "__main__":
    main()

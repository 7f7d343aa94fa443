"""Loopback TCP proxies: one whose link can be blackholed (a daemon cut off from Redis), and
one that cuts its connections at random moments (`ChaosProxy`, resumable sessions).

``blackhole()`` is what a network partition looks like to both ends: connections stay open,
nothing is refused or reset, and bytes simply stop arriving (they wait in the proxy's socket
buffers, as TCP would retransmit them).  New connections are accepted but carry nothing.
``heal()`` lets the bytes flow again.  No root, no iptables: it listens on 127.0.0.1:0 and
connects to 127.0.0.1 only.

``ChaosProxy`` relays the same way and, while its chaos runs, resets every connection it
carries at random intervals (seeded), mid-frame or not, as a flaky network would.
"""

from __future__ import annotations

import contextlib
import random
import selectors
import socket
import struct
import threading
import time


class BlackholeProxy:
    """``with BlackholeProxy(redis.port) as proxy:`` ... ``proxy.port``, ``proxy.blackhole()``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._peers: dict[socket.socket, socket.socket] = {}
        self._blocked = False
        self._stopping = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        #: Connections accepted so far (a reconnecting client adds one each attempt).
        self.accepted = 0

    def __enter__(self) -> BlackholeProxy:
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def blackhole(self) -> None:
        self._set(True)

    def heal(self) -> None:
        self._set(False)

    def _set(self, blocked: bool) -> None:
        with self._lock:
            self._blocked = blocked
        self._wake_w.send(b"x")

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake_w.send(b"x")
        self._thread.join(10)
        for sock in [*self._peers, self.listener, self._wake_r, self._wake_w]:
            sock.close()
        self._peers.clear()
        self._selector.close()

    def _run(self) -> None:
        relaying = True
        while True:
            with self._lock:
                if self._stopping:
                    return
                blocked = self._blocked
            if blocked == relaying:  # stop or resume reading the relayed sockets
                relaying = not blocked
                for sock in self._peers:
                    if relaying:
                        self._selector.register(sock, selectors.EVENT_READ)
                    else:
                        self._selector.unregister(sock)
            for key, _ in self._selector.select(self._timeout()):
                sock = key.fileobj
                if sock is self._wake_r:
                    self._wake_r.recv(4096)
                elif sock is self.listener:
                    self._accept(relaying)
                else:
                    self._relay(sock)  # type: ignore[arg-type]
            self._tick()

    def _timeout(self) -> float | None:
        return None  # wait for the sockets only

    def _tick(self) -> None:
        pass

    def _accept(self, relaying: bool) -> None:
        try:
            downstream, _ = self.listener.accept()
        except BlockingIOError:
            return
        self.accepted += 1
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        except OSError:  # the target is down: so is this connection
            downstream.close()
            return
        for sock in (downstream, upstream):
            sock.setblocking(True)
            sock.settimeout(5)
        self._peers[downstream] = upstream
        self._peers[upstream] = downstream
        if relaying:
            self._selector.register(downstream, selectors.EVENT_READ)
            self._selector.register(upstream, selectors.EVENT_READ)

    def _relay(self, sock: socket.socket) -> None:
        other = self._peers.get(sock)
        if other is None:
            return
        try:
            data = sock.recv(65536)
            if data:
                other.sendall(data)
                return
        except OSError:
            pass
        for s in (sock, other):  # one end closed or reset: close both
            self._peers.pop(s, None)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(s)
            s.close()


class ChaosProxy(BlackholeProxy):
    """``with ChaosProxy(port, seed=1) as proxy:`` ... ``proxy.start_chaos()``: from then on,
    every ``min_interval``..``max_interval`` seconds (seeded random), every connection it
    relays is reset (RST, both sides), until ``stop_chaos()``.  ``cuts`` counts the resets
    that closed at least one connection."""

    def __init__(
        self,
        target_port: int,
        seed: int = 0,
        min_interval: float = 0.05,
        max_interval: float = 0.5,
    ) -> None:
        super().__init__(target_port)
        self._random = random.Random(seed)
        self.min_interval = min_interval
        self.max_interval = max_interval
        self._next_cut: float | None = None
        self._once = False
        self.cuts = 0

    def start_chaos(self) -> None:
        with self._lock:
            self._next_cut = time.monotonic() + self._interval()
        self._wake_w.send(b"x")

    def stop_chaos(self) -> None:
        with self._lock:
            self._next_cut = None
        self._wake_w.send(b"x")

    def cut_soon(self) -> None:
        """Reset every relayed connection at the proxy thread's next turn (any thread)."""
        with self._lock:
            self._next_cut = time.monotonic()
            self._once = True
        self._wake_w.send(b"x")

    def _interval(self) -> float:
        return self._random.uniform(self.min_interval, self.max_interval)

    def _timeout(self) -> float | None:
        with self._lock:
            due = self._next_cut
        return None if due is None else max(due - time.monotonic(), 0.0)

    def _tick(self) -> None:
        with self._lock:
            due = self._next_cut
            if due is None or time.monotonic() < due:
                return
            if self._once:  # cut_soon: one cut, no chaos after it
                self._once, self._next_cut = False, None
            else:
                self._next_cut = time.monotonic() + self._interval()
        self.cut()

    def cut(self) -> None:
        """Reset every relayed connection now (call from the proxy's thread, or use chaos)."""
        if self._peers:
            self.cuts += 1
        for sock in list(self._peers):
            self._peers.pop(sock, None)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            with contextlib.suppress(OSError):  # linger 0: close() sends RST, not FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

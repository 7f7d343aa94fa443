"""Publishers and subscribers on threads, for cluster tests under load (failover, partitions).

A `Publisher` sends ``publish`` requests one after another, each with a unique id, and keeps
every outcome: acknowledged (with its offset and the time of the answer) or refused (the error
code).  A `Subscriber` reads everything its connection receives, with the time.  `losses`
then checks the promise of docs/cluster.md: every acknowledged publication reached each
subscriber exactly once, or that subscriber was told (``resync`` with ``recovered: false``).
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from daemon import RawClient


class Publisher(threading.Thread):
    def __init__(self, port: int, channel: str, tag: str) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.channel = channel
        self.tag = tag
        self.stopping = threading.Event()
        #: id -> (time answered, offset) of acknowledged publications.
        self.acked: dict[str, tuple[float, int]] = {}
        #: (time answered, error code) of refused ones.
        self.refused: list[tuple[float, str]] = []
        self.ids = itertools.count(1)
        self.progress = threading.Condition()

    def run(self) -> None:
        with RawClient(self.port, timeout=30) as raw:
            assert raw.recv()["type"] == "hello"
            for n in self.ids:
                if self.stopping.is_set():
                    return
                pid = f"{self.tag}-{n}"
                raw.send(
                    {"type": "publish", "id": n, "data": {"channel": self.channel, "data": pid}}
                )
                while (reply := raw.recv()) is not None and reply.get("id") != n:
                    pass
                assert reply is not None, "the node closed the publisher's connection"
                with self.progress:
                    refused = reply["type"] == "error"
                    if refused:
                        self.refused.append((time.monotonic(), reply["error"]["code"]))
                    else:
                        self.acked[pid] = (time.monotonic(), reply["data"]["offset"])
                    self.progress.notify_all()
                if refused:  # as a client would, retry a little later
                    self.stopping.wait(0.01)

    def wait_acked_after(self, moment: float, count: int = 1, timeout: float = 20) -> float:
        """Block until ``count`` publications were acknowledged after ``moment``; return the
        time of the first of them."""
        with self.progress:
            ok = self.progress.wait_for(
                lambda: len([t for t, _ in self.acked.values() if t > moment]) >= count, timeout
            )
            assert ok, f"{self.tag}: no publication acknowledged after {timeout}s"
            return min(t for t, _ in self.acked.values() if t > moment)

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


class Subscriber(threading.Thread):
    def __init__(self, port: int, channel: str, join_leave: bool = False) -> None:
        super().__init__(daemon=True)
        self.raw = RawClient(port, timeout=60)
        self.session = self.raw.recv()["data"]["session"]
        self.channel = channel
        self.raw.send(
            {"type": "subscribe", "id": 1, "data": {"channel": channel, "join_leave": join_leave}}
        )
        while (reply := self.raw.recv()) is not None and reply.get("id") != 1:
            pass
        assert reply is not None and reply["type"] == "subscribe", reply
        self.epoch = reply["data"]["epoch"]
        #: (time received, message) of everything after the subscribe's reply.
        self.messages: list[tuple[float, dict[str, Any]]] = []
        self.arrived = threading.Condition()
        self.closed = False

    def run(self) -> None:
        try:
            while (message := self.raw.recv()) is not None:
                if message["type"] == "ping":  # the server's heartbeat: stay alive
                    self.raw.send({"type": "pong", "id": message.get("id")})
                    continue
                with self.arrived:
                    self.messages.append((time.monotonic(), message))
                    self.arrived.notify_all()
        except OSError:
            pass
        finally:
            with self.arrived:
                self.closed = True
                self.arrived.notify_all()

    def request(self, type_: str, data: Any, id_: int) -> dict[str, Any]:
        """Send a request; its reply is read by the thread: wait for it."""
        self.raw.send({"type": type_, "id": id_, "data": data})
        return self.wait_for(lambda m: m.get("id") == id_)

    def wait_for(self, predicate: Any, timeout: float = 20, start: int = 0) -> dict[str, Any]:
        """The first message (from index ``start``) matching ``predicate``, waiting for it."""
        found: list[dict[str, Any]] = []

        def match() -> bool:
            found[:] = [m for _, m in self.messages[start:] if predicate(m)][:1]
            return bool(found) or self.closed

        with self.arrived:
            self.arrived.wait_for(match, timeout)
        assert found, f"no matching message within {timeout}s; last: {self.messages[-3:]}"
        return found[0]

    def received(self) -> list[str]:
        return [m["data"]["data"] for _, m in list(self.messages) if m["type"] == "publication"]

    def resyncs(self) -> list[tuple[float, dict[str, Any]]]:
        return [(t, m["data"]) for t, m in list(self.messages) if m["type"] == "resync"]

    def close(self) -> None:
        self.raw.sock.close()
        self.join(10)


def publication_of(data: Any) -> Any:
    """A `Subscriber.wait_for` predicate: the publication carrying ``data``."""
    return lambda m: m["type"] == "publication" and m["data"]["data"] == data


def losses(
    subscribers: list[Subscriber], publishers: list[Publisher], told_after: float | None = None
) -> dict[str, Any]:
    """Check every acknowledged publication against every subscriber.

    A publication of the history that could be lost at ``told_after`` (e.g. the moment of a
    kill -9 of the master) that a subscriber lacks is *told* when that subscriber received a
    ``resync`` with ``recovered: false`` after that moment; anything else missing is lost
    silently.  Duplicates are ids received twice.
    """
    acked = {pid: t for p in publishers for pid, (t, _) in p.acked.items()}
    at_risk = {pid for p in publishers for pid in _of_the_lost_history(p, told_after)}
    result: dict[str, Any] = {"acked": len(acked), "lost_silently": [], "told": 0, "dup": 0}
    result["subscribers"] = [
        {
            "session": sub.session,
            "received": len(sub.received()),
            "resyncs": sub.resyncs(),
            "last": [m for _, m in sub.messages[-3:]],
        }
        for sub in subscribers
    ]
    for sub in subscribers:
        got = sub.received()
        result["dup"] += len(got) - len(set(got))
        told = told_after is not None and any(
            t > told_after and not r["recovered"] for t, r in sub.resyncs()
        )
        for pid in acked:
            if pid in got:
                continue
            if told and pid in at_risk:
                result["told"] += 1
            else:
                result["lost_silently"].append((sub.session, pid))
    return result


def _of_the_lost_history(publisher: Publisher, moment: float | None) -> list[str]:
    """The publications acknowledged in the history current at ``moment``: those answered
    before it, and after it until the offsets start again (a new history).  An answer read
    after ``moment`` may still come from the killed master (it was in the socket)."""
    if moment is None:
        return []
    found, previous = [], 0
    for pid, (t, offset) in sorted(publisher.acked.items(), key=lambda item: item[1][0]):
        if t > moment and offset < previous:
            break
        found.append(pid)
        previous = offset
    return found

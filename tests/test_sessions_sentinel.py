"""Resumable sessions across a Redis Sentinel failover (docs/protocol.md "Sessions",
docs/cluster.md "High availability").

A master, a replica and three sentinels (`redis_sentinel.SentinelCluster`), two daemons that
find the master through them (`test_sentinel.nodes_on`), and two raw session peers
(`session_peer.SessionPeer`, which checks that every numbered message it reads is the next
seq): a busy one on node 0 that keeps asking while the master is down, and an idle one on
node 1 that only listens.  The master is killed -9; what the docs promise is checked:

* while no master is known, what needs the store is refused, typed: a numbered request
  closes the connection with ``unavailable`` (the session stays in Redis), a resume answers
  ``resumed: false, reason: unavailable`` (retry later), a publish is a 503;
* after the failover the session resumes on either node with nothing lost and nothing run or
  delivered twice: the resume's ``ack`` says which request to resend, pushes and broadcasts
  made while it was detached are replayed, and its subscription, whose channel starts a new
  epoch (the new master's data is a new generation), gets one numbered ``resync``
  (``recovered: false``) and then every publication of the new epoch;
* the idle session's connection stays up throughout: it gets the same ``resync`` and the new
  epoch's publications, numbered, and its requests and acks work on the new master.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
from redis_sentinel import SentinelCluster
from session_peer import SessionPeer
from test_cluster import LINK_DOWN, LINK_UP, Node
from test_sentinel import nodes_on


def data_of(message: dict[str, Any]) -> Any:
    return message.get("data")


def of_type(type_: str) -> Any:
    return lambda m: m.get("type") == type_


def echo(peer: SessionPeer, text: str) -> None:
    reply = peer.reply(peer.request("echo", text))
    assert (reply["ack"], data_of(reply)) == (peer.seq, text), reply


def new_epoch(peer: SessionPeer) -> dict[str, Any]:
    """The one numbered ``resync`` of channel ``ha``: the old epoch is gone, and the new
    one's publications follow from its start (offset 0).  Its reason is ``epoch_changed``,
    or ``history_lost`` when the new epoch had no publication yet (docs/cluster.md)."""
    resync = data_of(peer.expect(of_type("resync")))
    expected = {"channel": "ha", "recovered": False, "offset": 0}
    assert {k: resync.get(k) for k in expected} == expected, resync
    assert resync.get("reason") in ("epoch_changed", "history_lost"), resync
    return resync


def send(node: Node, sid: str, text: str) -> None:
    """A push through the admin API of ``node`` (``sid``'s session may be anywhere)."""
    status, answer = node.http("POST", f"/clients/{sid}/send", {"type": "told", "data": text})
    assert (status, answer) == (200, {"sent": 1}), answer


@pytest.mark.scenario
def test_a_session_lives_through_a_sentinel_failover(tmp_path: Path) -> None:
    with (
        SentinelCluster(tmp_path / "redis") as ha,
        nodes_on(tmp_path, ha, 2) as (a, b),
        SessionPeer(a.port) as busy,
        SessionPeer(b.port) as idle,
        contextlib.ExitStack() as stack,
    ):
        epochs = set()
        for peer in (busy, idle):
            peer.start()
            answer = data_of(peer.reply(peer.request("subscribe", {"channel": "ha"})))
            assert answer["offset"] == 0, answer
            epochs.add(answer["epoch"])
        (epoch,) = epochs
        echo(busy, "one")
        a.publish("ha", "before")
        for peer in (busy, idle):
            pub = data_of(peer.expect(of_type("publication")))
            assert (pub["offset"], pub["data"]) == (1, "before"), pub
        send(b, busy.sid, "pushed before")  # forwarded to node 0, numbered there
        assert data_of(busy.expect(of_type("told"))) == "pushed before"
        for peer in (busy, idle):
            # An ack is not answered: a numbered round trip after it shows Redis took it
            # (one link, applied in order).  One still in flight when the master dies
            # would close the connection "unavailable", as any store write would.
            peer.ack()
            echo(peer, "acked")

        killed = time.monotonic()
        ha.kill_master()
        for node in (a, b):
            node.daemon.wait_for(LINK_DOWN)
        # The busy client goes on asking: its request cannot be recorded in Redis, so the
        # node closes the connection, typed, and keeps the session for a resume.
        busy.request("echo", "during")
        rest = busy.closed()
        assert [m["error"]["code"] for m in rest] == ["unavailable"], rest
        assert all("seq" not in m for m in rest), rest
        # It reconnects at once: the resume is answered "unavailable", not "lost".
        retry = stack.enter_context(busy.clone(b.port))
        assert data_of(retry.resume()) == {"resumed": False, "reason": "unavailable"}
        status, answer = b.http("POST", "/publish", {"channel": "ha", "data": "refused"})
        assert (status, answer["code"]) == (503, "unavailable"), answer

        new_port = ha.wait_for_failover()
        for node in (a, b):
            node.daemon.wait_for(rf"the master of \S+ is 127\.0\.0\.1:{new_port}")
            node.daemon.wait_for(LINK_UP, count=2)
        # While the busy session is detached: a push and a broadcast are kept for it.
        send(a, busy.sid, "pushed while away")
        status, answer = b.http("POST", "/broadcast", {"type": "notice", "data": "all"})
        assert status == 200, answer
        a.publish("ha", "after")

        # The idle session never lost its connection: one resync, then the new epoch.
        resync = new_epoch(idle)
        assert resync["epoch"] != epoch, resync
        pub = data_of(idle.expect(of_type("publication")))
        assert (pub["offset"], pub["data"]) == (1, "after"), pub
        assert data_of(idle.expect(of_type("notice"))) == "all"
        echo(idle, "idle after")
        idle.ack()

        # The busy session resumes (on the connection that was told "unavailable").
        answer = data_of(retry.resume())
        resumed = time.monotonic() - killed
        assert answer == {
            "resumed": True,
            "session": busy.sid,
            "ack": busy.seq - 1,  # "during" never reached Redis: resend it
            "replay": 2,
            "expiry": 120,
        }, answer
        replay = [retry.next(), retry.next()]
        assert sorted((m["type"], data_of(m)) for m in replay) == [
            ("notice", "all"),
            ("told", "pushed while away"),
        ], replay
        during = retry.request("echo", "during", seq=busy.seq)
        reply = retry.reply(during)
        assert (reply["ack"], data_of(reply)) == (busy.seq, "during"), reply
        new_epoch(retry)
        pub = data_of(retry.expect(of_type("publication")))
        assert (pub["offset"], pub["data"]) == (1, "after"), pub
        echo(retry, "three")
        a.publish("ha", "later")
        for peer in (retry, idle):
            pub = data_of(peer.expect(of_type("publication")))
            assert (pub["offset"], pub["data"]) == (2, "later"), pub
        # Nothing else came: no second resync, no message twice (seqs are checked by the
        # peers as they read: consecutive, none repeated).
        for peer in (retry, idle):
            assert [m for m in peer.inbox if m["type"] in ("resync", "publication")] == []
        print(f"\nkill -9 of the master to the session resumed on the new one: {resumed:.2f}s")

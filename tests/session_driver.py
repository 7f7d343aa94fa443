"""A resumable client on the real reactor, for the session end-to-end and chaos tests.

Run as ``python session_driver.py '<json options>'``; prints one JSON line with what the
application saw.  The subprocess timeout of the test is its deadline.

It subscribes to channel ``chaos`` and sends ``count`` ``work`` requests (``n`` = 0, 1, ...),
at most ``window`` unanswered, paced over ``min_seconds``; a seeded random choice asks the
server to push ``pushed n`` back and/or to publish ``n`` on the channel (`SESSION_HANDLERS`
in test_sessions_e2e.py).
Each reply must be ``n``; pushes and publications must arrive exactly once and in order.
"""

from __future__ import annotations

import json
import random
import sys
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred

from heartbeatd.client import ReconnectingClient


def plan(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"n": n, "push": rng.random() < 0.5, "pub": rng.random() < 0.3} for n in range(count)]


def _first_difference(got: list[Any], want: list[Any]) -> Any:
    """Where two lists first differ, with a few items of each from there (None: equal)."""
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return {"at": i, "got": got[max(i - 3, 0) : i + 5], "want": want[max(i - 3, 0) : i + 5]}
    return None if len(got) == len(want) else {"at": min(len(got), len(want))}


async def main(reactor: Any, options: dict[str, Any]) -> None:
    count, window = options["count"], options.get("window", 64)
    work = plan(count, options.get("seed", 1))
    client = ReconnectingClient(
        reactor,
        options["endpoints"],
        backoff_initial=0.02,
        backoff_max=0.2,
        hello_timeout=options.get("hello_timeout", 2.0),
        request_timeout=options.get("request_timeout", 60.0),
        resumable=True,
        random=random.Random(options.get("seed", 1)).random,
    )
    events: list[dict[str, Any]] = []
    pushes: list[int] = []
    pubs: list[tuple[int, int]] = []
    not_recovered: list[str] = []
    client.on_session(events.append)
    client.on("pushed", lambda data, conn: pushes.append(data))
    # Every publication the connection hands over, before the subscription's own checks.
    wire_pubs: list[Any] = []
    client.on("publication", lambda data, conn: wire_pubs.append(data.get("data")))
    client.start()
    await client.subscribe(
        "chaos",
        lambda data, offset, sub: pubs.append((offset, data)),
        lambda sub, reason: not_recovered.append(reason),
    )
    outcomes: dict[str, int] = {}
    wrong: list[Any] = []

    # One sender, so requests are numbered in order of n; at most ``window`` unanswered;
    # paced over at least ``min_seconds``, so the chaos has time to strike many times.
    began, pace = reactor.seconds(), options.get("min_seconds", 0.0) / max(count, 1)
    limit = defer.DeferredSemaphore(window)
    replies: list[Deferred[None]] = []

    progress_at = options.get("progress_at")

    def answered(reply: Any, n: int) -> None:
        outcomes["ok"] = outcomes.get("ok", 0) + 1
        if outcomes["ok"] == progress_at:  # the test may act now (kill a node...)
            print(json.dumps({"progress": progress_at}), flush=True)
        if reply != n:
            wrong.append([n, reply])

    def failed(failure: Any) -> None:
        name = type(failure.value).__name__
        outcomes[name] = outcomes.get(name, 0) + 1

    for item in work:
        due = began + pace * item["n"] - reactor.seconds()
        if due > 0:
            await task.deferLater(reactor, due, lambda: None)
        await limit.acquire()
        d = client.request("work", item).addCallbacks(answered, failed, (item["n"],))
        d.addBoth(lambda _: limit.release())
        replies.append(d)
    await defer.gatherResults(replies)
    want_pushes = [i["n"] for i in work if i["push"]]
    want_pubs = [i["n"] for i in work if i["pub"]]
    deadline = reactor.seconds() + options.get("settle", 10.0)

    def missing() -> bool:  # by value: a handler run again (redelivered) repeats some
        return bool(set(want_pushes) - set(pushes) or set(want_pubs) - {d for _, d in pubs})

    while missing() and reactor.seconds() < deadline:
        await task.deferLater(reactor, 0.05, lambda: None)
    probe = None
    if missing():  # diagnosis: is the subscription live at all?
        before = len(wire_pubs)
        await client.request("work", {"n": -1, "pub": True})
        await task.deferLater(reactor, 2.0, lambda: None)
        probe = {"new_on_the_wire": wire_pubs[before:][-5:], "current": client.current}
    offsets = [o for o, _ in pubs]
    session = client.session
    assert session is not None
    result = {
        "outcomes": outcomes,
        "wrong_replies": wrong[:5],
        "pushes": len(pushes),
        "pushes_exact": pushes == want_pushes,
        "pushes_first_difference": _first_difference(pushes, want_pushes),
        "pubs": len(pubs),
        "pubs_exact": [d for _, d in pubs] == want_pubs,
        "pubs_first_difference": _first_difference([d for _, d in pubs], want_pubs),
        "offsets_consecutive": offsets == list(range(offsets[0], offsets[0] + len(offsets)))
        if offsets
        else True,
        "not_recovered": not_recovered,
        "events": {e["event"]: sum(1 for x in events if x["event"] == e["event"]) for e in events},
        "lost_reasons": [e["reason"] for e in events if e["event"] == "session_lost"],
        "replayed": session.replayed,
        "duplicates_dropped": session.duplicates,
        "unacked_left": len(session.state.unacked),
    }
    result["wire_pubs"] = len(wire_pubs)
    result["probe"] = probe
    result["wire_pubs_last"] = wire_pubs[-3:]
    if options.get("raw"):
        result["raw_pushes"], result["raw_pubs"] = pushes, [d for _, d in pubs]
    await client.stop()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, json.loads(sys.argv[1]))))

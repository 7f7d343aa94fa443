"""Replays the sessions transcript of docs/protocol.md against a server, line by line."""

from __future__ import annotations

import json
import re
from itertools import count
from pathlib import Path
from typing import Any

from helpers import Peer, make_config
from twisted.internet.task import Clock

from heartbeatd.cluster import broker as broker_module
from heartbeatd.server import resumable
from heartbeatd.server.factory import ServerFactory

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def transcript() -> list[tuple[str, str, Any]]:
    text = DOC.read_text()
    block = text.split("## Sessions", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    lines: list[tuple[str, str, Any]] = []
    for line in block.strip().splitlines():
        if m := re.fullmatch(r"([AB])([<>]) (.*)", line):
            lines.append((m.group(1), m.group(2), json.loads(m.group(3))))
        elif m := re.fullmatch(r"([AB])- .*", line):
            lines.append((m.group(1), "-", None))
        elif m := re.fullmatch(r"S> (broadcast|publish) (\S+) (.*)", line):
            lines.append(("S", m.group(1), (m.group(2), json.loads(m.group(3)))))
        else:
            raise AssertionError(line)
    return lines


def test_the_documented_transcript(monkeypatch) -> None:
    monkeypatch.setattr(broker_module, "new_epoch", lambda: "5e1f0c2a")
    monkeypatch.setattr(resumable, "_new_sid", lambda: "5e55104d0c0ffee0a11ce5e55104d0c0")
    monkeypatch.setattr(resumable, "_new_key", lambda: "c2VjcmV0LWtleS1vZi0xOTItYml0cw")
    clock = Clock()
    factory = ServerFactory(make_config(), clock=clock)
    peers: dict[str, Peer] = {}
    inbox: dict[str, list[Any]] = {"A": [], "B": []}

    def peer(name: str) -> Peer:
        if name not in peers:
            peers[name] = Peer(factory, 40000 + len(peers))
        return peers[name]

    def collect() -> None:
        clock.advance(0)
        for name, p in peers.items():
            inbox[name].extend(p.received())

    steps = count(1)
    for who, kind, message in transcript():
        step = next(steps)
        if kind == ">":
            peer(who).send(message)
            collect()
        elif kind == "-":
            collect()
            peers[who].disconnect()
        elif kind == "broadcast":
            factory.server.broadcast(*message)
            collect()
        elif kind == "publish":
            factory.channels.publish(*message)
            collect()
        else:
            assert inbox[who], f"step {step}: {who} expected {message}, got nothing"
            assert inbox[who].pop(0) == message, f"step {step}"
    assert inbox == {"A": [], "B": []}

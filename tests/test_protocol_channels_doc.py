"""Replays the channels transcript of docs/protocol.md against a server, line by line."""

from __future__ import annotations

import json
import re
from itertools import count
from pathlib import Path

from helpers import Peer, make_config
from twisted.internet.task import Clock

from heartbeatd.cluster import broker as broker_module
from heartbeatd.server.factory import ServerFactory

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def transcript() -> list[tuple[str, str, dict]]:
    text = DOC.read_text()
    block = text.split("## Channels", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    lines = []
    for line in block.strip().splitlines():
        m = re.fullmatch(r"([AB])([<>]) (.*)", line)
        assert m, line
        lines.append((m.group(1), m.group(2), json.loads(m.group(3))))
    return lines


def test_the_documented_transcript(monkeypatch) -> None:
    monkeypatch.setattr(broker_module, "new_epoch", lambda: "5e1f0c2a")
    clock = Clock()
    factory = ServerFactory(make_config(channels={"client_publish": True}), clock=clock)
    ids = iter(["a0000000000000a", "b0000000000000b"])
    monkeypatch.setattr(factory, "new_session_id", lambda: next(ids))
    peers = {"A": Peer(factory), "B": Peer(factory, 40001)}
    inbox: dict[str, list] = {"A": [], "B": []}
    steps = count(1)
    for who, direction, message in transcript():
        step = next(steps)
        if direction == ">":
            peers[who].send(message)
            clock.advance(0)
            for name, peer in peers.items():
                inbox[name].extend(peer.received())
        else:
            assert inbox[who], f"step {step}: {who} expected {message}, got nothing"
            assert inbox[who].pop(0) == message, f"step {step}"
    assert inbox == {"A": [], "B": []}

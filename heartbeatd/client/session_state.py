"""The numbers of a resumable session, client side (sans-IO: no Twisted, no sockets).

A session outlives connections (docs/protocol.md, "Sessions").  This object keeps what the
client must remember between them:

- outbound: the next client ``seq`` and a copy of every numbered request the server has not
  acknowledged yet (the resend buffer), trimmed by the server's cumulative acks and resent,
  in order and unchanged, after a resume;
- inbound: the last server ``seq`` delivered to the application (a message at or below it is
  a duplicate from a replay and is dropped; one past ``last + 1`` is a gap);
- our own acks: how many delivered messages are not acknowledged yet, so the caller can
  batch them (every ``batch`` messages, or after a delay it measures with its own clock).

It never reads the time and never writes: `heartbeatd.client.session` does both.
"""

from __future__ import annotations

from typing import Any, Final

from heartbeatd.wire.envelope import OMIT, decode_json_unchecked, encode_json

__all__ = ["DUPLICATE", "GAP", "NEW", "SessionState"]

#: Verdicts of `SessionState.accept` for an inbound server ``seq``.
NEW: Final = "new"
DUPLICATE: Final = "duplicate"
GAP: Final = "gap"


def _positive_int(value: Any) -> bool:
    return type(value) is int and value > 0


class SessionState:
    """Sequence numbers, resend buffer and ack bookkeeping of one client session."""

    def __init__(self) -> None:
        #: The session's id and key once the server granted them (None: no session).
        self.sid: str | None = None
        self.key: str | None = None
        self.expiry: float | None = None
        #: The seq the next numbered request gets.
        self.next_seq = 1
        #: seq -> encoded envelope of every numbered request not acknowledged by the server.
        self.unacked: dict[int, bytes] = {}
        #: The highest client seq the server said it has (its high-water mark).
        self.server_ack = 0
        #: The last server seq delivered to the application.
        self.delivered = 0
        #: The last server seq we acknowledged (in an ack or in a resume).
        self.acked = 0

    # -- lifetime ---------------------------------------------------------------------------

    def start(self, sid: str, key: str, expiry: float | None) -> None:
        """A new session was granted.  Requests numbered while there was none (from 1,
        waiting in the buffer) stay: they are the new session's first ones."""
        self.sid, self.key, self.expiry = sid, key, expiry
        self.server_ack = 0
        self.delivered = 0
        self.acked = 0

    def lose(self) -> list[int]:
        """The session is gone: forget it; returns the seqs whose requests are dropped."""
        dropped = list(self.unacked)
        self.sid = self.key = None
        self.expiry = None
        self.next_seq = 1
        self.unacked = {}
        self.server_ack = 0
        self.delivered = 0
        self.acked = 0
        return dropped

    @property
    def active(self) -> bool:
        return self.sid is not None

    # -- outbound ---------------------------------------------------------------------------

    def number(self, type: str, data: Any = OMIT) -> tuple[int, bytes]:
        """Number a request (its ``id`` is its ``seq``), keep a copy; returns both."""
        seq = self.next_seq
        envelope: dict[str, Any] = {"type": type, "id": seq, "seq": seq}
        if data is not OMIT:
            envelope["data"] = data
        body = encode_json(envelope)
        self.next_seq = seq + 1
        self.unacked[seq] = body
        return seq, body

    def drop_unsent(self, seq: int) -> None:
        """Request ``seq`` never left and is abandoned (it failed as not connected): forget
        its copy, so no connection ever sends what the application was told had failed.
        Every later copy (never sent either) moves down by one, so the seqs the server sees
        stay consecutive; the caller moves its own records the same way."""
        unacked = self.unacked
        if seq not in unacked:
            return
        later = [s for s in unacked if s > seq]
        bodies = [unacked.pop(s) for s in later]
        del unacked[seq]
        for old, body in zip(later, bodies, strict=True):
            unacked[old - 1] = _renumbered(body, old - 1)
        self.next_seq -= 1

    def server_acked(self, ack: Any) -> None:
        """The server has every request up to ``ack``: drop their copies.  A value that is
        not a positive int, or below a previous one, changes nothing; one past what we sent
        is taken as everything we sent."""
        if not _positive_int(ack) or ack <= self.server_ack:
            return
        ack = min(ack, self.next_seq - 1)
        self.server_ack = ack
        unacked = self.unacked
        while unacked:
            first = next(iter(unacked))
            if first > ack:
                break
            del unacked[first]

    def to_resend(self, ack: Any) -> list[bytes]:
        """After a resume answering ``ack``: the requests to send again, in seq order."""
        self.server_acked(ack)
        return list(self.unacked.values())

    # -- inbound ----------------------------------------------------------------------------

    def accept(self, seq: int) -> str:
        """A numbered server message arrived: `NEW` (deliver it), `DUPLICATE` (drop it) or
        `GAP` (messages are missing before it: the connection is not to be trusted)."""
        if seq <= self.delivered:
            return DUPLICATE
        if seq != self.delivered + 1:
            return GAP
        self.delivered = seq
        return NEW

    @property
    def ack_pending(self) -> int:
        """Messages delivered and not acknowledged yet."""
        return self.delivered - self.acked

    def take_ack(self) -> int | None:
        """The ack to send now (and recorded as sent), or None if everything is acked."""
        if self.delivered <= self.acked:
            return None
        self.acked = self.delivered
        return self.acked

    def resuming(self) -> int:
        """The ``ack`` a resume carries; it acknowledges everything delivered."""
        self.acked = self.delivered
        return self.delivered


def _renumbered(body: bytes, seq: int) -> bytes:
    """A copy `SessionState.number` made, with ``seq`` as its id and seq (nothing else
    changes: the application's data is the one it gave then)."""
    envelope = decode_json_unchecked(body)
    envelope["id"] = envelope["seq"] = seq
    return encode_json(envelope)

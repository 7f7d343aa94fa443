"""The wire: bytes in, messages out.  Sans-IO, with no Twisted import (a test enforces it).

Everything below the reactor uses this package: the server, the client, the pool and any
fuzzer.  `ACCELERATED` says which hot path runs: ``"c"`` (the optional extension) or
``"python"``.  A framing says where one frame body ends and the next begins (`int32`, `seed`); the
envelope says what a body means (``{"type", "id", "data"}``) and names the error codes.
"""

from __future__ import annotations

from heartbeatd.wire._accelerated import ACCELERATED
from heartbeatd.wire.framing import (
    HEARTBEAT,
    FrameDecoder,
    FrameTooLarge,
    Framing,
    FramingError,
    Heartbeat,
)
from heartbeatd.wire.int32 import Int32Decoder, Int32Framing
from heartbeatd.wire.seed import SeedDecoder, SeedFraming

__all__ = [
    "ACCELERATED",
    "FRAMINGS",
    "HEARTBEAT",
    "FrameDecoder",
    "FrameTooLarge",
    "Framing",
    "FramingError",
    "Heartbeat",
    "Int32Decoder",
    "Int32Framing",
    "SeedDecoder",
    "SeedFraming",
    "get_framing",
]

#: The framings a config may name (``framing:``), by name.
FRAMINGS: dict[str, Framing] = {
    Int32Framing.name: Int32Framing(),
    SeedFraming.name: SeedFraming(),
}


def get_framing(name: str) -> Framing:
    """Look a framing up by its config name."""
    try:
        return FRAMINGS[name]
    except KeyError:
        raise ValueError(f"unknown framing {name!r}; expected one of {sorted(FRAMINGS)}") from None

"""The framings a config may name (``framing:``), by name."""

from __future__ import annotations

from heartbeatd.framing import Framing, Int32Framing
from heartbeatd.seed_framing import SeedFraming

__all__ = ["FRAMINGS", "get_framing"]

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

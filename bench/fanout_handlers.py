"""Handlers for bench/fanout.py: ``broadcast`` pushes ``bcast`` to every connection.

The fan-out benchmark's peers all answer a ``broadcast`` request the same way (one push to
every connection, then ``{"sent": N}``); heartbeatd does it through the handler API's
``server.broadcast``, the path an application would use.
"""

from __future__ import annotations

from typing import Any


def register(registry: Any) -> None:
    @registry.handler("broadcast")
    def broadcast(request: Any) -> dict[str, int]:
        return {"sent": request.server.broadcast("bcast", request.data)}

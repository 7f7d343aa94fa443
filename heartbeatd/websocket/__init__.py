"""WebSocket: browsers and Node.js programs as clients, on the same connection core.

One text message carries one envelope, exactly the JSON of docs/protocol.md; everything a
connection means (dispatch, replies, auth, heartbeats, channels, limits) is the core's
(`heartbeatd.server.connection`).  This room adds only the adapter: the HTTP upgrade (path,
origins, trusted proxies, a deadline), RFC 6455 messages read by wsproto, and close codes.
`WebSocketSite` is the listener's factory; it shares the main `ServerFactory`, so both
listeners count against one ``limits.max_connections`` and one set of counters.

wsproto comes with the ``heartbeatd[websocket]`` extra; `available` says whether it is
installed, and the daemon reports a config error naming the extra when it is not.
"""

from __future__ import annotations

__all__ = ["MISSING_EXTRA", "available"]

MISSING_EXTRA = (
    "the WebSocket listener needs the optional dependency of heartbeatd[websocket] (wsproto): "
    "pip install 'heartbeatd[websocket]'"
)


def available() -> bool:
    """True when the WebSocket extra (wsproto) is installed."""
    try:
        import wsproto  # noqa: F401
    except ImportError:
        return False
    return True

"""The server: what one daemon does with connections.

`ServerFactory` tracks the clients and runs their heartbeat; a `Connection`
(`heartbeatd.server.connection`) is what one client means, whatever carries its bytes, and
`ServerProtocol` adapts a byte stream (int32 or seed framing, TCP, TLS) to it (the WebSocket
adapter lives in `heartbeatd.websocket`).  Handlers see the narrow API of
`heartbeatd.server.handlers` (a `Request` with its session and the server), never these
classes.
"""

from __future__ import annotations

from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import NO_REPLY, HandlerError, HandlerRegistry, Reply, Request

__all__ = ["NO_REPLY", "HandlerError", "HandlerRegistry", "Reply", "Request", "ServerFactory"]

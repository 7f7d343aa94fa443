"""The admin HTTP API (twisted.web): health, metrics, clients, push, disconnect.

Served in the reactor thread from our own resources (prometheus-client's bundled Twisted
resource defers to a thread pool and binds the global reactor).  Bound to 127.0.0.1 by
default; ``admin.token`` adds a bearer token, which is compared in constant time and never
logged.

    GET    /healthz                      200 while serving, 503 while draining
    GET    /metrics                      Prometheus text format
    GET    /clients[?recent_evictions=N] connected clients (and the last N closes)
    POST   /clients/{id}/send            body {"type": ..., "data": ...}: push to one client
    POST   /broadcast                    body {"type": ..., "data": ...}: push to every client
    DELETE /clients/{id}                 disconnect one client (reason "admin")
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from heartbeatd.daemon.metrics import registry_for
from heartbeatd.server.factory import ServerFactory

__all__ = ["AdminRoot", "admin_site"]


def _json(request: Request, value: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(value).encode() + b"\n"


def _read_message(request: Request) -> tuple[str, Any] | bytes:
    """The ``{"type", "data"}`` body of a push, or an error response already set."""
    try:
        body = json.loads(request.content.read() or b"null")
    except ValueError:
        return _json(request, {"error": "the body is not valid JSON"}, 400)
    if not isinstance(body, dict) or not isinstance(body.get("type"), str) or not body["type"]:
        return _json(request, {"error": 'expected {"type": "...", "data": ...}'}, 400)
    return body["type"], body.get("data")


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, factory: ServerFactory) -> None:
        super().__init__()
        self.factory = factory


class Health(_Leaf):
    def render_GET(self, request: Request) -> bytes:
        if self.factory.draining:
            return _json(request, {"status": "draining"}, 503)
        return _json(request, {"status": "serving", "clients": len(self.factory.clients)})


class Metrics(_Leaf):
    def __init__(self, factory: ServerFactory) -> None:
        super().__init__(factory)
        self.registry = registry_for(factory)

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class Broadcast(_Leaf):
    def render_POST(self, request: Request) -> bytes:
        message = _read_message(request)
        if isinstance(message, bytes):
            return message
        return _json(request, {"sent": self.factory.broadcast(*message)})


class Clients(Resource):
    def __init__(self, factory: ServerFactory) -> None:
        super().__init__()
        self.factory = factory

    def getChild(self, path: bytes, request: Request) -> Resource:
        if not path:
            return self
        return OneClient(self.factory, path.decode("utf-8", "replace"))

    def render_GET(self, request: Request) -> bytes:
        f = self.factory
        now, alive_now = f.clock.seconds(), f.now()
        clients = [
            {
                "session": c.session_id,
                "peer": c.peer,
                "identity": c.identity,
                "connected_at": c.connected_at,
                "last_seen_ago": round(alive_now - c.last_seen, 3),
                "last_rtt": c.last_rtt,
                "frames_in": c.frames_in,
                "frames_out": c.frames_out,
                "bytes_in": c.bytes_in,
                "bytes_out": c.bytes_out,
            }
            for c in f.clients.values()
        ]
        result: dict[str, Any] = {"now": now, "count": len(clients), "clients": clients}
        recent = request.args.get(b"recent_evictions")
        if recent:
            try:
                n = max(0, int(recent[0]))
            except ValueError:
                return _json(request, {"error": "recent_evictions must be an integer"}, 400)
            records = list(f.recent_closes)[-n:] if n else []
            result["recent_evictions"] = [r.to_dict() for r in records]
        return _json(request, result)


class OneClient(Resource):
    def __init__(self, factory: ServerFactory, session_id: str) -> None:
        super().__init__()
        self.factory = factory
        self.session_id = session_id

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"send":
            return SendToClient(self.factory, self.session_id)
        return super().getChild(path, request)

    def render_DELETE(self, request: Request) -> bytes:
        client = self.factory.clients.get(self.session_id)
        if client is None:
            return _json(request, {"error": f"no client {self.session_id!r}"}, 404)
        client.evict("admin", "disconnected through the admin API")
        return _json(request, {"disconnected": self.session_id})


class SendToClient(_Leaf):
    def __init__(self, factory: ServerFactory, session_id: str) -> None:
        super().__init__(factory)
        self.session_id = session_id

    def render_POST(self, request: Request) -> bytes:
        message = _read_message(request)
        if isinstance(message, bytes):
            return message
        if not self.factory.send(self.session_id, *message):
            return _json(request, {"error": f"no client {self.session_id!r}"}, 404)
        return _json(request, {"sent": 1})


class _Unauthorized(_Leaf):
    def render(self, request: Request) -> bytes:
        request.setHeader(b"www-authenticate", b'Bearer realm="heartbeatd"')
        return _json(request, {"error": "missing or wrong bearer token"}, 401)


class AdminRoot(Resource):
    """The API's root; checks the bearer token (when set) before any child is reached."""

    def __init__(self, factory: ServerFactory, token: str = "") -> None:
        super().__init__()
        self._token = token.encode()
        self.putChild(b"healthz", Health(factory))
        self.putChild(b"metrics", Metrics(factory))
        self.putChild(b"clients", Clients(factory))
        self.putChild(b"broadcast", Broadcast(factory))
        self._unauthorized = _Unauthorized(factory)

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if self._token:
            header = request.getHeader(b"authorization") or b""
            offered = header.removeprefix(b"Bearer ")
            if not hmac.compare_digest(offered, self._token):
                return self._unauthorized
        return super().getChildWithDefault(path, request)


def admin_site(factory: ServerFactory, token: str = "") -> Site:
    site = Site(AdminRoot(factory, token))
    site.noisy = False
    site.displayTracebacks = False
    return site

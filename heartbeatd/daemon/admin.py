"""The admin HTTP API (twisted.web): health, metrics, clients, push, disconnect.

Served in the reactor thread from our own resources (prometheus-client's bundled Twisted
resource defers to a thread pool and binds the global reactor).  Bound to 127.0.0.1 by
default; ``admin.token`` (or ``admin.token_file``) adds a bearer token, compared in constant
time and never logged.

    GET    /healthz                      200 while serving, 503 while draining (public)
    GET    /metrics                      Prometheus text format
    GET    /clients[?recent_evictions=N] connected clients (and the last N closes)
    POST   /clients/{session}/send       body {"type": ..., "data": ...}: push to one client
    POST   /broadcast                    body {"type": ..., "data": ...}: push to every client
    DELETE /clients/{session}            disconnect one client (reason "admin")

The token and the body size are checked when the request's headers are complete, before a
byte of its body is read (`AdminChannel`): an unauthenticated peer cannot make us buffer a
64 MiB body, and a ``Content-Length`` above ``admin.max_body_bytes`` is refused with 413 at
once.  Every answer is JSON, errors included.
"""

from __future__ import annotations

import hmac
import json
from collections import Counter
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.http import Headers, HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from heartbeatd._logging import get_logger
from heartbeatd.config import AdminConfig
from heartbeatd.daemon import channels_admin
from heartbeatd.daemon.admin_guard import AdminGuard, BadBody, parse_body
from heartbeatd.daemon.metrics import registry_for
from heartbeatd.server.factory import EvictionRecord, NotAuthenticated, ServerFactory

__all__ = [
    "AdminChannel",
    "AdminPolicy",
    "AdminRoot",
    "AdminSite",
    "admin_policy",
    "admin_site",
]

log = get_logger(__name__)

_REASONS = {401: b"Unauthorized", 404: b"Not Found", 405: b"Method Not Allowed"}
_REASONS.update({413: b"Payload Too Large", 400: b"Bad Request", 403: b"Forbidden"})
_REASONS.update({415: b"Unsupported Media Type", 421: b"Misdirected Request", 409: b"Conflict"})


def _json_body(value: Any) -> bytes:
    return json.dumps(value).encode() + b"\n"


def _json(request: Request, value: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return _json_body(value)


class AdminPolicy:
    """Who may call what, and how big a body may be; checked before a body is read."""

    def __init__(
        self,
        token: str = "",
        health_public: bool = True,
        max_body: int = 1 << 20,
        allowed_hosts: tuple[str, ...] = (),
    ):
        self.token = token.encode()
        self.health_public = health_public
        self.max_body = max_body
        #: Cross-site checks (Host, Origin, Content-Type); `admin_guard`.
        self.guard = AdminGuard(allowed_hosts)

    def is_public(self, method: bytes, path: bytes) -> bool:
        path = path.split(b"?", 1)[0].rstrip(b"/")
        return self.health_public and method in (b"GET", b"HEAD") and path == b"/healthz"

    def authorized(self, method: bytes, path: bytes, headers: Headers) -> bool:
        if not self.token or self.is_public(method, path):
            return True
        offered = (headers.getRawHeaders(b"authorization") or [b""])[0]
        return hmac.compare_digest(offered.removeprefix(b"Bearer "), self.token)

    def refusal(
        self,
        method: bytes,
        path: bytes,
        headers: Headers,
        length: int | None,
        listener: Any = None,
    ) -> tuple[int, str] | tuple[int, str, str] | None:
        """``(status, message[, code])`` when the request must be refused, else None.

        ``listener`` is the address the request came in on (``transport.getHost()``).
        """
        refused = self.guard.refusal(method, headers, length, listener)
        if refused is not None:
            return refused
        if not self.authorized(method, path, headers):
            return 401, "missing or wrong bearer token"
        if length is not None and length > self.max_body:
            return 413, f"the body is larger than admin.max_body_bytes ({self.max_body})"
        return None


class AdminChannel(HTTPChannel):
    """An HTTPChannel that refuses at the header stage: wrong token, or a body too large.

    `HTTPChannel.allHeadersReceived` is the first moment the method, path, headers and
    ``Content-Length`` are all known and no body byte has been consumed; a refused request
    gets its JSON answer there, reading stops (``loseConnection`` stops reading) and whatever
    the peer keeps sending is discarded, never buffered.  Chunked bodies, whose size is not
    announced, are counted as they arrive (`AdminRequest.handleContentChunk`).
    """

    site: AdminSite
    _refused = False

    def allHeadersReceived(self) -> None:
        request = self.requests[-1]
        refusal = self.site.policy.refusal(
            self._command,
            self._path,
            request.requestHeaders,
            self.length,
            self.transport.getHost(),
        )
        if refusal is not None:
            self.refuse(*refusal)
            return
        super().allHeadersReceived()

    def refuse(self, code: int, message: str, error_code: str = "") -> None:
        """Answer ``code`` with a JSON error, stop reading and close."""
        if self._refused:
            return
        self._refused = True
        self.site.refused[str(code)] += 1
        if self.site.access_log:
            log.info(
                "admin {method} {path} {code} (refused before the body) from {peer}",
                method=self._command.decode("ascii", "replace"),
                path=self._path.decode("ascii", "replace"),
                code=code,
                peer=_peer(self.transport.getPeer()),
            )
        body = _json_body(
            {"error": message, "code": error_code} if error_code else {"error": message}
        )
        extra = b'WWW-Authenticate: Bearer realm="heartbeatd"\r\n' if code == 401 else b""
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"%sConnection: close\r\n\r\n%s"
            % (code, _REASONS.get(code, b"Error"), len(body), extra, body)
        )
        self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        if not self._refused:
            super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        if not self._refused:
            super().allContentReceived()


class AdminRequest(Request):
    """Counts body bytes as they arrive, so a chunked body cannot exceed the cap either."""

    _body_bytes = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._body_bytes += len(data)
        channel = self.channel
        if isinstance(channel, AdminChannel):
            limit = channel.site.policy.max_body
            if self._body_bytes > limit:
                channel.refuse(413, f"the body is larger than admin.max_body_bytes ({limit})")
                return
        super().handleContentChunk(data)


def _peer(address: Any) -> str:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return f"{host}:{port}" if host is not None else str(address)


def _read_message(request: Request) -> tuple[str, Any] | bytes:
    """The ``{"type", "data"}`` body of a push, or an error response already set."""
    try:
        body = parse_body(request.content.read())
    except BadBody as e:
        return _json(request, {"error": e.message, "code": e.code}, 400)
    if not isinstance(body, dict) or not isinstance(body.get("type"), str) or not body["type"]:
        return _json(request, {"error": 'expected {"type": "...", "data": ...}'}, 400)
    return body["type"], body.get("data")


class JsonResource(Resource):
    """A resource whose unknown children and unsupported methods answer JSON, not HTML."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFound()

    def render(self, request: Request) -> bytes:
        method = request.method.decode("ascii", "replace")
        handler = getattr(self, f"render_{method}", None)
        if method == "HEAD" and not hasattr(self, "render_GET"):
            handler = None
        if handler is None:
            allowed = sorted(
                name[len("render_") :]
                for name in dir(self)
                if name.startswith("render_") and name != "render_HEAD"
            )
            if "GET" in allowed:
                allowed.append("HEAD")
            request.setHeader(b"allow", ", ".join(allowed).encode())
            return _json(
                request, {"error": f"method {method} not allowed; allowed: {allowed}"}, 405
            )
        return handler(request)


class NotFound(JsonResource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return _json(request, {"error": f"no such resource: {request.path.decode()!s}"}, 404)


class _Leaf(JsonResource):
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
    def __init__(self, factory: ServerFactory, refused: Counter[str] | None = None) -> None:
        super().__init__(factory)
        self.registry = registry_for(factory, refused)

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class Broadcast(_Leaf):
    def render_POST(self, request: Request) -> bytes:
        message = _read_message(request)
        if isinstance(message, bytes):
            return message
        return _json(request, {"sent": self.factory.broadcast(*message)})


def eviction(record: EvictionRecord) -> dict[str, Any]:
    """An eviction record as the API shows it: ``session``, like everywhere else."""
    out = record.to_dict()
    out["session"] = out.pop("session_id")
    return out


class Clients(JsonResource):
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
            result["recent_evictions"] = [eviction(r) for r in records]
        return _json(request, result)


class OneClient(JsonResource):
    def __init__(self, factory: ServerFactory, session: str) -> None:
        super().__init__()
        self.factory = factory
        self.session = session

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"send":
            return SendToClient(self.factory, self.session)
        return NotFound()

    def render_DELETE(self, request: Request) -> bytes:
        client = self.factory.clients.get(self.session)
        if client is None:
            return _json(request, {"error": f"no client {self.session!r}"}, 404)
        client.evict("admin", "disconnected through the admin API")
        return _json(request, {"disconnected": self.session})


class SendToClient(_Leaf):
    def __init__(self, factory: ServerFactory, session: str) -> None:
        super().__init__(factory)
        self.session = session

    def render_POST(self, request: Request) -> bytes:
        message = _read_message(request)
        if isinstance(message, bytes):
            return message
        try:
            sent = self.factory.send(self.session, *message)
        except NotAuthenticated as e:
            return _json(request, {"error": e.message, "code": e.code}, 409)
        if not sent:
            return _json(request, {"error": f"no client {self.session!r}"}, 404)
        return _json(request, {"sent": 1})


class _Unauthorized(_Leaf):
    def render(self, request: Request) -> bytes:
        request.setHeader(b"www-authenticate", b'Bearer realm="heartbeatd"')
        return _json(request, {"error": "missing or wrong bearer token"}, 401)


class AdminRoot(JsonResource):
    """The API's root.

    Checks the token again (the channel already did, before the body): the resources also
    serve in-process, without a channel in front.
    """

    def __init__(
        self,
        factory: ServerFactory,
        policy: AdminPolicy | None = None,
        refused: Counter[str] | None = None,
    ) -> None:
        super().__init__()
        self.policy = policy or AdminPolicy()
        self.putChild(b"healthz", Health(factory))
        self.putChild(b"metrics", Metrics(factory, Counter() if refused is None else refused))
        self.putChild(b"clients", Clients(factory))
        self.putChild(b"broadcast", Broadcast(factory))
        channels_admin.mount(self, factory)  # /publish; cluster-wide views with cluster.redis
        self._unauthorized = _Unauthorized(factory)

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if not self.policy.authorized(request.method, request.uri, request.requestHeaders):
            return self._unauthorized
        return super().getChildWithDefault(path, request)

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self if not path else NotFound()

    def render_GET(self, request: Request) -> bytes:
        paths = ["/healthz", "/metrics", "/clients", "/broadcast"]
        return _json(request, {"service": "heartbeatd admin API", "paths": paths})


class AdminSite(Site):
    """The admin API's Site: header-stage checks, an opt-in access log, no stock log lines."""

    protocol = AdminChannel
    requestFactory = AdminRequest
    noisy = False
    displayTracebacks = False

    def __init__(
        self,
        root: Resource,
        policy: AdminPolicy,
        access_log: bool = False,
        refused: Counter[str] | None = None,
        **kw: Any,
    ) -> None:
        #: Requests refused before their body, by status code (exported as a metric).
        self.refused: Counter[str] = Counter() if refused is None else refused
        super().__init__(root, **kw)
        self.policy = policy
        self.access_log = access_log

    def log(self, request: Request) -> None:
        """Twisted writes a combined-log line per request; ours is opt-in (``access_log``)."""
        if not self.access_log:
            return
        log.info(
            "admin {method} {path} {code} {size} bytes from {peer}",
            method=request.method.decode("ascii", "replace"),
            path=request.uri.decode("ascii", "replace"),
            code=request.code,
            size=request.sentLength,
            peer=_peer(request.getClientAddress()),
        )


def admin_site(factory: ServerFactory, config: AdminConfig, token: str = "") -> AdminSite:
    """The admin API for ``factory``; ``token`` is the resolved secret (file or inline)."""
    policy = admin_policy(config, token)
    refused: Counter[str] = Counter()
    return AdminSite(AdminRoot(factory, policy, refused), policy, config.access_log, refused)


def admin_policy(config: AdminConfig, token: str = "") -> AdminPolicy:
    """The token, public /healthz and body limit ``admin.*`` asks for."""
    return AdminPolicy(
        token or config.token, config.health_public, config.max_body_bytes, config.allowed_hosts
    )

"""The admin HTTP API (twisted.web): health, metrics, clients, push, disconnect.

The routes are one table, `heartbeatd.daemon.admin_routes.ROUTES` (method, path, handler;
docs/admin.md describes each); here are what they do on one daemon (`LocalBackend`), and the
channel and site that guard them.  Served in the reactor thread from our own resources
(prometheus-client's bundled Twisted resource defers to a thread pool and binds the global
reactor).  Bound to 127.0.0.1 by default; ``admin.token`` (or ``admin.token_file``) adds a
bearer token, compared in constant time and never logged.

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
from twisted.internet.defer import Deferred
from twisted.web.http import Headers, HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from heartbeatd._logging import get_logger
from heartbeatd.config import AdminConfig
from heartbeatd.daemon import channels_admin
from heartbeatd.daemon.admin_guard import AdminGuard
from heartbeatd.daemon.admin_routes import (
    AdminApi,
    Answer,
    ApiError,
    Backend,
    Call,
    index_answer,
    routed,
)
from heartbeatd.daemon.metrics import registry_for
from heartbeatd.server.factory import EvictionRecord, NotAuthenticated, ServerFactory

__all__ = [
    "AdminChannel",
    "AdminPolicy",
    "AdminRoot",
    "AdminSite",
    "LocalBackend",
    "admin_policy",
    "admin_site",
]

log = get_logger(__name__)

_REASONS = {401: b"Unauthorized", 404: b"Not Found", 405: b"Method Not Allowed"}
_REASONS.update({413: b"Payload Too Large", 400: b"Bad Request", 403: b"Forbidden"})
_REASONS.update({415: b"Unsupported Media Type", 421: b"Misdirected Request", 409: b"Conflict"})


def _json_body(value: Any) -> bytes:
    return json.dumps(value).encode() + b"\n"


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
        refused = self.guard.refusal(method, headers, length, listener, routed(method, path))
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


def eviction(record: EvictionRecord) -> dict[str, Any]:
    """An eviction record as the API shows it: ``session``, like everywhere else."""
    out = record.to_dict()
    out["session"] = out.pop("session_id")
    return out


class LocalBackend:
    """The routes on one daemon (`heartbeatd.daemon.admin_routes`): its own clients."""

    def __init__(self, factory: ServerFactory, refused: Counter[str] | None = None) -> None:
        self.factory = factory
        self.registry = registry_for(factory, Counter() if refused is None else refused)
        self.registry.register(channels_admin.ChannelsCollector(factory.channels))

    def index(self, call: Call) -> Answer:
        return index_answer()

    def health(self, call: Call) -> Answer:
        if self.factory.draining:
            return Answer({"status": "draining"}, 503)
        return Answer({"status": "serving", "clients": len(self.factory.clients)})

    def metrics(self, call: Call) -> Answer:
        content_type = CONTENT_TYPE_LATEST.encode()
        return Answer(raw=generate_latest(self.registry), headers={b"content-type": content_type})

    def clients(self, call: Call) -> Answer:
        f = self.factory
        identity = call.query("identity")
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
            if identity is None or c.identity == identity
        ]
        result: dict[str, Any] = {"now": now, "count": len(clients), "clients": clients}
        recent = self.recent_evictions(call)
        if recent is not None:
            result["recent_evictions"] = recent
        return Answer(result)

    def recent_evictions(self, call: Call) -> list[dict[str, Any]] | None:
        """This daemon's last N closes for ``?recent_evictions=N``, or None when not asked."""
        recent = call.query("recent_evictions")
        if not recent:
            return None
        try:
            n = max(0, int(recent))
        except ValueError:
            raise ApiError(400, "recent_evictions must be an integer") from None
        records = list(self.factory.recent_closes)[-n:] if n else []
        return [eviction(r) for r in records]

    def send(self, call: Call) -> Answer:
        session = call.params["session"]
        message = call.message()
        try:
            sent = self.factory.send(session, *message)
        except NotAuthenticated as e:
            raise ApiError(409, e.message, e.code) from None
        if not sent:
            raise ApiError(404, f"no client {session!r}")
        return Answer({"sent": 1})

    def disconnect(self, call: Call) -> Answer:
        session = call.params["session"]
        if not self.factory.channels.kick_local(session):
            raise ApiError(404, f"no client {session!r}")
        return Answer({"disconnected": session})

    def disconnect_identity(self, call: Call) -> Deferred[Answer]:
        identity = call.params["identity"]
        d = self.factory.channels.kick_identity(identity)
        return d.addCallback(lambda n: Answer({"identity": identity, "disconnected": n}))

    def broadcast(self, call: Call) -> Answer:
        return Answer({"sent": self.factory.broadcast(*call.message())})

    def publish(self, call: Call) -> Deferred[Answer]:
        body = call.json()
        if not isinstance(body, dict) or "data" not in body:
            raise ApiError(400, 'expected {"channel": "...", "data": ...}')
        channel = body.get("channel")
        d = self.factory.channels.publish(channel, body["data"])  # type: ignore[arg-type]
        return d.addCallback(lambda offset: Answer({"channel": channel, "offset": offset}))


class AdminRoot(AdminApi):
    """The admin API of one daemon: its own clients, or with ``cluster.redis`` every node's
    (`heartbeatd.daemon.channels_admin.ClusterBackend`)."""

    def __init__(
        self,
        factory: ServerFactory,
        policy: AdminPolicy | None = None,
        refused: Counter[str] | None = None,
    ) -> None:
        local = LocalBackend(factory, refused)
        backend: Backend = local
        if factory.channels.broker.clustered:
            backend = channels_admin.ClusterBackend(local)
        super().__init__(backend, policy or AdminPolicy())


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

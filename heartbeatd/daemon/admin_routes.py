"""The admin API's one routing table, served over a backend: local, cluster or supervisor.

    GET    /                             what this is, and the paths
    GET    /healthz                      health (public by default)
    GET    /metrics                      Prometheus text format
    GET    /clients[?recent_evictions=N] connected clients (``&identity=x``: of one identity)
    POST   /clients/{session}/send       push to one client
    DELETE /clients/{session}            disconnect one client
    DELETE /identities/{identity}        disconnect every session of one identity
    POST   /broadcast                    push to every client
    POST   /publish                      publish to a channel

`AdminApi` is the one twisted.web resource: it checks the token (again: the resources also
serve in-process, without `heartbeatd.daemon.admin.AdminChannel` in front), matches the
request against `ROUTES` (an unknown path is a JSON 404, a known path with another method a
JSON 405 with ``Allow``), and calls the backend's method of that route with a `Call`.  A
backend answers with an `Answer`, or a Deferred of one; it says what a route *does* where it
runs: `heartbeatd.daemon.admin.LocalBackend` (one daemon),
`heartbeatd.daemon.channels_admin.ClusterBackend` (a node with ``cluster.redis``: the clients
of every node), `heartbeatd.daemon.supervisor_admin.SupervisorBackend` (``workers: N``: asks
the workers).  Every answer is JSON, errors included, except /metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from heartbeatd._logging import get_logger
from heartbeatd.daemon.admin_guard import BadBody, parse_body
from heartbeatd.server.handlers import HandlerError

__all__ = ["ROUTES", "AdminApi", "Answer", "ApiError", "Backend", "Call", "Route", "routed"]

log = get_logger(__name__)

#: HTTP status of a typed error from the server (a `HandlerError` code); others are 400.
ERROR_STATUS = {"unavailable": 503, "not_found": 404, "not_authenticated": 409}


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # segments; ``{name}`` matches any one non-empty segment
    handler: str  # the backend method that answers it

    def match(self, segments: list[str]) -> dict[str, str] | None:
        pattern = [s for s in self.path.split("/") if s]
        if len(pattern) != len(segments):
            return None
        params = {}
        for want, got in zip(pattern, segments, strict=True):
            if want.startswith("{"):
                if not got:
                    return None
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params


ROUTES = (
    Route("GET", "/", "index"),
    Route("GET", "/healthz", "health"),
    Route("GET", "/metrics", "metrics"),
    Route("GET", "/clients", "clients"),
    Route("POST", "/clients/{session}/send", "send"),
    Route("DELETE", "/clients/{session}", "disconnect"),
    Route("DELETE", "/identities/{identity}", "disconnect_identity"),
    Route("POST", "/broadcast", "broadcast"),
    Route("POST", "/publish", "publish"),
)


@dataclass
class Answer:
    """What a backend answers: a JSON ``body``, or ``raw`` bytes with their content type."""

    body: Any = None
    status: int = 200
    raw: bytes | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)


class ApiError(Exception):
    """Answered as ``status`` with ``{"error": message[, "code": code]}``."""

    def __init__(self, status: int, message: str, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


@dataclass
class Call:
    """One request, routed: its ``params`` (``session``) and its body, read on demand."""

    request: Request
    params: dict[str, str]

    def query(self, name: str) -> str | None:
        values = (self.request.args or {}).get(name.encode())
        return values[0].decode("utf-8", "replace") if values else None

    def raw_body(self) -> bytes:
        content = self.request.content
        if content is None:
            return b""
        content.seek(0)
        data: bytes = content.read()
        return data

    def json(self) -> Any:
        """The parsed body (None when empty); a malformed one is a typed 400."""
        try:
            return parse_body(self.raw_body())
        except BadBody as e:
            raise ApiError(400, e.message, e.code) from None

    def message(self) -> tuple[str, Any]:
        """The ``{"type", "data"}`` body of a push."""
        body = self.json()
        if not isinstance(body, dict) or not isinstance(body.get("type"), str) or not body["type"]:
            raise ApiError(400, 'expected {"type": "...", "data": ...}')
        return body["type"], body.get("data")


class Backend(Protocol):
    """What each route does where the API runs; every method takes the `Call`."""

    def index(self, call: Call) -> Answer | Deferred[Answer]: ...

    def health(self, call: Call) -> Answer | Deferred[Answer]: ...

    def metrics(self, call: Call) -> Answer | Deferred[Answer]: ...

    def clients(self, call: Call) -> Answer | Deferred[Answer]: ...

    def send(self, call: Call) -> Answer | Deferred[Answer]: ...

    def disconnect(self, call: Call) -> Answer | Deferred[Answer]: ...

    def disconnect_identity(self, call: Call) -> Answer | Deferred[Answer]: ...

    def broadcast(self, call: Call) -> Answer | Deferred[Answer]: ...

    def publish(self, call: Call) -> Answer | Deferred[Answer]: ...


def index_answer() -> Answer:
    paths = [r.path for r in ROUTES if r.path != "/"]
    return Answer({"service": "heartbeatd admin API", "paths": list(dict.fromkeys(paths))})


def _segments(path: bytes) -> list[str]:
    """The path's segments, each percent-decoded after splitting on ``/``.

    Clients quote identities and session ids (``CN=alice,O=Example`` -> ``CN%3Dalice%2CO%3D...``);
    decoding after the split keeps an encoded ``%2F`` inside its segment.
    """
    raw = path.split(b"?", 1)[0].rstrip(b"/")
    if not raw:
        return []
    return [unquote_to_bytes(s).decode("utf-8", "replace") for s in raw.split(b"/")[1:]]


def _route(method: str, path: bytes) -> tuple[Route | None, dict[str, str], list[str]]:
    """The route answering ``method`` at ``path`` and its parameters; else the methods the
    path takes (``HEAD`` with ``GET``), sorted: none for an unknown path."""
    segments = _segments(path)
    allowed = []
    for route in ROUTES:
        params = route.match(segments)
        if params is None:
            continue
        if route.method == method or (method == "HEAD" and route.method == "GET"):
            return route, params, []
        allowed.append(route.method)
    if "GET" in allowed:
        allowed.append("HEAD")
    return None, {}, sorted(allowed)


def routed(method: bytes, path: bytes) -> bool:
    """True when a route takes ``method`` at ``path``: otherwise the request gets its 404 or
    405 whatever its body, so the header stage does not ask for a JSON ``Content-Type``."""
    return _route(method.decode("ascii", "replace"), path)[0] is not None


class AdminApi(Resource):
    """The admin API's one resource: token, routing table, backend, JSON answers."""

    isLeaf = True

    def __init__(self, backend: Backend, policy: Any) -> None:
        super().__init__()
        self.backend = backend
        self.policy = policy

    def render(self, request: Request) -> Any:
        if not self.policy.authorized(request.method, request.uri, request.requestHeaders):
            request.setHeader(b"www-authenticate", b'Bearer realm="heartbeatd"')
            return _write(request, Answer({"error": "missing or wrong bearer token"}, 401))
        method = request.method.decode("ascii", "replace")
        path = request.path if request.path is not None else request.uri
        found, params, allowed = _route(method, path)
        if found is not None:
            return self._answer(request, found, params)
        if not allowed:
            where = path.split(b"?", 1)[0].decode("utf-8", "replace")
            return _write(request, Answer({"error": f"no such resource: {where}"}, 404))
        shown = ", ".join(allowed)
        request.setHeader(b"allow", shown.encode())
        return _write(
            request, Answer({"error": f"method {method} not allowed; allowed: {shown}"}, 405)
        )

    def _answer(self, request: Request, route: Route, params: dict[str, str]) -> Any:
        try:
            result = getattr(self.backend, route.handler)(Call(request, params))
        except Exception:
            return _write(request, _failed(Failure(), request))
        if not isinstance(result, Deferred):
            return _write(request, result)
        fired: list[Answer] = []
        result.addErrback(_failed, request).addCallback(fired.append)
        if fired:  # answered at once (one node's hub): a plain synchronous render
            return _write(request, fired[0])

        def finish(answer: Answer) -> None:
            if not request.finished and not getattr(request, "_disconnected", False):
                request.write(_write(request, answer))
                request.finish()

        result.addCallback(lambda _: finish(fired[0]))
        return NOT_DONE_YET


def _failed(failure: Failure, request: Request) -> Answer:
    """A typed error as its JSON answer; anything else is logged and a 500."""
    if failure.check(ApiError):
        error: ApiError = failure.value  # type: ignore[assignment]
        body = {"error": error.message}
        if error.code:
            body["code"] = error.code
        return Answer(body, error.status)
    if failure.check(HandlerError):
        handler_error: HandlerError = failure.value  # type: ignore[assignment]
        status = ERROR_STATUS.get(handler_error.code, 400)
        return Answer({"error": handler_error.message, "code": handler_error.code}, status)
    log.failure("admin {path} failed", failure, path=request.path)
    return Answer({"error": "internal error", "code": "internal_error"}, 500)


def _write(request: Request, answer: Answer) -> bytes:
    request.setResponseCode(answer.status)
    for name, value in answer.headers.items():
        request.setHeader(name, value)
    if answer.raw is not None:
        return answer.raw
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(answer.body).encode() + b"\n"

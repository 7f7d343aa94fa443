"""Admin API for channels and the cluster, mounted on the admin root by `mount`.

    POST /publish                 body {"channel": ..., "data": ...} -> {"channel", "offset"}
    GET  /metrics                 adds heartbeatd_channel_* and heartbeatd_broker_up

With ``cluster.redis`` set, these answer for the whole cluster instead of this node:

    GET  /healthz                 adds "node" and "broker": "up"/"down" (status "degraded")
    GET  /clients                 every node's clients, each with its "node"
    POST /clients/{id}/send       reaches the session on whichever node holds it
    POST /broadcast               reaches every node's clients; answers {"nodes": N}

Errors are JSON with the channel error code: 400 for bad input, 503 ``unavailable`` while the
broker is unreachable.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from heartbeatd.daemon.admin_guard import BadBody, parse_body
from heartbeatd.server.channels import UNAVAILABLE, ChannelHub
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import HandlerError

__all__ = ["ChannelsCollector", "mount"]


def _json(request: Request, value: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(value).encode() + b"\n"


def _body(request: Request) -> dict[str, Any] | bytes:
    """The JSON object a request carries ({} for anything else), or a typed 400 already set."""
    try:
        body = parse_body(request.content.read())
    except BadBody as e:
        return _json(request, {"error": e.message, "code": e.code}, 400)
    return body if isinstance(body, dict) else {}


def _answer(request: Request, d: Deferred[Any], shape: Any) -> int:
    """Finish ``request`` when ``d`` fires: shape(result) as JSON, or a typed error."""

    def ok(result: Any) -> None:
        if not request.finished and not request._disconnected:
            request.write(_json(request, shape(result)))
            request.finish()

    def failed(failure: Failure) -> None:
        if request.finished or request._disconnected:
            return
        if failure.check(HandlerError):
            error: HandlerError = failure.value  # type: ignore[assignment]
            code = {UNAVAILABLE: 503, "not_authenticated": 409}.get(error.code, 400)
            body = {"error": error.message, "code": error.code}
        else:
            code, body = 500, {"error": "internal error", "code": "internal_error"}
        request.write(_json(request, body, code))
        request.finish()

    d.addCallbacks(ok, failed)
    return NOT_DONE_YET


class _HubLeaf(Resource):
    isLeaf = True

    def __init__(self, hub: ChannelHub) -> None:
        super().__init__()
        self.hub = hub


class Publish(_HubLeaf):
    def render_POST(self, request: Request) -> Any:
        body = _body(request)
        if isinstance(body, bytes):
            return body
        if "data" not in body:
            return _json(request, {"error": 'expected {"channel": "...", "data": ...}'}, 400)
        channel = body.get("channel")
        d = self.hub.publish(channel, body["data"])  # type: ignore[arg-type]
        return _answer(request, d, lambda offset: {"channel": channel, "offset": offset})


class ClusterHealth(_HubLeaf):
    def render_GET(self, request: Request) -> bytes:
        factory = self.hub.factory
        broker = self.hub.broker
        body = {
            "status": "serving" if broker.up else "degraded",
            "clients": len(factory.clients),
            "node": broker.node_id,
            "broker": "up" if broker.up else "down",
        }
        if factory.draining:
            body["status"] = "draining"
            return _json(request, body, 503)
        return _json(request, body)


class ClusterBroadcast(_HubLeaf):
    def render_POST(self, request: Request) -> Any:
        body = _body(request)
        if isinstance(body, bytes):
            return body
        if not isinstance(body.get("type"), str) or not body["type"]:
            return _json(request, {"error": 'expected {"type": "...", "data": ...}'}, 400)
        d = self.hub.broadcast(body["type"], body.get("data"))
        return _answer(request, d, lambda nodes: {"nodes": nodes})


class ClusterClients(Resource):
    def __init__(self, hub: ChannelHub) -> None:
        super().__init__()
        self.hub = hub

    def getChild(self, path: bytes, request: Request) -> Resource:
        if not path:
            return self
        return ClusterClient(self.hub, path.decode("utf-8", "replace"))

    def render_GET(self, request: Request) -> Any:
        return _answer(
            request,
            self.hub.clients(),
            lambda clients: {"count": len(clients), "clients": clients},
        )


class ClusterClient(Resource):
    def __init__(self, hub: ChannelHub, session: str) -> None:
        super().__init__()
        self.hub = hub
        self.session = session

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"send":
            return ClusterSend(self.hub, self.session)
        return super().getChild(path, request)

    def render_DELETE(self, request: Request) -> bytes:
        client = self.hub.factory.clients.get(self.session)
        if client is None:
            return _json(request, {"error": f"no client {self.session!r} on this node"}, 404)
        client.evict("admin", "disconnected through the admin API")
        return _json(request, {"disconnected": self.session})


class ClusterSend(_HubLeaf):
    def __init__(self, hub: ChannelHub, session: str) -> None:
        super().__init__(hub)
        self.session = session

    def render_POST(self, request: Request) -> Any:
        body = _body(request)
        if isinstance(body, bytes):
            return body
        if not isinstance(body.get("type"), str) or not body["type"]:
            return _json(request, {"error": 'expected {"type": "...", "data": ...}'}, 400)
        d = self.hub.send(self.session, body["type"], body.get("data"))

        def sent(found: bool) -> Any:
            if not found:
                raise HandlerError("not_found", f"no client {self.session!r} in the cluster")
            return {"sent": 1}

        return _answer(request, d.addCallback(sent), lambda result: result)


class ChannelsCollector(Collector):
    """Channel and broker metrics, read from the hub at scrape time."""

    def __init__(self, hub: ChannelHub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[object]:
        hub = self.hub
        yield GaugeMetricFamily(
            "heartbeatd_broker_up", "1 while the cluster broker is reachable.", value=hub.broker.up
        )
        yield GaugeMetricFamily(
            "heartbeatd_channels", "Channels with local subscribers.", value=hub.channel_count()
        )
        yield GaugeMetricFamily(
            "heartbeatd_channel_subscriptions",
            "Subscriptions of local clients.",
            value=hub.subscription_count(),
        )
        yield CounterMetricFamily(
            "heartbeatd_publications_published",
            "Publications published through this node.",
            value=hub.published,
        )
        yield CounterMetricFamily(
            "heartbeatd_publications_delivered",
            "Publication frames written to local subscribers.",
            value=hub.delivered,
        )
        recoveries = CounterMetricFamily(
            "heartbeatd_channel_recoveries",
            "Subscribes with since, by result.",
            labels=["result"],
        )
        for result, count in sorted(hub.recoveries.items()):
            recoveries.add_metric([result], count)
        yield recoveries
        yield CounterMetricFamily(
            "heartbeatd_channel_resyncs",
            "Subscribers told their stream could not be recovered (resync).",
            value=hub.resyncs,
        )
        yield CounterMetricFamily(
            "heartbeatd_channel_gaps_filled",
            "Fan-out gaps filled from the history.",
            value=hub.gaps_filled,
        )
        yield CounterMetricFamily(
            "heartbeatd_broker_command_timeouts",
            "Redis links reset because a command went unanswered (cluster.command_timeout).",
            value=getattr(hub.broker, "timeouts", 0),
        )
        yield CounterMetricFamily(
            "heartbeatd_broker_fences",
            "New Redis data generations this node found (failover or restart: channels resync).",
            value=getattr(hub.broker, "fences", 0),
        )


def mount(root: Resource, factory: ServerFactory) -> None:
    """Add the channel endpoints (and, in a cluster, the cluster-wide ones) to ``root``."""
    hub = factory.channels
    root.putChild(b"publish", Publish(hub))
    metrics = root.children.get(b"metrics")
    registry = getattr(metrics, "registry", None)
    if registry is not None:
        registry.register(ChannelsCollector(hub))
    if hub.broker.clustered:
        root.putChild(b"healthz", ClusterHealth(hub))
        root.putChild(b"clients", ClusterClients(hub))
        root.putChild(b"broadcast", ClusterBroadcast(hub))

"""The admin API of a node with ``cluster.redis`` (`ClusterBackend`), and channel metrics.

The routes (`heartbeatd.daemon.admin_routes`) answer for the whole cluster instead of this node:

    GET    /healthz               adds "node" and "broker": "up"/"down" (status "degraded")
    GET    /clients               every node's clients, each with its "node" (and this node's
                                  recent closes for ?recent_evictions=N)
    POST   /clients/{id}/send     reaches the session on whichever node holds it
    DELETE /clients/{id}          disconnects it on whichever node holds it (``?scope=local``:
                                  this node only, which a supervisor asks of each worker)
    POST   /broadcast             reaches every node's clients; answers {"nodes": N}

The rest (/, /metrics, /publish) are one node's (`heartbeatd.daemon.admin.LocalBackend`).
`ChannelsCollector` adds heartbeatd_channel_* and heartbeatd_broker_up to /metrics.  Errors
are JSON with the channel error code: 400 for bad input, 404 ``not_found`` for a session no
node holds, 503 ``unavailable`` while the broker is unreachable.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred

from heartbeatd.daemon.admin_routes import Answer, ApiError, Call
from heartbeatd.server.channels import ChannelHub
from heartbeatd.server.handlers import HandlerError

__all__ = ["ChannelsCollector", "ClusterBackend"]

#: The error code of a session no node holds (answered 404, as on one node).
NOT_FOUND = "not_found"


class _Local(Protocol):
    """What the cluster backend uses of the node's own (`heartbeatd.daemon.admin.LocalBackend`)."""

    factory: Any

    def index(self, call: Call) -> Answer: ...

    def metrics(self, call: Call) -> Answer: ...

    def disconnect_identity(self, call: Call) -> Deferred[Answer]: ...

    def publish(self, call: Call) -> Deferred[Answer]: ...

    def recent_evictions(self, call: Call) -> list[dict[str, Any]] | None: ...


class ClusterBackend:
    """The routes on a node of a cluster: clients, send, kick and broadcast span every node."""

    def __init__(self, local: _Local) -> None:
        self.local = local
        self.hub: ChannelHub = local.factory.channels

    def index(self, call: Call) -> Answer:
        return self.local.index(call)

    def metrics(self, call: Call) -> Answer:
        return self.local.metrics(call)

    def publish(self, call: Call) -> Deferred[Answer]:
        return self.local.publish(call)

    def health(self, call: Call) -> Answer:
        factory, broker = self.hub.factory, self.hub.broker
        body = {
            "status": "serving" if broker.up else "degraded",
            "clients": len(factory.clients),
            "node": broker.node_id,
            "broker": "up" if broker.up else "down",
        }
        if factory.draining:
            body["status"] = "draining"
            return Answer(body, 503)
        return Answer(body)

    def clients(self, call: Call) -> Deferred[Answer]:
        recent = self.local.recent_evictions(call)  # this node's: closes are not shared

        def listed(found: list[dict[str, Any]]) -> Answer:
            body: dict[str, Any] = {"count": len(found), "clients": found}
            if recent is not None:
                body["recent_evictions"] = recent
            return Answer(body)

        return self.hub.clients(call.query("identity")).addCallback(listed)

    def send(self, call: Call) -> Deferred[Answer]:
        session = call.params["session"]
        message = call.message()

        def sent(found: bool) -> Answer:
            if not found:
                raise HandlerError(NOT_FOUND, f"no client {session!r} in the cluster")
            return Answer({"sent": 1})

        return self.hub.send(session, *message).addCallback(sent)

    def disconnect(self, call: Call) -> Answer | Deferred[Answer]:
        session = call.params["session"]
        if call.query("scope") == "local":
            if not self.hub.kick_local(session):
                raise ApiError(404, f"no client {session!r} on this node")
            return Answer({"disconnected": session})

        def kicked(found: bool) -> Answer:
            if not found:
                raise HandlerError(NOT_FOUND, f"no client {session!r} in the cluster")
            return Answer({"disconnected": session})

        return self.hub.kick(session).addCallback(kicked)

    def disconnect_identity(self, call: Call) -> Deferred[Answer]:
        """Every session of the identity, on every node (each node closes its own)."""
        return self.local.disconnect_identity(call)

    def broadcast(self, call: Call) -> Deferred[Answer]:
        message = call.message()
        return self.hub.broadcast(*message).addCallback(lambda nodes: Answer({"nodes": nodes}))


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
        yield GaugeMetricFamily(
            "heartbeatd_fanout_queued",
            "Publication deliveries waiting in the fan-out queue (channels.fanout_batch a turn).",
            value=hub.queued,
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

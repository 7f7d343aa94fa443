"""Prometheus metrics, read from the daemon's own counters at scrape time.

Nothing here runs per frame: connections and the factory count in plain integers, and this
collector turns them into metric families only when ``/metrics`` is scraped.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import accumulate

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from heartbeatd.server.factory import ServerFactory

__all__ = ["FactoryCollector", "registry_for"]


class FactoryCollector(Collector):
    """Exports a `ServerFactory`'s state as ``heartbeatd_*`` metrics."""

    def __init__(self, factory: ServerFactory) -> None:
        self.factory = factory

    def collect(self) -> Iterator[object]:
        f = self.factory
        hb = f.heartbeat
        yield GaugeMetricFamily(
            "heartbeatd_connections", "Clients connected now.", value=len(f.clients)
        )
        yield CounterMetricFamily(
            "heartbeatd_connections_accepted", "Connections accepted.", value=f.accepted
        )
        yield CounterMetricFamily(
            "heartbeatd_connections_refused",
            "Connections refused at limits.max_connections.",
            value=f.refused,
        )
        evicted = CounterMetricFamily(
            "heartbeatd_evicted", "Clients closed by the server, by reason.", labels=["reason"]
        )
        for reason, count in sorted(f.closes.items()):
            evicted.add_metric([reason], count)
        yield evicted
        errors = CounterMetricFamily(
            "heartbeatd_errors", "Error frames sent, by code.", labels=["code"]
        )
        for code, count in sorted(f.errors.items()):
            errors.add_metric([code], count)
        yield errors
        foreign = CounterMetricFamily(
            "heartbeatd_foreign_protocol",
            "Connections whose first bytes were another protocol's, by kind.",
            labels=["kind"],
        )
        for kind, count in sorted(f.foreign.items()):
            foreign.add_metric([kind], count)
        yield foreign
        yield GaugeMetricFamily(
            "heartbeatd_partial_frame_bytes",
            "Bytes held by all clients' unfinished frames (limits.max_partial_frame_bytes).",
            value=f.partial_bytes,
        )
        yield CounterMetricFamily(
            "heartbeatd_log_lines_suppressed",
            "Per-event log lines left out by the rate limit (log.rate_limit_*).",
            value=sum(f.log_limiter.suppressed.values()),
        )
        totals = f.traffic_totals()
        for unit in ("frames", "bytes"):
            family = CounterMetricFamily(
                f"heartbeatd_{unit}",
                f"{unit.capitalize()} received and sent.",
                labels=["direction"],
            )
            for direction in ("in", "out"):
                family.add_metric([direction], totals[f"{unit}_{direction}"])
            yield family
        yield CounterMetricFamily("heartbeatd_heartbeat_sweeps", "Sweeps run.", value=hb.sweeps)
        yield GaugeMetricFamily(
            "heartbeatd_heartbeat_sweep_seconds",
            "Reactor time the last sweep spent in its batches.",
            value=hb.last_sweep_busy,
        )
        yield GaugeMetricFamily(
            "heartbeatd_heartbeat_batch_max_seconds",
            "Longest single batch of the last sweep (the longest the sweep blocked the reactor).",
            value=hb.last_sweep_longest_batch,
        )
        yield CounterMetricFamily(
            "heartbeatd_heartbeat_pings", "Heartbeat pings sent.", value=hb.pings_sent
        )
        yield GaugeMetricFamily(
            "heartbeatd_reactor_lag_seconds",
            "How late the last heartbeat sweep ran.",
            value=hb.last_lateness,
        )
        yield CounterMetricFamily(
            "heartbeatd_reactor_stalls", "Reactor stalls detected.", value=hb.stalls
        )
        yield CounterMetricFamily(
            "heartbeatd_reactor_stalled_seconds",
            "Seconds of stall excluded from client silence.",
            value=hb.stalled,
        )
        cumulative = list(accumulate(f.rtt_counts))
        buckets = [(repr(bound), cumulative[i]) for i, bound in enumerate(f.rtt_buckets)]
        buckets.append(("+Inf", cumulative[-1]))
        yield HistogramMetricFamily(
            "heartbeatd_ping_rtt_seconds",
            "Heartbeat ping round-trip time.",
            buckets=buckets,
            sum_value=f.rtt_sum,
        )


def registry_for(factory: ServerFactory) -> CollectorRegistry:
    """A registry holding only this daemon's metrics (no process-global state)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FactoryCollector(factory))
    return registry

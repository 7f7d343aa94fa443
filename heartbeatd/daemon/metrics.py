"""Prometheus metrics, read from the daemon's own counters at scrape time.

Nothing here runs per frame: connections and the factory count in plain integers, and this
collector turns them into metric families only when ``/metrics`` is scraped.  Labelled
counters list every known label value from the start (at zero), so a dashboard's
``rate()`` has a series before the first event; the standard ``process_*`` metrics and a
``heartbeatd_build_info`` come along.
"""

from __future__ import annotations

import platform
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import accumulate

import twisted
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from heartbeatd._version import __version__
from heartbeatd.server.channels import UNAVAILABLE
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.resumable import RESUME_REASONS
from heartbeatd.wire import ACCELERATED, envelope, sniff

__all__ = ["ERROR_CODES", "EVICTION_REASONS", "FactoryCollector", "registry_for"]

#: Why the server closes a client (``heartbeatd_evicted_total{reason}``), shown from zero.
EVICTION_REASONS = (
    "admin",
    "bad_frame",
    "first_frame_timeout",
    envelope.FRAME_TIMEOUT,
    envelope.FRAME_TOO_LARGE,
    "heartbeat_timeout",
    envelope.OVERLOADED,
    "shutdown",
    "slow_consumer",
    envelope.WRONG_PROTOCOL,
)
#: The protocol's own error codes (``heartbeatd_errors_total{code}``), shown from zero;
#: handlers' own codes appear once used.
ERROR_CODES = (
    envelope.BAD_FRAME,
    envelope.BAD_JSON,
    envelope.BAD_MESSAGE,
    envelope.FRAME_TIMEOUT,
    envelope.FRAME_TOO_LARGE,
    envelope.INTERNAL_ERROR,
    envelope.OVERLOADED,
    envelope.TOO_DEEP,
    envelope.TOO_MANY_CONNECTIONS,
    envelope.UNKNOWN_TYPE,
    envelope.WRONG_PROTOCOL,
    UNAVAILABLE,  # a publish (or presence) while the cluster broker is unreachable
)
#: The listeners a client can come through (``heartbeatd_connections_by_listener``).
LISTENERS = ("tcp", "tls", "websocket", "websocket+tls")
#: Why a connection was refused (``heartbeatd_connections_refused_by_reason_total{reason}``).
REFUSAL_REASONS = (
    "file_descriptors",
    "max_connections",
    "per_address_connections",
    "per_address_rate",
)
#: accept() errors (``heartbeatd_accept_errors_total{error}``).
ACCEPT_ERRORS = ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM")
#: Outcomes of a session resume (``heartbeatd_session_resumes_total{outcome}``).
RESUME_OUTCOMES = ("resumed", *RESUME_REASONS)
#: Why sessions ended (``heartbeatd_sessions_ended_total{reason}``).
SESSION_ENDS = ("ended", "expired", "overflow")
#: Admin requests refused before their body was read, by HTTP status.
ADMIN_REFUSALS = ("401", "403", "413", "415", "421")


def _with_zeros(counts: Counter[str], known: Iterable[str]) -> list[tuple[str, int]]:
    return sorted({**dict.fromkeys(known, 0), **counts}.items())


def _labelled(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    documentation: str,
    label: str,
    counts: Counter[str],
    known: Iterable[str],
) -> CounterMetricFamily | GaugeMetricFamily:
    """A family with one label whose every known value is shown, at zero until counted."""
    family = kind(name, documentation, labels=[label])
    for value, count in _with_zeros(counts, known):
        family.add_metric([value], count)
    return family


class FactoryCollector(Collector):
    """Exports a `ServerFactory`'s state as ``heartbeatd_*`` metrics."""

    def __init__(self, factory: ServerFactory, admin_refused: Counter[str] | None = None) -> None:
        self.factory = factory
        self.admin_refused = admin_refused

    def collect(self) -> Iterator[object]:
        f = self.factory
        hb = f.heartbeat
        info = GaugeMetricFamily(
            "heartbeatd_build_info",
            "Versions this daemon runs (the value is always 1).",
            labels=["version", "python", "twisted", "accelerated"],
        )
        info.add_metric(
            [__version__, platform.python_version(), twisted.__version__, ACCELERATED], 1
        )
        yield info
        yield GaugeMetricFamily(
            "heartbeatd_connections", "Clients connected now.", value=len(f.clients)
        )
        yield _labelled(
            GaugeMetricFamily,
            "heartbeatd_connections_by_listener",
            "Clients connected now, by listener (tcp, tls, websocket, websocket+tls).",
            "listener",
            f.by_listener,
            LISTENERS,
        )
        yield CounterMetricFamily(
            "heartbeatd_connections_accepted", "Connections accepted.", value=f.accepted
        )
        yield CounterMetricFamily(
            "heartbeatd_connections_refused",
            "Connections refused at any limit (see _by_reason).",
            value=f.refused,
        )
        yield _labelled(
            CounterMetricFamily,
            "heartbeatd_connections_refused_by_reason",
            "Connections refused, by limit (max_connections, per_address_connections, "
            "per_address_rate; file_descriptors: closed unanswered on EMFILE).",
            "reason",
            f.refusals,
            REFUSAL_REASONS,
        )
        yield GaugeMetricFamily(
            "heartbeatd_connection_limit",
            "Connections this process may hold: limits.max_connections, capped by the "
            "open-file limit.",
            value=f.max_connections,
        )
        yield _labelled(
            CounterMetricFamily,
            "heartbeatd_accept_errors",
            "accept() failures, by errno (EMFILE: out of file descriptors).",
            "error",
            f.accept_errors,
            ACCEPT_ERRORS,
        )
        yield CounterMetricFamily(
            "heartbeatd_close_timeouts",
            "Polite closes aborted after shutdown.close_timeout: the peer did not read them.",
            value=f.close_timeouts,
        )
        yield _labelled(
            CounterMetricFamily,
            "heartbeatd_evicted",
            "Clients closed by the server, by reason.",
            "reason",
            f.closes,
            EVICTION_REASONS,
        )
        yield _labelled(
            CounterMetricFamily,
            "heartbeatd_errors",
            "Error frames sent, by code.",
            "code",
            f.errors,
            ERROR_CODES,
        )
        yield _labelled(
            CounterMetricFamily,
            "heartbeatd_foreign_protocol",
            "Connections whose first bytes were another protocol's, by kind.",
            "kind",
            f.foreign,
            sniff.DESCRIPTIONS,
        )
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
            "heartbeatd_heartbeat_interval_seconds",
            "heartbeat.interval: seconds between sweeps (a sweep must take far less).",
            value=hb.interval,
        )
        yield GaugeMetricFamily(
            "heartbeatd_heartbeat_timeout_seconds",
            "heartbeat.timeout: silence after which a client is evicted.",
            value=hb.timeout,
        )
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
        yield from self._sessions()
        if self.admin_refused is not None:
            yield _labelled(
                CounterMetricFamily,
                "heartbeatd_admin_refused",
                "Admin requests refused before their body was read, by HTTP status.",
                "status",
                self.admin_refused,
                ADMIN_REFUSALS,
            )

    def _sessions(self) -> Iterator[object]:
        """Resumable sessions (docs/protocol.md, "Sessions")."""
        sessions = self.factory.sessions
        live = GaugeMetricFamily(
            "heartbeatd_sessions",
            "Resumable sessions this daemon holds, by state (attached to a connection, or "
            "detached and waiting for a resume; with a cluster, detached ones live in Redis).",
            labels=["state"],
        )
        live.add_metric(["attached"], sessions.attached)
        live.add_metric(["detached"], sessions.detached)
        yield live
        yield CounterMetricFamily(
            "heartbeatd_sessions_started", "Sessions started here.", value=sessions.started
        )
        yield _labelled(
            CounterMetricFamily,
            "heartbeatd_session_resumes",
            "Resume requests, by outcome (resumed, or the reason it was refused).",
            "outcome",
            sessions.resumes,
            RESUME_OUTCOMES,
        )
        yield CounterMetricFamily(
            "heartbeatd_session_replayed_messages",
            "Unacknowledged server messages replayed on resumes.",
            value=sessions.replayed,
        )
        yield CounterMetricFamily(
            "heartbeatd_session_takeovers",
            "Resumes that took a session from a connection still holding it (half-open).",
            value=sessions.takeovers,
        )
        yield _labelled(
            CounterMetricFamily,
            "heartbeatd_sessions_ended",
            "Sessions ended here, by reason (ended by the client, expired, overflow).",
            "reason",
            sessions.ended,
            SESSION_ENDS,
        )
        yield GaugeMetricFamily(
            "heartbeatd_session_unacked_messages",
            "Server messages of this daemon's sessions waiting for the client's ack.",
            value=sum(len(s.unacked) for s in sessions.states.values()),
        )
        yield GaugeMetricFamily(
            "heartbeatd_session_detached_bytes",
            "Bytes the detached sessions in this daemon keep for their replay "
            "(bounded by sessions.max_detached_bytes).",
            value=sessions.detached_bytes,
        )


def registry_for(
    factory: ServerFactory, admin_refused: Counter[str] | None = None
) -> CollectorRegistry:
    """A registry holding this daemon's metrics and the process's (CPU, memory, fds, start).

    Our own registry rather than prometheus-client's global one: nothing process-global, so
    tests can build several.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FactoryCollector(factory, admin_refused))
    ProcessCollector(registry=registry)
    return registry

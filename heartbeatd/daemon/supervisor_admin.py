"""``workers: N``: the supervisor's admin API, which answers for the whole daemon.

The supervisor serves ``admin.listen`` itself (same token, body limit and header-stage checks
as a single daemon, `AdminChannel`).  It reaches its workers through each worker's **private
admin socket**: a UNIX socket the supervisor binds in a directory only its user can enter and
hands to the worker (fd 4), on which the worker serves the ordinary admin API.  Every request
the supervisor makes there has a deadline, so a slow, stopped or dead worker delays an answer
by that much at most and is named in it.

    GET    /healthz             the supervisor's view of every worker, plus each one's own
    GET    /metrics             every worker's series with worker="N", and supervisor gauges
    DELETE /clients/{session}   asked of every serving worker: whichever holds it closes it;
                                held by none, forwarded (another node of the cluster may hold it)
    the other routes            forwarded to the first serving worker (with cluster.redis,
                                /clients, send, /broadcast and /publish span every worker)

The routes are the one table of `heartbeatd.daemon.admin_routes` (`SupervisorBackend` says
what each does here): an unknown path or method is answered by the supervisor itself.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.server import Request
from zope.interface import implementer

from heartbeatd._logging import LogLimiter, get_logger
from heartbeatd.daemon.admin import AdminPolicy, AdminSite
from heartbeatd.daemon.admin_routes import AdminApi, Answer, Call, index_answer
from heartbeatd.daemon.metrics import ADMIN_REFUSALS
from heartbeatd.daemon.worker_metrics import MetricsMerger, WorkerAnswer, parse

__all__ = [
    "Reply",
    "SupervisorAdmin",
    "WorkerChannel",
    "daemon_health",
    "supervisor_site",
]

log = get_logger(__name__)

#: Headers a forwarded request takes along, and the ones its answer brings back.
_REQUEST_HEADERS = (b"authorization", b"content-type")
_REPLY_HEADERS = (b"content-type", b"allow", b"www-authenticate")
#: Worker families the supervisor replaces with its own (its site is the one refusing).
_SUPERVISOR_FAMILIES = ("heartbeatd_admin_refused",)
#: A worker's state while it serves (the others: starting, restarting, not answering, ...).
SERVING = "serving"


class Supervised(Protocol):
    """What the admin API needs of the supervisor (`heartbeatd.daemon.supervisor.Supervisor`)."""

    count: int
    restarts: int
    stopping: bool
    node_base: str

    def worker_states(self) -> dict[int, str]: ...

    def worker_pid(self, index: int) -> int | None: ...

    def admin_socket(self, index: int) -> str | None: ...


# -- talking to one worker -----------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A worker's HTTP answer."""

    code: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class BodyTooLarge(Exception):
    """A worker's answer exceeded `WorkerChannel.MAX_BODY`."""


class _Body(protocol.Protocol):
    """Collects a response body up to ``limit`` bytes; more aborts the connection."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.finished: Deferred[bytes] = Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self._abort()
            self.finished.errback(BodyTooLarge(f"more than {self.limit} bytes"))
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(reason)


@implementer(IAgentEndpointFactory)
class _OneSocket:
    def __init__(self, reactor: Any, path: str, timeout: float) -> None:
        self._reactor, self._path, self._timeout = reactor, path, timeout

    def endpointForURI(self, uri: Any) -> Any:
        from twisted.internet.endpoints import UNIXClientEndpoint

        return UNIXClientEndpoint(self._reactor, self._path, timeout=max(1, int(self._timeout)))


class WorkerChannel:
    """HTTP requests to the workers' private admin sockets, each with a deadline."""

    #: Largest answer read from a worker (a /clients list of 100,000 clients fits).
    MAX_BODY = 64 << 20

    def __init__(self, reactor: Any, token: str = "") -> None:
        self._reactor = reactor
        self._token = token.encode()

    def request(
        self,
        path: str,
        method: bytes,
        uri: bytes,
        timeout: float,
        headers: Mapping[bytes, bytes] | None = None,
        body: bytes | None = None,
    ) -> Deferred[Reply]:
        """``method uri`` on the worker whose socket is ``path``; fails after ``timeout`` s."""
        sent = Headers({k: [v] for k, v in (headers or {}).items()})
        if self._token and not sent.hasHeader(b"authorization"):
            sent.setRawHeaders(b"authorization", [b"Bearer " + self._token])
        agent = Agent.usingEndpointFactory(self._reactor, _OneSocket(self._reactor, path, timeout))
        producer = None if body is None else FileBodyProducer(BytesIO(body))
        d = agent.request(method, b"http://worker" + uri, sent, producer)

        def read(response: Any) -> Deferred[Reply]:
            reader = _Body(self.MAX_BODY)
            response.deliverBody(reader)
            got = {
                name: response.headers.getRawHeaders(name)[0]
                for name in _REPLY_HEADERS
                if response.headers.hasHeader(name)
            }
            return reader.finished.addCallback(lambda data: Reply(response.code, got, data))

        def late(result: object, seconds: float) -> None:
            # The agent reports the cancel as a lost response: say what happened.
            raise TimeoutError(f"no answer within {seconds:g}s")

        d.addCallback(read)
        d.addTimeout(timeout, self._reactor, onTimeoutCancel=late)
        return d


# -- what the answers mean (no I/O) ----------------------------------------------------------


def daemon_health(
    count: int,
    states: Mapping[int, str],
    answers: Mapping[int, Any],
    stopping: bool = False,
    node: str = "",
) -> tuple[int, dict[str, Any]]:
    """``(HTTP status, body)`` of the daemon's /healthz.

    ``states`` is the supervisor's view of each index (``serving`` once the worker reported
    READY); ``answers`` holds the /healthz body of each serving worker that answered in time
    (a missing one did not).  A worker serves when both agree and it is not draining.  The
    daemon is ``serving`` (200) when every worker serves and every broker link is up,
    ``degraded`` (200: the shared socket still accepts through the others) when some worker
    or link is not, ``unavailable`` (503) when none serves, and ``draining`` (503) while
    stopping.
    """
    workers: dict[int, str] = {}
    clients = 0
    brokers: set[str] = set()
    for index in range(count):
        state = states.get(index, "stopped")
        if state == SERVING:
            answer = answers.get(index)
            if not isinstance(answer, dict):
                state = "not answering"
            elif answer.get("status") == "draining":
                state = "draining"
            else:
                clients += int(answer.get("clients", 0) or 0)
                if "broker" in answer:
                    brokers.add(str(answer["broker"]))
        workers[index] = state
    serving = sum(1 for state in workers.values() if state == SERVING)
    if stopping:
        status, code = "draining", 503
    elif serving == 0:
        status, code = "unavailable", 503
    elif serving < count or brokers - {"up"}:
        status, code = "degraded", 200
    else:
        status, code = SERVING, 200
    body: dict[str, Any] = {
        "status": status,
        "workers": count,
        "serving": serving,
        "missing": {str(i): state for i, state in workers.items() if state != SERVING},
        "clients": clients,
    }
    if node:
        body["node"] = node
    if brokers:
        body["broker"] = "up" if brokers == {"up"} else "down"
    return code, body


def supervisor_families(
    count: int,
    serving: int,
    restarts: int,
    answered: Mapping[int, bool],
    refused: Counter[str],
) -> list[Metric]:
    """The supervisor's own series: workers configured, serving, replaced, answering."""
    workers = GaugeMetricFamily("heartbeatd_workers", "Worker processes configured.", value=count)
    up = GaugeMetricFamily(
        "heartbeatd_workers_serving", "Worker processes serving now.", value=serving
    )
    replaced = CounterMetricFamily(
        "heartbeatd_worker_restarts", "Workers replaced after they exited.", value=restarts
    )
    scraped = GaugeMetricFamily(
        "heartbeatd_worker_scrape_ok",
        "1 when the worker answered this scrape in time (its series are missing when 0).",
        labels=["worker"],
    )
    for index in range(count):
        scraped.add_metric([str(index)], 1 if answered.get(index) else 0)
    admin = CounterMetricFamily(
        "heartbeatd_admin_refused",
        "Admin requests refused before their body was read, by HTTP status.",
        labels=["status"],
    )
    for status, value in sorted({**dict.fromkeys(ADMIN_REFUSALS, 0), **refused}.items()):
        admin.add_metric([status], value)
    return [workers, up, replaced, scraped, admin]


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def exposition(families: list[Metric]) -> bytes:
    """Prometheus text format for already-built families."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


# -- the resources ---------------------------------------------------------------------------


class SupervisorBackend:
    """The routes (`heartbeatd.daemon.admin_routes`) in the supervisor: answers for the whole
    daemon itself (/healthz, /metrics), asks every worker (DELETE /clients/{session}), or
    forwards to the first serving worker (the rest)."""

    #: Seconds each worker gets to answer a /healthz, a /metrics, a forwarded request.
    HEALTH_TIMEOUT = 2.0
    METRICS_TIMEOUT = 5.0
    FORWARD_TIMEOUT = 15.0

    def __init__(
        self,
        supervisor: Supervised,
        channel: WorkerChannel,
        refused: Counter[str],
        clock: Any,
    ) -> None:
        self.supervisor = supervisor
        self.channel = channel
        self.refused = refused
        self.merger = MetricsMerger()
        self._waiters: dict[str, list[Deferred[Any]]] = {}
        self._limiter = LogLimiter(clock, lines=1, window=60.0)
        self._own = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self._own)

    # -- the routes ----------------------------------------------------------------------

    def index(self, call: Call) -> Answer:
        return index_answer()

    def health(self, call: Call) -> Deferred[Answer]:
        health = self._shared("health", self._health)
        return health.addCallback(lambda answer: Answer(answer[1], answer[0]))

    def metrics(self, call: Call) -> Deferred[Answer]:
        content_type = {b"content-type": CONTENT_TYPE_LATEST.encode()}
        metrics = self._shared("metrics", self._metrics)
        return metrics.addCallback(lambda raw: Answer(raw=raw, headers=content_type))

    def disconnect(self, call: Call) -> Deferred[Answer]:
        return self._disconnect(call.request, call.params["session"])

    def clients(self, call: Call) -> Deferred[Answer]:
        return self.forward(call.request)

    # With cluster.redis (which workers need) a worker answers for all of them.
    send = broadcast = publish = disconnect_identity = clients

    def _shared(self, what: str, start: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        """One round of questions at a time per endpoint: requests meanwhile share its answer.

        A burst of scrapes or probes (``/healthz`` may be public) costs the workers one
        question each, not one per request.
        """
        waiter: Deferred[Any] = Deferred()
        waiters = self._waiters.get(what)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._waiters[what] = [waiter]

        def fire(result: Any) -> None:
            for d in self._waiters.pop(what):  # swapped out first: a waiter may ask again
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)

        start().addBoth(fire)
        return waiter

    # -- asking the workers --------------------------------------------------------------

    def _serving(self) -> list[int]:
        states = self.supervisor.worker_states()
        return [i for i in sorted(states) if states[i] == SERVING]

    def _ask_all(
        self, indexes: list[int], method: bytes, uri: bytes, timeout: float, **kw: Any
    ) -> Deferred[dict[int, Reply | Failure]]:
        """Ask each worker at once; every answer (or failure) once the slowest is in."""
        asked: list[tuple[int, Deferred[Reply]]] = []
        for index in indexes:
            path = self.supervisor.admin_socket(index)
            if path is not None:
                asked.append((index, self.channel.request(path, method, uri, timeout, **kw)))
        done = DeferredList([d for _, d in asked], consumeErrors=True)

        def collect(results: list[tuple[bool, Any]]) -> dict[int, Reply | Failure]:
            return {index: result for (index, _), (_, result) in zip(asked, results, strict=True)}

        return done.addCallback(collect)

    def _unanswered(self, what: str, failures: Mapping[int, Failure]) -> None:
        for index, failure in failures.items():
            if self._limiter.allow(f"worker {index} {what}"):
                log.warn(
                    "Worker {index} did not answer the admin API's {what}: {error}",
                    index=index,
                    what=what,
                    error=_describe(failure),
                )

    # -- the endpoints -------------------------------------------------------------------

    def _health(self) -> Deferred[Any]:
        sup = self.supervisor
        states = sup.worker_states()
        serving = [i for i in sorted(states) if states[i] == SERVING]
        d = self._ask_all(serving, b"GET", b"/healthz", self.HEALTH_TIMEOUT)

        def answer(replies: dict[int, Reply | Failure]) -> tuple[int, dict[str, Any]]:
            bodies = {i: r.json() for i, r in replies.items() if isinstance(r, Reply)}
            self._unanswered("/healthz", _failures(replies))
            return daemon_health(sup.count, states, bodies, sup.stopping, sup.node_base)

        return d.addCallback(answer)

    def _metrics(self) -> Deferred[bytes]:
        sup = self.supervisor
        serving = self._serving()
        d = self._ask_all(serving, b"GET", b"/metrics", self.METRICS_TIMEOUT)

        def answer(replies: dict[int, Reply | Failure]) -> bytes:
            answers: dict[str, WorkerAnswer] = {}
            failures = _failures(replies)
            for index, reply in replies.items():
                pid = sup.worker_pid(index)
                if not isinstance(reply, Reply) or pid is None:
                    continue
                if reply.code != 200:
                    failures[index] = Failure(ValueError(f"HTTP {reply.code}"))
                    continue
                try:
                    families = parse(reply.body.decode("utf-8"))
                except (ValueError, UnicodeDecodeError) as e:
                    failures[index] = Failure(e)
                    continue
                answers[str(index)] = WorkerAnswer(pid, families)
            self._unanswered("/metrics", failures)
            answers["supervisor"] = WorkerAnswer(os.getpid(), list(self._own.collect()))
            own = supervisor_families(
                sup.count,
                len(serving),
                sup.restarts,
                {i: str(i) in answers for i in range(sup.count)},
                self.refused,
            )
            merged = self.merger.merge(answers, own, skip=_SUPERVISOR_FAMILIES)
            return exposition(merged)

        return d.addCallback(answer)

    def _body(self, request: Request) -> bytes | None:
        request.content.seek(0)
        data: bytes = request.content.read()
        return data if data or request.method in (b"POST", b"PUT", b"PATCH") else None

    def _headers(self, request: Request) -> dict[bytes, bytes]:
        out = {}
        for name in _REQUEST_HEADERS:
            value = request.requestHeaders.getRawHeaders(name)
            if value:
                out[name] = value[0]
        return out

    def forward(self, request: Request) -> Deferred[Answer]:
        """Pass the request to the first serving worker, and its answer back."""
        serving = self._serving()
        if not serving:
            return succeed(_unavailable("no worker is serving"))
        index = serving[0]
        path = self.supervisor.admin_socket(index)
        if path is None:
            return succeed(_unavailable(f"worker {index} has no admin socket"))
        d = self.channel.request(
            path,
            request.method,
            request.uri,
            self.FORWARD_TIMEOUT,
            headers=self._headers(request),
            body=self._body(request),
        )

        def failed(failure: Failure) -> Answer:
            self._unanswered(request.path.decode("ascii", "replace"), {index: failure})
            return _unavailable(f"worker {index} did not answer: {_describe(failure)}")

        return d.addCallbacks(_passed_on, failed)

    def _disconnect(self, request: Request, session: str) -> Deferred[Answer]:
        """Every serving worker is asked for its own clients (``?scope=local``) and the holder
        closes it; when none holds it, the first serving worker is asked to find it on another
        node of the cluster."""
        serving = self._serving()
        if not serving:
            return succeed(_unavailable("no worker is serving"))
        d = self._ask_all(
            serving,
            b"DELETE",
            request.path + b"?scope=local",
            self.FORWARD_TIMEOUT,
            headers=self._headers(request),
        )

        def answer(replies: dict[int, Reply | Failure]) -> Answer | Deferred[Answer]:
            for index, reply in sorted(replies.items()):
                if isinstance(reply, Reply) and reply.code == 200:
                    return Answer({"disconnected": session, "worker": index})
            failures = _failures(replies)
            others = {i: r for i, r in replies.items() if isinstance(r, Reply) and r.code != 404}
            if others:  # e.g. 401: every worker says the same; pass the first on
                return _passed_on(others[min(others)])
            if failures:
                self._unanswered("DELETE /clients", failures)
                return _unavailable(
                    f"no client {session!r} on the workers that answered; "
                    f"workers {sorted(failures)} did not answer"
                )
            return self.forward(request)  # on another node, or nowhere (404)

        return d.addCallback(answer)


def _passed_on(reply: Reply) -> Answer:
    """A worker's answer, as it is."""
    return Answer(status=reply.code, raw=reply.body, headers=dict(reply.headers))


def _unavailable(why: str) -> Answer:
    return Answer({"error": why, "code": "unavailable"}, 503)


class SupervisorAdmin(AdminApi):
    """The admin API's one resource in the supervisor (`SupervisorBackend`)."""

    def __init__(
        self,
        supervisor: Supervised,
        channel: WorkerChannel,
        policy: AdminPolicy,
        refused: Counter[str],
        clock: Any,
    ) -> None:
        super().__init__(SupervisorBackend(supervisor, channel, refused, clock), policy)


def _failures(replies: Mapping[int, Reply | Failure]) -> dict[int, Failure]:
    return {i: r for i, r in replies.items() if isinstance(r, Failure)}


def _describe(failure: Failure) -> str:
    if failure.check(TimeoutError):
        return failure.getErrorMessage()
    if failure.check(ResponseNeverReceived, ResponseFailed):
        reasons = getattr(failure.value, "reasons", [])
        return "; ".join(r.getErrorMessage() or r.type.__name__ for r in reasons)
    return f"{failure.type.__name__}: {failure.getErrorMessage()}"


def supervisor_site(
    supervisor: Supervised,
    reactor: Any,
    token: str,
    policy: AdminPolicy,
    access_log: bool = False,
) -> AdminSite:
    """The daemon's admin site, served by the supervisor on ``admin.listen``."""
    refused: Counter[str] = Counter()
    root = SupervisorAdmin(supervisor, WorkerChannel(reactor, token), policy, refused, reactor)
    return AdminSite(root, policy, access_log, refused)

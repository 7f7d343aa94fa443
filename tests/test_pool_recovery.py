"""The pool's recovery from a server outage, on a Clock: every transition the issue asked for.

One backoff step per failed round, a single probe while down, probes at least every
``probe_interval`` while callers ask, a last-chance attempt for a waiter about to time out,
``fail_fast``, the connect deadline, and what stats() says about all of it.  The last tests
run the real `connect` path over ``iosim.ConnectionCompleter`` to a real server factory.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import iosim, make_config, parse_frames
from test_pool import FakeConn, Harness, assert_stats
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from heartbeatd.client import (
    ClientConnection,
    ClientError,
    Pool,
    PoolConfig,
    PoolError,
    PoolTimeout,
    PoolUnavailable,
    parse_pool_config,
)
from heartbeatd.config import ConfigError
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import default_registry

_sync = SynchronousTestCase()
successResultOf = _sync.successResultOf
failureResultOf = _sync.failureResultOf
assertNoResult = _sync.assertNoResult


def down_with_waiters(clock: Clock, waiters: int = 4, **config: Any) -> tuple[Harness, list]:
    """A pool of max_size 4 whose first round of connects was all refused."""
    h = Harness(clock, max_size=4, backoff_initial=1, backoff_max=8, **config)
    borrowers = [h.pool.acquire() for _ in range(waiters)]
    assert len(h.connects) == waiters
    for i in range(waiters):
        h.refuse(i)
    return h, borrowers


def test_a_round_of_refused_parallel_connects_is_one_backoff_step(clock: Clock) -> None:
    h, borrowers = down_with_waiters(clock)
    stats = h.pool.stats()
    assert stats["attempt"] == 1 and stats["server_down"] and stats["errors"] == 4
    # Callers are waiting: the draw (0.5) is taken under min(backoff cap 1, probe_interval 0.5).
    assert stats["next_retry_in"] == pytest.approx(0.25)
    assert stats["last_error"] == "connection refused"
    for d in borrowers:
        assertNoResult(d)


def test_a_single_probe_while_down_then_the_whole_demand_at_once(clock: Clock) -> None:
    h, borrowers = down_with_waiters(clock)
    for expected_attempt in (2, 3):
        clock.advance(h.pool.stats()["next_retry_in"])
        assert len(h.connects) == 4 + expected_attempt - 1  # one probe, not four
        assert h.pool.stats()["creating"] == 1
        h.refuse()
        assert h.pool.stats()["attempt"] == expected_attempt
    clock.advance(h.pool.stats()["next_retry_in"])
    assert len(h.connects) == 7
    probe = h.succeed()  # the server is back
    assert len(h.connects) == 10  # the three other waiters' connections start together
    assert_stats(h.pool, server_down=False, attempt=0, next_retry_in=None, creating=3)
    for i in range(7, 10):
        h.succeed(i)
    assert [successResultOf(d) for d in borrowers] == [probe, *h.made[1:]]


def test_failures_of_a_round_already_counted_do_not_add_steps(clock: Clock) -> None:
    h = Harness(clock, max_size=3, backoff_initial=1, backoff_max=8)
    for _ in range(3):
        h.pool.acquire()
    h.refuse(0)
    clock.advance(0.1)
    h.refuse(1)  # started in the same round as the first: no second step
    assert h.pool.stats()["attempt"] == 1
    h.succeed(2)  # one of that round got through after all: the outage is over
    assert_stats(h.pool, server_down=False, attempt=0, in_use=1)
    assert len(h.connects) == 5  # and the two waiters left get connections in parallel


def test_probe_interval_caps_the_delay_once_callers_ask(clock: Clock) -> None:
    h = Harness(clock, min_idle=1, backoff_initial=1, backoff_max=8)
    h.pool.start()
    for _ in range(4):  # nobody asking: the background refill backs off to 4 s (0.5 * 8)
        h.refuse()
        clock.advance(h.pool.stats()["next_retry_in"])
    h.refuse()
    assert h.pool.stats()["next_retry_in"] == pytest.approx(4.0)
    clock.advance(1)
    waiter = h.pool.acquire()
    # The same draw under probe_interval (0.5 * 0.5) from the failure, which was 1 s ago: now.
    assert h.pool.stats()["next_retry_in"] == 0
    clock.advance(0)
    assert len(h.connects) == 6
    conn = h.succeed()
    assert successResultOf(waiter) is conn


def test_a_waiter_about_to_time_out_triggers_an_attempt(clock: Clock) -> None:
    h = Harness(
        clock, min_idle=1, acquire_timeout=2, backoff_initial=16, backoff_max=16, probe_interval=0
    )
    h.pool.start()
    h.refuse()
    assert h.pool.stats()["next_retry_in"] == 8  # 0.5 * 16: longer than anyone waits
    waiter = h.pool.acquire()
    assert h.pool.stats()["next_retry_in"] == pytest.approx(1.6)  # 80% of acquire_timeout
    clock.advance(1.6)
    assert len(h.connects) == 2
    conn = h.succeed()
    assert successResultOf(waiter) is conn


def test_a_waiter_that_saw_an_attempt_gets_no_extra_one(clock: Clock) -> None:
    h = Harness(clock, acquire_timeout=2, backoff_initial=16, backoff_max=16, probe_interval=0)
    waiter = h.pool.acquire()  # its own attempt...
    h.refuse()  # ...failed: the next one follows the backoff (8 s), not its deadline
    assert h.pool.stats()["next_retry_in"] == 8
    clock.advance(2)
    assert isinstance(failureResultOf(waiter, PoolTimeout).value, PoolError)
    assert len(h.connects) == 1


def test_fail_fast_fails_at_once_while_the_server_is_known_down(clock: Clock) -> None:
    h = Harness(clock, fail_fast=True, backoff_initial=1, backoff_max=8)
    first = h.pool.request("echo")  # not known down yet: it waits for the connect
    assertNoResult(first)
    h.refuse()  # now it is known: the waiter is failed too, not left to time out
    assert "the server is down" in str(failureResultOf(first, PoolUnavailable).value)
    error = failureResultOf(h.pool.acquire(), PoolUnavailable).value
    assert isinstance(error, ClientError)
    assert "the server is down; down for 0.00s, 1 failed attempts, next attempt in" in str(error)
    failureResultOf(h.pool.request("echo"), PoolUnavailable)
    assert_stats(h.pool, unavailable=3, waiting=0, timeouts=0)
    clock.advance(h.pool.stats()["next_retry_in"])
    assert len(h.connects) == 2  # the probe goes on, though nobody waits for it
    conn = h.succeed()
    assert successResultOf(h.pool.acquire()) is conn


def test_fail_fast_callers_count_as_asking(clock: Clock) -> None:
    h = Harness(clock, min_idle=1, fail_fast=True, backoff_initial=1, backoff_max=8)
    h.pool.start()
    for _ in range(4):
        h.refuse()
        clock.advance(h.pool.stats()["next_retry_in"])
    h.refuse()
    assert h.pool.stats()["next_retry_in"] == pytest.approx(4.0)  # nobody asking
    clock.advance(1)
    failureResultOf(h.pool.acquire(), PoolUnavailable)
    assert h.pool.stats()["next_retry_in"] == 0  # brought forward as for a waiter
    clock.advance(0)
    assert len(h.connects) == 6
    h.succeed()
    assert h.pool.stats()["server_down"] is False
    assert successResultOf(h.pool.acquire()) is h.made[-1]


def test_connect_timeout_bounds_a_connect_that_never_completes(clock: Clock) -> None:
    h = Harness(clock, connect_timeout=3, acquire_timeout=10)
    waiter = h.pool.acquire()
    clock.advance(3)
    assert h.connects[0].called  # cancelled by the pool
    h.connects[0].addErrback(lambda _: None)
    stats = h.pool.stats()
    assert stats["server_down"] and stats["creating"] == 0
    assert stats["last_error"] == "no connection within connect_timeout 3s"
    clock.advance(stats["next_retry_in"])
    h.succeed()
    successResultOf(waiter)


def test_stats_show_wait_times(clock: Clock) -> None:
    h = Harness(clock, max_size=1)
    held = h.pool.acquire()
    conn = h.succeed()
    successResultOf(held)
    clock.advance(1)
    waiter = h.pool.acquire()
    clock.advance(2)
    assert h.pool.stats()["oldest_waiter"] == 2
    h.pool.release(conn)
    successResultOf(waiter)
    # Two waits: the first borrower waited (0 s) for the connect, the second 2 s.
    assert_stats(h.pool, waits=2, wait_seconds_total=2, wait_seconds_max=2, oldest_waiter=0)


def test_leak_stack_names_the_borrower_not_whoever_released(clock: Clock) -> None:
    h = Harness(clock, max_size=1, leak_threshold=30)
    first = h.pool.acquire()
    conn = h.succeed()
    successResultOf(first)

    def borrower_who_waits() -> Deferred:
        return h.pool.acquire()

    def releaser() -> None:
        h.pool.release(conn)

    waiting = borrower_who_waits()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        releaser()  # hands the connection to the waiter from inside this function
        successResultOf(waiting)
        clock.advance(30)
    finally:
        globalLogPublisher.removeObserver(events.append)
    (leak,) = [e for e in events if "held for" in e.get("log_format", "")]
    assert "borrower_who_waits" in leak["stack"] and "releaser" not in leak["stack"]


def test_async_with_records_the_callers_stack(clock: Clock) -> None:
    h = Harness(clock, leak_threshold=5)
    events: list[dict] = []

    async def app_code() -> None:
        async with h.pool.connection():
            await Deferred()  # holds the connection forever

    globalLogPublisher.addObserver(events.append)
    try:
        ensureDeferred(app_code())
        h.succeed()
        clock.advance(5)
    finally:
        globalLogPublisher.removeObserver(events.append)
    (leak,) = [e for e in events if "held for" in e.get("log_format", "")]
    assert "app_code" in leak["stack"]


def test_idle_timeout_counts_from_the_last_shared_request(clock: Clock) -> None:
    h = Harness(clock, max_size=2, idle_timeout=10)
    a, b = h.pool.acquire(), h.pool.acquire()
    ca, cb = h.succeed(0), h.succeed(1)
    h.pool.release(successResultOf(a))
    h.pool.release(successResultOf(b))
    clock.advance(6)
    reply = h.pool.request("echo")  # goes out on ca: ca is not idle since 0 any more
    (sent,) = ca.pings
    sent.callback("ok")
    successResultOf(reply)
    clock.advance(4)
    assert cb.closed and not ca.closed
    clock.advance(6)
    assert ca.closed


def test_close_stops_connects_in_flight(clock: Clock) -> None:
    h = Harness(clock)
    waiter = h.pool.acquire()
    closed = h.pool.close()
    failureResultOf(waiter)
    assert h.connects[0].called  # cancelled, not left to finish
    h.connects[0].addErrback(lambda _: None)
    successResultOf(closed)
    assert clock.getDelayedCalls() == []


def test_pool_config_checks_the_new_keys() -> None:
    assert PoolConfig().fail_fast is False and PoolConfig().probe_interval == 0.5
    with pytest.raises(ConfigError) as caught:
        parse_pool_config({"fail_fast": "yes", "probe_interval": -1})
    assert caught.value.errors == [
        "pool.probe_interval: -1 is not allowed; expected a number >= 0 (0 disables)",
        "pool.fail_fast: 'yes' is not allowed; expected true or false",
    ]
    with pytest.raises(ConfigError, match=r"pool\.backoff_initial: 5\.0 is not allowed"):
        parse_pool_config({"backoff_initial": 5, "backoff_max": 1})


# -- "data": one rule for conn.request and pool.request ----------------------------------


class Wire:
    """Real ClientConnections on StringTransports, as a pool's connect_fn."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.transports: list[StringTransport] = []

    def connect(self) -> Deferred[ClientConnection]:
        conn = ClientConnection(self.clock, expect_hello=False)
        transport = StringTransport()
        conn.makeConnection(transport)
        self.transports.append(transport)
        return conn.when_ready()


def test_data_is_omitted_unless_given_and_none_is_null(clock: Clock) -> None:
    wire = Wire(clock)
    pool = Pool(clock, PoolConfig(min_idle=1, max_size=1), wire.connect)
    pool.start()
    conn = successResultOf(pool.acquire())
    pool.release(conn)
    for sender in (pool.request, conn.request):
        sender("ping")
        sender("echo", None)
        sender("echo", {"a": 1})
    sent = parse_frames(wire.transports[0].value())
    shapes = [{k: v for k, v in m.items() if k != "id"} for m in sent]
    assert (
        shapes
        == [
            {"type": "ping"},
            {"type": "echo", "data": None},
            {"type": "echo", "data": {"a": 1}},
        ]
        * 2
    )
    for d in pool.close(), conn.when_idle():
        d.addErrback(lambda _: None)


# -- the real connect path over iosim.ConnectionCompleter -------------------------------


class Network:
    """A MemoryReactorClock with a real heartbeatd server factory listening on it."""

    def __init__(self, **pool: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.completer = iosim.ConnectionCompleter(self.reactor)
        config = make_config(heartbeat={"interval": 10, "timeout": 30})
        self.server = ServerFactory(config, default_registry(), self.reactor)
        self.reactor.listenTCP(9000, self.server)
        defaults = {"endpoint": "tcp:host=127.0.0.1:port=9000", "min_idle": 0, "max_size": 2}
        self.pool = Pool(self.reactor, PoolConfig(**{**defaults, **pool}), random=lambda: 0.5)
        self.pumps: list[Any] = []

    def accept(self) -> None:
        pump = self.completer.succeedOnce()
        assert pump is not None
        self.pumps.append(pump)
        pump.flush()

    def refuse(self) -> None:
        self.completer.failOnce()

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()


def test_over_iosim_down_probe_and_recovery() -> None:
    net = Network(max_size=2, backoff_initial=1, backoff_max=8)
    replies = [net.pool.request("echo", n) for n in range(3)]
    assert len(net.reactor.tcpClients) == 2  # max_size sockets for three callers
    net.refuse()
    net.refuse()
    assert_stats(net.pool, attempt=1, server_down=True)
    net.reactor.advance(net.pool.stats()["next_retry_in"])
    assert len(net.reactor.tcpClients) == 1  # a single probe
    net.accept()  # the server is back: hello, then the waiting requests go out on it
    net.flush()
    assert [successResultOf(r) for r in replies] == [0, 1, 2]
    # Each request borrowed the connection only to send it: one socket served all three.
    assert_stats(net.pool, server_down=False, created=1, idle=1, creating=0)
    assert net.reactor.tcpClients == []
    net.pool.close()
    net.flush()
    assert net.server.clients == {}


def test_over_iosim_a_silent_server_hits_connect_timeout_and_is_dropped() -> None:
    net = Network(connect_timeout=2)
    waiter = net.pool.acquire()
    client_factory = net.reactor.tcpClients[0][2]
    # A server that accepts but never speaks: connect the client side only.
    proto = client_factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    net.reactor.advance(2)
    # connect_timeout and the hello timeout are both 2 s: either way the socket is dropped.
    assert transport.disconnecting
    proto.connectionLost(Failure(ConnectionError("aborted")))
    assert_stats(net.pool, server_down=True, creating=0)
    assertNoResult(waiter)
    net.pool.close()
    failureResultOf(waiter, PoolError)


def test_over_iosim_fail_fast_then_recovery() -> None:
    net = Network(fail_fast=True, min_idle=1)
    net.pool.start()
    net.refuse()
    failureResultOf(net.pool.request("echo", 1), PoolUnavailable)
    net.reactor.advance(net.pool.stats()["next_retry_in"])
    net.accept()
    reply = net.pool.request("echo", 1)
    net.flush()
    assert successResultOf(reply) == 1


def test_a_connection_told_to_go_away_during_its_borrow_ping_is_not_lent(clock: Clock) -> None:
    h = Harness(clock, ping_on_borrow_after=30)
    first = h.pool.acquire()
    conn = h.succeed()
    h.pool.release(successResultOf(first))
    clock.advance(31)
    borrowed = h.pool.acquire()
    (ping,) = conn.pings
    conn.goaway()  # the server starts draining while our ping is in flight
    ping.callback(None)  # the ping is still answered...
    assert conn.closed and len(h.connects) == 2  # ...but the connection is replaced
    fresh = h.succeed()
    assert successResultOf(borrowed) is fresh


def test_cancelling_connect_while_awaiting_the_hello_drops_the_socket() -> None:
    from twisted.internet.defer import CancelledError
    from twisted.internet.protocol import Factory, Protocol

    from heartbeatd.client import connect

    reactor = MemoryReactorClock()
    completer = iosim.ConnectionCompleter(reactor)
    silent = Factory.forProtocol(Protocol)  # accepts, never says hello
    reactor.listenTCP(9000, silent)
    d = connect(reactor, "tcp:host=127.0.0.1:port=9000", hello_timeout=60)
    pump = completer.succeedOnce()
    assert pump is not None
    pump.flush()
    assertNoResult(d)  # connected, waiting for the hello
    d.cancel()  # e.g. the pool's connect_timeout
    failureResultOf(d, CancelledError)
    pump.flush()
    assert pump.clientIO.disconnected and pump.serverIO.disconnected  # no socket left behind


def test_connections_made_at_once_still_respect_max_size(clock: Clock) -> None:
    from twisted.internet.defer import succeed

    made: list[FakeConn] = []

    def connect_now() -> Deferred:
        made.append(FakeConn(f"c{len(made)}"))
        return succeed(made[-1])

    pool = Pool(clock, PoolConfig(min_idle=4, max_size=4), connect_now)
    pool.start()
    assert len(made) == 4 and pool.stats()["idle"] == 4
    borrowed = [successResultOf(pool.acquire()) for _ in range(4)]
    assertNoResult(pool.acquire())
    assert len(made) == 4 and sorted(map(repr, borrowed)) == ["c0", "c1", "c2", "c3"]


def test_close_aborts_connections_that_do_not_close_in_time(clock: Clock) -> None:
    class Stuck(FakeConn):
        def close(self) -> None:  # a polite close that never completes (peer reads nothing)
            pass

        def abort(self, error: Exception) -> None:
            FakeConn.close(self)

    h = Harness(clock, connect_timeout=3)
    d = h.pool.acquire()
    stuck = Stuck("stuck")
    h.connects[0].callback(stuck)
    successResultOf(d)
    closed = h.pool.close()
    clock.advance(2.9)
    assertNoResult(closed)
    clock.advance(0.1)
    successResultOf(closed)
    assert stuck.closed and clock.getDelayedCalls() == []


def test_new_errors_are_typed_and_exported() -> None:
    import heartbeatd.client as front
    from heartbeatd.client import ConnectionFailed, NotConnected

    for name in ("ConnectionFailed", "NotConnected", "PoolUnavailable"):
        assert name in front.__all__
    assert issubclass(NotConnected, ConnectionFailed) and issubclass(ConnectionFailed, ClientError)
    assert issubclass(PoolUnavailable, PoolError)

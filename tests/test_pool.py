"""Every pool transition on a Clock, with connections whose fate each test decides."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from heartbeatd.client import (
    ConnectionClosed,
    Pool,
    PoolClosed,
    PoolConfig,
    PoolExhausted,
    PoolTimeout,
    RequestTimeout,
    ServerError,
    load_pool_config,
    parse_pool_config,
)
from heartbeatd.config import ConfigError


class FakeConn:
    """Stands in for a ClientConnection: the test kills it, or sends it goaway."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.usable = True
        self.closed = False
        self._close: list = []
        self._goaway: list = []
        self.pings: list[Deferred] = []

    def __repr__(self) -> str:
        return self.name

    def on_close(self, cb: Any) -> None:
        self._close.append(cb)

    def on_goaway(self, cb: Any) -> None:
        self._goaway.append(cb)

    def close(self) -> None:
        if not self.closed:
            self.closed, self.usable = True, False
            for cb in self._close:
                cb(self, None)

    die = close  # the peer went away: same callbacks

    def abort(self, error: Exception) -> None:
        self.close()

    def goaway(self) -> None:
        self.usable = False
        for cb in self._goaway:
            cb(self, {"reconnect_after": 1})

    def request(self, type: str, data: Any = None, timeout: float | None = None) -> Deferred:
        d: Deferred = Deferred()
        self.pings.append(d)
        return d

    @property
    def pending_requests(self) -> int:
        return sum(not d.called for d in self.pings)

    def when_idle(self) -> Deferred:
        return gatherResults([d for d in self.pings if not d.called]).addBoth(lambda _: None)


class Harness:
    def __init__(self, clock: Clock, **config: Any) -> None:
        self.clock = clock
        self.connects: list[Deferred] = []
        self.made: list[FakeConn] = []
        defaults = {"min_idle": 0, "max_size": 2, "idle_timeout": 0, "max_lifetime": 0}
        self.pool = Pool(
            clock, PoolConfig(**{**defaults, **config}), self._connect, random=lambda: 0.5
        )

    def _connect(self) -> Deferred:
        d: Deferred = Deferred()
        self.connects.append(d)
        return d

    def succeed(self, index: int = -1) -> FakeConn:
        conn = FakeConn(f"c{len(self.made)}")
        self.made.append(conn)
        self.connects[index].callback(conn)
        return conn

    def refuse(self, index: int = -1) -> None:
        self.connects[index].errback(ConnectionRefusedError("connection refused"))


@pytest.fixture
def h(clock: Clock) -> Harness:
    return Harness(clock)


def assert_stats(pool: Pool, **expected: int) -> None:
    stats = pool.stats()
    assert {key: stats[key] for key in expected} == expected


def result(d: Deferred) -> Any:
    """What ``d`` fired with (a value or a Failure, then consumed), like successResultOf."""
    fired: list[Any] = []
    d.addBoth(fired.append)
    assert fired, "Deferred has not fired"
    return fired[0]


def test_acquire_creates_then_reuses(h: Harness) -> None:
    d = h.pool.acquire()
    assert not d.called and len(h.connects) == 1
    conn = h.succeed()
    assert result(d) is conn
    assert h.pool.stats()["in_use"] == 1
    h.pool.release(conn)
    assert_stats(h.pool, idle=1, in_use=0)
    assert result(h.pool.acquire()) is conn
    assert len(h.connects) == 1  # reused, not reconnected


def test_waiters_are_served_fifo_within_max_size(h: Harness) -> None:
    a, b = h.pool.acquire(), h.pool.acquire()
    ca, cb = h.succeed(0), h.succeed(1)
    assert (result(a), result(b)) == (ca, cb)
    w1, w2 = h.pool.acquire(), h.pool.acquire()
    assert len(h.connects) == 2  # max_size 2: no third connection
    assert h.pool.stats()["waiting"] == 2
    h.pool.release(cb)
    assert result(w1) is cb and not w2.called
    h.pool.release(ca)
    assert result(w2) is ca


def test_acquire_timeout_explains_the_state(h: Harness, clock: Clock) -> None:
    held = [h.pool.acquire(), h.pool.acquire()]
    h.succeed(0), h.succeed(1)
    assert all(d.called for d in held)
    waiting = h.pool.acquire()
    clock.advance(5)
    error = result(waiting).value
    assert isinstance(error, PoolTimeout)
    assert "within 5s; 0 idle, 2 in use, 0 being created, 1 waiting (max_size 2)" in str(error)
    assert h.pool.stats()["timeouts"] == 1 and h.pool.stats()["waiting"] == 0


def test_max_waiters_fails_fast(clock: Clock) -> None:
    h = Harness(clock, max_size=1, max_waiters=1)
    first = h.pool.acquire()
    h.succeed()
    assert first.called
    second = h.pool.acquire()
    third = h.pool.acquire()
    assert not second.called
    assert isinstance(result(third).value, PoolExhausted)


def test_connection_dying_while_idle_is_replaced_before_anyone_borrows_it(clock: Clock) -> None:
    h = Harness(clock, min_idle=1)
    h.pool.start()
    first = h.succeed()
    assert h.pool.stats()["idle"] == 1
    first.die()  # e.g. its heartbeat found the server gone
    assert h.pool.stats()["idle"] == 0 and len(h.connects) == 2
    second = h.succeed()
    assert result(h.pool.acquire()) is second
    assert h.pool.stats()["destroyed"] == 1


def test_connection_dying_while_in_use_is_not_returned_to_idle(h: Harness) -> None:
    d = h.pool.acquire()
    conn = h.succeed()
    result(d)
    conn.die()
    h.pool.release(conn)
    assert h.pool.stats()["idle"] == 0
    assert h.pool.stats()["destroyed"] == 1
    assert len(h.connects) == 1  # min_idle 0: nothing to refill


def test_connection_dying_while_waiters_queue(clock: Clock) -> None:
    h = Harness(clock, max_size=1)
    d = h.pool.acquire()
    conn = h.succeed()
    result(d)
    waiter = h.pool.acquire()
    conn.die()
    h.pool.release(conn)
    assert len(h.connects) == 2  # a replacement for the waiter
    replacement = h.succeed()
    assert result(waiter) is replacement


def test_close_fails_waiters_and_closes_connections(h: Harness) -> None:
    a = h.pool.acquire()
    ca = h.succeed()
    result(a)
    h.pool.acquire()
    h.succeed()
    waiter = h.pool.acquire()
    closed = h.pool.close()
    assert isinstance(result(waiter).value, PoolClosed)
    assert all(c.closed for c in h.made)
    assert closed.called
    assert isinstance(result(h.pool.acquire()).value, PoolClosed)
    h.pool.release(ca)  # a late release is harmless


def test_refill_backs_off_while_the_server_is_down(clock: Clock) -> None:
    h = Harness(clock, min_idle=1, backoff_initial=1, backoff_max=4)
    h.pool.start()
    delays = []
    for _ in range(5):
        h.refuse()
        before = len(h.connects)
        stats = h.pool.stats()
        assert stats["server_down"] and stats["next_retry_in"] is not None
        delays.append(round(stats["next_retry_in"], 3))
        clock.advance(delays[-1])
        assert len(h.connects) == before + 1  # exactly one new attempt per retry
    # random() is 0.5: half of the cap 1, 2, 4, 4, 4 (capped)
    assert delays == [0.5, 1.0, 2.0, 2.0, 2.0]
    h.succeed()
    assert_stats(h.pool, idle=1, attempt=0, server_down=False)


def test_waiter_during_outage_times_out_with_the_connect_error(clock: Clock) -> None:
    h = Harness(clock, backoff_initial=1)
    d = h.pool.acquire()
    h.refuse()
    clock.advance(5)
    error = result(d).value
    assert isinstance(error, PoolTimeout) and "connection refused" in str(error)


def test_run_always_releases_and_destroys_broken_connections(h: Harness) -> None:
    out = h.pool.run(lambda conn: conn.name)
    conn = h.succeed()
    assert result(out) == conn.name and h.pool.stats()["idle"] == 1

    def fails(conn: FakeConn) -> None:
        raise ValueError("app bug")

    assert isinstance(result(h.pool.run(fails)).value, ValueError)
    assert h.pool.stats()["idle"] == 1  # an application error does not break the connection

    def times_out(conn: FakeConn) -> None:
        raise RequestTimeout("slow")

    assert isinstance(result(h.pool.run(times_out)).value, RequestTimeout)
    assert_stats(h.pool, idle=0, destroyed=1)

    def protocol_error(conn: FakeConn) -> None:
        raise ServerError("bad_json", "x")

    broken = h.pool.run(protocol_error)
    h.succeed()
    assert isinstance(result(broken).value, ServerError)
    assert h.pool.stats()["destroyed"] == 2


def test_goaway_drains_and_replaces(clock: Clock) -> None:
    h = Harness(clock, min_idle=1)
    h.pool.start()
    idle = h.succeed()
    idle.goaway()  # idle: closed at once and replaced
    assert idle.closed and len(h.connects) == 2
    busy = h.succeed()
    assert result(h.pool.acquire()) is busy
    busy.goaway()  # in use: the borrower finishes first
    assert not busy.closed
    assert len(h.connects) == 3  # replacement already on its way
    h.pool.release(busy)
    assert busy.closed


def test_idle_timeout_closes_down_to_min_idle(clock: Clock) -> None:
    h = Harness(clock, min_idle=1, max_size=3, idle_timeout=60)
    held = [h.pool.acquire() for _ in range(3)]
    conns = [h.succeed(i) for i in range(3)]
    for d in held:
        result(d)
    for c in conns:
        h.pool.release(c)
    assert h.pool.stats()["idle"] == 3
    clock.advance(60)
    assert h.pool.stats()["idle"] == 1
    assert sum(c.closed for c in conns) == 2
    clock.advance(600)
    assert h.pool.stats()["idle"] == 1  # min_idle is kept


def test_max_lifetime_recycles_with_jitter(clock: Clock) -> None:
    values = iter([0.0, 1.0])
    h = Harness(clock, max_size=2, max_lifetime=100, lifetime_jitter=0.2)
    h.pool._random = lambda: next(values)
    a, b = h.pool.acquire(), h.pool.acquire()
    ca, cb = h.succeed(0), h.succeed(1)
    result(a), result(b)
    h.pool.release(ca), h.pool.release(cb)
    clock.advance(80)  # b's lifetime: 100 * (1 - 0.2 * 1.0)
    assert cb.closed and not ca.closed
    clock.advance(20)
    assert ca.closed


def test_leak_warning_names_where_it_was_acquired(clock: Clock) -> None:
    h = Harness(clock, leak_threshold=30)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        d = h.pool.acquire()
        h.succeed()
        result(d)
        clock.advance(30)
    finally:
        globalLogPublisher.removeObserver(events.append)
    (leak,) = [e for e in events if "held for" in e.get("log_format", "")]
    assert "test_leak_warning_names_where_it_was_acquired" in leak["stack"]


def test_ping_on_borrow_after_a_long_idle(clock: Clock) -> None:
    h = Harness(clock, ping_on_borrow_after=30)
    d = h.pool.acquire()
    conn = h.succeed()
    h.pool.release(result(d))
    clock.advance(10)
    assert result(h.pool.acquire()) is conn and conn.pings == []  # fresh: no ping
    h.pool.release(conn)
    clock.advance(31)
    borrowed = h.pool.acquire()
    assert not borrowed.called and len(conn.pings) == 1
    conn.pings[0].errback(ConnectionClosed("dead"))  # the ping fails: a new connection
    assert conn.closed and len(h.connects) == 2
    fresh = h.succeed()
    assert result(borrowed) is fresh


def test_async_context_manager_releases(h: Harness) -> None:
    async def work() -> str:
        async with h.pool.connection() as conn:
            return conn.name

    d = ensureDeferred(work())
    conn = h.succeed()
    assert result(d) == conn.name and h.pool.stats()["idle"] == 1

    async def broken() -> None:
        async with h.pool.connection():
            raise ConnectionClosed("lost")

    assert isinstance(result(ensureDeferred(broken())).value, ConnectionClosed)
    assert h.pool.stats()["idle"] == 0


def test_pool_config_from_yaml(tmp_path) -> None:
    path = tmp_path / "client.yaml"
    path.write_text("pool:\n  max_size: 4\n  endpoint: 'tcp:host=127.0.0.1:port=1'\n")
    config = load_pool_config(path)
    assert (config.max_size, config.min_idle) == (4, 1)
    with pytest.raises(ConfigError, match=r"pool\.max_size: 0 is not allowed"):
        parse_pool_config({"max_size": 0})
    with pytest.raises(ConfigError, match=r"pool\.min_idle: 5 is not allowed"):
        parse_pool_config({"min_idle": 5, "max_size": 2})
    with pytest.raises(ConfigError, match=r"did you mean 'pool\.max_size'"):
        parse_pool_config({"max_sise": 2})


def test_pool_config_subscribe_retry_timeout_reaches_the_subscription_connection(
    tmp_path, clock: Clock
) -> None:
    """Checked like ReconnectingClient's argument (seconds > 0; infinity: never give up)."""
    import math

    from heartbeatd.client.reconnect import DEFAULT_SUBSCRIBE_RETRY_TIMEOUT

    assert PoolConfig().subscribe_retry_timeout == DEFAULT_SUBSCRIBE_RETRY_TIMEOUT == 60
    default = Pool(clock, PoolConfig(min_idle=0)).subscriber_fn()
    assert default._subscribe_retry_timeout == DEFAULT_SUBSCRIBE_RETRY_TIMEOUT
    path = tmp_path / "client.yaml"
    path.write_text("pool:\n  subscribe_retry_timeout: 2.5\n")
    config = load_pool_config(path)
    assert config.subscribe_retry_timeout == 2.5
    assert Pool(clock, config).subscriber_fn()._subscribe_retry_timeout == 2.5
    path.write_text("pool:\n  subscribe_retry_timeout: .inf\n")
    forever = load_pool_config(path)
    assert forever.subscribe_retry_timeout == math.inf
    assert Pool(clock, forever).subscriber_fn()._subscribe_retry_timeout == math.inf
    assert parse_pool_config({"subscribe_retry_timeout": 1}).subscribe_retry_timeout == 1.0
    for bad in (0, -1, math.nan, "60", True, None):
        with pytest.raises(ConfigError, match=r"pool\.subscribe_retry_timeout: .* is not allowed"):
            parse_pool_config({"subscribe_retry_timeout": bad})


def test_request_multiplexes_over_idle_connections(clock: Clock) -> None:
    h = Harness(clock, min_idle=2, max_size=2)
    h.pool.start()
    a, b = h.succeed(0), h.succeed(1)
    replies = [h.pool.request("echo", n) for n in range(4)]
    assert [len(a.pings), len(b.pings)] == [2, 2]  # round robin, no borrow, no new connection
    assert h.pool.stats()["idle"] == 2 and h.pool.stats()["in_use"] == 0
    for conn in (a, b):
        for d in conn.pings:
            d.callback("ok")
    assert [result(r) for r in replies] == ["ok"] * 4


def test_multiplexed_request_that_breaks_its_connection_replaces_it(clock: Clock) -> None:
    h = Harness(clock, min_idle=1, max_size=1)
    h.pool.start()
    conn = h.succeed()
    d = h.pool.request("echo", 1)
    conn.pings[0].errback(RequestTimeout("slow"))
    assert isinstance(result(d).value, RequestTimeout)
    assert conn.closed and len(h.connects) == 2  # destroyed and replaced


def test_idle_connection_with_shared_requests_in_flight_closes_after_them(clock: Clock) -> None:
    h = Harness(clock, min_idle=0, max_size=1, idle_timeout=10)
    d = h.pool.acquire()
    conn = h.succeed()
    h.pool.release(result(d))
    pending = h.pool.request("slow")
    clock.advance(10)  # idle timeout while the shared request is in flight
    assert not conn.closed
    conn.pings[0].callback("done")
    assert result(pending) == "done" and conn.closed


def test_request_without_idle_connections_waits_then_shares(clock: Clock) -> None:
    h = Harness(clock, max_size=1)
    first, second = h.pool.request("echo", 1), h.pool.request("echo", 2)
    assert h.pool.stats()["waiting"] == 2
    conn = h.succeed()
    # Borrowed only to send: both requests went out on the one connection, which is idle
    # again while the replies are pending.
    assert len(conn.pings) == 2
    assert_stats(h.pool, idle=1, in_use=0, waiting=0)
    conn.pings[1].callback("two")
    conn.pings[0].callback("one")
    assert (result(first), result(second)) == ("one", "two")


def test_shared_request_breaking_a_borrowed_connection_retires_it(h: Harness) -> None:
    shared = h.pool.request("echo", 1)
    conn = h.succeed()
    exclusive = h.pool.acquire()
    assert result(exclusive) is conn  # someone borrowed it exclusively meanwhile
    conn.pings[0].errback(ConnectionClosed("lost"))
    assert isinstance(result(shared).value, ConnectionClosed)
    assert not conn.closed  # not pulled from under its borrower...
    h.pool.release(conn)
    assert conn.closed  # ...but destroyed when given back


# -- several endpoints -------------------------------------------------------------------------


class ManyHarness:
    """A pool over endpoints "a", "b"...; each connect is a Deferred the test settles."""

    def __init__(self, clock: Clock, names: str = "ab", **config: Any) -> None:
        self.clock = clock
        self.connects: list[tuple[str, Deferred]] = []
        defaults = {
            "min_idle": 0,
            "max_size": 4,
            "idle_timeout": 0,
            "max_lifetime": 0,
            "backoff_initial": 1,
            "backoff_max": 8,
            "probe_interval": 0,
        }
        config = {**defaults, **config, "endpoint": list(names)}
        self.pool = Pool(clock, PoolConfig(**config), random=lambda: 0.5, connect_to=self._connect)

    def _connect(self, endpoint: str) -> Deferred:
        d: Deferred = Deferred()
        self.connects.append((endpoint, d))
        return d

    def targets(self) -> list[str]:
        return [endpoint for endpoint, _ in self.connects]

    def pending(self) -> list[str]:
        return [endpoint for endpoint, d in self.connects if not d.called]

    def succeed(self, index: int = -1) -> FakeConn:
        endpoint, d = self.connects[index]
        conn = FakeConn(f"{endpoint}{index % len(self.connects)}")
        d.callback(conn)
        return conn

    def refuse(self, index: int = -1) -> None:
        self.connects[index][1].errback(ConnectionRefusedError("connection refused"))

    def per_endpoint(self) -> dict[str, tuple[int, bool]]:
        return {
            e["endpoint"]: (e["connections"], e["down"]) for e in self.pool.stats()["endpoints"]
        }


def test_new_connections_spread_over_the_endpoints(clock: Clock) -> None:
    h = ManyHarness(clock, "abc", max_size=6)
    borrowed = [h.pool.acquire() for _ in range(6)]
    assert h.targets() == ["a", "b", "c", "a", "b", "c"]
    for i in range(6):
        h.succeed(i)
    assert all(d.called for d in borrowed)
    assert h.per_endpoint() == {"a": (2, False), "b": (2, False), "c": (2, False)}
    # One of b's connections dies: its replacement goes to the least loaded endpoint, b.
    conns = [result(d) for d in borrowed]
    h.pool.release(conns[1], broken=True)
    h.pool.acquire()
    assert h.targets()[-1] == "b"
    h.refuse()  # and a failed attempt is not counted as a connection
    assert h.per_endpoint()["b"] == (1, True)
    h.pool.close()
    assert h.per_endpoint() == {"a": (0, False), "b": (0, True), "c": (0, False)}


def test_a_failed_endpoint_is_skipped_until_its_own_backoff_passes(clock: Clock) -> None:
    h = ManyHarness(clock)
    first = h.pool.acquire()
    assert h.targets() == ["a"]
    h.refuse()  # a is down; b serves, at once, and the pool is not down
    assert h.targets() == ["a", "b"]
    assert_stats(h.pool, server_down=False, attempt=0)
    conn = h.succeed()
    assert result(first) is conn
    more = [h.pool.acquire() for _ in range(2)]
    assert h.targets() == ["a", "b", "b", "b"]  # a waits out its backoff (0.5 * cap 1)
    h.succeed(2)
    h.succeed(3)
    assert all(d.called for d in more)
    assert h.per_endpoint() == {"a": (0, True), "b": (3, False)}
    clock.advance(0.5)
    h.pool.acquire()
    assert h.targets()[-1] == "a"  # due again, and the least loaded
    h.succeed()
    assert h.per_endpoint() == {"a": (1, False), "b": (3, False)}


def test_a_full_round_of_failures_backs_off_and_an_outage_probes_in_rounds(clock: Clock) -> None:
    h = ManyHarness(clock, "abc")
    waiter = h.pool.acquire()
    h.refuse()  # a
    assert h.pending() == ["b"]
    h.refuse()  # b
    assert h.pending() == ["c"]
    h.refuse()  # c: every endpoint failed, one failed round
    assert_stats(h.pool, server_down=True, attempt=1, creating=0)
    assert h.pool.stats()["next_retry_in"] == 0.5  # 0.5 * cap 1
    clock.advance(0.5)
    assert h.pending() == ["a"]  # a round of probes, one at a time, without delays between
    h.refuse()
    assert h.pending() == ["b"]
    h.refuse()
    assert h.pending() == ["c"]
    h.refuse()
    assert_stats(h.pool, server_down=True, attempt=2)
    assert h.pool.stats()["next_retry_in"] == 1.0  # the second round: 0.5 * cap 2
    clock.advance(1.0)
    assert h.pending() == ["a"]
    h.refuse()
    conn = h.succeed()  # b is back: the outage is over, the count reset
    assert result(waiter) is conn
    assert_stats(h.pool, server_down=False, attempt=0)
    assert h.per_endpoint()["b"] == (1, False)

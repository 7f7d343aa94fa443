"""Per-address limits: connections held and accept rate per client address, on a Clock; and the
refusal a real client gets from the real daemon."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from daemon import Daemon, RawClient
from helpers import Peer, make_config
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock

from heartbeatd.server.admission import Admission
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.protocol import RefusedProtocol, ServerProtocol

ADMIN = re.compile(r"admin API listening on 127\.0\.0\.1:(\d+)")


def take(a: Admission, host: str | None) -> tuple[str, str] | None:
    """Admit a connection from ``host`` as the factory does (key, then admit)."""
    return a.admit(a.key(host))


def admission(clock: Clock, **limits: object) -> Admission:
    return Admission(make_config(limits={"per_address_exempt": [], **limits}).limits, clock)


def test_connections_per_address(clock: Clock) -> None:
    a = admission(clock, max_connections_per_address=2, accepts_per_second_per_address=0)
    assert take(a, "10.0.0.1") is None
    assert take(a, "10.0.0.1") is None
    reason, message = take(a, "10.0.0.1")  # type: ignore[misc]
    assert reason == "per_address_connections"
    assert "per-address limit (limits.max_connections_per_address is 2)" in message
    assert take(a, "10.0.0.2") is None  # another address is not affected
    a.release("10.0.0.1")
    assert take(a, "10.0.0.1") is None


def test_accept_rate_with_burst(clock: Clock) -> None:
    a = admission(
        clock,
        max_connections_per_address=0,
        accepts_per_second_per_address=2,
        accept_burst_per_address=3,
    )
    assert [take(a, "10.0.0.1") for _ in range(3)] == [None] * 3  # the burst
    reason, message = take(a, "10.0.0.1")  # type: ignore[misc]
    assert reason == "per_address_rate" and "accepts_per_second_per_address is 2" in message
    clock.advance(0.5)  # one token back
    assert take(a, "10.0.0.1") is None
    assert take(a, "10.0.0.1") is not None
    clock.advance(100)  # refills to the burst, not beyond
    assert [take(a, "10.0.0.1") is None for _ in range(4)] == [True, True, True, False]


def test_exempt_networks_and_non_ip_peers(clock: Clock) -> None:
    a = Admission(
        make_config(
            limits={"max_connections_per_address": 1, "per_address_exempt": ["10.0.0.0/8"]}
        ).limits,
        clock,
    )
    assert [take(a, "10.9.9.9") for _ in range(5)] == [None] * 5
    assert take(a, None) is None  # UNIX sockets have no address to count
    assert take(a, "192.0.2.1") is None and take(a, "192.0.2.1") is not None
    assert a.tracked() == 1  # exempt peers cost no memory


def test_defaults_exempt_loopback_and_allow_a_nated_office(clock: Clock) -> None:
    a = Admission(make_config().limits, clock)
    assert all(take(a, "127.0.0.1") is None for _ in range(10_000))
    office = [take(a, "198.51.100.7") for _ in range(500)]  # everyone back after a restart
    assert office == [None] * 500
    assert take(a, "198.51.100.7") is not None  # the 501st at once is told to retry


def test_memory_is_bounded_by_recent_addresses(clock: Clock) -> None:
    a = admission(clock, accepts_per_second_per_address=10, accept_burst_per_address=10)
    for n in range(1000):
        host = f"10.1.{n // 256}.{n % 256}"
        assert take(a, host) is None
        a.release(host)
    clock.advance(2)  # every bucket refilled: the entries are forgettable
    for n in range(400):
        take(a, f"10.2.{n // 256}.{n % 256}")
        a.release(f"10.2.{n // 256}.{n % 256}")
    assert a.tracked() < 1000  # forgotten as new ones arrive (a few per admit)


# -- through the factory ------------------------------------------------------------------------


def test_factory_refuses_with_an_error_frame_and_counts_by_reason(clock: Clock) -> None:
    config = make_config(
        limits={
            "max_connections_per_address": 1,
            "accepts_per_second_per_address": 0,
            "per_address_exempt": [],
        }
    )
    factory = ServerFactory(config, clock=clock)
    first = Peer(factory, 40000)
    assert isinstance(first.protocol, ServerProtocol)
    second = Peer(factory, 40001)
    assert isinstance(second.protocol, RefusedProtocol)
    (refusal,) = second.received()
    assert refusal["error"]["code"] == "too_many_connections"
    assert "per-address limit" in refusal["error"]["message"]
    assert second.transport.disconnecting
    assert factory.refusals == {"per_address_connections": 1}
    first.disconnect()  # its slot is released
    assert isinstance(Peer(factory, 40002).protocol, ServerProtocol)


def test_ipv6_peers_are_counted_per_prefix(clock: Clock) -> None:
    config = make_config(limits={"max_connections_per_address": 1, "per_address_exempt": []})
    factory = ServerFactory(config, clock=clock)
    assert isinstance(factory.buildProtocol(IPv6Address("TCP", "2001:db8::1", 1)), ServerProtocol)
    # Another address of the same /64 is the same host for the limit.
    refused = factory.buildProtocol(IPv6Address("TCP", "2001:db8::2:3", 2))
    assert isinstance(refused, RefusedProtocol)
    assert b"2001:db8::/64 holds 1 connections" in refused._frame
    assert isinstance(
        factory.buildProtocol(IPv6Address("TCP", "2001:db8:0:1::1", 3)), ServerProtocol
    )
    assert isinstance(factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 2)), ServerProtocol)
    # An IPv4 client on a dual-stack listener is counted as its IPv4 address.
    a = factory.admission
    assert a.key("::ffff:192.0.2.1") == "192.0.2.1"
    defaults = Admission(make_config().limits, clock)
    assert defaults.key("::1") is None and defaults.key("::ffff:127.0.0.1") is None


def test_ipv6_prefix_128_counts_single_addresses(clock: Clock) -> None:
    a = admission(clock, max_connections_per_address=1, ipv6_prefix_per_address=128)
    assert take(a, "2001:db8::1") is None and take(a, "2001:db8::2") is None
    assert take(a, "2001:db8::1") is not None


@pytest.mark.parametrize(
    "limits, error",
    [
        ({"max_connections_per_address": -1}, r"limits\.max_connections_per_address: -1"),
        ({"accept_burst_per_address": 0}, r"limits\.accept_burst_per_address: 0"),
        ({"per_address_exempt": ["nope"]}, r"limits\.per_address_exempt: \['nope'\]"),
    ],
)
def test_config_errors(limits: dict[str, object], error: str) -> None:
    from heartbeatd.config import ConfigError

    with pytest.raises(ConfigError, match=error):
        make_config(limits=limits)


def clients(admin: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/clients", timeout=10) as r:
        return int(json.loads(r.read())["count"])


# -- the real daemon ----------------------------------------------------------------------------


def test_real_client_over_the_limit_is_told_why(tmp_path: Path) -> None:
    config = {
        "limits": {"max_connections_per_address": 2, "per_address_exempt": []},
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
    }
    with Daemon(tmp_path, config) as daemon:
        admin = int(daemon.wait_for(ADMIN).group(1))
        with RawClient(daemon.port) as a, RawClient(daemon.port) as b:
            assert a.recv()["type"] == "hello" and b.recv()["type"] == "hello"
            with RawClient(daemon.port) as c:
                refusal = c.recv()
                assert refusal["error"]["code"] == "too_many_connections"
                assert "limits.max_connections_per_address is 2" in refusal["error"]["message"]
                assert c.recv() is None  # then closed
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert (
            'heartbeatd_connections_refused_by_reason_total{reason="per_address_connections"} 1.0'
            in metrics
        )
        deadline = time.monotonic() + 10  # wait (polling, with a deadline) for both closes
        while clients(admin) and time.monotonic() < deadline:
            pass
        with RawClient(daemon.port) as again:  # the two closed: room again
            assert again.recv()["type"] == "hello"
        assert daemon.stop() == 0
    assert "per-address limit" in daemon.log

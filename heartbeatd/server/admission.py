"""Per-address admission: how many connections one client address may hold and open per second.

``limits.max_connections`` protects the daemon; these protect the other clients from one
address (a runaway reconnect loop, a script opening sockets).  Each address has a count of
open connections and a token bucket of accepts (``accepts_per_second_per_address``, holding at
most ``accept_burst_per_address``), both on the factory's clock.  Loopback is exempt by default
(`limits.per_address_exempt`): local processes and a local proxy are not strangers.

Memory is bounded by the addresses that are connected or were refused recently: a bucket is
forgotten once it has refilled and its address holds no connection.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Any

from twisted.internet.interfaces import IReactorTime

from heartbeatd.server.ratelimit import has_token, refill, retry_after

__all__ = ["Admission"]

# Reasons a connection is refused (the factory counts them; /metrics shows them by reason).
PER_ADDRESS_CONNECTIONS = "per_address_connections"
PER_ADDRESS_RATE = "per_address_rate"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address ``host`` names (IPv4 on a dual-stack listener as IPv4), or None."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def address_key(address: ipaddress.IPv4Address | ipaddress.IPv6Address, ipv6_prefix: int) -> str:
    """What one client is counted under: its IPv4 address, or its IPv6 network of
    ``ipv6_prefix`` bits (one host is given a whole /64)."""
    if address.version == 6 and ipv6_prefix < 128:
        return str(ipaddress.ip_network(f"{address}/{ipv6_prefix}", strict=False))
    return str(address)


class _Address:
    __slots__ = ("connections", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.connections = 0
        self.tokens = tokens
        self.stamp = stamp


class Admission:
    """Decides per address whether a new connection may be accepted."""

    def __init__(self, limits: Any, clock: IReactorTime) -> None:
        self.clock = clock
        self._addresses: OrderedDict[str, _Address] = OrderedDict()
        self.configure(limits)

    def configure(self, limits: Any) -> None:
        """Apply (new) limits; live connections keep their counts."""
        self.max_connections = limits.max_connections_per_address
        self.rate = float(limits.accepts_per_second_per_address)
        self.burst = float(limits.accept_burst_per_address)
        self._exempt_networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(str(n), strict=False) for n in limits.per_address_exempt
        )
        self.ipv6_prefix = limits.ipv6_prefix_per_address
        #: host -> the key it is counted under (None: exempt, or not an IP address).
        self._keys: dict[str, str | None] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.max_connections or self.rate)

    def tracked(self) -> int:
        """Addresses held in memory now."""
        return len(self._addresses)

    def key(self, host: str | None) -> str | None:
        """What a connection from ``host`` is counted under: the IPv4 address, the IPv6
        network of ``limits.ipv6_prefix_per_address`` bits (one host is given a whole /64), or
        None when it is not limited (exempt, not an IP address, limits off)."""
        if host is None or not self.enabled:
            return None
        try:
            return self._keys[host]
        except KeyError:
            pass
        address = parse_address(host)
        if address is None or any(address in n for n in self._exempt_networks):
            key = None  # not an IP (UNIX socket...), or exempt: nothing to count per address
        else:
            key = address_key(address, self.ipv6_prefix)
        if len(self._keys) > 4096:
            self._keys.clear()
        self._keys[host] = key
        return key

    def admit(self, key: str | None) -> tuple[str, str] | None:
        """None to accept (and count) a connection counted under ``key`` (see `key`); else
        (reason, message)."""
        if key is None:
            return None
        host = key
        now = self.clock.seconds()
        self._forget_idle(now)
        entry = self._addresses.get(host)
        if entry is None:
            entry = self._addresses[host] = _Address(self.burst, now)
        else:
            self._addresses.move_to_end(host)
            if self.rate:
                entry.tokens = refill(entry.tokens, self.burst, self.rate, now - entry.stamp)
            entry.stamp = now
        if self.max_connections and entry.connections >= self.max_connections:
            return (
                PER_ADDRESS_CONNECTIONS,
                f"{host} holds {entry.connections} connections, the per-address limit "
                f"(limits.max_connections_per_address is {self.max_connections})",
            )
        if self.rate:
            if not has_token(entry.tokens, self.rate):
                return (
                    PER_ADDRESS_RATE,
                    f"{host} opens connections too fast for the per-address limit "
                    f"(limits.accepts_per_second_per_address is {self.rate:g}, "
                    f"burst {self.burst:g})",
                )
            entry.tokens = max(0.0, entry.tokens - 1.0)
        entry.connections += 1
        return None

    def wait(self, key: str | None) -> float | None:
        """Seconds until ``key``'s accept bucket gives a token (`retry_after`: rounded up to
        the millisecond), after `admit` refused it ``per_address_rate``; None when it has one."""
        entry = self._addresses.get(key) if key is not None else None
        if entry is None or not self.rate or has_token(entry.tokens, self.rate):
            return None
        return retry_after(entry.tokens, self.rate)

    def release(self, key: str | None) -> None:
        """A connection that `admit` counted under ``key`` has closed."""
        if key is None:
            return
        entry = self._addresses.get(key)
        if entry is not None and entry.connections > 0:
            entry.connections -= 1

    def _forget_idle(self, now: float) -> None:
        """Drop least recently seen addresses whose bucket is full and who hold nothing."""
        addresses = self._addresses
        refill = self.burst / self.rate if self.rate else 0.0
        for _ in range(3):  # amortised: a few per admit keeps the dict bounded
            if not addresses:
                return
            host, entry = next(iter(addresses.items()))
            if entry.connections:
                addresses.move_to_end(host)  # still connected: look at the next one
            elif now - entry.stamp >= refill:
                del addresses[host]
            else:
                return

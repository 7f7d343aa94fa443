"""Finding the Redis master through Sentinel (``cluster.sentinel``), for `RedisBroker`.

The sentinels are asked by txredisapi's own `txredisapi.Sentinel` (its ``discover_master``
asks every sentinel and takes the first that names a master that is neither subjectively nor
objectively down); this module only makes that an endpoint, so the broker's two connections
(commands and pub/sub) keep their own reconnect loop (``ClientService``), their protocols and
their deadlines, and simply land on whichever server is the master at each attempt.

A connection is only kept once the server itself says it is the master (``ROLE``): Sentinel's
view lags a failover by design, and a demoted master still accepts connections.

Imported only with ``cluster.sentinel``, after twistd installed the reactor (txredisapi
imports the global one).
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from heartbeatd._logging import LogLimiter, get_logger
from heartbeatd.cluster.broker import BrokerUnavailable
from heartbeatd.config import SentinelConfig

__all__ = ["MasterEndpoint", "parse_address"]

log = get_logger(__name__)

#: Most seconds one discovery waits for a sentinel that names a healthy master; then the
#: attempt fails and the connection's backoff retries (a failover takes about
#: ``down-after-milliseconds`` plus a second or two, so asking often matters more).
DISCOVERY_TIMEOUT = 1.0


def parse_address(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (already checked by the config) -> (host, port)."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


@implementer(IStreamClientEndpoint)
class MasterEndpoint:
    """Connects to the address the sentinels give for ``service``, asked at every attempt."""

    def __init__(self, reactor: Any, config: SentinelConfig, timeout: float) -> None:
        self.reactor = reactor
        self.service = config.service
        self.timeout = timeout
        addresses = [parse_address(a) for a in config.addresses]
        self.sentinel = txredisapi.Sentinel(
            addresses,
            password=config.sentinel_password or None,
            connectTimeout=timeout,
            replyTimeout=timeout,
        )
        self.sentinel.discovery_timeout = min(DISCOVERY_TIMEOUT, timeout)
        #: The master's address as last discovered (for logs, and the pub/sub link's check).
        self.master: tuple[str, int] | None = None
        self.discoveries = 0
        self.log_limiter = LogLimiter(reactor)

    def describe(self) -> str:
        where = "unknown" if self.master is None else f"{self.master[0]}:{self.master[1]}"
        return f"sentinel service {self.service} (master {where})"

    def connect(self, factory: Any) -> Deferred[Any]:
        self.discoveries += 1
        d = self.sentinel.discover_master(self.service)

        def found(address: tuple[str, int]) -> Deferred[Any]:
            address = (str(address[0]), int(address[1]))
            if address != self.master:
                log.info(
                    "Sentinel: the master of {service} is {host}:{port}",
                    service=self.service,
                    host=address[0],
                    port=address[1],
                )
                self.master = address
            endpoint = HostnameEndpoint(self.reactor, address[0], address[1], self.timeout)
            return endpoint.connect(factory)

        def not_found(failure: Any) -> Any:
            if failure.check(txredisapi.MasterNotFoundError):
                if self.log_limiter.allow("no_master"):
                    log.warn(
                        "Sentinel: no master known for {service} yet; asking again",
                        service=self.service,
                    )
                raise BrokerUnavailable(f"no master known for {self.service}")
            return failure

        return d.addCallbacks(found, not_found)

    def stop(self) -> Deferred[Any]:
        return self.sentinel.disconnect()


def check_master(proto: Any) -> Deferred[Any]:
    """Fires when the server behind ``proto`` says it is the master; fails otherwise."""

    def role(reply: Any) -> None:
        name = reply[0] if isinstance(reply, list) and reply else reply
        if name != "master":
            raise BrokerUnavailable(f"the server Sentinel named is a {name}, not the master")

    return proto.execute_command("ROLE").addCallback(role)

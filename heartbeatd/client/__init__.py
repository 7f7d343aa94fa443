"""The heartbeatd client library: what an application imports to talk to a heartbeatd server.

    from heartbeatd.client import connect, ReconnectingClient, Pool, PoolConfig, ClientError

It loads neither the server nor the daemon nor YAML (a test checks), so a program that only
talks to a server gets only the client.  Every failure is a `ClientError`.
"""

from __future__ import annotations

from heartbeatd.client.channels import Subscription
from heartbeatd.client.config import PoolConfig, load_pool_config, parse_pool_config
from heartbeatd.client.connection import ClientConnection, connect
from heartbeatd.client.errors import (
    ClientError,
    ClientStopped,
    ConnectionClosed,
    ConnectionFailed,
    HandshakeTimeout,
    NotConnected,
    PoolClosed,
    PoolError,
    PoolExhausted,
    PoolTimeout,
    PoolUnavailable,
    RequestTimeout,
    ServerError,
    SessionLost,
    SessionUnavailable,
    SubscriptionRateLimited,
    SubscriptionUnavailable,
)
from heartbeatd.client.pool import Pool
from heartbeatd.client.reconnect import ReconnectingClient
from heartbeatd.client.tls import ClientTLS

__all__ = [
    "ClientConnection",
    "ClientError",
    "ClientStopped",
    "ClientTLS",
    "ConnectionClosed",
    "ConnectionFailed",
    "HandshakeTimeout",
    "NotConnected",
    "Pool",
    "PoolClosed",
    "PoolConfig",
    "PoolError",
    "PoolExhausted",
    "PoolTimeout",
    "PoolUnavailable",
    "ReconnectingClient",
    "RequestTimeout",
    "ServerError",
    "SessionLost",
    "SessionUnavailable",
    "Subscription",
    "SubscriptionRateLimited",
    "SubscriptionUnavailable",
    "connect",
    "load_pool_config",
    "parse_pool_config",
]

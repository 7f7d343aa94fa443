"""The cluster room: channels' storage and fan-out, presence, and node-to-node messages.

The server talks to a `Broker` only.  `MemoryBroker` is the embedded default (one node, no
extra service); `heartbeatd.cluster.redis.RedisBroker` shares everything through Redis and is
imported only when ``cluster.redis`` is set, so a single daemon never needs a Redis client.
"""

from heartbeatd.cluster.broker import (
    Broker,
    BrokerListener,
    BrokerUnavailable,
    History,
    MemoryBroker,
    Position,
)

__all__ = ["Broker", "BrokerListener", "BrokerUnavailable", "History", "MemoryBroker", "Position"]

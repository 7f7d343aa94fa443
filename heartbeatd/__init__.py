"""heartbeatd: long-lived TCP connections with framed JSON messages and heartbeats, on Twisted.

The public surface is small and listed in ``__all__``; modules not named here are internal.
"""

from heartbeatd._version import __version__
from heartbeatd.config import Config, ConfigError, load_config
from heartbeatd.dispatch import NO_REPLY, HandlerError, HandlerRegistry, Reply, Request
from heartbeatd.factory import ServerFactory

__all__ = [
    "NO_REPLY",
    "Config",
    "ConfigError",
    "HandlerError",
    "HandlerRegistry",
    "Reply",
    "Request",
    "ServerFactory",
    "__version__",
    "load_config",
]

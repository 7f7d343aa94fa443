"""heartbeatd: long-lived TCP connections with framed JSON messages and heartbeats, on Twisted.

The package is four rooms, each for one audience, with imports pointing down only:

* `heartbeatd.wire`: sans-IO framings and the JSON envelope (no Twisted);
* `heartbeatd.server`: the protocol, the client registry, the heartbeat, the handler API;
* `heartbeatd.client`: connection, reconnecting client, pool, errors (for applications);
* `heartbeatd.daemon`: twistd, config file, reload, admin API, metrics, systemd.

The handler API is re-exported here lazily, so ``import heartbeatd.client`` or
``import heartbeatd.wire`` (which import this module first) stay light.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from heartbeatd._version import __version__

if TYPE_CHECKING:  # what type checkers see of the lazy exports below (mypy --strict, pyright)
    from heartbeatd.config import Config as Config
    from heartbeatd.config import ConfigError as ConfigError
    from heartbeatd.daemon.config import load_config as load_config
    from heartbeatd.server.factory import ServerFactory as ServerFactory
    from heartbeatd.server.handlers import NO_REPLY as NO_REPLY
    from heartbeatd.server.handlers import Authorizer as Authorizer
    from heartbeatd.server.handlers import HandlerError as HandlerError
    from heartbeatd.server.handlers import HandlerRegistry as HandlerRegistry
    from heartbeatd.server.handlers import Reply as Reply
    from heartbeatd.server.handlers import Request as Request
    from heartbeatd.server.session import Server as Server
    from heartbeatd.server.session import Session as Session

#: Public name -> the module that defines it (imported on first use).
_LAZY = {
    "NO_REPLY": "heartbeatd.server.handlers",
    "HandlerError": "heartbeatd.server.handlers",
    "HandlerRegistry": "heartbeatd.server.handlers",
    "Reply": "heartbeatd.server.handlers",
    "Request": "heartbeatd.server.handlers",
    "Authorizer": "heartbeatd.server.handlers",
    "Server": "heartbeatd.server.session",
    "Session": "heartbeatd.server.session",
    "ServerFactory": "heartbeatd.server.factory",
    "Config": "heartbeatd.config",
    "ConfigError": "heartbeatd.config",
    "load_config": "heartbeatd.daemon.config",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'heartbeatd' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value

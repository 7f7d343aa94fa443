"""Loggers for heartbeatd's modules, all behind one level filter that ``log.level`` sets.

Events still flow to twisted.logger's global publisher, so twistd's own observers (file,
stdout, syslog, journald) see them; only their minimum level is ours to decide.  Shared by
the server, the client and the daemon; how events are written out is `heartbeatd.daemon.logs`.
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

__all__ = ["get_logger", "set_level"]

_ROOT = "heartbeatd"
_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def get_logger(namespace: str) -> Logger:
    """A Logger for ``namespace`` (a module's ``__name__``) that honours ``log.level``."""
    return Logger(namespace=namespace, observer=_observer)


def set_level(name: str) -> None:
    """Set the minimum level (``debug``, ``info``, ``warn``, ``error``, ``critical``)."""
    _predicate.setLogLevelForNamespace(_ROOT, LogLevel.levelWithName(name))

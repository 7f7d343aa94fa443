"""Loggers for heartbeatd's modules, all behind one level filter that ``log.level`` sets.

Events still flow to twisted.logger's global publisher, so twistd's own observers (file,
stdout, syslog, journald) see them; only their minimum level is ours to decide.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogPublisher,
    textFileLogObserver,
)
from zope.interface import provider

__all__ = ["get_logger", "json_line", "observer", "set_format", "set_level"]

LOG_FORMATS = ("text", "json")
_format = "text"
#: Set once twistd has called `observer` (``--logger heartbeatd.logs.observer``).
observer_in_use = False

_ROOT = "heartbeatd"
_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def get_logger(namespace: str) -> Logger:
    """A Logger for ``namespace`` (a module's ``__name__``) that honours ``log.level``."""
    return Logger(namespace=namespace, observer=_observer)


def set_level(name: str) -> None:
    """Set the minimum level (``debug``, ``info``, ``warn``, ``error``, ``critical``)."""
    _predicate.setLogLevelForNamespace(_ROOT, LogLevel.levelWithName(name))


def set_format(name: str) -> None:
    """Choose what `observer` builds: ``text`` or ``json`` (one JSON object per line)."""
    global _format
    _format = name


def json_line(event: dict[str, Any]) -> str:
    """One log event as one line of JSON, for journald or ELK.

    Carries the time, level, namespace, rendered text, every simple field the event was
    logged with (``session``, ``peer``, ``reason``...), and a failure's traceback if any.
    """
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), tz=timezone.utc).isoformat(),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", ""),
        "text": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in record:
            continue
        if value is None or isinstance(value, (str, int, float, bool)):
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False)


def _json_observer(stream: TextIO) -> ILogObserver:
    @provider(ILogObserver)
    def write(event: dict[str, Any]) -> None:
        stream.write(json_line(event) + "\n")
        stream.flush()

    return write


def observer() -> ILogObserver:
    """twistd's ``--logger`` factory: writes to stdout in the configured ``log.format``."""
    global observer_in_use
    observer_in_use = True
    if _format == "json":
        return _json_observer(sys.stdout)
    return textFileLogObserver(sys.stdout)

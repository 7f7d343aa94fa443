"""How the daemon writes its log: text or one JSON object per line, to stdout.

twistd starts its log observer after ``makeService``, so the format chosen in the config is
applied through ``--logger heartbeatd.daemon.logs.observer`` (as ``make run`` and the systemd
unit do).  Levels are `heartbeatd._logging`'s business.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

from twisted.logger import ILogObserver, formatEvent, textFileLogObserver
from zope.interface import provider

__all__ = ["json_line", "observer", "set_format"]

LOG_FORMATS = ("text", "json")
_format = "text"
#: Set once twistd has called `observer` (``--logger heartbeatd.daemon.logs.observer``).
observer_in_use = False


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

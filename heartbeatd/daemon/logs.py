"""How the daemon writes its log: text or one JSON object per line, to stdout.

twistd starts its log observer after ``makeService``, so the format chosen in the config is
applied through ``--logger heartbeatd.daemon.logs.observer`` (as ``make run`` and the systemd
unit do).  Levels are `heartbeatd._logging`'s business.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

from twisted.logger import ILogObserver, formatEvent, textFileLogObserver
from zope.interface import provider

__all__ = ["is_twisted_chatter", "json_line", "observer", "set_format"]

#: Twisted's stock lines about ports and factories ("ServerFactory starting on 9000",
#: "ServerFactory (TLS) starting on 9000", "(TCP Port 9000 Closed)", "Starting factory
#: <...object at 0x...>"): they repeat what our own start-up and shutdown lines say, in words
#: an operator cannot act on.
_CHATTER = re.compile(r"^(?:[\w.]+(?: \(TLS\))? starting on \S+|\(\w+ Port \S+ Closed\))$")
_FACTORY_FORMATS = ("Starting factory {factory!r}", "Stopping factory {factory!r}")

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


def is_twisted_chatter(event: dict[str, Any]) -> bool:
    """True for Twisted's stock port/factory lines (a legacy ``log.msg`` or a factory's)."""
    if event.get("log_format") in _FACTORY_FORMATS:
        return True
    text = event.get("log_text")
    return isinstance(text, str) and _CHATTER.match(text) is not None


def _json_observer(stream: TextIO) -> ILogObserver:
    @provider(ILogObserver)
    def write(event: dict[str, Any]) -> None:
        stream.write(json_line(event) + "\n")
        stream.flush()

    return write


def _without_chatter(inner: ILogObserver) -> ILogObserver:
    @provider(ILogObserver)
    def write(event: dict[str, Any]) -> None:
        if not is_twisted_chatter(event):
            inner(event)

    return write


def observer() -> ILogObserver:
    """twistd's ``--logger`` factory: writes to stdout in the configured ``log.format``."""
    global observer_in_use
    observer_in_use = True
    if _format == "json":
        return _without_chatter(_json_observer(sys.stdout))
    return _without_chatter(textFileLogObserver(sys.stdout))

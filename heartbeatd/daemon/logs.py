"""How the daemon writes its log: text or one JSON object per line, to stdout or a file.

twistd starts its log observer after ``makeService``, so the format chosen in the config is
applied through ``--logger heartbeatd.daemon.logs.observer`` (as ``make run`` and the systemd
unit do).  Levels are `heartbeatd._logging`'s business.

twistd ignores ``--logfile`` when ``--logger`` is given, and a daemon's stdout is
``/dev/null``; so ``makeService`` passes twistd's ``--logfile`` and ``--nodaemon`` on
(`set_destination`) and `observer` writes where twistd's own logger would have: stdout in the
foreground unless ``--logfile`` names a file; otherwise that file (``twistd.log`` by default).
The file is never rotated by us: SIGUSR1 reopens it, for logrotate (see docs/deployment.md).
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

from twisted.logger import ILogObserver, formatEvent, textFileLogObserver
from zope.interface import provider

__all__ = [
    "ReopeningFile",
    "is_twisted_chatter",
    "json_line",
    "observer",
    "set_destination",
    "set_format",
]

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
#: The file `observer` writes to; None: stdout.
_path: str | None = None


def set_format(name: str) -> None:
    """Choose what `observer` builds: ``text`` or ``json`` (one JSON object per line)."""
    global _format
    _format = name


def set_destination(logfile: str | None, daemon: bool) -> None:
    """Where `observer` writes, from twistd's ``--logfile`` and whether it daemonizes.

    As twistd's own logger: ``-`` or nothing in the foreground is stdout; a daemon without
    ``--logfile`` writes ``twistd.log`` (its stdout is ``/dev/null``).
    """
    global _path
    foreground_stdout = logfile == "-" or (not logfile and not daemon)
    _path = None if foreground_stdout else (logfile or "twistd.log")


class ReopeningFile:
    """A log file opened for appending, which `reopen` opens again by name.

    logrotate renames the file and sends SIGUSR1 (``postrotate``); the next line goes to a
    new file of the old name.  ``copytruncate`` works too (appends follow the truncation).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open

    def write(self, text: str) -> None:
        self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def reopen(self) -> None:
        """Open the file of that name again.  One we create gets the old file's mode: the
        first was opened before twistd daemonized, under the shell's umask, not twistd's
        077 (logrotate's ``create`` makes the file itself, with its own mode: kept)."""
        try:
            mode = stat.S_IMODE(os.fstat(self._file.fileno()).st_mode)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
            try:
                fd = os.open(self.path, flags | os.O_EXCL, mode)
                os.fchmod(fd, mode)
            except FileExistsError:
                fd = os.open(self.path, flags)
            new = open(fd, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        except OSError:
            return  # keep writing the old file rather than lose lines
        old, self._file = self._file, new
        old.close()

    def install_reopen_signal(self) -> None:
        """SIGUSR1 reopens the file, from the reactor's thread (never mid-write)."""

        def on_usr1(signum: int, frame: object) -> None:
            from twisted.internet import reactor  # resolved late: honour twistd --reactor

            reactor.callFromThread(self.reopen)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, on_usr1)


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
    """twistd's ``--logger`` factory: writes in the configured ``log.format`` to stdout, or
    to twistd's ``--logfile`` (`set_destination`)."""
    global observer_in_use
    observer_in_use = True
    stream: Any = sys.stdout
    if _path is not None:
        try:
            stream = ReopeningFile(_path)
        except OSError as e:
            # twistd starts its logger before it forks or writes the pidfile: exiting here
            # is the clean way out, with one line rather than a traceback.
            raise SystemExit(
                f"heartbeatd: cannot open the log file {_path!r}: {e.strerror or e}"
            ) from None
        stream.install_reopen_signal()
    if _format == "json":
        return _without_chatter(_json_observer(stream))
    return _without_chatter(textFileLogObserver(stream))

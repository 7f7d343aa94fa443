"""Loggers for heartbeatd's modules, all behind one level filter that ``log.level`` sets.

Events still flow to twisted.logger's global publisher, so twistd's own observers (file,
stdout, syslog, journald) see them; only their minimum level is ours to decide.  Shared by
the server, the client and the daemon; how events are written out is `heartbeatd.daemon.logs`.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

__all__ = ["LogLimiter", "get_logger", "set_level"]

_ROOT = "heartbeatd"
_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def get_logger(namespace: str) -> Logger:
    """A Logger for ``namespace`` (a module's ``__name__``) that honours ``log.level``."""
    return Logger(namespace=namespace, observer=_observer)


_limiter_log = Logger(namespace="heartbeatd.log", observer=_observer)


def set_level(name: str) -> None:
    """Set the minimum level (``debug``, ``info``, ``warn``, ``error``, ``critical``)."""
    _predicate.setLogLevelForNamespace(_ROOT, LogLevel.levelWithName(name))


class LogLimiter:
    """Rate limit for log lines that one peer can trigger at will, per cause.

    A bad frame, a refusal or a failing handler each deserve a line, but a peer that sends a
    thousand a second would turn the log into the attack.  Each cause gets ``lines`` lines per
    ``window`` seconds; the rest are counted, and one "N more suppressed" line follows when
    the window ends (on the next event or `flush`, which the heartbeat sweep calls).  Metrics
    count every event; only the log is thinned.
    """

    def __init__(self, clock: IReactorTime, lines: int = 10, window: float = 10.0) -> None:
        self._clock = clock
        self.lines = lines
        self.window = window
        #: cause -> [window start, lines allowed so far, lines suppressed]
        self._causes: dict[str, list[float]] = {}
        #: Every line suppressed since start, by cause.
        self.suppressed: dict[str, int] = {}

    def allow(self, cause: str) -> bool:
        """True when a line for ``cause`` may be logged now."""
        now = self._clock.seconds()
        state = self._causes.get(cause)
        if state is None:
            self._causes[cause] = [now, 1, 0]
            return True
        if now - state[0] >= self.window:
            self._report(cause, state)
            state[0], state[1], state[2] = now, 1, 0
            return True
        if state[1] < self.lines:
            state[1] += 1
            return True
        state[2] += 1
        self.suppressed[cause] = self.suppressed.get(cause, 0) + 1
        return False

    def flush(self) -> None:
        """Report causes whose window has ended with lines suppressed."""
        now = self._clock.seconds()
        for cause, state in list(self._causes.items()):
            if now - state[0] >= self.window:
                self._report(cause, state)
                del self._causes[cause]

    def _report(self, cause: str, state: list[float]) -> None:
        if state[2]:
            _limiter_log.warn(
                "{count} more {cause!r} log lines suppressed in {window:g}s",
                count=int(state[2]),
                cause=cause,
                window=self.window,
            )

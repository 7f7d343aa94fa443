"""SIGTERM/SIGINT handling: the first signal shuts down gracefully, a second exits at once.

Twisted's own handlers make twistd re-raise the signal at exit, so the process would die *by*
SIGTERM instead of exiting 0; service managers and shell scripts expect a clean stop to be
exit status 0.  These handlers replace the reactor's once it runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.internet.error import ReactorNotRunning

from heartbeatd._logging import get_logger

__all__ = ["ShutdownSignals"]

log = get_logger(__name__)


class ShutdownSignals:
    """Installs graceful-stop handlers for SIGTERM and SIGINT, and SIGHUP for reload."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, reactor: Any, on_hangup: Callable[[], object] | None = None) -> None:
        self._reactor = reactor
        self._on_hangup = on_hangup
        self.received: list[int] = []

    def install(self) -> None:
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)
        if self._on_hangup is not None:
            signal.signal(signal.SIGHUP, self._hangup)

    def _hangup(self, signum: int, frame: FrameType | None) -> None:
        assert self._on_hangup is not None
        self._reactor.callFromThread(self._on_hangup)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        name = signal.Signals(signum).name
        if len(self.received) > 1:
            # Second signal: the operator wants out now; skip the graceful path.
            os.write(2, f"heartbeatd: second {name}, exiting at once\n".encode())
            os._exit(128 + signum)
        self._reactor.callFromThread(self._stop, name)

    def _stop(self, name: str) -> None:
        log.info("Received {signal}, shutting down gracefully", signal=name)
        # A shutdown begun elsewhere (a supervisor's stop) may already be under way.
        if self._reactor.running:
            with contextlib.suppress(ReactorNotRunning):
                self._reactor.stop()

"""systemd's notify protocol: READY, STATUS, WATCHDOG, STOPPING, RELOADING, in a few lines.

Messages are datagrams to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` means
the abstract namespace).  Without that variable (not under systemd) every call does nothing.
The watchdog is fed from the reactor at half of ``$WATCHDOG_USEC``, so a blocked reactor stops
feeding it and systemd restarts the daemon, which is the point.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from twisted.internet.task import LoopingCall

from heartbeatd._logging import get_logger

__all__ = ["Notifier"]

log = get_logger(__name__)


class Notifier:
    """Sends sd_notify messages; a no-op when ``NOTIFY_SOCKET`` is unset."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if address:
            self.address = b"\0" + address[1:].encode() if address.startswith("@") else address
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._watchdog: LoopingCall | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: Any) -> None:
        """Send ``KEY=value`` lines, e.g. ``send(READY=1, STATUS="serving")``."""
        if self.address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self.address)
        except OSError as e:
            log.warn("sd_notify to {address!r} failed: {error}", address=self.address, error=e)

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def stopping(self, status: str = "stopping") -> None:
        self.send(STOPPING=1, STATUS=status)

    def reloading(self) -> None:
        # Type=notify-reload requires MONOTONIC_USEC with RELOADING=1.
        self.send(RELOADING=1, MONOTONIC_USEC=int(time.monotonic() * 1e6))

    def start_watchdog(self, clock: Any) -> None:
        if self.watchdog_interval is None or not self.enabled:
            return
        self._watchdog = LoopingCall(self.send, WATCHDOG=1)
        self._watchdog.clock = clock
        self._watchdog.start(self.watchdog_interval, now=True)

    def stop_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None

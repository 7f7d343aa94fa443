"""Start-up failures (a port in use...): reported on the launching stderr, and to twistd.

``twistd`` without ``-n`` forks twice and the first process waits on a pipe for the daemon's
word: ``UnixApplicationRunner.postApplication`` writes ``0`` once ``startApplication`` (which
calls ``privilegedStartService``) returned, or ``1 <the exception>`` and removes the pidfile
when it raised an ``Exception``.  A ``SystemExit`` is not an ``Exception``: the daemon exits
without a word, the first process (which holds the pipe's write end too) waits for ever, and
the pidfile stays.  So start-up failures raise `StartupError`.

twistd passes on at most 100 bytes of it, and the daemon's own stderr is ``/dev/null`` by
then, so `LaunchStderr` keeps a copy of the stderr twistd was started with (taken in
``makeService``, before the fork) and writes the whole reason there; it is closed as soon as
the daemon has started, so a caller reading our stderr to its end is not kept waiting.
In the foreground without ``--logfile`` the log is already on the terminal: nothing more.
"""

from __future__ import annotations

import contextlib
import os
import sys
from types import TracebackType
from typing import Any

from heartbeatd._logging import get_logger

__all__ = ["LaunchStderr", "StartupError", "install_excepthook"]

log = get_logger(__name__)


class StartupError(Exception):
    """The daemon cannot start; the message is the whole reason, for an operator."""


class LaunchStderr:
    """The stderr twistd was launched with, kept across daemonizing until start-up is over.

    ``twistd_options`` are twistd's own (``--pidfile``): on a failure the pidfile is removed
    before twistd tells the waiting parent, which twistd itself does only after, so a script
    that sees the command fail never sees the pidfile.
    """

    def __init__(self, fd: int | None = None, twistd_options: Any = None) -> None:
        # os.dup's copy is not inherited by children (workers), only kept by us.
        self._fd: int | None = os.dup(2) if fd is None else fd
        self._twistd_options = twistd_options
        # In the foreground with no --logfile, the log line itself reaches the terminal (or
        # the journal): writing the message to stderr too printed it twice.
        options = twistd_options if twistd_options is not None else {}
        self._log_is_here = bool(options.get("nodaemon")) and options.get("logfile") in (
            None,
            "",
            "-",
        )

    def fail(self, message: str) -> StartupError:
        """Log ``message``, write it to the launching stderr, and return the error to raise."""
        log.error("{message}", message=message)
        self._remove_pidfile()
        if self._fd is not None and not self._log_is_here:
            with contextlib.suppress(OSError):  # a closed terminal: the log has it
                os.write(self._fd, message.encode("utf-8", "backslashreplace") + b"\n")
        self.close()
        return StartupError(message)

    def _remove_pidfile(self) -> None:
        options = self._twistd_options
        path = options.get("pidfile") if options is not None else None
        if path:
            with contextlib.suppress(OSError):
                os.unlink(path)
            options["pidfile"] = ""  # twistd's own removal, next, has nothing left to do

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


_installed = False


def install_excepthook() -> None:
    """A `StartupError` reaching the top prints no traceback (its line is already out).

    In the foreground, twistd re-raises it after removing the pidfile and Python would
    print a traceback into the log; the exit status stays 1.
    """
    global _installed
    if _installed:
        return
    _installed = True
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if isinstance(value, StartupError):
            return
        previous(kind, value, tb)

    sys.excepthook = hook

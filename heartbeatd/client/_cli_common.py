"""What the ``heartbeat`` commands share: exit codes, the one-line error, Ctrl-C, a context.

Both `heartbeatd.client.cli` (the wire commands) and `heartbeatd.client._admin_cli` (the
admin API's) build on it, so neither imports the other's module at load time.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any, TextIO

from twisted.internet import error as twisted_errors
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure

from heartbeatd.client.connection import ClientConnection, connect
from heartbeatd.client.errors import (
    ClientError,
    ConnectionClosed,
    ConnectionFailed,
    HandshakeTimeout,
    ServerError,
)
from heartbeatd.client.tls import ClientTLS, read_token

EXIT_OK, EXIT_SERVER_ERROR, EXIT_USAGE, EXIT_CONNECTION, EXIT_TIMEOUT = 0, 1, 2, 3, 4
EXIT_BUG, EXIT_INTERRUPTED = 5, 130


class CliError(Exception):
    """A failure the user is told about in one line, with an exit status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- Ctrl-C ------------------------------------------------------------------------------------


class Interrupt:
    """Ctrl-C as an event: commands race their waits against it and finish cleanly."""

    def __init__(self) -> None:
        self.fired = False
        self._waiters: list[Deferred[None]] = []

    def fire(self) -> None:
        self.fired = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def wait(self) -> Deferred[None]:
        d: Deferred[None] = Deferred(lambda d: self._waiters.remove(d))
        if self.fired:
            d.callback(None)
        else:
            self._waiters.append(d)
        return d

    def until(self, work: Deferred[Any]) -> Deferred[tuple[bool, Any]]:
        """``(False, result)`` once ``work`` succeeds (its failure is raised as it is), or
        ``(True, None)`` on Ctrl-C, ``work`` then being cancelled.

        Not `twisted.internet.defer.race`: that waits for every racer to fail before it
        fails, and the Ctrl-C racer may never fire.
        """
        outcome: Deferred[tuple[bool, Any]] = Deferred()
        stop = self.wait()

        def finished(result: Any) -> None:
            if outcome.called:
                return None  # the CancelledError of work we abandoned
            stop.cancel()
            if isinstance(result, Failure):
                outcome.errback(result)
            else:
                outcome.callback((False, result))
            return None

        def interrupted(_: object) -> None:
            if not outcome.called:
                outcome.callback((True, None))
                work.cancel()

        stop.addCallbacks(interrupted, lambda f: f.trap(CancelledError) and None)
        work.addBoth(finished)
        return outcome


def install_interrupt(reactor: Any, interrupt: Interrupt) -> None:
    """Replace the reactor's SIGINT and SIGTERM handlers: the first Ctrl-C (or a ``kill``,
    a service manager's stop) fires ``interrupt``, so the command finishes as it does on
    Ctrl-C instead of the reactor stopping under it (which looked like a lost connection)."""
    count = 0

    def handler(signum: int, frame: Any) -> None:
        nonlocal count
        count += 1
        if count > 1:
            os._exit(EXIT_INTERRUPTED)  # a second Ctrl-C: out now
        reactor.callFromThread(interrupt.fire)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


class Context:
    """What a command needs: the reactor, its arguments, its output, Ctrl-C."""

    def __init__(
        self,
        reactor: Any,
        args: argparse.Namespace,
        out: TextIO,
        err: TextIO,
        interrupt: Interrupt,
    ) -> None:
        self.reactor = reactor
        self.args = args
        self.out = out
        self.err = err
        self.interrupt = interrupt
        self.broken_pipe = False
        #: More `ClientConnection` options for every connect (``watch``: ``on_push``, so
        #: replayed pushes right after a resume are heard; ``session``).
        self.connect_options: dict[str, Any] = {}

    def print(self, line: str) -> None:
        """Write one line; a closed pipe (``heartbeat watch | head -1``) ends the command."""
        if self.broken_pipe:
            return
        try:
            self.out.write(line + "\n")
            self.out.flush()
        except BrokenPipeError:
            self.broken_pipe = True
            _silence(self.out)
            self.interrupt.fire()

    def note(self, line: str) -> None:
        self.err.write(f"heartbeat: {line}\n")
        self.err.flush()

    def sleep(self, seconds: float) -> Deferred[None]:
        d: Deferred[None] = Deferred(lambda d: call.cancel() if call.active() else None)
        call = self.reactor.callLater(seconds, d.callback, None)
        return d

    async def connect(
        self, endpoint: IStreamClientEndpoint, target: str | None = None
    ) -> ClientConnection:
        """Connect and await the hello, with a deadline; every failure a `CliError`
        (naming ``target``, the endpoint as the user wrote it; default ENDPOINT)."""
        args = self.args
        target = args.endpoint if target is None else target
        tls, token = credentials(args)
        try:
            connecting = connect(
                self.reactor,
                endpoint,
                framing=args.framing,
                request_timeout=args.timeout,
                hello_timeout=args.timeout,
                tls=tls,
                token=token,
                # A JWT is short-lived: on the server's refresh, the file is read again
                # (whatever renews it, the CLI sends the new token).
                get_token=(
                    (lambda path=args.auth_token_file: read_token(path))
                    if args.auth_token_file
                    else None
                ),
                **self.connect_options,
            )
        except (OSError, ValueError, ImportError) as e:  # unreadable or bad TLS files
            raise CliError(EXIT_USAGE, f"TLS options: {message(e)}") from None
        # Twisted's TCP endpoints wait 30 s by default; ours is --timeout (plus the hello's).
        connecting.addTimeout(args.timeout * 2, self.reactor)
        try:
            interrupted, conn = await self.interrupt.until(connecting)
        except Exception as e:
            raise connect_failure(e, target, tls_hint=tls is None) from None
        if interrupted:
            raise CliError(EXIT_INTERRUPTED, "interrupted")
        return conn  # type: ignore[no-any-return]


def credentials(args: Any) -> tuple[ClientTLS | None, str | None]:
    """TLS settings and the auth token from the command line (usage errors exit 2)."""
    tls = token = None
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CliError(EXIT_USAGE, "--tls-cert and --tls-key go together")
    if args.tls_ca or args.tls_cert:
        try:
            tls = ClientTLS(args.tls_ca, args.tls_cert, args.tls_key, args.tls_hostname)
        except (OSError, ValueError) as e:
            raise CliError(EXIT_USAGE, f"TLS options: {e}") from None
    if args.auth_token_file:
        try:
            token = read_token(args.auth_token_file)
        except (OSError, ValueError) as e:
            raise CliError(EXIT_USAGE, f"--token-file: {e}") from None
    return tls, token


def _silence(stream: TextIO) -> None:
    """Point a closed pipe's descriptor at /dev/null, so the interpreter's final flush of it
    does not print "Exception ignored ... BrokenPipeError"."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (tests' StringIO)
        pass


#: Said when a plaintext client heard no hello: a TLS server says nothing until the client's
#: ClientHello, and an HTTP one (the WebSocket listener, the admin API) until its request, so
#: each waits on the other in silence.
TLS_HINT = (
    "is it a TLS port (give --tls-ca), or an HTTP one (WebSocket, admin API: give the listen port)?"
)


def connect_failure(e: BaseException, target: str, tls_hint: bool = False) -> CliError:
    """Why a connection could not be made, as one line and an exit status.

    ``tls_hint``: the connection was plaintext, so a silent server may be a TLS one.
    """
    if isinstance(e, HandshakeTimeout) and tls_hint:
        return CliError(EXIT_TIMEOUT, f"timed out connecting to {target}: {e}; {TLS_HINT}")
    if isinstance(e, ConnectionFailed) and e.__cause__ is not None:
        e = e.__cause__  # the library's typed wrapper: sort by what actually happened
    if isinstance(e, twisted_errors.DNSLookupError):
        host = target.rsplit(":", 1)[0] if ":" in target else target
        return CliError(EXIT_CONNECTION, f"cannot resolve host of {host!r}: {e}")
    cancelled = (twisted_errors.ConnectingCancelledError, CancelledError)
    if isinstance(e, (twisted_errors.TimeoutError, HandshakeTimeout, *cancelled)):
        return CliError(EXIT_TIMEOUT, f"timed out connecting to {target}")
    if isinstance(e, twisted_errors.ConnectionRefusedError):
        return CliError(EXIT_CONNECTION, f"cannot reach {target}: connection refused")
    if isinstance(e, ServerError):
        return CliError(EXIT_SERVER_ERROR, f"{target} refused the connection: {e}")
    if isinstance(e, (ClientError, twisted_errors.ConnectError, twisted_errors.ConnectionLost)):
        return CliError(EXIT_CONNECTION, f"cannot reach {target}: {message(e)}")
    if isinstance(e, OSError):
        return CliError(EXIT_CONNECTION, f"cannot reach {target}: {e.strerror or e}")
    return CliError(EXIT_BUG, f"unexpected failure connecting to {target}: {message(e)}")


def message(e: BaseException) -> str:
    text = str(e).strip()
    return text.rstrip(".") if text else type(e).__name__


def lost(e: ConnectionClosed, target: str) -> CliError:
    return CliError(EXIT_CONNECTION, f"connection to {target} lost: {message(e)}")

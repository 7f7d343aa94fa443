"""``heartbeat``: talk to a heartbeatd server, and to its admin API, from a shell.

Every failure is one line on stderr and an exit status; no input prints a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import textwrap
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TextIO

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IStreamClientEndpoint

from heartbeatd._version import __version__
from heartbeatd.client._cli_common import (
    EXIT_BUG,
    EXIT_CONNECTION,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SERVER_ERROR,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    CliError,
    Context,
    Interrupt,
    install_interrupt,
    lost,
    message,
)
from heartbeatd.client.connection import ClientConnection
from heartbeatd.client.errors import (
    ConnectionClosed,
    RequestTimeout,
    ServerError,
)
from heartbeatd.wire import FRAMINGS

__all__ = ["CliError", "Interrupt", "client_endpoint", "main", "parse_args", "run"]

EXIT_CODES = """exit status:
  0    success (also: watch or ping stopped with Ctrl-C)
  1    the server or admin API answered with an error
  2    bad usage: unknown option, malformed endpoint, port or JSON
  3    could not connect (refused, unresolvable host), or the connection was lost
  4    timed out
  5    an unexpected failure (a bug: please report it)
  130  request interrupted with Ctrl-C"""

ENDPOINT_HELP = (
    "host:port (e.g. 127.0.0.1:9000, [::1]:9000) or a Twisted client endpoint string "
    "(tcp:host=H:port=P, unix:path=/run/heartbeatd.sock, tls:host=H:port=P)"
)
_HOST_PORT = re.compile(r"(?P<host>[\w.\-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>[^:]*)")
#: Twisted client endpoint types a ``word:...`` may name (``unix:`` is not host "unix").
_ENDPOINT_TYPES = frozenset({"tcp", "tcp6", "unix", "tls", "ssl", "hostname", "tor", "onion"})
_ENDPOINT_KINDS = re.compile(r"^[a-zA-Z][\w+-]*:")


# -- arguments -------------------------------------------------------------------------------


def endpoint_string(text: str) -> str:
    """``host:port`` becomes a TCP endpoint string; anything else is passed through.

    Raises `CliError` (usage) for a ``host:port`` whose port is not 1..65535.
    """
    match = _HOST_PORT.fullmatch(text)
    if match is None or match["host"].lower() in _ENDPOINT_TYPES:
        return text
    port = match["port"]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise CliError(EXIT_USAGE, f"invalid port {port!r} in {text!r}; expected 1..65535")
    host = match["host"].strip("[]").replace(":", r"\:")
    return f"tcp:host={host}:port={int(port)}"


def client_endpoint(reactor: Any, text: str) -> IStreamClientEndpoint:
    """Parse ENDPOINT without connecting; a malformed one is a one-line usage error."""
    from twisted.internet.endpoints import clientFromString

    description = endpoint_string(text)
    if _ENDPOINT_KINDS.match(description) is None:
        raise CliError(EXIT_USAGE, f"invalid endpoint {text!r}; expected {ENDPOINT_HELP}")
    try:
        return clientFromString(reactor, description)
    except (ImportError, NameError):  # Twisted's TLS endpoints without pyOpenSSL
        raise CliError(
            EXIT_USAGE, f"endpoint {text!r} needs TLS support: pip install 'twisted[tls]'"
        ) from None
    except Exception as e:  # Twisted raises ValueError, KeyError, TypeError... for bad strings
        detail = str(e) or type(e).__name__
        raise CliError(EXIT_USAGE, f"invalid endpoint {text!r}: {detail}") from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0")
    return value


def _non_negative(text: str) -> float:
    if text.strip() in ("0", "0.0"):
        return 0.0
    return _positive(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not valid JSON ({e}); quote strings: '\"text\"'"
        ) from None


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), not the usage block."""

    def error(self, message: str) -> NoReturn:
        raise CliError(EXIT_USAGE, f"{message} (see: {self.prog} --help)")


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection options")
    group.add_argument(
        "--framing",
        choices=sorted(FRAMINGS),
        default=argparse.SUPPRESS,
        help="wire framing of the server (default int32)",
    )
    group.add_argument(
        "--timeout",
        type=_positive,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help="seconds to wait for the connection, the hello and each reply (default 5)",
    )
    secure = common.add_argument_group("TLS and authentication (see docs/security.md)")
    for flag, help_text in (
        ("--tls-ca", "connect with TLS; PEM CA file to verify the server"),
        ("--tls-cert", "PEM client certificate (mutual TLS; with --tls-key)"),
        ("--tls-key", "PEM private key of --tls-cert"),
        ("--tls-hostname", "name the server certificate must carry (default: its host)"),
    ):
        secure.add_argument(flag, default=argparse.SUPPRESS, metavar="FILE", help=help_text)
    secure.add_argument(
        "--token-file",
        dest="auth_token_file",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="file whose first line is the token to authenticate with (auth.mode on the server)",
    )
    return common


def _admin_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("admin API options")
    group.add_argument(
        "--admin",
        default=os.environ.get("HEARTBEAT_ADMIN", "http://127.0.0.1:9100"),
        metavar="URL",
        help="the daemon's admin API (default $HEARTBEAT_ADMIN or http://127.0.0.1:9100)",
    )
    group.add_argument(
        "--token-file",
        default=os.environ.get("HEARTBEAT_TOKEN_FILE"),
        metavar="FILE",
        help="file holding the admin bearer token (default $HEARTBEAT_TOKEN_FILE; none)",
    )
    group.add_argument(
        "--timeout",
        type=_positive,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help="seconds to wait for the answer (default 5)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    conn, admin = _connection_options(), _admin_options()
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="heartbeat",
        description="Talk to a heartbeatd server (ping, request, watch) and to its admin\n"
        "API (clients, send, broadcast, kick).",
        epilog=f"{textwrap.fill(f'ENDPOINT is {ENDPOINT_HELP}.', 78)}\n\n{EXIT_CODES}",
        formatter_class=formatter,
        parents=[conn],
    )
    parser.add_argument("--version", action="version", version=f"heartbeat {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def command(name: str, parents: list[argparse.ArgumentParser], **kw: Any) -> Any:
        kw["description"] = textwrap.fill(kw["description"], 78)
        return commands.add_parser(
            name, parents=parents, formatter_class=formatter, epilog=EXIT_CODES, **kw
        )

    ping = command(
        "ping",
        [conn],
        help="measure round-trip times, like ping(8)",
        description="Send ping requests and print each pong's round trip; Ctrl-C (or -c) "
        "stops and prints the summary.",
    )
    ping.add_argument("endpoint", metavar="ENDPOINT", help="the server")
    ping.add_argument(
        "-c",
        "--count",
        type=_count,
        default=4,
        metavar="N",
        help="pings to send (default 4; 0: until Ctrl-C)",
    )
    ping.add_argument(
        "-i",
        "--interval",
        type=_non_negative,
        default=1.0,
        metavar="SECONDS",
        help="pause between pings (default 1)",
    )

    request = command(
        "request",
        [conn],
        help="send one request and print the reply's data",
        description="Send one request and print the reply's data as JSON.",
    )
    request.add_argument("endpoint", metavar="ENDPOINT", help="the server")
    request.add_argument("type", metavar="TYPE", help="message type, e.g. echo")
    request.add_argument(
        "data", metavar="DATA", nargs="?", type=_json_value, help="JSON data (default: none)"
    )

    watch = command(
        "watch",
        [conn],
        help="print pushed messages as JSON lines",
        description="Print every message the server pushes, one JSON object per line. On a "
        "goaway (the server is shutting down) the goaway is printed and the watch "
        "reconnects at a random moment within the window the server advertised, and keeps "
        "watching. Ctrl-C stops it (exit 0).",
    )
    watch.add_argument("endpoint", metavar="ENDPOINT", help="the server")
    watch.add_argument(
        "-n", "--count", type=_count, default=0, metavar="N", help="stop after N (0: never)"
    )
    watch.add_argument(
        "--exit-on-goaway",
        action="store_true",
        help="exit 0 when the server sends goaway instead of reconnecting",
    )
    watch.add_argument(
        "--reconnect-timeout",
        type=_positive,
        default=60.0,
        metavar="SECONDS",
        help="after a goaway, give up (exit 3) if no reconnect succeeded by then (default 60)",
    )

    clients = command(
        "clients",
        [admin],
        help="list connected clients (admin API)",
        description="List the connected clients: session, peer, connected since, last "
        "heard from, last ping round trip, frames in and out.",
    )
    clients.add_argument("--json", action="store_true", help="print the API's JSON as it is")
    clients.add_argument(
        "--evictions",
        type=_count,
        default=0,
        metavar="N",
        help="also list the last N closes with their reasons",
    )
    send = command(
        "send",
        [admin],
        help="push a message to one client (admin API)",
        description="Push {type, data} to the client with this session id.",
    )
    send.add_argument("session", metavar="SESSION", help="session id (see: heartbeat clients)")
    send.add_argument("type", metavar="TYPE", help="message type")
    send.add_argument(
        "data", metavar="DATA", nargs="?", type=_json_value, help="JSON data (default: none)"
    )
    broadcast = command(
        "broadcast",
        [admin],
        help="push a message to every client (admin API)",
        description="Push {type, data} to every connected client.",
    )
    broadcast.add_argument("type", metavar="TYPE", help="message type")
    broadcast.add_argument(
        "data", metavar="DATA", nargs="?", type=_json_value, help="JSON data (default: none)"
    )
    kick = command(
        "kick",
        [admin],
        help="disconnect one client (admin API)",
        description="Disconnect the client with this session id (eviction reason 'admin').",
    )
    kick.add_argument("session", metavar="SESSION", help="session id (see: heartbeat clients)")
    # Listed here for --help; `main` hands `heartbeat doctor ...` to the daemon's program.
    doctor = commands.add_parser(
        "doctor",
        help="check this machine against a daemon config (open files, backlog, memory, "
        "kernel drops, Redis)",
        description="Run python -m heartbeatd.daemon.doctor: see heartbeat doctor --help.",
    )
    doctor.add_argument("--config", "-c", metavar="FILE", help="the daemon's YAML file")
    doctor.add_argument("--limit-nofile", metavar="N", help="the unit's LimitNOFILE=")
    doctor.add_argument("--sample", metavar="SECONDS", help="read drop counters twice")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; options may come before or after the subcommand."""
    args = build_parser().parse_args(argv)
    if not hasattr(args, "framing"):
        args.framing = "int32"
    if not hasattr(args, "timeout"):
        args.timeout = 5.0
    for name in ("tls_ca", "tls_cert", "tls_key", "tls_hostname", "auth_token_file"):
        if not hasattr(args, name):
            setattr(args, name, None)
    if hasattr(args, "endpoint"):
        client_endpoint(None, args.endpoint)  # a malformed one fails now, before any reactor
    return args


async def ping(ctx: Context) -> int:
    args = ctx.args
    conn = await ctx.connect(client_endpoint(ctx.reactor, args.endpoint))
    started = ctx.reactor.seconds()
    sent, times, failure = 0, [], None
    try:
        while not args.count or sent < args.count:
            if sent:
                interrupted, _ = await ctx.interrupt.until(ctx.sleep(args.interval))
                if interrupted:
                    break
            sent += 1
            before = ctx.reactor.seconds()
            try:
                interrupted, _ = await ctx.interrupt.until(conn.request("ping"))
            except RequestTimeout:
                ctx.print(f"no pong from {args.endpoint}: seq={sent} (timed out)")
                continue
            except ConnectionClosed as e:
                failure = lost(e, args.endpoint)
                break
            if interrupted:
                sent -= 1  # not answered because we stopped, not lost
                break
            times.append((ctx.reactor.seconds() - before) * 1000)
            ctx.print(f"pong from {args.endpoint}: seq={sent} time={times[-1]:.3f} ms")
    finally:
        conn.close()
    elapsed = (ctx.reactor.seconds() - started) * 1000
    loss = 100.0 * (sent - len(times)) / sent if sent else 0.0
    ctx.print(f"--- {args.endpoint} ping statistics ---")
    ctx.print(
        f"{sent} pings sent, {len(times)} pongs received, {loss:.0f}% loss, time {elapsed:.0f} ms"
    )
    if times:
        mean = sum(times) / len(times)
        mdev = (sum((t - mean) ** 2 for t in times) / len(times)) ** 0.5
        ctx.print(
            f"rtt min/avg/max/mdev = {min(times):.3f}/{mean:.3f}/{max(times):.3f}/{mdev:.3f} ms"
        )
    if failure is not None:
        raise failure
    if sent and not times and not ctx.interrupt.fired:
        return EXIT_TIMEOUT
    return EXIT_OK


async def request(ctx: Context) -> int:
    args = ctx.args
    conn = await ctx.connect(client_endpoint(ctx.reactor, args.endpoint))
    try:
        data = () if args.data is None else (args.data,)
        interrupted, reply = await ctx.interrupt.until(conn.request(args.type, *data))
    except ServerError as e:
        raise CliError(EXIT_SERVER_ERROR, f"server error {e.code}: {e.message}") from None
    except RequestTimeout:
        raise CliError(EXIT_TIMEOUT, f"no reply within {args.timeout:g}s") from None
    except ConnectionClosed as e:
        raise lost(e, args.endpoint) from None
    finally:
        conn.close()
    if interrupted:
        raise CliError(EXIT_INTERRUPTED, "interrupted")
    ctx.print(json.dumps(reply, ensure_ascii=False))
    return EXIT_OK


async def watch(ctx: Context) -> int:
    args = ctx.args
    endpoint = client_endpoint(ctx.reactor, args.endpoint)
    conn = await ctx.connect(endpoint)
    seen = 0
    while True:
        done: Deferred[str] = Deferred()

        def pushed(type_: str, data: Any, conn: ClientConnection, done: Deferred = done) -> None:
            nonlocal seen
            ctx.print(json.dumps({"type": type_, "data": data}, ensure_ascii=False))
            seen += 1
            if args.count and seen >= args.count and not done.called:
                done.callback("count")

        def goaway(conn: ClientConnection, data: dict[str, Any], done: Deferred = done) -> None:
            ctx.print(json.dumps({"type": "goaway", "data": data}, ensure_ascii=False))
            if not done.called:
                done.callback("goaway")

        def closed(conn: ClientConnection, why: Any, done: Deferred = done) -> None:
            if not done.called:
                done.errback(ConnectionClosed(why.getErrorMessage() if why else "closed"))

        conn.on_any(pushed)
        conn.on_goaway(goaway)
        conn.on_close(closed)
        try:
            interrupted, outcome = await ctx.interrupt.until(done)
        except ConnectionClosed as e:
            raise lost(e, args.endpoint) from None
        if interrupted or outcome == "count" or args.exit_on_goaway:
            conn.close()
            return EXIT_OK
        window = (conn.goaway or {}).get("reconnect_after", 5)
        window = float(window) if isinstance(window, (int, float)) and window >= 0 else 5.0
        conn.close()
        conn_or_none = await _reconnect(ctx, endpoint, window)
        if conn_or_none is None:
            return EXIT_OK  # Ctrl-C while waiting to reconnect
        conn = conn_or_none


async def _reconnect(
    ctx: Context, endpoint: IStreamClientEndpoint, window: float
) -> ClientConnection | None:
    """Reconnect at a random moment within ``window`` s, retrying until the deadline."""
    args = ctx.args
    delay = random.uniform(0, window)
    ctx.note(f"server going away; reconnecting in {delay:.1f}s (window {window:g}s)")
    deadline = ctx.reactor.seconds() + delay + args.reconnect_timeout
    retry = 0.25
    while True:
        interrupted, _ = await ctx.interrupt.until(ctx.sleep(delay))
        if interrupted:
            return None
        try:
            conn = await ctx.connect(endpoint)
        except CliError as e:
            if e.code in (EXIT_INTERRUPTED,):
                return None
            if ctx.reactor.seconds() + retry > deadline:
                raise CliError(
                    EXIT_CONNECTION,
                    f"could not reconnect to {args.endpoint} within "
                    f"{args.reconnect_timeout:g}s: {e.message}",
                ) from None
            delay, retry = retry, min(retry * 2, 5.0)
            continue
        session = (conn.hello or {}).get("session", "?")
        ctx.note(f"reconnected to {args.endpoint} (session {session})")
        return conn


COMMANDS: dict[str, Callable[[Context], Coroutine[Any, Any, int]]] = {
    "ping": ping,
    "request": request,
    "watch": watch,
}
ADMIN_COMMANDS = ("clients", "send", "broadcast", "kick")


async def run(
    reactor: Any,
    args: argparse.Namespace,
    out: TextIO | None = None,
    err: TextIO | None = None,
    interrupt: Interrupt | None = None,
) -> int:
    """Run one parsed command; return its exit status (failures reported on ``err``)."""
    ctx = Context(reactor, args, out or sys.stdout, err or sys.stderr, interrupt or Interrupt())
    try:
        if args.command in ADMIN_COMMANDS:
            # Imported only here: twisted.web is not loaded for ping/request/watch.
            from heartbeatd.client._admin_cli import admin_command

            return await admin_command(ctx)
        return await COMMANDS[args.command](ctx)
    except CliError as e:
        ctx.note(e.message)
        return e.code
    except Exception as e:  # the promise: never a traceback
        ctx.note(f"unexpected failure ({type(e).__name__}: {message(e)}); please report it")
        return EXIT_BUG


def _leave_if_a_lookup_hangs(reactor: Any, code: int) -> None:
    """Exit now if a host name lookup still runs in the reactor's thread pool.

    getaddrinfo cannot be cancelled, and the reactor's shutdown joins its threads: after a
    connect timed out on a slow resolver, ``heartbeat`` would hang for the resolver's whole
    timeout.  The command is over and its connections closed, so nothing is lost.
    """
    pool = getattr(reactor, "threadpool", None)
    if pool is not None and pool.working:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


#: ``heartbeat doctor`` reads the daemon's YAML, which the client never loads: it is the
#: daemon's program, run in its own interpreter (same exit status, same output).
DOCTOR = ("-m", "heartbeatd.daemon.doctor")


def run_doctor(argv: list[str]) -> NoReturn:
    os.execv(sys.executable, [sys.executable, *DOCTOR, *argv])


def main(argv: list[str] | None = None) -> None:
    """The ``heartbeat`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["doctor"]:
        run_doctor(argv[1:])
    try:
        args = parse_args(argv)
        if args.command == "doctor":  # options came before the word
            options = ("config", "limit_nofile", "sample")
            run_doctor(
                [
                    f"--{name.replace('_', '-')}={getattr(args, name)}"
                    for name in options
                    if getattr(args, name) is not None
                ]
            )
        from twisted.internet import task
    except CliError as e:
        sys.stderr.write(f"heartbeat: {e.message}\n")
        raise SystemExit(e.code) from None
    except KeyboardInterrupt:  # Ctrl-C before the reactor (and our handler) started
        raise SystemExit(EXIT_INTERRUPTED) from None

    def start(reactor: Any) -> Deferred[None]:
        interrupt = Interrupt()
        reactor.callWhenRunning(install_interrupt, reactor, interrupt)

        async def command() -> None:
            code = await run(reactor, args, interrupt=interrupt)
            _leave_if_a_lookup_hangs(reactor, code)
            if code:
                raise SystemExit(code)

        return ensureDeferred(command())

    task.react(start)

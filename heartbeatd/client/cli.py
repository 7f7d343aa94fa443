"""``heartbeat``: talk to a heartbeatd server, and to its admin API, from a shell.

Every failure is one line on stderr and an exit status; no input prints a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import sys
import textwrap
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TextIO

from twisted.internet import error as twisted_errors
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
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
    ClientError,
    ConnectionClosed,
    RequestTimeout,
    ServerError,
)
from heartbeatd.client.session import ClientSession
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
SEVERAL_HELP = (
    "Several, separated by commas (the nodes of a cluster: 10.0.0.1:9000,10.0.0.2:9000), "
    "are tried in turn: a command connects to the first that answers; subscribe moves to "
    "the next one when its connection is lost, and watch and subscribe after a goaway."
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
    if match is None or match["host"].lower() in _ENDPOINT_TYPES or "=" in match["port"]:
        return text  # ``xyz:foo=bar`` is an endpoint string of an unknown type, not a port
    port = match["port"]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise CliError(EXIT_USAGE, f"invalid port {port!r} in {text!r}; expected 1..65535")
    host = match["host"].strip("[]").replace(":", r"\:")
    return f"tcp:host={host}:port={int(port)}"


def _endpoint_types() -> list[str]:
    """The client endpoint types Twisted knows here (built in, and from plugins)."""
    from twisted.internet import endpoints
    from twisted.internet.interfaces import IStreamClientEndpointStringParserWithReactor
    from twisted.plugin import getPlugins

    # Twisted's built-in parsers (a private table: read with a fallback of its contents).
    builtin = getattr(endpoints, "_clientParsers", None) or {"tcp": 0, "ssl": 0, "unix": 0}
    names = {str(name).lower() for name in builtin}
    try:
        plugins = getPlugins(IStreamClientEndpointStringParserWithReactor)
        names.update(str(p.prefix).lower() for p in plugins)
    except Exception:  # a broken plugin must not hide the user's mistake
        pass
    return sorted(names)


#: Twisted's message for a missing endpoint argument: "... missing 1 required positional
#: argument: 'port'" (or "arguments: 'host' and 'port'").
_MISSING = re.compile(r"missing \d+ required (?:positional |keyword-only )?arguments?: (.*)")


def client_endpoint(reactor: Any, text: str) -> IStreamClientEndpoint:
    """Parse ENDPOINT without connecting; a malformed one is a one-line usage error."""
    from twisted.internet.endpoints import clientFromString

    description = endpoint_string(text)
    kind = _ENDPOINT_KINDS.match(description)
    if kind is None:
        raise CliError(EXIT_USAGE, f"invalid endpoint {text!r}; expected {ENDPOINT_HELP}")
    known = _endpoint_types()
    name = kind.group(0)[:-1].lower()
    if name not in known:
        raise CliError(
            EXIT_USAGE,
            f"invalid endpoint {text!r}: unknown endpoint type {name!r}; expected host:port "
            f"or one of {', '.join(f'{k}:' for k in known)}",
        )
    try:
        return clientFromString(reactor, description)
    except (ImportError, NameError):  # Twisted's TLS endpoints without pyOpenSSL
        raise CliError(
            EXIT_USAGE, f"endpoint {text!r} needs TLS support: pip install 'twisted[tls]'"
        ) from None
    except Exception as e:  # Twisted raises ValueError, KeyError, TypeError... for bad strings
        missing = _MISSING.search(str(e))
        if missing is not None:
            names = re.findall(r"'(\w+)'", missing.group(1))
            wanted = " and ".join(f"{n}=..." for n in names) or missing.group(1)
            raise CliError(EXIT_USAGE, f"invalid endpoint {text!r}: missing {wanted}") from None
        detail = str(e) or type(e).__name__
        raise CliError(EXIT_USAGE, f"invalid endpoint {text!r}: {detail}") from None


class Targets:
    """ENDPOINT: one endpoint, or several separated by commas, tried in turn."""

    def __init__(self, reactor: Any, text: str) -> None:
        self.texts = [piece.strip() for piece in text.split(",")]
        if not all(self.texts):
            raise CliError(EXIT_USAGE, f"invalid endpoint list {text!r}: an empty entry")
        self.endpoints = [client_endpoint(reactor, piece) for piece in self.texts]
        #: The endpoint connected to, or to try first.
        self.current = 0

    @property
    def name(self) -> str:
        return self.texts[self.current]


async def connect_any(ctx: Context, targets: Targets, start: int | None = None) -> ClientConnection:
    """Try each endpoint once, from ``start`` (default: the current one) on; the first that
    connects becomes current.  All failing: one `CliError` naming each failure."""
    count = len(targets.endpoints)
    first = targets.current if start is None else start % count
    failures: list[CliError] = []
    for step in range(count):
        index = (first + step) % count
        try:
            conn = await ctx.connect(targets.endpoints[index], targets.texts[index])
        except CliError as e:
            if e.code == EXIT_INTERRUPTED or count == 1:
                raise
            failures.append(e)
            continue
        targets.current = index
        return conn
    codes = {e.code for e in failures}
    code = codes.pop() if len(codes) == 1 else EXIT_CONNECTION
    raise CliError(code, "; ".join(e.message for e in failures))


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


def _position(text: str) -> tuple[str, int]:
    epoch, _, offset = text.rpartition(":")
    if not epoch or not offset.isdigit():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not EPOCH:OFFSET (as subscribe prints them, e.g. 5e1f0c2a:12)"
        )
    return epoch, int(offset)


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
        metavar = "NAME" if flag == "--tls-hostname" else "FILE"
        secure.add_argument(flag, default=argparse.SUPPRESS, metavar=metavar, help=help_text)
    secure.add_argument(
        "--token-file",
        dest="auth_token_file",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="file whose first line is the token (or JWT) to authenticate with (auth.mode on "
        "the server); read again when the server asks for a refresh",
    )
    return common


def _admin_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("admin API options")
    group.add_argument(
        "--admin",
        default=os.environ.get("HEARTBEAT_ADMIN", "http://127.0.0.1:9100"),
        metavar="URL",
        help="the daemon's admin API, http://HOST:PORT or HOST:PORT "
        "(default $HEARTBEAT_ADMIN or http://127.0.0.1:9100)",
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
        description="Talk to a heartbeatd server (ping, request, watch; subscribe, publish,\n"
        "presence on channels) and to its admin API (clients, send, broadcast, kick).",
        epilog=f"{textwrap.fill(f'ENDPOINT is {ENDPOINT_HELP}. {SEVERAL_HELP}', 78)}\n\n"
        f"{EXIT_CODES}",
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
        description="Send one request and print the reply's data as JSON (with --no-reply: "
        "send the message, expect no reply).",
    )
    request.add_argument("endpoint", metavar="ENDPOINT", help="the server")
    request.add_argument("type", metavar="TYPE", help="message type, e.g. echo")
    request.add_argument(
        "data", metavar="DATA", nargs="?", type=_json_value, help="JSON data (default: none)"
    )
    request.add_argument(
        "--no-reply",
        action="store_true",
        help="send the message without an id (for a handler that answers nothing) and exit 0 "
        "once it is written; print nothing",
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
        help="after a goaway (or, with --resumable, a lost connection), give up (exit 3) if "
        "no reconnect succeeded by then (default 60)",
    )
    watch.add_argument(
        "--resumable",
        action="store_true",
        help="keep a resumable session: after a lost connection, reconnect and resume it, "
        "so no pushed message is missed or printed twice",
    )

    sub = command(
        "subscribe",
        [conn],
        help="print a channel's publications as JSON lines",
        description="Subscribe to CHANNEL and print each publication as one JSON line "
        '({"channel", "epoch", "offset", "data"}). After a lost connection or a goaway it '
        "reconnects and subscribes again from the last publication printed, so none is "
        "missed or printed twice; when the server cannot give back what was missed, stderr "
        "says so and printing goes on from the current position. Ctrl-C stops it (exit 0).",
    )
    sub.add_argument("endpoint", metavar="ENDPOINT", help="the server")
    sub.add_argument("channel", metavar="CHANNEL", help="channel name")
    sub.add_argument(
        "--since",
        type=_position,
        metavar="EPOCH:OFFSET",
        help="start after this publication (an epoch and offset printed before): the ones "
        "after it are printed first, or stderr says they are gone",
    )
    sub.add_argument(
        "-n", "--count", type=_count, default=0, metavar="N", help="stop after N (0: never)"
    )
    sub.add_argument(
        "--reconnect-timeout",
        type=_positive,
        default=60.0,
        metavar="SECONDS",
        help="give up (exit 3) if no reconnect succeeded by then, or (exit 1) if the server "
        "answered unavailable to every subscribe again for that long (default 60)",
    )
    pub = command(
        "publish",
        [conn],
        help="publish to a channel",
        description="Publish DATA (JSON) to CHANNEL and print the answer, "
        '{"channel", "offset"}. The server must allow it (channels.client_publish); '
        "operators can also publish through the admin API (POST /publish).",
    )
    pub.add_argument("endpoint", metavar="ENDPOINT", help="the server")
    pub.add_argument("channel", metavar="CHANNEL", help="channel name")
    pub.add_argument("data", metavar="DATA", type=_json_value, help="JSON data")
    who = command(
        "presence",
        [conn],
        help="list a channel's subscribers",
        description='Print who is subscribed to CHANNEL: {"channel", "clients": [{"session", '
        '"node", "identity"}, ...]}.',
    )
    who.add_argument("endpoint", metavar="ENDPOINT", help="the server")
    who.add_argument("channel", metavar="CHANNEL", help="channel name")

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
    clients.add_argument(
        "--identity", metavar="IDENTITY", help="only the sessions of this identity"
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
        description="Disconnect the client with this session id, or with --identity every "
        "session of one identity (eviction reason 'admin').",
    )
    target = kick.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "session", metavar="SESSION", nargs="?", help="session id (see: heartbeat clients)"
    )
    target.add_argument(
        "--identity",
        metavar="IDENTITY",
        help="disconnect every session of this identity instead (on every node of a cluster)",
    )
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
        Targets(None, args.endpoint)  # a malformed one fails now, before any reactor
    if args.command in ADMIN_COMMANDS:
        from heartbeatd.client._admin_cli import base_url

        base_url(args.admin)  # likewise a malformed --admin
    return args


async def ping(ctx: Context) -> int:
    args = ctx.args
    targets = Targets(ctx.reactor, args.endpoint)
    conn = await connect_any(ctx, targets)
    name = targets.name
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
                ctx.print(f"no pong from {name}: seq={sent} (timed out)")
                continue
            except ConnectionClosed as e:
                failure = lost(e, name)
                break
            if interrupted:
                sent -= 1  # not answered because we stopped, not lost
                break
            times.append((ctx.reactor.seconds() - before) * 1000)
            ctx.print(f"pong from {name}: seq={sent} time={times[-1]:.3f} ms")
    finally:
        conn.close()
    elapsed = (ctx.reactor.seconds() - started) * 1000
    loss = 100.0 * (sent - len(times)) / sent if sent else 0.0
    ctx.print(f"--- {name} ping statistics ---")
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
    if args.no_reply:
        targets = Targets(ctx.reactor, args.endpoint)
        conn = await connect_any(ctx, targets)
        args.endpoint = targets.name  # for the messages of _send_only: the one connected to
        return await _send_only(ctx, conn)
    reply = await _ask(ctx, args.type, *(() if args.data is None else (args.data,)))
    ctx.print(json.dumps(reply, ensure_ascii=False))
    return EXIT_OK


async def _send_only(ctx: Context, conn: ClientConnection) -> int:
    """Send without an id and close: the close completes once what we wrote is handed to the
    kernel (Twisted flushes its buffer before it shuts the socket), so exit 0 means written."""
    args = ctx.args
    closed: Deferred[None] = Deferred()
    conn.on_close(lambda conn, why: closed.called or closed.callback(None))
    try:
        if args.data is None:
            conn.send(args.type)
        else:
            conn.send(args.type, args.data)
    except ConnectionClosed as e:
        raise lost(e, args.endpoint) from None
    conn.close()
    closed.addTimeout(args.timeout, ctx.reactor)
    try:
        interrupted, _ = await ctx.interrupt.until(closed)
    except (twisted_errors.TimeoutError, DeferredTimeout):
        # The bytes may still sit in our buffer (the peer does not read): not written.
        conn.abort(ConnectionClosed("not written in time"))
        raise CliError(
            EXIT_TIMEOUT, f"could not write the message to {args.endpoint} within {args.timeout:g}s"
        ) from None
    if interrupted:
        conn.abort(ConnectionClosed("interrupted"))
        raise CliError(EXIT_INTERRUPTED, "interrupted")
    return EXIT_OK


#: With --resumable, how soon (at most; random within it) a lost connection is retried.
RESUME_WINDOW = 0.5


async def watch(ctx: Context) -> int:
    args = ctx.args
    targets = Targets(ctx.reactor, args.endpoint)
    seen = 0
    current: list[Deferred[str]] = []  # the running connection's "done"

    def pushed(type_: str, data: Any, conn: ClientConnection) -> None:
        nonlocal seen
        if args.count and seen >= args.count:
            return
        ctx.print(json.dumps({"type": type_, "data": data}, ensure_ascii=False))
        seen += 1
        if args.count and seen >= args.count and current and not current[-1].called:
            current[-1].callback("count")

    # Heard from the first byte of each connection: a resume's replay follows its answer
    # at once, before connect() returns.
    ctx.connect_options["on_push"] = pushed
    session: ClientSession | None = None
    if args.resumable:
        session = ctx.connect_options["session"] = ClientSession(ctx.reactor)
        session.on_session(lambda event: ctx.note(_session_note(event)))
    conn = await connect_any(ctx, targets)
    while True:
        done: Deferred[str] = Deferred()
        current.append(done)
        if args.count and seen >= args.count:
            done.callback("count")

        def goaway(conn: ClientConnection, data: dict[str, Any], done: Deferred = done) -> None:
            ctx.print(json.dumps({"type": "goaway", "data": data}, ensure_ascii=False))
            if not done.called:
                done.callback("goaway")

        def closed(conn: ClientConnection, why: Any, done: Deferred = done) -> None:
            if not done.called:
                done.errback(ConnectionClosed(why.getErrorMessage() if why else "closed"))

        conn.on_goaway(goaway)
        conn.on_close(closed)
        why = "server going away"
        try:
            interrupted, outcome = await ctx.interrupt.until(done)
        except ConnectionClosed as e:
            if session is None:
                raise lost(e, targets.name) from None
            interrupted, outcome, why = False, "lost", f"connection lost ({e})"
        if interrupted or outcome == "count" or args.exit_on_goaway:
            if session is not None and conn.usable and session.state.active:
                await _end_session(ctx, conn)
            conn.close()
            return EXIT_OK
        if outcome == "lost":
            window = RESUME_WINDOW
        else:
            window = (conn.goaway or {}).get("reconnect_after", 5)
            window = float(window) if isinstance(window, (int, float)) and window >= 0 else 5.0
            conn.close()
        conn_or_none = await _reconnect(ctx, targets, window, why)
        if conn_or_none is None:
            return EXIT_OK  # Ctrl-C while waiting to reconnect
        conn = conn_or_none


def _session_note(event: dict[str, Any]) -> str:
    if event["event"] == "resumed":
        return f"session resumed ({event['replayed']} replayed)"
    if event["event"] == "session_lost":
        return f"session lost ({event['reason']}): messages may have been missed; a new one starts"
    return "session started"


async def _end_session(ctx: Context, conn: ClientConnection) -> None:
    """Tell the server the session is over (it would be kept until its expiry), briefly."""
    ending = conn.request("session_end", timeout=min(ctx.args.timeout, 2.0))
    with contextlib.suppress(ClientError):  # else the server keeps it until its expiry
        await ctx.interrupt.until(ending)


async def _reconnect(
    ctx: Context,
    targets: Targets,
    window: float,
    why: str = "server going away",
) -> ClientConnection | None:
    """Reconnect at a random moment within ``window`` s, retrying until the deadline.

    With several endpoints, it starts with the one after the server it left and tries each
    in turn; only a full round of failures waits (0.25 s, doubling up to 5 s).
    """
    args = ctx.args
    delay = random.uniform(0, window)
    ctx.note(f"{why}; reconnecting in {delay:.1f}s (window {window:g}s)")
    deadline = ctx.reactor.seconds() + delay + args.reconnect_timeout
    retry = 0.25
    start = targets.current + 1 if len(targets.endpoints) > 1 else 0
    while True:
        interrupted, _ = await ctx.interrupt.until(ctx.sleep(delay))
        if interrupted:
            return None
        try:
            conn = await connect_any(ctx, targets, start)
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
        ctx.note(f"reconnected to {targets.name} (session {session})")
        return conn


async def _ask(ctx: Context, type: str, *data: Any) -> Any:
    """One request (``data``: none, or its data) on a fresh connection; its reply's data, or
    a `CliError` with the exit status of each failure (the one mapping for every command)."""
    args = ctx.args
    targets = Targets(ctx.reactor, args.endpoint)
    conn = await connect_any(ctx, targets)
    try:
        interrupted, reply = await ctx.interrupt.until(conn.request(type, *data))
    except ServerError as e:
        raise CliError(EXIT_SERVER_ERROR, f"server error {e.code}: {e.message}") from None
    except RequestTimeout:
        raise CliError(EXIT_TIMEOUT, f"no reply within {args.timeout:g}s") from None
    except ConnectionClosed as e:
        raise lost(e, targets.name) from None
    finally:
        conn.close()
    if interrupted:
        raise CliError(EXIT_INTERRUPTED, "interrupted")
    return reply


async def publish(ctx: Context) -> int:
    args = ctx.args
    answer = await _ask(ctx, "publish", {"channel": args.channel, "data": args.data})
    ctx.print(json.dumps(answer, ensure_ascii=False))
    return EXIT_OK


async def presence(ctx: Context) -> int:
    answer = await _ask(ctx, "presence", {"channel": ctx.args.channel})
    ctx.print(json.dumps(answer, ensure_ascii=False))
    return EXIT_OK


#: Pause before asking again when a re-subscribe is answered ``unavailable`` (a cluster whose
#: Redis is coming back), doubled up to the cap; for ``--reconnect-timeout`` seconds at most.
RESUBSCRIBE_RETRY = (0.5, 5.0)


async def subscribe(ctx: Context) -> int:
    """Print a channel's publications; after a reconnect, subscribe again from the last one
    printed (``since``), so none is printed twice and a lost one is said on stderr."""
    from heartbeatd.client.channels import Subscription, channels_of

    args = ctx.args
    targets = Targets(ctx.reactor, args.endpoint)
    channel = args.channel
    ended: list[Deferred[str]] = []  # the current connection's end: count, lost or goaway
    printed = 0

    def publication(data: Any, offset: int, sub: Subscription) -> None:
        nonlocal printed
        line = {"channel": channel, "epoch": sub.epoch, "offset": offset, "data": data}
        ctx.print(json.dumps(line, ensure_ascii=False))
        printed += 1
        if args.count and printed >= args.count and ended and not ended[-1].called:
            ended[-1].callback("count")

    lost_before: list[str] = []

    def not_recovered(sub: Subscription, reason: str) -> None:
        lost_before.append(reason)
        ctx.note(
            f"{channel}: publications were lost ({reason}); recovery failed, continuing "
            f"from {sub.epoch}:{sub.offset}"
        )

    sub = Subscription(channel, publication, not_recovered)
    if args.since is not None:
        sub.epoch, sub.offset = args.since
    conn = await connect_any(ctx, targets)
    first, retry = True, RESUBSCRIBE_RETRY[0]
    unavailable_since: float | None = None  # the first unavailable answer of this spell
    while True:
        end: Deferred[str] = Deferred()
        ended.append(end)
        conn.on_close(lambda c, why, end=end: end.called or end.callback("lost"))
        conn.on_goaway(lambda c, data, end=end: end.called or end.callback("goaway"))
        asked = f"{sub.epoch}:{sub.offset}" if sub.epoch else None
        lost_before.clear()
        try:
            interrupted, _ = await ctx.interrupt.until(channels_of(conn).attach(sub))
        except ServerError as e:
            if first or e.code != "unavailable":
                conn.close()
                raise CliError(EXIT_SERVER_ERROR, f"server error {e.code}: {e.message}") from None
            # Bounded like the library's subscribe_retry_timeout: --reconnect-timeout from
            # the first unavailable answer (across reconnects), the last try at the deadline.
            now = ctx.reactor.seconds()
            if unavailable_since is None:
                unavailable_since = now
            elapsed, limit = now - unavailable_since, args.reconnect_timeout
            if elapsed >= limit:
                conn.close()
                raise CliError(
                    EXIT_SERVER_ERROR,
                    f"server error {e.code}: {e.message} (every subscribe to {channel} for "
                    f"{elapsed:g}s; --reconnect-timeout is {limit:g}s)",
                ) from None
            wait = min(retry, unavailable_since + limit - now)
            ctx.note(f"subscribing to {channel} again: {e.message}; retrying in {wait:g}s")
            interrupted, _ = await ctx.interrupt.until(ctx.sleep(wait))
            retry = min(retry * 2, RESUBSCRIBE_RETRY[1])
            if interrupted:
                conn.close()
                return EXIT_OK
            if conn.usable:
                continue
            interrupted = False  # the connection went meanwhile: reconnect below
        except RequestTimeout:
            if first:
                conn.close()
                raise CliError(EXIT_TIMEOUT, f"no reply within {args.timeout:g}s") from None
            conn.abort(ConnectionClosed("no answer to subscribe"))
        except ConnectionClosed as e:
            if first:
                raise lost(e, targets.name) from None
        else:
            if interrupted:
                conn.close()
                return EXIT_OK
            retry, unavailable_since = RESUBSCRIBE_RETRY[0], None
            where = f"{sub.epoch}:{sub.offset}"
            if asked is None:
                ctx.note(f"subscribed to {channel} at {where}")
            elif not lost_before:
                ctx.note(f"subscribed to {channel} from {asked} (recovered)")
            else:
                ctx.note(f"subscribed to {channel} at {where}")
            first = False
            if args.count and printed >= args.count:  # the recovered backlog was enough
                conn.close()
                return EXIT_OK
        interrupted, outcome = await ctx.interrupt.until(end)
        if interrupted or outcome == "count":
            conn.close()
            return EXIT_OK
        if outcome == "goaway":
            window = (conn.goaway or {}).get("reconnect_after", 5)
            ok = isinstance(window, (int, float)) and window >= 0
            conn.close()
            next_conn = await _reconnect(ctx, targets, float(window) if ok else 5.0)
        else:
            why = message(conn.close_reason.value) if conn.close_reason else "closed"
            next_conn = await _reconnect(
                ctx, targets, 0.0, f"connection to {targets.name} lost ({why})"
            )
        if next_conn is None:
            return EXIT_OK  # Ctrl-C while waiting to reconnect
        conn = next_conn


COMMANDS: dict[str, Callable[[Context], Coroutine[Any, Any, int]]] = {
    "ping": ping,
    "request": request,
    "watch": watch,
    "subscribe": subscribe,
    "publish": publish,
    "presence": presence,
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

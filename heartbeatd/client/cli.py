"""``heartbeat``: talk to a heartbeatd server from a shell.

    heartbeat ping ENDPOINT [-c COUNT]          round-trip times of ping/pong
    heartbeat request ENDPOINT TYPE [JSON]      one request; prints the reply's data as JSON
    heartbeat watch ENDPOINT [-n COUNT]         prints pushed messages as JSON lines

ENDPOINT is ``host:port`` or any Twisted client endpoint string (``tcp:host=...:port=...``,
``unix:path=...``, ``tls:...``).  Exit status: 0 success, 1 the server answered with an error,
2 bad usage, 3 could not connect or the connection was lost, 4 timed out.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from twisted.internet import error as twisted_errors
from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred

from heartbeatd.client.connection import ClientConnection, connect
from heartbeatd.client.errors import (
    ConnectionClosed,
    HandshakeTimeout,
    RequestTimeout,
    ServerError,
)
from heartbeatd.client.tls import ClientTLS, read_token
from heartbeatd.wire import FRAMINGS

__all__ = ["main"]

EXIT_OK, EXIT_SERVER_ERROR, EXIT_USAGE, EXIT_CONNECTION, EXIT_TIMEOUT = 0, 1, 2, 3, 4
_HOST_PORT = re.compile(r"(?P<host>[\w.\-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d+)")


def endpoint_string(text: str) -> str:
    """``host:port`` becomes a TCP endpoint string; anything else is passed through."""
    match = _HOST_PORT.fullmatch(text)
    if match is None:
        return text
    host = match["host"].strip("[]").replace(":", r"\:")
    return f"tcp:host={host}:port={match['port']}:timeout=5"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heartbeat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--framing", choices=sorted(FRAMINGS), default="int32")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for a reply (default 5)"
    )
    parser.add_argument("--token-file", help="file whose first line is the auth token to send")
    parser.add_argument("--tls-ca", help="connect with TLS; PEM CA file to verify the server")
    parser.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-hostname", help="name the server certificate must carry")
    commands = parser.add_subparsers(dest="command", required=True)
    ping = commands.add_parser("ping", help="measure round-trip times")
    ping.add_argument("endpoint")
    ping.add_argument("-c", "--count", type=int, default=4)
    ping.add_argument("-i", "--interval", type=float, default=1.0)
    request = commands.add_parser("request", help="send one request and print the reply")
    request.add_argument("endpoint")
    request.add_argument("type")
    request.add_argument("data", nargs="?", help="JSON data (default: none)")
    watch = commands.add_parser("watch", help="print pushed messages as they arrive")
    watch.add_argument("endpoint")
    watch.add_argument("-n", "--count", type=int, default=0, help="stop after N (0: never)")
    return parser


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _fail(code: int, message: str) -> SystemExit:
    sys.stderr.write(f"heartbeat: {message}\n")
    return SystemExit(code)


def _credentials(args: argparse.Namespace) -> tuple[ClientTLS | None, str | None]:
    """TLS settings and the token from the command line (usage errors exit 2)."""
    tls = token = None
    if (args.tls_cert is None) != (args.tls_key is None):
        raise _fail(EXIT_USAGE, "--tls-cert and --tls-key go together")
    if args.tls_ca or args.tls_cert:
        tls = ClientTLS(args.tls_ca, args.tls_cert, args.tls_key, args.tls_hostname)
    if args.token_file:
        try:
            token = read_token(args.token_file)
        except (OSError, ValueError) as e:
            raise _fail(EXIT_USAGE, f"--token-file: {e}") from None
    return tls, token


async def _connect(reactor: Any, args: argparse.Namespace) -> ClientConnection:
    tls, token = _credentials(args)
    return await connect(
        reactor,
        endpoint_string(args.endpoint),
        framing=args.framing,
        request_timeout=args.timeout,
        hello_timeout=args.timeout,
        tls=tls,
        token=token,
    )


async def _ping(reactor: Any, args: argparse.Namespace, conn: ClientConnection) -> None:
    times = []
    for n in range(args.count):
        if n:
            await task.deferLater(reactor, args.interval)
        started = reactor.seconds()
        await conn.request("ping", timeout=args.timeout)
        times.append((reactor.seconds() - started) * 1000)
        _out(f"pong from {args.endpoint}: seq={n + 1} time={times[-1]:.3f} ms")
    if times:
        _out(
            f"{len(times)} pings, rtt min/avg/max = {min(times):.3f}/"
            f"{sum(times) / len(times):.3f}/{max(times):.3f} ms"
        )


async def _request(reactor: Any, args: argparse.Namespace, conn: ClientConnection) -> None:
    data: Any = None
    if args.data is not None:
        try:
            data = json.loads(args.data)
        except ValueError as e:
            raise _fail(EXIT_USAGE, f"DATA is not valid JSON: {e}") from None
    reply = await conn.request(args.type, data, timeout=args.timeout)
    _out(json.dumps(reply, ensure_ascii=False))


async def _watch(reactor: Any, args: argparse.Namespace, conn: ClientConnection) -> None:
    done: Deferred[None] = Deferred()
    seen = 0

    def pushed(type_: str, data: Any, conn: ClientConnection) -> None:
        nonlocal seen
        _out(json.dumps({"type": type_, "data": data}, ensure_ascii=False))
        seen += 1
        if args.count and seen >= args.count and not done.called:
            done.callback(None)

    conn.on_any(pushed)
    conn.on_close(lambda c, why: done.called or done.errback(ConnectionClosed("connection lost")))
    await done


async def _run(reactor: Any, args: argparse.Namespace) -> None:
    try:
        conn = await _connect(reactor, args)
        try:
            await {"ping": _ping, "request": _request, "watch": _watch}[args.command](
                reactor, args, conn
            )
        finally:
            conn.close()
    except ServerError as e:
        raise _fail(EXIT_SERVER_ERROR, f"server error {e.code}: {e.message}") from None
    except (RequestTimeout, HandshakeTimeout, twisted_errors.TimeoutError) as e:
        raise _fail(EXIT_TIMEOUT, f"timed out: {e}") from None
    except (ConnectionClosed, twisted_errors.ConnectError, twisted_errors.ConnectionLost) as e:
        raise _fail(EXIT_CONNECTION, f"cannot reach {args.endpoint}: {e}") from None
    except (OSError, ValueError, ImportError) as e:  # unreadable CA/key files, missing extra
        raise _fail(EXIT_USAGE, f"TLS settings: {e}") from None


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    task.react(lambda reactor: ensureDeferred(_run(reactor, args)))

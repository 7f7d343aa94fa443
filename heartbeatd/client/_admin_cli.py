"""The ``heartbeat`` admin subcommands: an HTTP client of the daemon's admin API.

``clients``, ``send``, ``broadcast`` and ``kick`` call ``/clients``, ``/clients/{s}/send``,
``/broadcast`` and ``DELETE /clients/{s}`` with twisted.web's Agent.  Imported by the CLI
only when one of them runs; it needs nothing of the daemon (no heartbeatd.server, no
heartbeatd.daemon, no YAML): it speaks HTTP and JSON.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from twisted.internet import error as twisted_errors
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from heartbeatd.client._cli_common import (
    EXIT_CONNECTION,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SERVER_ERROR,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    CliError,
    Context,
)

__all__ = ["AnswerTooLarge", "admin_command", "read_bounded"]

#: Largest admin answer read (a /clients listing of ~100k clients fits).
MAX_RESPONSE_BYTES = 256 * 1024 * 1024


class AnswerTooLarge(Exception):
    """The admin API's answer is longer than the bound; reading it was stopped."""

    def __init__(self, limit: int, length: int | None = None) -> None:
        said = f" ({length} bytes)" if length is not None else ""
        super().__init__(f"answer larger than {limit} bytes{said}; not read")
        self.limit = limit
        self.length = length


class _BoundedBody(Protocol):
    """Collect a response body up to ``limit`` bytes; beyond, stop reading and fail.

    A chunked answer (a cluster's, or a supervisor's) announces no length, so the bound is
    checked as the bytes arrive, not only against ``Content-Length``.
    """

    def __init__(self, limit: int, done: Deferred[bytes]) -> None:
        self.limit = limit
        self.done = done
        self.chunks: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.chunks.clear()
            self.done.errback(AnswerTooLarge(self.limit))
            if self.transport is not None:
                self.transport.stopProducing()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            # PotentialDataLoss: an answer without a length that ended with its connection;
            # what was read is the whole body (as twisted.web's readBody takes it).
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def read_bounded(response: IResponse, limit: int = MAX_RESPONSE_BYTES) -> Deferred[bytes]:
    """The body of ``response``, or an `AnswerTooLarge` failure past ``limit`` bytes.

    ``response.length`` is an int or `UNKNOWN_LENGTH` (a chunked answer); a known length above
    the bound is refused before a byte is read.
    """
    done: Deferred[bytes] = Deferred()
    length = response.length
    if length is not UNKNOWN_LENGTH and isinstance(length, int) and length > limit:
        response.deliverBody(_Discard())
        done.errback(AnswerTooLarge(limit, length))
        return done
    response.deliverBody(_BoundedBody(limit, done))
    return done


def read_token(path: str | None) -> str:
    if not path:
        return ""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise CliError(EXIT_USAGE, f"cannot read --token-file {path!r}: {reason}") from None
    if not token:
        raise CliError(EXIT_USAGE, f"--token-file {path!r} is empty")
    return token


def base_url(text: str) -> str:
    """``--admin``: a URL, or ``host:port`` as the wire commands take it (plain HTTP)."""
    if "://" not in text:
        text = f"http://{text}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(
            EXIT_USAGE, f"invalid --admin URL {text!r}; expected http://HOST:PORT or HOST:PORT"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise CliError(EXIT_USAGE, f"invalid port in --admin URL {text!r}") from None
    return text.rstrip("/")


async def call(ctx: Context, method: str, path: str, body: Any = None) -> Any:
    """One admin API call; the decoded JSON answer, or a `CliError`."""
    args = ctx.args
    url = base_url(args.admin) + path
    token = read_token(args.token_file)
    headers = Headers({b"accept": [b"application/json"]})
    if token:
        headers.addRawHeader(b"authorization", f"Bearer {token}".encode())
    producer = None
    if body is not None:
        headers.addRawHeader(b"content-type", b"application/json")
        producer = FileBodyProducer(io.BytesIO(json.dumps(body).encode()))
    agent = Agent(ctx.reactor, connectTimeout=args.timeout)

    async def exchange() -> tuple[int, bytes]:
        response = await agent.request(method.encode(), url.encode(), headers, producer)
        return response.code, await read_bounded(response, MAX_RESPONSE_BYTES)

    pending = ensureDeferred(exchange())
    pending.addTimeout(args.timeout, ctx.reactor)
    try:
        interrupted, outcome = await ctx.interrupt.until(pending)
    except CliError:
        raise
    except AnswerTooLarge as e:
        raise CliError(EXIT_SERVER_ERROR, f"{args.admin}: {e}") from None
    except (twisted_errors.TimeoutError, DeferredTimeout, CancelledError):
        raise CliError(EXIT_TIMEOUT, f"no answer from {url} within {args.timeout:g}s") from None
    except ResponseFailed as e:
        # Our deadline cancels the request: Agent reports that as a failed response.
        if any(r.check(CancelledError) for r in e.reasons):
            raise CliError(EXIT_TIMEOUT, f"no answer from {url} within {args.timeout:g}s") from None
        raise CliError(
            EXIT_CONNECTION, f"cannot reach the admin API at {args.admin}: {_why(e)}"
        ) from None
    except twisted_errors.DNSLookupError as e:
        raise CliError(EXIT_CONNECTION, f"cannot resolve the host of {args.admin}: {e}") from None
    except twisted_errors.ConnectionRefusedError:
        raise CliError(
            EXIT_CONNECTION, f"cannot reach the admin API at {args.admin}: connection refused"
        ) from None
    except (twisted_errors.ConnectError, OSError) as e:
        raise CliError(
            EXIT_CONNECTION, f"cannot reach the admin API at {args.admin}: {_why(e)}"
        ) from None
    if interrupted:
        raise CliError(EXIT_INTERRUPTED, "interrupted")
    status, raw = outcome
    try:
        answer = json.loads(raw)
    except ValueError:
        raise CliError(
            EXIT_SERVER_ERROR, f"{args.admin} answered {status} with a body that is not JSON"
        ) from None
    if status >= 400:
        message = answer.get("error") if isinstance(answer, dict) else None
        hint = " (give --token-file)" if status == 401 and not token else ""
        raise CliError(EXIT_SERVER_ERROR, f"admin API: {status} {message or raw[:200]!r}{hint}")
    return answer


def _why(e: BaseException) -> str:
    if isinstance(e, ResponseFailed):
        reasons = [r.getErrorMessage() for r in e.reasons]
        return "; ".join(reasons) or "the response failed"
    return str(e).strip() or type(e).__name__


class _Discard:
    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass


def _message(args: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"type": args.type}
    if args.data is not None:
        message["data"] = args.data
    return message


def _age(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


async def clients(ctx: Context) -> int:
    args = ctx.args
    query = []
    if args.evictions:
        query.append(f"recent_evictions={args.evictions}")
    if getattr(args, "identity", None) is not None:
        query.append(f"identity={quote(args.identity, safe='')}")
    path = "/clients" + ("?" + "&".join(query) if query else "")
    answer = await call(ctx, "GET", path)
    if args.json:
        ctx.print(json.dumps(answer, indent=2, ensure_ascii=False))
        return EXIT_OK
    now = answer.get("now", 0)
    rows = [["SESSION", "PEER", "CONNECTED", "LAST SEEN", "RTT ms", "FRAMES IN", "FRAMES OUT"]]
    for c in answer.get("clients", []):
        rtt = c.get("last_rtt")
        rows.append(
            [
                str(c.get("session")),
                str(c.get("peer")),
                _age(now - c["connected_at"]) if "connected_at" in c else "-",
                _age(c.get("last_seen_ago")) + " ago",
                f"{rtt * 1000:.1f}" if isinstance(rtt, (int, float)) else "-",
                str(c.get("frames_in", "-")),
                str(c.get("frames_out", "-")),
            ]
        )
    for line in _table(rows):
        ctx.print(line)
    ctx.print(f"{answer.get('count', len(rows) - 1)} client(s)")
    evictions = answer.get("recent_evictions")
    if evictions:
        ctx.print("")
        rows = [["SESSION", "PEER", "REASON", "SILENT s", "DETAIL"]]
        for r in evictions:
            rows.append(
                [
                    str(r.get("session")),
                    str(r.get("peer")),
                    str(r.get("reason")),
                    str(r.get("silent_for")),
                    str(r.get("detail", "")),
                ]
            )
        for line in _table(rows):
            ctx.print(line)
    return EXIT_OK


async def send(ctx: Context) -> int:
    session = ctx.args.session
    await call(ctx, "POST", f"/clients/{quote(session, safe='')}/send", _message(ctx.args))
    ctx.print(f"sent {ctx.args.type} to {session}")
    return EXIT_OK


async def broadcast(ctx: Context) -> int:
    answer = await call(ctx, "POST", "/broadcast", _message(ctx.args))
    ctx.print(broadcast_summary(ctx.args.type, answer))
    return EXIT_OK


def broadcast_summary(type: str, answer: dict[str, Any]) -> str:
    """One daemon counts the clients it wrote to; a cluster only the nodes it reached."""
    if "nodes" in answer:
        return f"sent {type} to every client of {answer['nodes']} node(s)"
    return f"sent {type} to {answer.get('sent', 0)} client(s)"


async def kick(ctx: Context) -> int:
    identity = getattr(ctx.args, "identity", None)
    if identity is not None:
        answer = await call(ctx, "DELETE", f"/identities/{quote(identity, safe='')}")
        ctx.print(f"disconnected {answer.get('disconnected', 0)} session(s) of {identity}")
        return EXIT_OK
    session = ctx.args.session
    await call(ctx, "DELETE", f"/clients/{quote(session, safe='')}")
    ctx.print(f"disconnected {session}")
    return EXIT_OK


async def admin_command(ctx: Context) -> int:
    command = {"clients": clients, "send": send, "broadcast": broadcast, "kick": kick}
    return await command[ctx.args.command](ctx)

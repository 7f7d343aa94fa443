"""Cross-site checks for every admin listener: ``Host``, ``Origin`` and ``Content-Type``.

The admin API needs no token on loopback, so a web page a local user opens must not be able
to drive it: a browser sends a page's requests with the page's ``Origin`` (a ``no-cors``
``fetch`` still reaches the server), and DNS rebinding makes a hostile name resolve to
127.0.0.1 while the ``Host`` header still names the attacker's site.  `AdminGuard.refusal` runs
at the header stage (`heartbeatd.daemon.admin.AdminChannel`), before the token and before a
byte of the body, for the daemon's admin site and the supervisor's alike:

- ``Host`` must name the listener: a loopback name or address, the address it is bound to, or
  one of ``admin.allowed_hosts`` (the port is not compared); else 421 ``forbidden_host``;
- ``Origin``, when present, must be this very listener (``http(s)://`` + the ``Host`` header);
  else 403 ``forbidden_origin``;
- a request with a body (or any ``POST``/``PUT``/``PATCH``) that a route takes must say
  ``Content-Type: application/json``: a page cannot send that cross-site without a CORS
  preflight, which we never grant; else 415 ``unsupported_media_type``.  A method no route
  takes at that path does nothing: it goes on to its JSON 405 (or 404), body unread.

UNIX-socket listeners skip the ``Host`` check: a browser cannot reach them.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.web.http import Headers

from heartbeatd.wire.envelope import DEFAULT_MAX_JSON_DEPTH, TOO_DEEP, ProtocolError, decode_json

__all__ = ["LOOPBACK_NAMES", "AdminGuard", "BadBody", "parse_body"]

#: Host names that always mean this machine (RFC 6761 reserves ``localhost`` and its subdomains).
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})

_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})

Refusal = tuple[int, str, str]


def split_host(value: str) -> tuple[str, str]:
    """``(host, port)`` of a ``Host`` header value (``[::1]:9100``, ``a.b``, ``1.2.3.4:80``)."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, rest.removeprefix(":")
    host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    return host, port


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AdminGuard:
    """Refuses requests a web page (or a rebound DNS name) could have sent; see the module."""

    def __init__(self, allowed_hosts: tuple[str, ...] = ()) -> None:
        self.allowed_hosts = frozenset(h.strip().lower().strip("[]") for h in allowed_hosts)

    def host_allowed(self, host: str, listener: Any) -> bool:
        if _is_loopback(host) or host in self.allowed_hosts:
            return True
        bound = getattr(listener, "host", None)
        return bound is not None and host == str(bound).lower() and bound not in ("0.0.0.0", "::")

    def refusal(
        self,
        method: bytes,
        headers: Headers,
        length: int | None,
        listener: Any = None,
        routed: bool = True,
    ) -> Refusal | None:
        """``(status, message, code)`` when the request must be refused, else None.

        ``routed`` is False when no route takes ``method`` at the request's path
        (`heartbeatd.daemon.admin_routes.routed`): it then answers 405 or 404 and runs
        nothing, so its ``Content-Type`` does not matter.
        """
        raw_host = (headers.getRawHeaders(b"host") or [b""])[0].decode("latin-1")
        if isinstance(listener, (IPv4Address, IPv6Address)):
            host, _ = split_host(raw_host)
            if not host or not self.host_allowed(host, listener):
                return (
                    421,
                    "the Host header does not name this admin listener "
                    "(add the name to admin.allowed_hosts if it is yours)",
                    "forbidden_host",
                )
        origin = headers.getRawHeaders(b"origin")
        if origin is not None:
            value = origin[0].decode("latin-1").strip().lower()
            scheme, sep, rest = value.partition("://")
            same = bool(sep) and scheme in ("http", "https") and rest == raw_host.strip().lower()
            if not same:
                return (
                    403,
                    "cross-site request refused: the Origin is not this admin listener",
                    "forbidden_origin",
                )
        has_body = bool(length) or headers.hasHeader(b"transfer-encoding")
        if routed and (method in _BODY_METHODS or has_body):
            kind = (headers.getRawHeaders(b"content-type") or [b""])[0]
            if kind.split(b";", 1)[0].strip().lower() != b"application/json":
                return (
                    415,
                    "the body must be Content-Type: application/json",
                    ("unsupported_media_type"),
                )
        return None


class BadBody(ValueError):
    """An admin request body that is not JSON, or nests too deep: a typed 400."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_body(data: bytes) -> Any:
    """An admin request's JSON body (empty: None), parsed with the protocol's depth bound.

    ``admin.max_body_bytes`` bounds its size before it is read; a body nesting deeper than
    the wire's limit is refused as ``too_deep`` instead of exhausting the parser's stack.
    """
    if not data:
        return None
    try:
        return decode_json(data, DEFAULT_MAX_JSON_DEPTH)
    except ProtocolError as e:  # decode_json already tells nesting (too_deep) from bad JSON
        if e.code == TOO_DEEP:
            text = f"the body nests deeper than {DEFAULT_MAX_JSON_DEPTH} levels"
            raise BadBody(TOO_DEEP, text) from None
        raise BadBody(e.code, e.message.split(":", 1)[0]) from None

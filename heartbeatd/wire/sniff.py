"""Recognising a foreign protocol from a connection's first bytes (sans-IO).

A browser, a TLS client, an SSH client or redis-cli pointed at our port should get a clear
answer at once, whatever ``max_frame_bytes`` is.  Without this, an HTTP request on the int32
port is refused only by luck ("GET " reads as a 1.2 GB length), and a listener configured
for larger frames would wait for the rest of the "frame".  Every signature below is
impossible as the start of a valid frame in either framing, except where noted.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DESCRIPTIONS", "SNIFF_BYTES", "identify"]

#: What each kind `identify` returns looks like, for error messages and logs.
DESCRIPTIONS: Final = {
    "http": "an HTTP request",
    "http2": "an HTTP/2 connection preface",
    "tls": "a TLS ClientHello (a TLS client on a plaintext listener)",
    "ssh": "an SSH client's banner",
    "resp": "a Redis (RESP) command",
}

_HTTP_METHODS: Final = (
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
)

#: (prefix, kind), most specific first.
_SIGNATURES: Final = (
    (b"PRI * HTTP/2", "http2"),
    *((method, "http") for method in _HTTP_METHODS),
    (b"SSH-", "ssh"),
)

#: How many leading bytes `identify` may need to decide.
SNIFF_BYTES: Final = max(len(prefix) for prefix, _ in _SIGNATURES)


def _tls_record(head: bytes) -> str | None:
    # A TLS handshake record: content type 22, protocol major version 3, minor 0..4.
    if head[:1] != b"\x16":
        return None
    if len(head) < 3:
        return "" if head[1:2] in (b"", b"\x03") else None
    return "tls" if head[1] == 3 and head[2] <= 4 else None


def _resp(head: bytes) -> str | None:
    # A Redis RESP array: '*' then the element count's digits.
    if head[:1] != b"*":
        return None
    if len(head) < 2:
        return ""
    return "resp" if head[1:2].isdigit() else None


def identify(head: bytes) -> str | None:
    """What ``head`` (a connection's first bytes) looks like.

    Returns a kind of `DESCRIPTIONS` (``"http"``), ``""`` while ``head`` is still a prefix of
    some signature (read more), or None when it matches none (it may be ours).
    """
    for probe in (_tls_record, _resp):
        found = probe(head)
        if found is not None:
            return found
    undecided = False
    for prefix, kind in _SIGNATURES:
        if head.startswith(prefix):
            return kind
        if prefix.startswith(head):
            undecided = True
    return "" if undecided else None

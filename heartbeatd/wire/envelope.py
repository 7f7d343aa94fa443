"""The JSON envelope every frame body carries, and its error codes (sans-IO, no Twisted).

An envelope is ``{"type": str, "id": str | int (optional), "data": any (optional)}``.  Replies
carry the request's ``type`` and ``id``; errors are ``{"type": "error", "id": ..., "error":
{"code": ..., "message": ...}}``.  Unknown extra keys are ignored, so later versions can add
fields without breaking older peers.
"""

from __future__ import annotations

from typing import Any, Final

try:  # orjson is several times faster; PyPy has no build of it, so fall back to the stdlib.
    import orjson

    _dumps = orjson.dumps
    _loads = orjson.loads
    JSON_BACKEND: Final = "orjson"
except ImportError:  # pragma: no cover - exercised only where orjson is missing
    import json

    def _reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()

    def _loads(body: bytes) -> Any:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)

    JSON_BACKEND: Final = "json"  # type: ignore[misc]

__all__ = [
    "BAD_FRAME",
    "BAD_JSON",
    "BAD_MESSAGE",
    "DEFAULT_MAX_JSON_DEPTH",
    "FRAME_TIMEOUT",
    "FRAME_TOO_LARGE",
    "INTERNAL_ERROR",
    "JSON_BACKEND",
    "OMIT",
    "OVERLOADED",
    "TOO_DEEP",
    "TOO_MANY_CONNECTIONS",
    "UNKNOWN_TYPE",
    "WRONG_PROTOCOL",
    "Message",
    "ProtocolError",
    "decode_json",
    "decode_message",
    "encode_error",
    "encode_json",
    "encode_message",
    "exceeds_depth",
    "nesting_exceeds",
]

# Error codes that appear in ``error.code`` on the wire (documented in docs/protocol.md).
BAD_JSON: Final = "bad_json"
BAD_MESSAGE: Final = "bad_message"
UNKNOWN_TYPE: Final = "unknown_type"
FRAME_TOO_LARGE: Final = "frame_too_large"
BAD_FRAME: Final = "bad_frame"
INTERNAL_ERROR: Final = "internal_error"
TOO_MANY_CONNECTIONS: Final = "too_many_connections"
TOO_DEEP: Final = "too_deep"
WRONG_PROTOCOL: Final = "wrong_protocol"
FRAME_TIMEOUT: Final = "frame_timeout"
OVERLOADED: Final = "overloaded"

#: Deepest JSON nesting accepted (arrays and objects).  orjson parses up to 1024 levels but
#: encodes only about 254, so anything deeper than what we can echo back is refused at the
#: door with ``too_deep`` instead of failing later inside a handler or the reply encoder.
DEFAULT_MAX_JSON_DEPTH: Final = 64

#: Pass as ``data`` to leave the key out of an envelope entirely.
OMIT: Final = object()


class ProtocolError(Exception):
    """A message that cannot be handled; becomes an error frame carrying ``code``."""

    def __init__(self, code: str, message: str, id: str | int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id


class Message:
    """One decoded envelope (``bare``: a plain JSON value delivered under a type)."""

    __slots__ = ("bare", "data", "id", "type")

    def __init__(
        self, type: str, id: str | int | None = None, data: Any = None, bare: bool = False
    ) -> None:
        self.type = type
        self.id = id
        self.data = data
        self.bare = bare

    def __repr__(self) -> str:
        return f"Message(type={self.type!r}, id={self.id!r}, data={self.data!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (self.type, self.id, self.data) == (other.type, other.id, other.data)


#: Serialise any JSON value to UTF-8 bytes (the backend's own function: it is on the hot path).
encode_json = _dumps

#: Raw parser for the hot path: raises ValueError on bad input (callers then take the slow path).
decode_json_unchecked = _loads


def may_be_deeper_than(body: bytes, limit: int) -> bool:
    """Cheap, exact-enough pre-check: nesting deeper than ``limit`` needs more brackets.

    Counts at C speed, but over every byte: about 1.5 ns a byte, which is more than parsing
    a long string costs. `exceeds_depth` asks the parsed value first.
    """
    return body.count(b"[") + body.count(b"{") > limit


def nesting_exceeds(value: Any, limit: int) -> bool:
    """True when ``value`` nests arrays/objects more than ``limit`` levels deep."""
    return bool(_walk_deeper_than(value, limit, None))


def _walk_deeper_than(value: Any, limit: int, budget: int | None) -> bool | None:
    """Walk ``value`` level by level: True past ``limit`` levels, False if it ends first,
    None once more than ``budget`` members were looked at (no budget: walk it all)."""
    level: list[Any] = [value]
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        nested: list[Any] = []
        for container in level:
            members = container.values() if type(container) is dict else container
            if budget is not None:
                budget -= len(members)
                if budget < 0:
                    return None
            nested += [m for m in members if type(m) is dict or type(m) is list]
        level = nested
    return False


#: Members a depth check walks before it falls back to counting brackets first.
_WALK_BUDGET: Final = 256


def exceeds_depth(value: Any, body: bytes, limit: int) -> bool:
    """True when the parsed ``value`` of ``body`` nests deeper than ``limit`` levels.

    Cheapest test first. A body too short to nest that deep is not checked. A value with
    few members (an envelope, however long its strings) is walked at once: counting the
    brackets of a 256 KiB body costs more than parsing it. A value with many members (a
    long array) is walked only if the bracket count allows that depth.
    """
    if len(body) < 2 * limit + 2 or (type(value) is not dict and type(value) is not list):
        return False
    deeper = _walk_deeper_than(value, limit, _WALK_BUDGET)
    if deeper is None:
        return may_be_deeper_than(body, limit) and nesting_exceeds(value, limit)
    return deeper


def decode_json(body: bytes, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> Any:
    """Parse a UTF-8 JSON body; raise `ProtocolError` when it is not JSON (``bad_json``) or
    nests deeper than ``max_depth`` (``too_deep``)."""
    try:
        value = _loads(body)
    except RecursionError:  # the stdlib parser (PyPy) recurses on the C stack's behalf
        raise _parser_depth_error(max_depth) from None
    except (ValueError, UnicodeDecodeError) as e:
        # orjson refuses nesting past 1024 levels itself, before our own walk could run
        # ("recursion depth exceeded" in 3.9.15, "depth limit exceeded" later).
        if "depth" in str(e):
            raise _parser_depth_error(max_depth) from None
        raise ProtocolError(BAD_JSON, _bad_json_message(body, e)) from None
    if exceeds_depth(value, body, max_depth):
        raise ProtocolError(
            TOO_DEEP, f"JSON nests deeper than {max_depth} levels (the limit)", _id_of(value)
        )
    return value


def _bad_json_message(body: bytes, error: Exception) -> str:
    """What is wrong with a body the parser refused.  Bytes that are not UTF-8 are named by
    offset: orjson says "surrogates not allowed" of any of them."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"body is not valid UTF-8: byte 0x{body[e.start]:02x} at offset {e.start}"
    return f"body is not valid UTF-8 JSON: {error}"


def _parser_depth_error(max_depth: int) -> ProtocolError:
    return ProtocolError(TOO_DEEP, f"JSON nests deeper than {max_depth} levels (the limit)")


def _id_of(value: Any) -> str | int | None:
    id = value.get("id") if isinstance(value, dict) else None
    return id if id is not None and _valid_id(id) else None


def _valid_id(value: Any) -> bool:
    # bool is an int subclass, but true/false are not usable request ids.
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def as_message(value: Any) -> Message:
    """Check that a parsed JSON value is an envelope; raise ``bad_message`` if not."""
    if not isinstance(value, dict):
        raise ProtocolError(BAD_MESSAGE, f"expected a JSON object, got {type(value).__name__}")
    id = value.get("id")
    if id is not None and not _valid_id(id):
        raise ProtocolError(BAD_MESSAGE, "'id' must be a string or an integer")
    type_ = value.get("type")
    if not isinstance(type_, str) or not type_:
        raise ProtocolError(BAD_MESSAGE, "'type' must be a non-empty string", id)
    if type_ == "error" and "data" not in value:
        # An error frame's payload is its "error" object; expose it where readers look.
        return Message(type_, id, value.get("error"))
    return Message(type_, id, value.get("data"))


def decode_message(
    body: bytes, bare_type: str | None = None, max_depth: int = DEFAULT_MAX_JSON_DEPTH
) -> Message:
    """Decode one frame body into a `Message`, or raise `ProtocolError`.

    With ``bare_type`` (seed framing), a JSON value that is not an envelope, i.e. not an
    object with a string ``type``, is not an error: it arrives as a bare message of that type.
    """
    value = decode_json(body, max_depth)
    if bare_type is not None and not (
        isinstance(value, dict) and isinstance(value.get("type"), str)
    ):
        return Message(bare_type, None, value, bare=True)
    return as_message(value)


def encode_message(type: str, data: Any = OMIT, id: str | int | None = None) -> bytes:
    """Encode an envelope; ``data`` is omitted when not given, ``id`` when None."""
    envelope: dict[str, Any] = {"type": type}
    if id is not None:
        envelope["id"] = id
    if data is not OMIT:
        envelope["data"] = data
    return _dumps(envelope)


def encode_error(
    code: str, message: str, id: str | int | None = None, retry_after: float | None = None
) -> bytes:
    """Encode an error envelope; ``id`` is null when the request's id is unknown.

    ``retry_after``: seconds until a refusal of a rate (``rate_limited``) would not happen
    again; the ``error`` object carries it only when given."""
    error: dict[str, Any] = {"code": code, "message": message}
    if retry_after is not None:
        error["retry_after"] = retry_after
    return _dumps({"type": "error", "id": id, "error": error})

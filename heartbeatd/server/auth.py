"""Who a client is: token authentication in the first frame, a custom check, or its certificate.

With ``auth.mode: token`` or ``custom`` the hello says ``"auth": "required"`` and a client must
send ``{"type": "auth", "id": ..., "data": {"token": "..."}}`` within ``auth.timeout`` seconds.
Until then it may only ``ping`` (and answer our pings): anything else is answered
``unauthenticated`` and the connection closed; a wrong token gets ``auth_failed`` and a close.
The protocol holds an `AuthGate` only while the client is unauthenticated, so an authenticated
connection pays one ``is None`` test per read for all this.

Tokens are compared in constant time and never logged; the identity they map to is (it is on
the session, in ``/clients`` and in the close log lines).
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from heartbeatd._logging import get_logger
from heartbeatd._validation import ConfigError
from heartbeatd.wire.envelope import Message, encode_message

__all__ = [
    "AUTH_FAILED",
    "AUTH_TIMEOUT",
    "BAD_IDENTITY",
    "TOKEN_EXPIRED",
    "UNAUTHENTICATED",
    "AuthGate",
    "Authenticator",
    "TokenRefused",
    "TokenTable",
    "Verified",
    "load_authenticator",
    "peer_certificate_identity",
]

log = get_logger(__name__)

# Error codes on the wire (docs/protocol.md, docs/security.md).
UNAUTHENTICATED = "unauthenticated"
AUTH_FAILED = "auth_failed"
AUTH_TIMEOUT = "auth_timeout"
BAD_IDENTITY = "bad_identity"
#: A signed token whose ``exp`` passed (``auth.mode: jwt``, heartbeatd.server.signed_tokens).
TOKEN_EXPIRED = "token_expired"

#: What an unauthenticated client may send besides ``auth``: a ping, and the answers to ours.
_ALLOWED_BEFORE_AUTH = frozenset({"ping", "pong", "error"})
#: Messages held while an asynchronous authenticator decides (the rest of a pipelined read).
MAX_HELD = 64
#: Longest token looked at: a bound on what we hash and compare.
MAX_TOKEN_BYTES = 4096
#: Longest identity accepted (from the tokens file or an authenticator): it is logged and
#: listed, so it is bounded and printable (a newline in one would forge a log line).
MAX_IDENTITY_CHARS = 256


def valid_identity(identity: object) -> bool:
    """A non-empty printable string of at most `MAX_IDENTITY_CHARS` characters."""
    return (
        isinstance(identity, str)
        and 0 < len(identity) <= MAX_IDENTITY_CHARS
        and identity.isprintable()
    )


CheckFn = Callable[[str, str], Any]


class TokenRefused(Exception):
    """A token was not accepted: ``code`` (``auth_failed``, ``token_expired``) and why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Verified:
    """What a checked connect token says: the identity, its claims, when it expires."""

    __slots__ = ("claims", "exp", "identity")

    def __init__(self, identity: str, claims: dict[str, Any], exp: float) -> None:
        self.identity = identity
        self.claims = claims
        self.exp = exp

    @property
    def channels(self) -> list[str]:
        value = self.claims.get("channels")
        if not isinstance(value, list):
            return []
        return [c for c in value if isinstance(c, str)]


# -- tokens -----------------------------------------------------------------------------------


class TokenTable:
    """``identity:token`` lines (or ``identity:sha256:<hex>``), checked in constant time.

    Every entry is compared, whether or not an earlier one matched, so the time taken does not
    tell which entry (or how much of a token) was right.
    """

    def __init__(self, entries: list[tuple[str, bytes]]) -> None:
        #: (identity, sha256 digest of the token)
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def parse(cls, text: str, source: str = "auth.tokens_file") -> TokenTable:
        entries: list[tuple[str, bytes]] = []
        errors: list[str] = []
        seen: dict[bytes, tuple[int, str]] = {}  # digest -> (line, identity)
        text = text.removeprefix("\ufeff")  # a BOM from an editor is not part of an identity
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            identity, sep, secret = line.partition(":")
            identity, secret = identity.strip(), secret.strip()
            if not sep or not identity or not secret:
                # Never echo the line: it may hold a token.
                errors.append(
                    f"{source}: line {number} is not allowed; expected 'identity:token' or "
                    "'identity:sha256:<64 hex digits>'"
                )
                continue
            if secret.startswith("sha256:"):
                digest_hex = secret[len("sha256:") :]
                try:
                    digest = bytes.fromhex(digest_hex)
                except ValueError:
                    digest = b""
                if len(digest) != 32:
                    errors.append(
                        f"{source}: line {number} ({identity}) is not allowed; expected "
                        "sha256: followed by 64 hex digits"
                    )
                    continue
            else:
                digest = hashlib.sha256(secret.encode()).digest()
            if not valid_identity(identity):
                errors.append(
                    f"{source}: line {number} is not allowed; expected an identity of at most "
                    f"{MAX_IDENTITY_CHARS} printable characters"
                )
                continue
            if digest in seen:
                first, other = seen[digest]
                errors.append(
                    f"{source}: line {number} ({identity}) has the same token as line {first} "
                    f"({other}); expected one identity per token"
                )
                continue
            seen[digest] = (number, identity)
            entries.append((identity, digest))
        if errors:
            raise ConfigError(errors)
        if not entries:
            raise ConfigError([f"{source}: no identity:token entries; expected at least one"])
        return cls(entries)

    @classmethod
    def load(cls, path: str) -> TokenTable:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(
                [f"auth.tokens_file: {path!r} cannot be read: {e.strerror or e}"]
            ) from None
        except UnicodeDecodeError:
            raise ConfigError([f"auth.tokens_file: {path!r} is not UTF-8 text"]) from None
        return cls.parse(text, f"auth.tokens_file {path!r}")

    def holds(self, identity: str, digest: bytes) -> bool:
        """Whether ``identity`` still has the token whose SHA-256 is ``digest`` (reload)."""
        found = False
        for entry_identity, entry_digest in self._entries:
            if hmac.compare_digest(digest, entry_digest) and entry_identity == identity:
                found = True
        return found

    def identify(self, token: str, peer: str = "") -> str | None:
        """The identity whose token this is, or None."""
        offered = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found: str | None = None
        for identity, digest in self._entries:
            if hmac.compare_digest(offered, digest) and found is None:
                found = identity
        return found


# -- the authenticator (one per factory) -------------------------------------------------------


class Authenticator:
    """Checks tokens: ``check(token, peer)`` returns an identity, None, or a Deferred of either."""

    def __init__(
        self,
        check: CheckFn,
        timeout: float,
        description: str,
        holds: Callable[[str, bytes], bool] | None = None,
    ) -> None:
        self.check = check
        self.timeout = timeout
        self.description = description
        #: ``holds(identity, token_digest)``: whether a connection authenticated earlier is
        #: still valid (the tokens file after a reload); None when it cannot be told (custom).
        self.holds = holds
        #: ``after_login(connection, verified)`` when ``check`` returned a `Verified` (JWT).
        self.after_login: Callable[[Any, Verified], None] | None = None

    def gate(self, connection: _Guarded, clock: IReactorTime) -> AuthGate:
        return AuthGate(self, connection, clock)


def _import_function(spec: str) -> CheckFn:
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        function = getattr(module, name)
    except Exception as e:
        raise ConfigError(
            [f"auth.authenticator: {spec!r} cannot be loaded: {type(e).__name__}: {e}"]
        ) from None
    if not callable(function):
        raise ConfigError([f"auth.authenticator: {spec!r} is not callable"])
    return function  # type: ignore[no-any-return]


def load_authenticator(auth: Any) -> Authenticator | None:
    """The `Authenticator` for an ``auth:`` config section (None for ``mode: none``).

    Reads the tokens file now (at start and on SIGHUP), so a bad file is a config error and
    never a surprise on the first connection.
    """
    if auth.mode == "token":
        table = TokenTable.load(auth.tokens_file)
        return Authenticator(table.identify, auth.timeout, f"{len(table)} token(s)", table.holds)
    if auth.mode == "custom":
        return Authenticator(_import_function(auth.authenticator), auth.timeout, auth.authenticator)
    return None  # mode jwt: heartbeatd.server.signed_tokens.load_authenticator


# -- one connection's gate -------------------------------------------------------------------


class _Guarded(Protocol):
    """What the gate needs of a server connection (`heartbeatd.server.connection.Connection`)."""

    session_id: str
    peer: str
    identity: str | None
    connected: bool
    close_reason: str | None

    def auth_succeeded(
        self,
        identity: str,
        reply: bytes,
        held: list[Message],
        digest: bytes = b"",
        then: Callable[[], None] | None = None,
    ) -> None: ...

    def auth_refused(self, code: str, message: str, id: Any, reason: str) -> None: ...


class AuthGate:
    """Stands between an unauthenticated connection and the handlers."""

    __slots__ = ("_authenticator", "_connection", "_digest", "_held", "_state", "_timer")

    def __init__(
        self, authenticator: Authenticator, connection: _Guarded, clock: IReactorTime
    ) -> None:
        self._authenticator = authenticator
        self._connection = connection
        self._held: list[Message] | None = None  # a list while an async check runs
        self._digest = b""  # SHA-256 of the token offered (re-checked on reload)
        self._state = "waiting"  # waiting | checking | refused
        self._timer: IDelayedCall | None = clock.callLater(authenticator.timeout, self._timed_out)

    def stop(self) -> None:
        """The connection is gone or authenticated: no timer may fire for it."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def intercept(self, message: Message) -> bool:
        """True when the gate dealt with ``message``; False lets it through (ping, pong)."""
        if self._state == "refused":
            return True
        if self._state == "checking":
            held = self._held
            assert held is not None
            if len(held) >= MAX_HELD:
                self._refuse(
                    UNAUTHENTICATED,
                    f"more than {MAX_HELD} messages sent while authentication was checked",
                    message.id,
                )
            else:
                held.append(message)
            return True
        if message.type in _ALLOWED_BEFORE_AUTH:
            return False
        if message.type != "auth":
            self._refuse(
                UNAUTHENTICATED,
                f"authenticate first: {message.type!r} is not allowed before 'auth'",
                message.id,
            )
            return True
        data = message.data
        token = data.get("token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES:
            self._refuse(AUTH_FAILED, 'expected data {"token": "<token>"}', message.id)
            return True
        self._state = "checking"
        self._held = []
        if self._authenticator.holds is not None:
            self._digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        peer = self._connection.peer
        result = maybeDeferred(self._authenticator.check, token, peer)
        result.addCallbacks(self._checked, self._check_failed, (message,), None, (message,))
        return True

    def _checked(self, identity: Any, message: Message) -> None:
        conn = self._connection
        if not conn.connected or self._state != "checking":
            return
        verified = None
        if isinstance(identity, Verified):  # a signed token: its claims and expiry too
            verified, identity = identity, identity.identity
        if not isinstance(identity, str) or not identity:
            self._refuse(AUTH_FAILED, "the token was not accepted", message.id)
            return
        if not valid_identity(identity):
            limiter = getattr(getattr(conn, "factory", None), "log_limiter", None)
            if limiter is None or limiter.allow("auth.bad_identity"):
                log.warn(
                    "auth.authenticator returned an identity that is not allowed for client "
                    "{session} ({peer}): {length} characters, printable: {printable}; refused",
                    session=conn.session_id,
                    peer=conn.peer,
                    length=len(identity),
                    printable=identity.isprintable(),
                )
            self._refuse(
                BAD_IDENTITY,
                f"the identity is not allowed (at most {MAX_IDENTITY_CHARS} printable characters)",
                message.id,
            )
            return
        self.stop()
        held, self._held = self._held or [], None
        self._state = "done"
        log.info(
            "Client {session} ({peer}) authenticated as {identity}",
            session=conn.session_id,
            peer=conn.peer,
            identity=identity,
        )
        if verified is not None:
            conn.claims = verified.claims  # type: ignore[attr-defined]
        after_login = self._authenticator.after_login
        then = None
        if verified is not None and after_login is not None:
            claimed = verified

            def then() -> None:  # after the auth reply is written: its pushes follow it
                if conn.connected and conn.close_reason is None:
                    after_login(conn, claimed)

        conn.auth_succeeded(
            identity,
            encode_message("auth", {"identity": identity}, message.id),
            held,
            self._digest,
            then,
        )

    def _check_failed(self, failure: Failure, message: Message) -> None:
        conn = self._connection
        if failure.check(TokenRefused):  # a bad signed token: a typed refusal, no traceback
            refused: TokenRefused = failure.value  # type: ignore[assignment]
            limiter = getattr(getattr(conn, "factory", None), "log_limiter", None)
            if limiter is None or limiter.allow("auth.token:" + refused.code):
                log.info(
                    "Refused the token of client {session} ({peer}): {code} ({why})",
                    session=conn.session_id,
                    peer=conn.peer,
                    code=refused.code,
                    why=refused.message,
                )
            if conn.connected and self._state == "checking":
                self._refuse(refused.code, refused.message, message.id)
            return
        # The authenticator's own failure: logged for the operator (the token is not in it
        # unless the application put it there), answered as a refusal on the wire.  Rate
        # limited: a directory that is down would otherwise log a traceback per login.
        limiter = getattr(getattr(conn, "factory", None), "log_limiter", None)
        if limiter is None or limiter.allow("auth.authenticator"):
            log.failure(
                "auth.authenticator failed for client {session} ({peer})",
                failure,
                session=conn.session_id,
                peer=conn.peer,
            )
        if conn.connected and self._state == "checking":
            self._refuse(AUTH_FAILED, "the token could not be checked", message.id)

    def _timed_out(self) -> None:
        self._timer = None
        if self._state in ("waiting", "checking"):
            self._refuse(
                AUTH_TIMEOUT,
                f"no successful auth within auth.timeout ({self._authenticator.timeout:g}s)",
                None,
            )

    def _refuse(self, code: str, text: str, id: Any) -> None:
        self._state = "refused"
        self._held = None
        self.stop()
        self._connection.auth_refused(code, text, id, code)


def peer_certificate_identity(transport: Any, with_issuer: bool = False) -> str | None:
    """The subject of a TLS client's certificate (``CN=alice,O=Example``), or None.

    ``with_issuer`` (``tls.client_identity: issuer_and_subject``) appends the issuer:
    ``CN=alice,O=Example;issuer=CN=Example CA`` (RFC 4514 escapes ``;`` inside values).
    """
    try:
        handle = transport.getHandle()
        get = handle.get_peer_certificate
    except Exception:  # not a pyOpenSSL connection: no TLS here
        return None
    try:
        cert = get(as_cryptography=True)
    except TypeError:  # pyOpenSSL before 24.3: convert its X509 ourselves
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            x509 = get()
            cert = x509.to_cryptography() if x509 is not None else None
    except Exception:
        return None
    if cert is None:
        return None
    subject = str(cert.subject.rfc4514_string())
    if not subject:
        return None
    return f"{subject};issuer={cert.issuer.rfc4514_string()}" if with_issuer else subject

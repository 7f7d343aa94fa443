"""Signed tokens (JWT, checked by PyJWT): who connects, for how long, and channel tokens.

``auth.mode: jwt``: the ``auth`` message carries a JWT signed with the key in ``auth.jwt``
(HS256 with ``hmac_secret_file``; RS256 or ES256 with ``public_key_file``, a PEM public key or
a JWKS file).  Only the key's own algorithm is accepted (never ``none``, never HS256 with a
public key); ``exp`` and ``sub`` are required, ``aud``/``iss`` checked when configured; ``sub``
is the identity and the claims are the session's (``session.claims``).

While the connection lives its ``exp`` holds: ``auth.jwt.refresh_before`` seconds before it the
server pushes ``{"type": "refresh"}``; the client answers ``{"type": "refresh", "data":
{"token": ...}}`` with a token for the same ``sub``; a connection whose token expired is sent
``token_expired`` and closed.  A ``channels`` claim (a list of names) subscribes the connection
at connect.  A namespace with ``subscribe: token`` takes a channel token in the subscribe
request: its ``channel`` claim must name that channel and its ``sub`` this connection's
identity.

PyJWT is the ``heartbeatd[jwt]`` extra, imported only when a JWT key is configured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IDelayedCall

from heartbeatd._logging import get_logger
from heartbeatd._validation import ConfigError
from heartbeatd.config import AuthConfig, JwtConfig
from heartbeatd.server import auth as auth_module
from heartbeatd.server.auth import (
    AUTH_FAILED,
    MAX_TOKEN_BYTES,
    TOKEN_EXPIRED,
    Authenticator,
    TokenRefused,
    Verified,
    valid_identity,
)
from heartbeatd.server.handlers import NO_REPLY, HandlerError, HandlerRegistry, Request
from heartbeatd.wire.envelope import encode_error

__all__ = [
    "BAD_TOKEN",
    "TOKEN_EXPIRED",
    "JwtVerifier",
    "TokenRefused",
    "Verified",
    "load_authenticator",
    "load_token_verifier",
    "register",
]

log = get_logger(__name__)

#: A channel token that is not valid (docs/security.md#channels).
BAD_TOKEN = "bad_token"
#: Least bytes of an HMAC secret (RFC 7518 3.2: at least the hash's size).
MIN_HMAC_BYTES = 32
#: The algorithm a public key is used with (only that one is accepted).
_ALGORITHM_OF_KEY = {"RSA": "RS256", "EC": "ES256"}


def _jwt() -> Any:
    try:
        import jwt
    except ImportError:
        raise ConfigError(
            [
                "auth.jwt: signed tokens need PyJWT; expected it installed "
                "(pip install 'heartbeatd[jwt]')"
            ]
        ) from None
    return jwt


class JwtVerifier:
    """Checks JWTs against the configured key; ``decode`` raises `TokenRefused`."""

    def __init__(
        self, config: JwtConfig, timeout: float = 5.0, now: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.timeout = timeout
        #: Wall-clock time: ``exp`` is an absolute time (tests pass their own).
        self.now = now
        self._jwt = _jwt()
        #: kid -> (key, algorithm); the key of a PEM or secret file is under "".
        self._keys: dict[str, tuple[Any, str]] = {}
        self._jwks = False
        if config.hmac_secret_file:
            secret = self._read("auth.jwt.hmac_secret_file", config.hmac_secret_file)
            secret = secret.rstrip(b"\r\n")
            if len(secret) < MIN_HMAC_BYTES:
                raise ConfigError(
                    [
                        f"auth.jwt.hmac_secret_file: {config.hmac_secret_file!r} holds "
                        f"{len(secret)} bytes; expected at least {MIN_HMAC_BYTES}"
                    ]
                )
            self._keys[""] = (secret, "HS256")
        else:
            self._load_public(config.public_key_file)
        self.description = (
            f"JWT ({', '.join(sorted({alg for _, alg in self._keys.values()}))}"
            f"{', aud ' + config.audience if config.audience else ''}"
            f"{', iss ' + config.issuer if config.issuer else ''})"
        )

    @staticmethod
    def _read(key: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ConfigError([f"{key}: {path!r} cannot be read: {e.strerror or e}"]) from None

    def _load_public(self, path: str) -> None:
        data = self._read("auth.jwt.public_key_file", path)
        jwt = self._jwt
        if data.lstrip().startswith(b"{"):
            try:
                keys = jwt.PyJWKSet.from_json(data.decode()).keys
            except Exception as e:
                raise ConfigError(
                    [f"auth.jwt.public_key_file: {path!r} is not a usable JWKS: {e}"]
                ) from None
            self._jwks = True
            for jwk in keys:
                alg = _ALGORITHM_OF_KEY.get(jwk.key_type)
                if alg is None or (jwk.algorithm_name not in (alg, None)):
                    continue
                self._keys[jwk.key_id or ""] = (jwk.key, alg)
            if not self._keys:
                raise ConfigError([f"auth.jwt.public_key_file: {path!r} has no RS256 or ES256 key"])
            return
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        try:
            key = load_pem_public_key(data)
        except Exception:
            raise ConfigError(
                [f"auth.jwt.public_key_file: {path!r} is not a PEM public key or a JWKS"]
            ) from None
        if isinstance(key, rsa.RSAPublicKey):
            self._keys[""] = (key, "RS256")
        elif isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
            self._keys[""] = (key, "ES256")
        else:
            raise ConfigError(
                [
                    f"auth.jwt.public_key_file: {path!r} is not allowed; expected an RSA key "
                    "(RS256) or an EC P-256 key (ES256)"
                ]
            )

    def decode(self, token: Any, required: tuple[str, ...] = ("exp", "sub")) -> dict[str, Any]:
        """The verified claims of ``token``; `TokenRefused` when anything is wrong."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES:
            raise TokenRefused(AUTH_FAILED, f"expected a JWT of at most {MAX_TOKEN_BYTES} bytes")
        jwt = self._jwt
        try:
            header = jwt.get_unverified_header(token)
            kid = header.get("kid")
            if kid is None and len(self._keys) == 1:
                found: tuple[Any, str] | None = next(iter(self._keys.values()))
            else:
                found = self._keys.get(kid) if isinstance(kid, str) else None
                if found is None and "" in self._keys and not self._jwks:
                    found = self._keys[""]  # a PEM or secret key: a kid says nothing
            if found is None:
                raise TokenRefused(AUTH_FAILED, "the token's key id (kid) is not known")
            key, algorithm = found
            config = self.config
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],  # the key's own: never none, never HS256 with RS keys
                audience=config.audience or None,
                issuer=config.issuer or None,
                options={"require": list(required), "verify_aud": bool(config.audience)},
            )
        except TokenRefused:
            raise
        except jwt.ExpiredSignatureError:
            raise TokenRefused(TOKEN_EXPIRED, "the token has expired") from None
        except jwt.InvalidTokenError as e:
            raise TokenRefused(AUTH_FAILED, f"the token is not valid: {str(e)[:120]}") from None
        except Exception:  # a token that breaks the parser is still only a bad token
            raise TokenRefused(AUTH_FAILED, "the token is not valid") from None
        if not isinstance(claims, dict) or not valid_identity(claims.get("sub")):
            raise TokenRefused(AUTH_FAILED, "the token's sub is not a valid identity")
        exp = claims.get("exp")
        if "exp" in required and (type(exp) not in (int, float) or exp != exp):
            raise TokenRefused(AUTH_FAILED, "the token's exp is not a number")
        return claims

    def check(self, token: str, peer: str = "") -> Verified:
        """The connect check (`heartbeatd.server.auth.Authenticator`): a `Verified`."""
        claims = self.decode(token)
        return Verified(claims["sub"], claims, float(claims["exp"]))

    def check_channel(self, token: Any, channel: str, identity: str | None) -> None:
        """A channel token (``subscribe: token``): `HandlerError` unless it is for ``channel``
        and ``identity``."""
        try:
            claims = self.decode(token, ("exp", "sub", "channel"))
        except TokenRefused as e:
            code = TOKEN_EXPIRED if e.code == TOKEN_EXPIRED else BAD_TOKEN
            raise HandlerError(code, e.message) from None
        if claims.get("channel") != channel:
            raise HandlerError("forbidden", "the channel token is for another channel")
        if identity is None or claims.get("sub") != identity:
            raise HandlerError("forbidden", "the channel token was issued to another identity")


def load_authenticator(auth: AuthConfig) -> Authenticator | None:
    """`heartbeatd.server.auth.load_authenticator`, plus ``auth.mode: jwt``."""
    if auth.mode != "jwt":
        return auth_module.load_authenticator(auth)
    verifier = load_token_verifier(auth)
    if verifier is None:  # the config check requires a key with mode jwt
        raise ConfigError(["auth.jwt: mode jwt needs hmac_secret_file or public_key_file"])
    authenticator = Authenticator(verifier.check, auth.timeout, verifier.description)
    authenticator.after_login = after_login
    return authenticator


def load_token_verifier(auth: AuthConfig) -> JwtVerifier | None:
    """The verifier of ``auth.jwt`` (None when no key is configured); raises `ConfigError`."""
    if not auth.jwt.enabled:
        return None
    return JwtVerifier(auth.jwt, auth.timeout)


# -- a connection's token lifetime ---------------------------------------------------------


class Lifetimes:
    """The refresh and expiry timers of the connections that logged in with a JWT."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        #: session id -> (refresh push, expiry close)
        self._timers: dict[str, tuple[IDelayedCall, IDelayedCall]] = {}

    def watch(self, client: Any, exp: float) -> None:
        """(Re)start ``client``'s timers for a token expiring at ``exp`` (wall clock)."""
        self.forget(client.session_id)
        factory = self.factory
        verifier = factory.token_verifier
        now = verifier.now() if verifier is not None else time.time()
        left = max(0.0, exp - now)
        before = factory.config.auth.jwt.refresh_before
        clock = factory.clock
        self._timers[client.session_id] = (
            clock.callLater(max(0.0, left - before), self._ask_refresh, client),
            clock.callLater(left, self._expired, client),
        )

    def forget(self, session: str) -> None:
        timers = self._timers.pop(session, None)
        if timers is not None:
            for timer in timers:
                if timer.active():
                    timer.cancel()

    def __len__(self) -> int:
        return len(self._timers)

    def _ask_refresh(self, client: Any) -> None:
        if client.connected and client.close_reason is None:
            client.send("refresh")

    def _expired(self, client: Any) -> None:
        self._timers.pop(client.session_id, None)
        if not client.connected or client.close_reason is not None:
            return
        text = "the token expired and no new one came (answer refresh with a token)"
        self.factory.count_error(TOKEN_EXPIRED)
        client.write_frame(encode_error(TOKEN_EXPIRED, text), encoded=False)
        client.close(TOKEN_EXPIRED, text)


def after_login(client: Any, verified: Verified) -> None:
    """A JWT login succeeded (the auth reply is out): keep its claims, watch its ``exp`` and
    subscribe the channels its ``channels`` claim names.

    Each claimed channel goes through the subscribe permission check (`Permissions.check`
    with ``claimed``: the signed claim satisfies ``token`` and ``authenticated``, not ``none``);
    a refusal is pushed as ``subscribe_refused`` with the check's own code."""
    factory = client.factory
    client.claims = verified.claims
    factory.lifetimes.watch(client, verified.exp)
    hub = factory.channels
    for channel in verified.channels[: factory.config.channels.max_per_connection]:
        try:
            name = hub.check_channel(channel)
            checked = hub.permissions.check(
                client, "subscribe", name, {"channel": name}, claimed=True
            )
        except HandlerError as e:
            client.send("subscribe_refused", {"channel": channel, "code": e.code})
            continue
        if checked is None:
            d = hub.subscribe(client, name)
        else:
            d = checked.addCallback(lambda _, name=name: hub.subscribe(client, name))
        d.addCallbacks(
            lambda answer: client.send("subscribed", answer),
            lambda failure, channel=name: client.send(
                "subscribe_refused", _refused(channel, failure.value)
            ),
        )


def _refused(channel: str, error: BaseException) -> dict[str, Any]:
    """A claimed channel's ``subscribe_refused`` push (``retry_after`` with ``rate_limited``)."""
    refused: dict[str, Any] = {"channel": channel, "code": getattr(error, "code", "unavailable")}
    wait = getattr(error, "retry_after", None)
    if wait is not None:
        refused["retry_after"] = wait
    return refused


# -- the refresh message -----------------------------------------------------------------


def _refresh(request: Request) -> Any:
    client = request._connection
    factory = client.factory
    verifier = factory.token_verifier
    if verifier is None or factory.config.auth.mode != "jwt":
        raise HandlerError("bad_request", "refresh needs auth.mode jwt")
    data = request.data
    token = data.get("token") if isinstance(data, dict) else None
    try:
        claims = verifier.decode(token)
    except TokenRefused as e:
        raise HandlerError(e.code, e.message) from None
    if claims["sub"] != client.identity:
        raise HandlerError(AUTH_FAILED, "the new token names another identity")
    client.claims = claims
    factory.lifetimes.watch(client, float(claims["exp"]))
    return NO_REPLY if request.id is None else {"exp": claims["exp"]}


def register(registry: HandlerRegistry) -> None:
    """Add the ``refresh`` handler (an application's own ``refresh`` is kept)."""
    if registry.get("refresh") is None:
        registry.add("refresh", _refresh)

"""Signed tokens (issue 22): JWT connect auth, refresh and expiry, channel tokens.

Driven in memory on a Clock (the tokens' exp is wall-clock time, as in production: each test
makes its tokens relative to now, and the server's timers run on the Clock).  The same refusals
over real sockets are in test_channel_permissions_daemon.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from helpers import Peer, make_config
from twisted.internet.task import Clock

from heartbeatd.config import ConfigError
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import default_registry
from heartbeatd.server.signed_tokens import load_authenticator, load_token_verifier

SECRET = "s3cret-" + "x" * 60


def token(key: Any = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    body = {"sub": "alice", "exp": int(time.time()) + 100, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=algorithm)


def jwt_factory(
    clock: Clock, tmp_path: Path, key_file: str = "hmac_secret_file", key: str = SECRET, **extra
) -> ServerFactory:
    path = tmp_path / "key"
    path.write_text(key)
    sections: dict[str, Any] = {
        "auth": {"mode": "jwt", "jwt": {key_file: str(path), **extra.pop("jwt", {})}},
        **extra,
    }
    config = make_config(**sections)
    factory = ServerFactory(config, default_registry(), clock)
    factory.authenticator = load_authenticator(config.auth)
    factory.token_verifier = load_token_verifier(config.auth)
    return factory


def login(factory: ServerFactory, tok: str, port: int = 40000) -> tuple[Peer, list[Any]]:
    peer = Peer(factory, port)
    peer.send({"type": "auth", "id": 1, "data": {"token": tok}})
    factory.clock.advance(0)  # type: ignore[attr-defined]
    return peer, peer.received()


def closed_with(peer: Peer) -> str | None:
    return peer.protocol.close_reason


def test_a_valid_token_logs_in_as_its_sub_with_its_claims(clock: Clock, tmp_path: Path) -> None:
    factory = jwt_factory(clock, tmp_path)
    peer, frames = login(factory, token(team="red"))
    assert frames == [{"type": "auth", "id": 1, "data": {"identity": "alice"}}]
    assert peer.protocol.session.claims["team"] == "red"
    assert peer.protocol.session.identity == "alice"


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: token(exp=int(time.time()) - 10), "token_expired"),
        (
            lambda: jwt.encode({"sub": "alice", "exp": time.time() + 99}, None, "none"),
            "auth_failed",
        ),
        (lambda: token(key="another-secret-" + "y" * 40), "auth_failed"),
        (lambda: token(exp=None), "auth_failed"),
        (lambda: token(sub=None), "auth_failed"),
        (lambda: token(sub="bad\nname"), "auth_failed"),
        (lambda: token(algorithm="HS512"), "auth_failed"),
        (lambda: "not.a.jwt", "auth_failed"),
        (lambda: "x" * 5000, "auth_failed"),
    ],
)
def test_bad_tokens_are_refused_with_a_typed_error(
    clock: Clock, tmp_path: Path, make: Any, code: str
) -> None:
    factory = jwt_factory(clock, tmp_path)
    peer, frames = login(factory, make())
    assert frames[-1]["type"] == "error" and frames[-1]["error"]["code"] == code, frames
    assert closed_with(peer) == code


def test_audience_and_issuer_are_checked_when_set(clock: Clock, tmp_path: Path) -> None:
    factory = jwt_factory(clock, tmp_path, jwt={"audience": "chat", "issuer": "https://id"})
    _, ok = login(factory, token(aud="chat", iss="https://id"))
    assert ok[0]["type"] == "auth"
    for bad in (token(aud="billing", iss="https://id"), token(iss="https://id"), token(aud="chat")):
        _, frames = login(factory, bad)
        assert frames[-1]["error"]["code"] == "auth_failed", frames


def rsa_pem() -> tuple[Any, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, public.decode()


def test_rs256_and_es256_public_keys_and_no_algorithm_confusion(
    clock: Clock, tmp_path: Path
) -> None:
    private, public = rsa_pem()
    factory = jwt_factory(clock, tmp_path, "public_key_file", public)
    assert login(factory, token(private, "RS256"))[1][0]["type"] == "auth"
    # The public key used as an HMAC secret (the classic confusion attack) is refused.
    _, frames = login(factory, _confused(public))
    assert frames[-1]["error"]["code"] == "auth_failed"

    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_public = ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    factory = jwt_factory(clock, tmp_path, "public_key_file", ec_public.decode())
    assert login(factory, token(ec_key, "ES256"))[1][0]["type"] == "auth"
    _, frames = login(factory, token(private, "RS256"))
    assert frames[-1]["error"]["code"] == "auth_failed"


def _confused(public_pem: str) -> str:
    """An HS256 token whose secret is the RSA public key's PEM (PyJWT refuses to make one)."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": "alice", "exp": int(time.time()) + 99}).encode())
    signature = hmac.new(public_pem.encode(), f"{head}.{body}".encode(), hashlib.sha256)
    return f"{head}.{body}.{b64(signature.digest())}"


def test_a_jwks_file_chooses_the_key_by_kid(clock: Clock, tmp_path: Path) -> None:
    private, _ = rsa_pem()
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    keys = json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]})
    factory = jwt_factory(clock, tmp_path, "public_key_file", keys)
    good = jwt.encode(
        {"sub": "alice", "exp": int(time.time()) + 99}, private, "RS256", headers={"kid": "k1"}
    )
    assert login(factory, good)[1][0]["type"] == "auth"
    other = jwt.encode(
        {"sub": "alice", "exp": int(time.time()) + 99}, private, "RS256", headers={"kid": "k2"}
    )
    assert login(factory, other)[1][-1]["error"]["code"] == "auth_failed"


def test_refresh_is_asked_before_expiry_and_a_new_token_extends(
    clock: Clock, tmp_path: Path
) -> None:
    factory = jwt_factory(clock, tmp_path, jwt={"refresh_before": 30})
    now = int(time.time())
    peer, _ = login(factory, token(exp=now + 100))
    clock.advance(65)
    assert peer.received() == []
    clock.advance(10)  # 30 s before exp
    assert peer.received() == [{"type": "refresh"}]
    peer.send({"type": "refresh", "id": 5, "data": {"token": token(exp=now + 300)}})
    assert peer.received() == [{"type": "refresh", "id": 5, "data": {"exp": now + 300}}]
    clock.advance(100)  # past the first exp: still open
    assert closed_with(peer) is None
    # A refresh for another identity is refused; the connection keeps its old token.
    peer.send({"type": "refresh", "id": 6, "data": {"token": token(sub="mallory")}})
    assert peer.received()[-1]["error"]["code"] == "auth_failed"
    peer.send({"type": "refresh", "id": 7, "data": {"token": token(exp=now - 1)}})
    assert peer.received()[-1]["error"]["code"] == "token_expired"


def test_no_refresh_before_expiry_closes_with_token_expired(clock: Clock, tmp_path: Path) -> None:
    factory = jwt_factory(clock, tmp_path, jwt={"refresh_before": 30})
    peer, _ = login(factory, token(exp=int(time.time()) + 60))
    clock.advance(40)
    assert peer.received() == [{"type": "refresh"}]
    clock.advance(25)
    frames = peer.received()
    assert frames[-1]["error"]["code"] == "token_expired"
    assert closed_with(peer) == "token_expired"
    assert len(factory.lifetimes) == 0


def test_disconnecting_forgets_the_timers(clock: Clock, tmp_path: Path) -> None:
    factory = jwt_factory(clock, tmp_path)
    peer, _ = login(factory, token())
    assert len(factory.lifetimes) == 1
    peer.disconnect()
    assert len(factory.lifetimes) == 0
    assert clock.getDelayedCalls() == [] or all(
        c.func.__name__ not in ("_ask_refresh", "_expired") for c in clock.getDelayedCalls()
    )


def test_the_channels_claim_subscribes_at_connect(clock: Clock, tmp_path: Path) -> None:
    factory = jwt_factory(clock, tmp_path)
    peer, frames = login(factory, token(channels=["news", "user#alice", "user#bob", 7]))
    subscribed = {f["data"]["channel"] for f in frames if f["type"] == "subscribed"}
    refused = [f["data"] for f in frames if f["type"] == "subscribe_refused"]
    assert subscribed == {"news", "user#alice"}
    assert refused == [{"channel": "user#bob", "code": "forbidden"}]
    factory.channels.publish("user#alice", "hi")
    assert peer.received()[-1]["data"]["data"] == "hi"


def test_the_channels_claim_goes_through_namespace_permissions(
    clock: Clock, tmp_path: Path
) -> None:
    """The claim stands for a channel token (and an identity), never for ``none``; an unknown
    namespace is refused with its own code (it used to be ``forbidden``)."""
    namespaces = {
        "secret": {"subscribe": "none"},
        "deal": {"subscribe": "token"},
        "member": {"subscribe": "authenticated"},
    }
    factory = jwt_factory(clock, tmp_path, channels={"namespaces": namespaces})
    claim = ["secret:x", "deal:1", "member:a", "nowhere:y", "user#bob", "news"]
    peer, frames = login(factory, token(channels=claim))
    subscribed = {f["data"]["channel"] for f in frames if f["type"] == "subscribed"}
    refused = {
        f["data"]["channel"]: f["data"]["code"] for f in frames if f["type"] == "subscribe_refused"
    }
    assert subscribed == {"deal:1", "member:a", "news"}
    assert refused == {
        "secret:x": "forbidden",
        "nowhere:y": "unknown_namespace",
        "user#bob": "forbidden",
    }
    assert set(factory.channels.channels_of(peer.protocol.session_id)) == subscribed


def test_claim_pushes_follow_the_auth_reply_on_the_wire(clock: Clock, tmp_path: Path) -> None:
    """A client that waits for the auth reply (Python ``connect``) then reads the pushes;
    they used to be written before the reply, batched in the same read."""
    factory = jwt_factory(clock, tmp_path)
    peer = Peer(factory, 40000)
    peer.received()  # the hello
    auth = {"type": "auth", "id": 1, "data": {"token": token(channels=["news", "user#bob"])}}
    peer.send(auth, {"type": "ping", "id": 2})  # one read: the replies are batched
    clock.advance(0)
    types = [f["type"] for f in peer.received()]
    assert types == ["auth", "subscribed", "subscribe_refused", "pong"]


def channel_token_factory(clock: Clock, tmp_path: Path) -> ServerFactory:
    return jwt_factory(
        clock, tmp_path, channels={"namespaces": {"private": {"subscribe": "token"}}}
    )


def test_channel_tokens(clock: Clock, tmp_path: Path) -> None:
    factory = channel_token_factory(clock, tmp_path)
    peer, _ = login(factory, token())

    def sub(channel: str, tok: Any, id: int) -> dict[str, Any]:
        peer.send({"type": "subscribe", "id": id, "data": {"channel": channel, "token": tok}})
        clock.advance(0)
        return peer.received()[0]

    assert sub("private:a", token(channel="private:a"), 1)["type"] == "subscribe"
    assert sub("private:b", token(channel="private:a"), 2)["error"]["code"] == "forbidden"
    stolen = token(channel="private:c", sub="bob")
    assert sub("private:c", stolen, 3)["error"]["code"] == "forbidden"
    expired = token(channel="private:d", exp=int(time.time()) - 5)
    assert sub("private:d", expired, 4)["error"]["code"] == "token_expired"
    forged = token(key="k" * 40, channel="private:e")
    assert sub("private:e", forged, 5)["error"]["code"] == "bad_token"
    assert sub("private:f", None, 6)["error"]["code"] == "bad_token"
    assert closed_with(peer) is None


def test_config_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(auth={"mode": "jwt"})
    assert "auth.jwt.hmac_secret_file: '' is not allowed with auth.mode jwt" in str(info.value)
    with pytest.raises(ConfigError) as info:
        make_config(channels={"namespaces": {"p": {"subscribe": "token"}}})
    assert "channels.namespaces.p.subscribe: 'token' is not allowed without" in str(info.value)
    short = tmp_path / "short"
    short.write_text("tiny")
    config = make_config(auth={"mode": "jwt", "jwt": {"hmac_secret_file": str(short)}})
    with pytest.raises(ConfigError) as info:
        load_authenticator(config.auth)
    assert "holds 4 bytes; expected at least 32" in str(info.value)
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    config = make_config(auth={"mode": "jwt", "jwt": {"public_key_file": str(bad)}})
    with pytest.raises(ConfigError) as info:
        load_authenticator(config.auth)
    assert "is not a PEM public key or a JWKS" in str(info.value)


# -- the Python client: get_token on connect and on refresh ------------------------------


def test_the_client_calls_get_token_on_connect_and_on_refresh(tmp_path: Path) -> None:
    from helpers import successResultOf
    from twisted.internet.defer import succeed

    from heartbeatd.testing import ServerClientPair

    key = tmp_path / "key"
    key.write_text(SECRET)
    config = make_config(
        auth={"mode": "jwt", "jwt": {"hmac_secret_file": str(key), "refresh_before": 30}}
    )
    now = int(time.time())
    issued: list[int] = []

    def get_token() -> Any:
        issued.append(now + 60 * (len(issued) + 1))
        return succeed(token(exp=issued[-1]))

    with ServerClientPair(config=config) as pair:
        pair.factory.authenticator = load_authenticator(config.auth)
        pair.factory.token_verifier = load_token_verifier(config.auth)
        client = pair.connect(get_token=get_token)
        assert successResultOf(client.when_ready()).identity == "alice"
        assert len(issued) == 1
        pair.advance(40)  # 20 s before the first exp: the server asks, the client answers
        assert len(issued) == 2
        pair.advance(50)  # past the first exp
        assert client.connected and not client.closed
        pair.advance(60)  # the second token is refreshed the same way
        assert len(issued) == 3 and client.connected


def test_a_client_without_get_token_is_closed_at_expiry(tmp_path: Path) -> None:
    from heartbeatd.testing import ServerClientPair

    key = tmp_path / "key"
    key.write_text(SECRET)
    config = make_config(auth={"mode": "jwt", "jwt": {"hmac_secret_file": str(key)}})
    with ServerClientPair(config=config) as pair:
        pair.factory.authenticator = load_authenticator(config.auth)
        pair.factory.token_verifier = load_token_verifier(config.auth)
        client = pair.connect(token=token(exp=int(time.time()) + 40))
        assert client.identity == "alice"
        pair.advance(45)
        assert client.closed
        assert pair.factory.closes["token_expired"] == 1

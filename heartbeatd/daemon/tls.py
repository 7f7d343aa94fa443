"""TLS for the daemon's listener, from our own config keys (``tls.*``), reloadable on SIGHUP.

Users set ``tls.certificate`` and ``tls.private_key`` (and ``tls.client_ca`` for mutual TLS)
instead of writing an ``ssl:`` endpoint string with its escapes; `ServerTLS.wrap` puts TLS
on whatever ``listen`` endpoint they chose (TCP, IPv6, a systemd socket, UNIX).  The OpenSSL
context is built once and swapped by `ServerTLS.reload`, so a renewed certificate applies to
new connections while open ones keep theirs.

pyOpenSSL comes with the ``heartbeatd[tls]`` extra and is imported only when TLS is
configured; without it, a TLS configuration is a config error that names the extra.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IStreamServerEndpoint,
)
from zope.interface import implementer

from heartbeatd._logging import get_logger
from heartbeatd.config import ConfigError, TlsConfig

__all__ = ["ServerTLS", "TLSServerEndpoint", "check_tls", "load_server_tls"]

log = get_logger(__name__)

MISSING_EXTRA = (
    "TLS needs the optional dependencies of heartbeatd[tls] (pyOpenSSL, service-identity): "
    "pip install 'heartbeatd[tls]'"
)


def _openssl() -> Any:
    try:
        from OpenSSL import SSL
        from twisted.protocols import tls  # noqa: F401 - needs pyOpenSSL too
    except ImportError:
        raise ConfigError([f"tls.certificate: {MISSING_EXTRA}"]) from None
    return SSL


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError([f"{key}: {path!r} cannot be read: {e.strerror or e}"]) from None


def build_context(config: TlsConfig) -> Any:
    """An ``OpenSSL.SSL.Context`` for the server; `ConfigError` names the key at fault."""
    SSL = _openssl()

    errors: list[str] = []
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    minimum = SSL.TLS1_3_VERSION if config.min_version == "1.3" else SSL.TLS1_2_VERSION
    context.set_min_proto_version(minimum)
    # No compression (CRIME), no renegotiation (a client-started one would make the TLS layer
    # want to read before it can write), and a fresh ECDH key per handshake.
    options = SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_SINGLE_ECDH_USE
    options |= getattr(SSL, "OP_NO_RENEGOTIATION", 0)
    context.set_options(options)
    context.set_cipher_list(b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!MD5:!DSS")
    # Read the files ourselves: OpenSSL's own messages for a missing file are cryptic.
    _read("tls.certificate", config.certificate)
    _read("tls.private_key", config.private_key)
    try:
        context.use_certificate_chain_file(config.certificate.encode())
    except SSL.Error as e:
        errors.append(
            f"tls.certificate: {config.certificate!r} is not allowed; expected a PEM "
            f"certificate (chain) ({_describe(e)})"
        )
    try:
        context.use_privatekey_file(config.private_key.encode())
    except SSL.Error as e:
        if "mismatch" in _describe(e) and not errors:
            raise ConfigError([_not_its_key(config)]) from None
        errors.append(
            f"tls.private_key: {config.private_key!r} is not allowed; expected an unencrypted "
            f"PEM private key ({_describe(e)})"
        )
    if not errors:
        try:
            context.check_privatekey()
        except SSL.Error:
            errors.append(_not_its_key(config))
    if config.client_ca:
        pem = _read("tls.client_ca", config.client_ca)
        try:
            if b"-----BEGIN CERTIFICATE-----" not in pem:
                raise ValueError("no PEM certificate in the file")
            context.load_verify_locations(config.client_ca.encode())
            context.load_client_ca(config.client_ca.encode())  # the CAs named to clients
        except (SSL.Error, ValueError) as e:
            errors.append(
                f"tls.client_ca: {config.client_ca!r} is not allowed; expected PEM CA "
                f"certificates ({_describe(e)})"
            )
        errors.extend(_ambiguous_roots(config, pem))
        if config.client_crl:
            errors.extend(_load_crls(SSL, context, config.client_crl))
        context.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *args: bool(args[-1])
        )
    elif config.client_crl:
        errors.append(f"tls.client_crl: {config.client_crl!r} is not allowed without tls.client_ca")
    if errors:
        raise ConfigError(errors)
    # Session resumption (tickets) spares returning clients a full handshake.
    context.set_session_id(b"heartbeatd")
    return context


def _ambiguous_roots(config: TlsConfig, pem: bytes) -> list[str]:
    """With several root CAs in client_ca, a subject alone does not say who a client is: any
    of them may issue ``CN=alice`` (issue 22). Such a file needs issuer_and_subject."""
    if config.client_identity != "subject":
        return []
    from cryptography import x509

    roots = []
    marker = b"-----BEGIN CERTIFICATE-----"
    for chunk in pem.split(marker)[1:]:
        try:
            cert = x509.load_pem_x509_certificate(marker + chunk)
        except ValueError:
            continue
        if cert.issuer == cert.subject:
            roots.append(cert.subject.rfc4514_string())
    if len(roots) < 2:
        return []
    return [
        f"tls.client_identity: 'subject' is not allowed with {len(roots)} root CAs in "
        f"tls.client_ca ({'; '.join(roots)}): each could issue any subject; expected "
        "issuer_and_subject (or one CA per daemon)"
    ]


def _load_crls(SSL: Any, context: Any, path: str) -> list[str]:
    """Add the CRLs in ``path`` to the verify store and check every client against them."""
    from OpenSSL.crypto import X509StoreFlags

    pem = _read("tls.client_crl", path)
    if b"-----BEGIN X509 CRL-----" not in pem:
        return [f"tls.client_crl: {path!r} is not allowed; expected PEM CRLs (no X509 CRL in it)"]
    try:
        context.load_verify_locations(path.encode())  # OpenSSL reads the CRLs of a PEM file
    except SSL.Error as e:
        return [f"tls.client_crl: {path!r} is not allowed; expected PEM CRLs ({_describe(e)})"]
    # The leaf's issuer must have a CRL in the file: a CA without one refuses its clients.
    context.get_cert_store().set_flags(X509StoreFlags.CRL_CHECK)
    return []


def _not_its_key(config: TlsConfig) -> str:
    return (
        f"tls.private_key: {config.private_key!r} does not belong to the certificate in "
        f"tls.certificate ({config.certificate!r})"
    )


def _describe(error: Exception) -> str:
    args = getattr(error, "args", ())
    if args and isinstance(args[0], list) and args[0]:
        return "; ".join(str(item[-1]) for item in args[0] if item)
    return str(error) or type(error).__name__


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Makes each new connection's TLS state from the current context (swapped on reload)."""

    def __init__(self, config: TlsConfig) -> None:
        self.config = config
        self.context = build_context(config)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> Any:
        from OpenSSL import SSL

        return SSL.Connection(self.context, None)

    def reload(self, config: TlsConfig) -> None:
        """Re-read certificate and key (new connections use them); raise `ConfigError`."""
        self.context = build_context(config)
        self.config = config

    def wrap(self, endpoint: IStreamServerEndpoint, clock: Any = None) -> TLSServerEndpoint:
        return TLSServerEndpoint(endpoint, self, clock)

    def describe(self) -> str:
        mutual = ", clients need a certificate from tls.client_ca" if self.config.client_ca else ""
        if self.config.client_crl:
            mutual += " (checked against tls.client_crl)"
        return f"TLS {self.config.min_version}+{mutual}"


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """Any stream server endpoint, with TLS on every connection it accepts."""

    def __init__(self, inner: IStreamServerEndpoint, tls: ServerTLS, clock: Any = None) -> None:
        self.inner = inner
        self.tls = tls
        self.clock = clock

    def listen(self, protocolFactory: Any) -> Any:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        wrapper = TLSMemoryBIOFactory(self.tls, False, protocolFactory, clock=self.clock)
        wrapper.noisy = False
        return self.inner.listen(wrapper)


def load_server_tls(config: TlsConfig) -> ServerTLS | None:
    """The listener's TLS (None when ``tls.certificate`` is empty); raise `ConfigError`."""
    if not config.enabled:
        return None
    return ServerTLS(config)


def check_tls(config: TlsConfig) -> list[str]:
    """Every problem with ``tls:`` (missing extra, unreadable or mismatched files)."""
    try:
        load_server_tls(config)
    except ConfigError as e:
        return list(e.errors)
    return []

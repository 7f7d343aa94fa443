"""Client credentials: TLS (verify the server, present a certificate) and the auth token.

    from heartbeatd.client import ClientTLS, connect
    conn = await connect(reactor, "tcp:host=db.example:port=9443", tls=ClientTLS(ca_file="ca.pem"))

`ClientTLS` only holds file names; pyOpenSSL (the ``heartbeatd[tls]`` extra) is imported when a
TLS connection is made, so ``import heartbeatd.client`` stays light.  The server's certificate
is checked against ``ca_file`` (or the system's CAs when it is None) and its name against
``hostname``, which defaults to the endpoint's host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["ClientTLS", "client_tls", "read_token", "wrap_client_endpoint"]

_HOST = re.compile(r"(?:^|:)host=((?:\\.|[^:\\])+)")


@dataclass(frozen=True)
class ClientTLS:
    """How a client speaks TLS: trusted CAs, an optional certificate, the expected name."""

    #: PEM file of CA certificates that may sign the server's; None: the system's CAs.
    ca_file: str | None = None
    #: PEM files of this client's certificate and key, for servers that require one (mTLS).
    certificate: str | None = None
    private_key: str | None = None
    #: The name the server's certificate must carry; None: the endpoint's host.
    hostname: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("ClientTLS: certificate and private_key go together")

    def options(self, hostname: str) -> Any:
        """Twisted's client TLS options (an ``IOpenSSLClientConnectionCreator``)."""
        try:
            from twisted.internet import ssl
        except ImportError as e:  # pragma: no cover - pyOpenSSL is missing
            raise ImportError(
                "TLS needs the optional dependencies: pip install 'heartbeatd[tls]'"
            ) from e
        trust: Any = None
        if self.ca_file is not None:
            trust = ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(pem) for pem in _pem_certificates(_read(self.ca_file))]
            )
        client_cert = None
        if self.certificate is not None and self.private_key is not None:
            client_cert = ssl.PrivateCertificate.loadPEM(
                _read(self.private_key) + b"\n" + _read(self.certificate)
            )
        return ssl.optionsForClientTLS(
            self.hostname or hostname, trustRoot=trust, clientCertificate=client_cert
        )


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _pem_certificates(pem: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    found = []
    for part in pem.split(end)[:-1]:
        start = part.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            found.append(part[start:] + end + b"\n")
    if not found:
        raise ValueError("no PEM certificate in the CA file")
    return found


def endpoint_host(endpoint: Any) -> str | None:
    """The host of a client endpoint string (``tcp:host=...``) or TCP endpoint object."""
    if isinstance(endpoint, str):
        match = _HOST.search(endpoint)
        return match.group(1).replace("\\:", ":") if match else None
    host = getattr(endpoint, "_hostText", None) or getattr(endpoint, "_host", None)
    return host if isinstance(host, str) else None


def wrap_client_endpoint(reactor: Any, endpoint: Any, tls: ClientTLS) -> Any:
    """``endpoint`` (a string or an endpoint) with TLS on top."""
    from twisted.internet.endpoints import clientFromString, wrapClientTLS

    hostname = tls.hostname or endpoint_host(endpoint)
    if not hostname:
        raise ValueError("ClientTLS: cannot tell the server's name; pass hostname=")
    if isinstance(endpoint, str):
        endpoint = clientFromString(reactor, endpoint)
    return wrapClientTLS(tls.options(hostname), endpoint)


def read_token(path: str) -> str:
    """The token in ``path`` (its first line, without surrounding white space)."""
    with open(path, encoding="utf-8") as f:
        token = f.readline().strip()
    if not token:
        raise ValueError(f"{path!r} holds no token")
    return token


def client_tls(config: Any) -> ClientTLS | None:
    """A pool's `ClientTLS` from its ``tls_*`` settings; None when ``tls_ca`` and
    ``tls_certificate`` are both empty."""
    if not (config.tls_ca or config.tls_certificate):
        return None
    return ClientTLS(
        ca_file=config.tls_ca or None,
        certificate=config.tls_certificate or None,
        private_key=config.tls_private_key or None,
        hostname=config.tls_hostname or None,
    )

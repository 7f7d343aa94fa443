"""mTLS identities bound to their CA, and revocation (issue 22, finding 6)."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from daemon import Daemon
from test_tls import WHOAMI, Certs, TlsClient, tls_config

from heartbeatd.config import parse_config
from heartbeatd.daemon.tls import check_tls


def two_cas(tmp_path: Path) -> tuple[Certs, Certs, Path]:
    one, two = Certs(tmp_path / "one", "one"), Certs(tmp_path / "two", "two")
    both = tmp_path / "both.pem"
    both.write_bytes(one.ca_file.read_bytes() + two.ca_file.read_bytes())
    return one, two, both


def client(certs: Certs, server: Certs) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(server.ca_file))
    context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    return context


def test_two_root_cas_need_the_issuer_in_the_identity(tmp_path: Path) -> None:
    one, _, both = two_cas(tmp_path)
    errors = check_tls(parse_config(tls_config(one, client_ca=str(both))).tls)
    assert len(errors) == 1 and errors[0].startswith("tls.client_identity: 'subject'")
    config = tls_config(one, client_ca=str(both), client_identity="issuer_and_subject")
    assert check_tls(parse_config(config).tls) == []


def test_the_same_subject_from_two_cas_is_two_identities(tmp_path: Path) -> None:
    one, two, both = two_cas(tmp_path)
    (tmp_path / "whoami_handlers.py").write_text(WHOAMI)
    config = {
        **tls_config(one, client_ca=str(both), client_identity="issuer_and_subject"),
        "handlers": ["whoami_handlers"],
    }
    with Daemon(tmp_path, config, env={"PYTHONPATH": str(tmp_path)}) as daemon:
        seen = []
        for certs in (one, two):
            with TlsClient(daemon.port, client(certs, one)) as alice:
                assert alice.recv()["type"] == "hello"
                alice.send({"type": "whoami", "id": 1})
                seen.append(alice.recv()["data"])
        assert seen[0] != seen[1]
        assert all(s.startswith("CN=alice") and ";issuer=" in s for s in seen)
        assert "heartbeatd test one" in seen[0] and "heartbeatd test two" in seen[1]


def make_crl(certs: Certs, path: Path, revoke: bool) -> None:
    key = serialization.load_pem_private_key(certs.ca.private_key_pem.bytes(), None)
    ca = x509.load_pem_x509_certificate(certs.ca.cert_pem.bytes())
    leaf = x509.load_pem_x509_certificate(certs.client_cert.read_bytes())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(now + datetime.timedelta(days=1))
    )
    if revoke:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(leaf.serial_number)
            .revocation_date(now - datetime.timedelta(minutes=1))
            .build()
        )
    crl = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def handshake_ok(port: int, context: ssl.SSLContext) -> bool:
    try:
        with TlsClient(port, context) as peer:
            return peer.recv() is not None
    except (ssl.SSLError, OSError):
        return False


def test_a_revoked_client_certificate_is_refused(tmp_path: Path) -> None:
    certs = Certs(tmp_path / "ca")
    crl = tmp_path / "crl.pem"
    make_crl(certs, crl, revoke=False)
    config = tls_config(certs, client_ca=str(certs.ca_file), client_crl=str(crl))
    with Daemon(tmp_path, config) as daemon:
        assert handshake_ok(daemon.port, client(certs, certs))
    make_crl(certs, crl, revoke=True)
    with Daemon(tmp_path, config) as daemon:
        assert not handshake_ok(daemon.port, client(certs, certs))
    bad = parse_config(tls_config(certs, client_crl=str(crl)))
    assert check_tls(bad.tls)[0].startswith("tls.client_crl: ")

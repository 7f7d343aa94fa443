"""docs/security.md's examples: the test CA commands and the CLI line run here, against a real
TLS daemon made from those very certificates; its two Python blocks are registered in
`tests/test_docs.py` (``security-client``, ``security-authenticator``) through the checks
below."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon
from docs_examples import ROOT, blocks
from helpers import successResultOf

from heartbeatd.config import parse_config
from heartbeatd.daemon.tls import check_tls
from heartbeatd.server.auth import load_authenticator

PAGE = "docs/security.md"
HEARTBEAT = str(Path(sys.executable).parent / "heartbeat")
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def sh_blocks() -> list[str]:
    return [b.code for b in blocks([ROOT / PAGE]) if b.language == "sh"]


def make_test_ca(folder: Path) -> dict[str, str]:
    """Run the page's "Making a test CA" commands in ``folder``; the daemon's tls: section."""
    subprocess.run(["bash", "-euc", sh_blocks()[0]], cwd=folder, check=True, capture_output=True)
    return {
        "certificate": str(folder / "server.pem"),
        "private_key": str(folder / "server.key"),
        "client_ca": str(folder / "ca.pem"),
    }


def tls_daemon(folder: Path) -> Daemon:
    """A daemon with the test CA's certificates, mutual TLS, and the token alice-token."""
    (folder / "tokens").write_text("alice:alice-token\n")
    (folder / "alice.token").write_text("alice-token\n")
    auth = {"mode": "token", "tokens_file": str(folder / "tokens")}
    return Daemon(folder, {"tls": make_test_ca(folder), "auth": auth})


# -- checks for tests/test_docs.py ----------------------------------------------------------------


def check_security_authenticator(code: str, tmp_path: Path, monkeypatch: Any) -> None:
    (tmp_path / "security_doc_auth.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = parse_config({"auth": {"mode": "custom", "authenticator": "security_doc_auth:check"}})
    authenticator = load_authenticator(config.auth)
    assert authenticator is not None
    assert successResultOf(authenticator.check("svc-billing", "10.0.0.1:5000")) == "billing"
    assert authenticator.check("nope", "10.0.0.1:5000") is None


def check_security_client(code: str, _plain: Daemon, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl for the page's test CA")
    with tls_daemon(tmp_path) as daemon:
        run = subprocess.run(
            [sys.executable, "-c", code.replace("9443", str(daemon.port))],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "alice hi"
        assert daemon.stop() == 0


# -- the shell blocks ---------------------------------------------------------------------------


def test_the_page_has_the_blocks_these_tests_run() -> None:
    assert len(sh_blocks()) == 2
    python = [b.marker for b in blocks([ROOT / PAGE]) if b.language == "python"]
    assert python == ["security-client", "security-authenticator"]


@needs_openssl
def test_test_ca_commands_and_cli_line(tmp_path: Path) -> None:
    with tls_daemon(tmp_path) as daemon:
        (tmp_path / "again").mkdir()
        assert check_tls(parse_config({"tls": make_test_ca(tmp_path / "again")}).tls) == []
        cli = sh_blocks()[1]
        command = cli.replace("heartbeat ", f"{HEARTBEAT} ", 1).replace("9443", str(daemon.port))
        result = subprocess.run(
            ["bash", "-euc", command], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == "hi"
        assert daemon.stop() == 0
    assert "authenticated as alice" in daemon.log
    assert "alice-token" not in daemon.log

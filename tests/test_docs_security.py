"""Every code example in docs/security.md runs: the test CA commands, the YAML, the CLI line,
the Python client and the custom authenticator, against the real daemon."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from daemon import Daemon

from heartbeatd.config import parse_config
from heartbeatd.daemon.tls import check_tls
from heartbeatd.server.auth import load_authenticator

DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"
HEARTBEAT = str(Path(sys.executable).parent / "heartbeat")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


def test_every_block_is_known() -> None:
    assert len(blocks("yaml")) == 2
    assert len(blocks("sh")) == 2
    assert len(blocks("python")) == 2
    assert len(re.findall(r"```", DOC.read_text())) == 2 * 6


def test_yaml_examples_are_valid_config() -> None:
    tls_block, auth_block = (yaml.safe_load(b) for b in blocks("yaml"))
    config = parse_config({**tls_block, **auth_block})
    assert config.tls.client_ca and config.auth.mode == "token"


def test_custom_authenticator_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = next(b for b in blocks("python") if b.startswith("# my_auth.py"))
    (tmp_path / "security_doc_auth.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = parse_config({"auth": {"mode": "custom", "authenticator": "security_doc_auth:check"}})
    authenticator = load_authenticator(config.auth)
    assert authenticator is not None
    assert authenticator.check("svc-billing", "10.0.0.1:5000").result == "billing"
    assert authenticator.check("nope", "10.0.0.1:5000") is None


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_test_ca_cli_and_python_client_examples(tmp_path: Path) -> None:
    make_ca, cli = blocks("sh")
    subprocess.run(["bash", "-euc", make_ca], cwd=tmp_path, check=True, capture_output=True)
    tls = {
        "certificate": str(tmp_path / "server.pem"),
        "private_key": str(tmp_path / "server.key"),
        "client_ca": str(tmp_path / "ca.pem"),
    }
    assert check_tls(parse_config({"tls": tls}).tls) == []
    (tmp_path / "tokens").write_text("alice:alice-token\n")
    (tmp_path / "alice.token").write_text("alice-token\n")
    config = {"tls": tls, "auth": {"mode": "token", "tokens_file": str(tmp_path / "tokens")}}
    with Daemon(tmp_path, config) as daemon:
        port = str(daemon.port)
        command = cli.replace("heartbeat ", f"{HEARTBEAT} ", 1).replace("9443", port)
        result = subprocess.run(
            ["bash", "-euc", command], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == "hi"

        client = next(b for b in blocks("python") if "ClientTLS" in b)
        run = subprocess.run(
            [sys.executable, "-c", client.replace("9443", port)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "alice hi"
        assert daemon.stop() == 0
    assert "authenticated as alice" in daemon.log

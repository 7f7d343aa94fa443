"""docs/security.md's examples: the test CA commands and the CLI line run here, against a real
TLS daemon made from those very certificates; its two Python blocks are registered in
`tests/test_docs.py` (``security-client``, ``security-authenticator``) through the checks
below."""

from __future__ import annotations

import json
import shutil
import stat
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


def yaml_blocks() -> list[Any]:
    import yaml

    return [yaml.safe_load(b.code) for b in blocks([ROOT / PAGE]) if b.language == "yaml"]


def check_security_channel_rules(code: str) -> None:
    """The worked example: the page's channel config and its authorizer module, in memory."""
    import types

    from helpers import failureResultOf

    from heartbeatd.client import ServerError
    from heartbeatd.testing import ServerClientPair

    rules = types.ModuleType("channel_rules")
    exec(compile(code, "<security-channel-rules>", "exec"), rules.__dict__)
    raw = next(y for y in yaml_blocks() if "namespaces" in y.get("channels", {}))
    config = parse_config({"channels": raw["channels"]})  # auth: made below per identity
    with ServerClientPair(config=config, handlers=[rules], identity="bob") as pair:
        assert successResultOf(pair.request("subscribe", {"channel": "team:red"}))
        failure = failureResultOf(pair.request("subscribe", {"channel": "team:blue"}), ServerError)
        assert failure.value.code == "not_a_member"
        failure = failureResultOf(pair.request("subscribe", {"channel": "user#alice"}), ServerError)
        assert failure.value.code == "forbidden"
        assert successResultOf(pair.request("subscribe", {"channel": "user#bob"}))
        failure = failureResultOf(pair.request("presence", {"channel": "user#bob"}), ServerError)
        assert failure.value.code == "forbidden"  # presence: none in the default namespace
        failure = failureResultOf(
            pair.request("publish", {"channel": "team:red", "data": 1}), ServerError
        )
        assert failure.value.code == "forbidden"
        lead = pair.connect(identity="bob", claims={"role": "lead"})
        d = lead.request("publish", {"channel": "team:red", "data": "hi"})
        pair.flush()
        assert successResultOf(d)["offset"] == 1


def check_security_jwt(code: str, tmp_path: Path, monkeypatch: Any) -> None:
    """The page's secret and token work with the page's auth: section."""
    from heartbeatd.server.signed_tokens import load_authenticator, load_token_verifier
    from heartbeatd.testing import ServerClientPair

    documented = "/etc/heartbeatd/jwt-secret"  # absolute, as the daemon's YAML names it
    secret = tmp_path / "jwt-secret"
    assert code.count(f'"{documented}"') == 1
    namespace: dict[str, Any] = {}
    exec(compile(code.replace(documented, str(secret)), "<security-jwt>", "exec"), namespace)
    assert len(secret.read_text()) >= 32
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600  # created so, never 644 first
    raw = next(y for y in yaml_blocks() if y.get("auth", {}).get("jwt", {}).get("audience"))
    assert raw["auth"]["jwt"]["hmac_secret_file"] == documented
    raw["auth"]["jwt"]["hmac_secret_file"] = str(secret)
    config = parse_config(raw)
    with ServerClientPair(config=config) as pair:
        pair.factory.authenticator = load_authenticator(config.auth)
        pair.factory.token_verifier = load_token_verifier(config.auth)
        client = pair.connect(token=namespace["token"])
        assert successResultOf(client.when_ready()).identity == "alice"
        pair.factory.channels.publish("user#alice", "for alice")
        pair.flush()
        assert [c for c in pair.factory.channels.channels_of(_session(pair))] == ["user#alice"]
        wrong = pair.connect(token=namespace["issue"]("alice", aud=None) + "x")
        assert wrong.closed


def _session(pair: Any) -> str:
    sessions = [s for s, c in pair.factory.clients.items() if c.identity == "alice"]
    return sessions[0]


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
    assert python == [
        "security-client",
        "security-authenticator",
        "security-channel-rules",
        "security-jwt",
    ]


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

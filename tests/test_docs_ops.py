"""The examples of docs/cli.md, docs/deployment.md and docs/admin.md, run as written.

A block marked ``<!-- tested: KIND -->`` is run: shell lines one by one against a real daemon
(the documented addresses, paths and token file replaced by this test's), each line's
``# exit N`` / ``# prints X`` comment being its expected outcome; YAML blocks are checked by
the daemon's config validation.  Host-only steps (``sudo``, ``systemctl``) are not marked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from daemon import Daemon, RawClient
from test_admin import ADMIN, http
from test_cli import CONNECTED, Command

from heartbeatd.config import parse_config

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"<!-- tested: (\w+) -->\n```(\w+)\n(.*?)```", re.DOTALL)
EXPECT = re.compile(r"\s{2,}#\s*(?:exit (\d+)|prints (\S+))?.*$")
TOKEN = "doc-token"


def blocks(page: str, kind: str) -> list[str]:
    found = [body for k, _lang, body in BLOCK.findall((DOCS / page).read_text()) if k == kind]
    assert found, f"no '{kind}' example in docs/{page}"
    return found


def run_lines(block: str, replace: dict[str, str], env: dict[str, str]) -> None:
    for raw in block.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        match = EXPECT.search(raw)
        line = raw[: match.start()] if match else raw
        code = int(match.group(1)) if match and match.group(1) else 0
        prints = match.group(2) if match else None
        for old, new in replace.items():
            line = line.replace(old, new)
        result = subprocess.run(
            ["bash", "-c", line], capture_output=True, text=True, timeout=60, env=env
        )
        assert result.returncode == code, (raw, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, (raw, result.stderr)
        if code:
            assert result.stderr.count("\n") == 1, (raw, result.stderr)  # one line
        if prints is not None:
            assert result.stdout.strip() == prints, (raw, result.stdout)


def test_cli_and_admin_examples(tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_text(TOKEN + "\n")
    config = {
        "admin": {"listen": "tcp:0:interface=127.0.0.1", "token_file": str(token)},
        "log": {"level": "debug"},  # for the CONNECTED line
    }
    with Daemon(tmp_path, config) as daemon, Command("watch", f"127.0.0.1:{daemon.port}") as watch:
        admin = int(daemon.wait_for(ADMIN).group(1))
        daemon.wait_for(CONNECTED)
        (client,) = http(admin, "GET", "/clients", token=TOKEN)[1]["clients"]
        replace = {
            "http://127.0.0.1:9100": f"http://127.0.0.1:{admin}",
            "127.0.0.1:9100": f"127.0.0.1:{admin}",
            "127.0.0.1:9000": f"127.0.0.1:{daemon.port}",
            "/etc/heartbeatd/admin-token": str(token),
        }
        env = {k: v for k, v in os.environ.items() if k not in ("HEARTBEAT_TOKEN_FILE", "SESSION")}
        env.update(
            PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
            HEARTBEAT_ADMIN=f"http://127.0.0.1:{admin}",
            SESSION=client["session"],
        )
        for block in blocks("cli.md", "cli"):
            run_lines(block, replace, env)
        (block,) = blocks("cli.md", "admin")
        run_lines(block, replace, env)
        pushed = [json.loads(watch.next_line()) for _ in range(2)]
        assert pushed == [
            {"type": "note", "data": {"text": "hello"}},
            {"type": "maintenance", "data": "in 5 minutes"},
        ]
        assert watch.finish() == 3  # the last example kicked it
        assert daemon.stop() == 0


def test_channel_examples(tmp_path: Path) -> None:
    config = {"channels": {"client_publish": True}}
    with Daemon(tmp_path, config) as daemon, RawClient(daemon.port) as probe:
        assert probe.recv()["type"] == "hello"
        probe.send({"type": "subscribe", "id": 1, "data": {"channel": "news"}})
        epoch = probe.recv()["data"]["epoch"]
        env = dict(os.environ)
        env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}")
        env["EPOCH"] = epoch
        (block,) = blocks("cli.md", "channels")
        run_lines(block, {"127.0.0.1:9000": f"127.0.0.1:{daemon.port}"}, env)
        assert probe.recv()["data"] == {"channel": "news", "offset": 1, "data": {"title": "hello"}}
        assert daemon.stop() == 0


def test_curl_examples(tmp_path: Path) -> None:
    if subprocess.run(["which", "curl"], capture_output=True).returncode:
        pytest.skip("curl is not installed")
    token = tmp_path / "admin-token"
    token.write_text(TOKEN)
    config = {"admin": {"listen": "tcp:0:interface=127.0.0.1", "token": TOKEN}}
    with Daemon(tmp_path, config) as daemon:
        admin = int(daemon.wait_for(ADMIN).group(1))
        replace = {
            "127.0.0.1:9100": f"127.0.0.1:{admin}",
            "/etc/heartbeatd/admin-token": str(token),
        }
        (block,) = blocks("admin.md", "curl")
        run_lines(block, replace, dict(os.environ))
        assert daemon.stop() == 0
    # What the page says of the 401 line without a token: a bad request, 400.
    (tmp_path / "open").mkdir()
    config = {"admin": {"listen": "tcp:0:interface=127.0.0.1"}}
    with Daemon(tmp_path / "open", config) as daemon:
        admin = int(daemon.wait_for(ADMIN).group(1))
        (unauthorized,) = [x for x in block.splitlines() if x.endswith("# prints 401")]
        line = unauthorized.split("  #", 1)[0].replace("127.0.0.1:9100", f"127.0.0.1:{admin}")
        result = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=60)
        assert result.stdout.strip() == "400", result.stdout
        assert daemon.stop() == 0


def test_packaged_files_examples(tmp_path: Path) -> None:
    replace = {
        "/opt/heartbeatd/bin/python": sys.executable,
        "/tmp/heartbeatd-files": str(tmp_path / "files"),
    }
    (block,) = blocks("deployment.md", "files")
    run_lines(block, replace, dict(os.environ))
    assert (tmp_path / "files" / "heartbeatd.service.d" / "socket-activation.conf").exists()


@pytest.mark.parametrize("page", ["deployment.md", "admin.md"])
def test_yaml_examples_are_valid_configuration(page: str) -> None:
    for block in blocks(page, "config"):
        parse_config(yaml.safe_load(block))

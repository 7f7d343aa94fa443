"""The documentation is tested: every Python example runs, and the key tables match the schema.

The convention (`tests/docs_examples.py` has the parser):

* Every fenced ``python`` block in README.md and docs/*.md has, on the line just above its
  fence, a marker ``<!-- test: NAME -->`` (an HTML comment: invisible when rendered).
* ``CHECKS`` below maps each NAME to the function that runs that block and asserts what it
  does.  A block without a marker, a marker nothing checks, and a check whose block is gone
  all fail `test_every_python_block_is_checked`, so no example goes untested and none rots.
* Handler examples run in memory on `heartbeatd.testing.ServerClientPair`; client programs
  (they take the server's port as ``sys.argv[1]``) run as scripts against one real daemon.
* Every ``yaml`` block is a daemon configuration (or a fragment of one) and must pass
  `heartbeatd.config.parse_config`.  ``sh`` and unlabelled blocks are shown, not run (the
  commands they show are exercised by the end-to-end tests).
* The key tables of docs/configuration.md and docs/client.md list exactly the schema's keys,
  with its defaults (`heartbeatd.config`, `heartbeatd.client.PoolConfig`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import subprocess
import sys
import types
import unittest
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon import Daemon
from docs_examples import ROOT, blocks, example
from helpers import failureResultOf, successResultOf
from test_docs_security import (
    check_security_authenticator,
    check_security_channel_rules,
    check_security_client,
    check_security_jwt,
)

from heartbeatd.client import ClientConnection, PoolConfig, ServerError
from heartbeatd.config import _SECTIONS, Config, parse_config
from heartbeatd.testing import ServerClientPair


def module_from(name: str, code: str) -> types.ModuleType:
    """Execute an example as the module ``name`` (not added to sys.modules)."""
    module = types.ModuleType(name)
    exec(compile(code, f"<example {name}>", "exec"), module.__dict__)
    return module


# -- the checks, one per marked block --------------------------------------------------------


def check_readme_handler(code: str) -> None:
    handlers = module_from("myapp_handlers", code)
    with ServerClientPair(handlers=[handlers]) as pair:
        assert successResultOf(pair.request("sum", [1, 2, 3])) == 6
        assert successResultOf(pair.request("sum", [0.5, 2])) == 2.5
        failure = failureResultOf(pair.request("sum", ["1"]), ServerError)
        assert failure.value.code == "bad_request"
        listener = pair.connect()
        heard: list[tuple[ClientConnection, Any]] = []
        for client in (pair.client, listener):
            client.on("announcement", lambda data, conn: heard.append((conn, data)))
        announced = pair.client.request("announce", "hello all", timeout=5)
        pair.flush()
        assert sorted(id(conn) for conn, _ in heard) == sorted(map(id, (pair.client, listener)))
        assert {data for _, data in heard} == {"hello all"}
        pair.advance(5)  # NO_REPLY: the sender's request gets no answer at all
        failureResultOf(announced)


def check_handlers_session(code: str) -> None:
    handlers = module_from("session_handlers", code)
    with ServerClientPair(handlers=[handlers]) as pair:
        me = successResultOf(pair.request("whoami"))
        assert me["session"] == pair.client.hello["session"]
        assert me["peer"].startswith("127.0.0.1:") and me["identity"] is None
        other = pair.connect()
        told: list[Any] = []
        other.on("told", lambda data, conn: told.append(data))
        reply = pair.request("tell", {"to": other.hello["session"], "text": "psst"})
        assert successResultOf(reply) == {"clients": 2} and told == ["psst"]
        failure = failureResultOf(pair.request("tell", {"to": "nobody", "text": "?"}))
        assert failure.value.code == "no_such_session"
        farewells: list[Any] = []
        other.on("farewell", lambda data, conn: farewells.append(data))
        other.send("bye")
        pair.flush()
        assert farewells == ["see you"] and other.closed and pair.clients == 1
        assert pair.factory.closes["said_bye"] == 1


def check_handlers_testing(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests import the README's handler module by name, as a user's tests would.
    (tmp_path / "myapp_handlers.py").write_text(example("readme-handler"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "myapp_handlers", raising=False)
    module = module_from("test_myapp", code)
    cases = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, unittest.TestCase)
        and value.__module__ == module.__name__
    ]
    tests = unittest.TestSuite(map(unittest.defaultTestLoader.loadTestsFromTestCase, cases))
    result = unittest.TestResult()
    tests.run(result)
    problems = [text for _, text in result.errors + result.failures]
    assert result.testsRun == 3 and problems == [], "\n".join(problems)


def check_client_imports(code: str) -> None:
    import heartbeatd.client

    names = vars(module_from("client_imports", code))
    for name in ("connect", "ReconnectingClient", "Pool", "PoolConfig", "ClientError"):
        assert names[name] is getattr(heartbeatd.client, name)


def check_pool_config(code: str) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module_from("pool_config_example", code)
    printed = out.getvalue()
    assert "pool.max_size: 0 is not allowed" in printed
    assert "pool.acquire_timout: unknown key" in printed


def run_client_script(code: str, daemon: Daemon, tmp_path: Path) -> str:
    script = tmp_path / "example.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script), str(daemon.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def check_readme_client(code: str, daemon: Daemon, tmp_path: Path) -> None:
    out = run_client_script(code, daemon, tmp_path)
    assert out.splitlines() == ["echo: {'x': 1}", "error code: unknown_type"]


def check_client_reconnecting(code: str, daemon: Daemon, tmp_path: Path) -> None:
    out = run_client_script(code, daemon, tmp_path).splitlines()
    assert len(out) == 2 and out[0].startswith("session: ") and len(out[0]) > len("session: ")
    assert out[1] == "echo: hi"


def check_client_channels(code: str, daemon: Daemon, tmp_path: Path) -> None:
    out = run_client_script(code, daemon, tmp_path).splitlines()
    assert out == ["subscribed at offset 0", "news #1: hi", "published at offset 1"]


def check_client_resumable(code: str, daemon: Daemon, tmp_path: Path) -> None:
    out = run_client_script(code, daemon, tmp_path).splitlines()
    assert out == ["session: started", "session: resumed", "echo: still here"], out


def check_client_pool(code: str, daemon: Daemon, tmp_path: Path) -> None:
    out = run_client_script(code, daemon, tmp_path).splitlines()
    assert out[0].startswith("pool: 100 replies; {") and out[1:] == ["borrowed: None"]


IN_MEMORY: dict[str, Callable[..., None]] = {
    "client-imports": check_client_imports,
    "readme-handler": check_readme_handler,
    "handlers-session": check_handlers_session,
    "handlers-testing": check_handlers_testing,
    "pool-config": check_pool_config,
    "security-authenticator": check_security_authenticator,
    "security-channel-rules": check_security_channel_rules,
    "security-jwt": check_security_jwt,
}
AGAINST_A_DAEMON: dict[str, Callable[[str, Daemon, Path], None]] = {
    "readme-client": check_readme_client,
    "client-reconnecting": check_client_reconnecting,
    "client-pool": check_client_pool,
    "client-channels": check_client_channels,
    "client-resumable": check_client_resumable,
    "security-client": check_security_client,  # starts its own TLS daemon
}
CHECKS = {**IN_MEMORY, **AGAINST_A_DAEMON}


# -- the tests ---------------------------------------------------------------------------------


def test_every_python_block_is_checked() -> None:
    python = [b for b in blocks() if b.language == "python"]
    unmarked = [b.where() for b in python if b.marker is None]
    assert unmarked == [], "python blocks need a <!-- test: NAME --> marker line"
    names = [b.marker for b in python]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
    assert sorted(set(names) - set(CHECKS)) == [], "markers without a check in CHECKS"
    assert sorted(set(CHECKS) - set(names)) == [], "checks whose block is gone"
    # A marker above anything but a python block is a mistake too.
    stray = [b.where() for b in blocks() if b.marker and b.language != "python"]
    assert stray == []


@pytest.mark.parametrize("name", sorted(IN_MEMORY))
def test_in_memory_example(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    check = IN_MEMORY[name]
    extra = {"tmp_path": tmp_path, "monkeypatch": monkeypatch}
    wanted = check.__code__.co_varnames[1 : check.__code__.co_argcount]
    check(example(name), **{k: extra[k] for k in wanted})


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    config = {"channels": {"client_publish": True}}  # for the channels example
    with Daemon(tmp_path_factory.mktemp("daemon"), config) as running:
        yield running
        assert running.stop() == 0


@pytest.mark.parametrize("name", sorted(AGAINST_A_DAEMON))
def test_client_program_example(name: str, daemon: Daemon, tmp_path: Path) -> None:
    AGAINST_A_DAEMON[name](example(name), daemon, tmp_path)


def test_readme_quickstart_as_a_user_follows_it(tmp_path: Path) -> None:
    """README's steps as written: the handler saved beside where `make run` runs, `make run
    CONFIG=...` on your own file, the client example run with the venv's Python."""
    import os
    import re

    work = tmp_path / "work"
    work.mkdir()
    (work / "myapp_handlers.py").write_text(example("readme-handler"))
    (work / "example.py").write_text(example("readme-client"))
    (tmp_path / "daemon").mkdir()
    daemon = Daemon(tmp_path / "daemon", {"handlers": ["myapp_handlers"]})
    venv = Path(sys.executable).parent.parent
    # The exact command `make run` runs (-n: print it; -o: never reinstall for this).
    planned = subprocess.run(
        [
            "make",
            "-s",
            "-n",
            "-f",
            str(ROOT / "Makefile"),
            "-o",
            str(venv / ".installed-stamp"),
            "run",
            f"VENV={venv}",
            f"CONFIG={daemon.config_path}",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert planned.returncode == 0, planned.stderr
    line = planned.stdout.strip().splitlines()[-1]
    assert "twistd" in line and str(daemon.config_path) in line
    daemon.argv = ["bash", "-c", f"cd {work} && exec env {line}"]  # env: VAR=x cmd
    daemon.env = {k: v for k, v in daemon.env.items() if k != "PYTHONPATH"}
    readme = (ROOT / "README.md").read_text()
    (run_it,) = re.findall(r"`(\.venv/bin/python example\.py 9000)`", readme)
    with daemon:
        command = run_it.replace(".venv/bin/python", str(venv / "bin" / "python"))
        command = command.replace("9000", str(daemon.port))
        result = subprocess.run(
            ["bash", "-c", command], cwd=work, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["echo: {'x': 1}", "error code: unknown_type"]
        heartbeat = str(venv / "bin" / "heartbeat")
        summed = subprocess.run(
            [heartbeat, "request", f"127.0.0.1:{daemon.port}", "sum", "[1, 2, 3]"],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )
        assert (summed.returncode, summed.stdout) == (0, "6\n"), summed.stderr
        assert daemon.stop() == 0
    assert re.search(r"message types: announce, .*\bsum\b", daemon.log), daemon.log


def test_yaml_blocks_are_valid_configuration() -> None:
    for block in blocks():
        if block.language == "yaml":
            parse_config(yaml.safe_load(block.code))  # raises ConfigError naming the key


def test_readme_names_every_port_the_shipped_config_opens() -> None:
    """README says what `make run` opens: the shipped config's three listeners, loopback."""
    readme = (ROOT / "README.md").read_text()
    config = yaml.safe_load((ROOT / "config" / "heartbeatd.yaml").read_text())
    listeners = {
        "TCP": config["listen"],
        "WebSocket": config["websocket"]["listen"],
        "admin API": config["admin"]["listen"],
    }
    for what, endpoint in listeners.items():
        port = re.match(r"tcp:(\d+):", endpoint)
        assert port and "interface=127.0.0.1" in endpoint, (what, endpoint)
        said = rf"127\.0\.0\.1:{port[1]}\b|\b{port[1]} \({re.escape(what)}\)"
        assert re.search(said, readme), f"README does not name {what} port {port[1]}"


def test_readme_stays_short_and_its_doc_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 4000, "README.md is the two-minute read; move detail to docs/"
    for line in readme.splitlines():
        if "](docs/" in line:
            target = line.split("](", 1)[1].split(")", 1)[0].split("#", 1)[0]
            assert (ROOT / target).is_file(), f"README links to missing {target}"


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as
    hyphens, ``-1``, ``-2``... for repeats (code blocks skipped)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not re.match(r"#{1,6} ", line):
            continue
        title = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_relative_links_and_their_anchors_resolve() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    anchors = {page: heading_anchors(page.read_text()) for page in pages}
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            path, _, fragment = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif fragment and linked.suffix == ".md":
                known = anchors.get(linked) or heading_anchors(linked.read_text())
                if fragment not in known:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# -- key tables against the schema -------------------------------------------------------------


def table_rows(page: str, heading: str) -> dict[str, tuple[str, str]]:
    """``key -> (default cell, meaning)`` of the tables under ``heading`` (to the next one of
    its level or higher)."""
    lines = (ROOT / page).read_text().splitlines()
    level = heading.split(" ", 1)[0]
    start = lines.index(heading)
    rows: dict[str, tuple[str, str]] = {}
    for line in lines[start + 1 :]:
        if line.startswith("#") and len(line.split(" ", 1)[0]) <= len(level):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line else []
        if len(cells) == 3 and cells[0].startswith("`") and cells[1].startswith("`"):
            key = cells[0].strip("`")
            assert key not in rows, f"{page}: {key} is listed twice"
            rows[key] = (cells[1][1:-1], cells[2])
    return rows


def schema_defaults(cls: type, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if cls is Config and f.name in _SECTIONS:
            out.update(schema_defaults(_SECTIONS[f.name], f"{f.name}."))
            continue
        if "section" in f.metadata:  # nested (cluster.sentinel)
            out.update(schema_defaults(f.metadata["section"], f"{prefix}{f.name}."))
            continue
        default = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):  # a nested section (channels.default)
                out.update(schema_defaults(type(default), f"{prefix}{f.name}."))
                continue
        out[prefix + f.name] = list(default) if isinstance(default, tuple) else default
    return out


@pytest.mark.parametrize(
    ("page", "heading", "schema"),
    [
        ("docs/configuration.md", "## Keys", Config),
        ("docs/client.md", "### Pool configuration", PoolConfig),
    ],
)
def test_key_table_matches_the_schema(page: str, heading: str, schema: type) -> None:
    documented = table_rows(page, heading)
    defaults = schema_defaults(schema)
    assert sorted(set(defaults) - set(documented)) == [], f"keys missing from {page}"
    assert sorted(set(documented) - set(defaults)) == [], f"{page} lists keys the schema lacks"
    for key, (cell, meaning) in documented.items():
        assert yaml.safe_load(cell) == defaults[key], f"{page}: {key} default {cell!r}"
        assert meaning, f"{page}: {key} has no meaning"

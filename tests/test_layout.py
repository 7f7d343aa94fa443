"""The layout's rules: light front doors, imports that point down, no cycles, true exports.

* ``import heartbeatd.client`` (in a fresh interpreter) loads no server, daemon or YAML module,
  and ``import heartbeatd.wire`` loads no Twisted at all.
* The static import graph of ``heartbeatd/`` (every ``import``, including those under
  ``TYPE_CHECKING`` and inside functions) has no cycle, and its arrows point down the rooms.
  A module does not count as importing its parent package (Python runs the parent's
  ``__init__`` first, but that is not an arrow anyone wrote); ``from pkg import name`` counts
  as importing ``pkg.name`` when that is a module, else ``pkg``.
* Every name in a module's ``__all__`` exists (klein's ``test_exports`` does the same).
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "heartbeatd"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports_of(name: str) -> set[str]:
    """The heartbeatd modules ``name`` imports anywhere in its source."""
    return imports_in(MODULES[name].read_text(encoding="utf-8"), name, is_package(name))


def imports_in(source: str, name: str, package: bool = False) -> set[str]:
    """The heartbeatd modules that ``source`` (the module ``name``) imports, at any depth."""
    tree = ast.parse(source)
    package_name = name if package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_name.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            # ``import a.b.c`` names a module; keep the deepest part of it that is ours.
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def loaded_modules(statement: str) -> list[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def under(modules: list[str], *prefixes: str) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)]


# -- front doors -----------------------------------------------------------------------------


def test_the_client_front_door_loads_no_server_daemon_or_yaml() -> None:
    loaded = loaded_modules("import heartbeatd.client")
    assert "heartbeatd.client" in loaded and "heartbeatd" in loaded
    assert under(loaded, "heartbeatd.server", "heartbeatd.daemon", "yaml") == []


#: Every module of the wire, not just its front door: a submodule the package does not import
#: (say wire/websocket.py) would otherwise be free to import Twisted.
WIRE_MODULES = under(sorted(MODULES), "heartbeatd.wire")


def test_the_wire_loads_no_twisted() -> None:
    assert len(WIRE_MODULES) > 1
    loaded = loaded_modules("import " + ", ".join(WIRE_MODULES))
    assert set(WIRE_MODULES) <= set(loaded) and "heartbeatd" in loaded
    assert under(loaded, "twisted", "zope") == []
    assert under(loaded, "heartbeatd.server", "heartbeatd.client", "heartbeatd.daemon") == []


def test_the_checks_see_a_violation() -> None:
    """The import probe is real: importing the server does load Twisted."""
    assert under(loaded_modules("import heartbeatd.server"), "twisted") != []


def test_the_wire_probe_imports_every_submodule() -> None:
    """A wire submodule that imported Twisted would be loaded (and caught) by the probe."""
    assert {f"heartbeatd.wire.{p.stem}" for p in (PACKAGE / "wire").glob("[!_]*.py")} <= set(
        WIRE_MODULES
    )


# -- the static import graph -----------------------------------------------------------------


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle (as a path that returns to its start), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if colour.get(target) == GREY:
                return [*stack[stack.index(target) :], target]
            if colour.get(target) == WHITE and (cycle := visit(target)):
                return cycle
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_heartbeatd() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles_and_the_parser_sees_hidden_imports() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    source = """
from typing import TYPE_CHECKING
from . import errors
from ..wire import framing, FRAMINGS
if TYPE_CHECKING:
    from heartbeatd.server.protocol import ServerProtocol
def later():
    import heartbeatd.daemon.config
    from heartbeatd.client import Pool
import twisted.internet
"""
    assert imports_in(source, "heartbeatd.client.example") == {
        "heartbeatd.client.errors",  # relative
        "heartbeatd.wire.framing",  # a module imported from a package
        "heartbeatd.wire",  # a name from a package's __init__
        "heartbeatd.server.protocol",  # under TYPE_CHECKING
        "heartbeatd.daemon.config",  # inside a function
        # heartbeatd.client (Pool) is the module's own parent: not an arrow; twisted: not ours
    }
    assert GRAPH["heartbeatd.client.pool"] >= {"heartbeatd.client.connection"}


#: Room -> rooms it must never import (statically, not even for type checking).  From the
#: bottom: the wire; the schema (``config``); the cluster broker, which the server enters
#: through its small interface; the server; the WebSocket transport, an adapter on the
#: server's connection core; the daemon, which wires them together.  The client stands apart.
_ABOVE_CLUSTER = ("heartbeatd.server", "heartbeatd.websocket", "heartbeatd.daemon")
FORBIDDEN = {
    "heartbeatd.wire": (
        "heartbeatd.config",
        "heartbeatd.cluster",
        *_ABOVE_CLUSTER,
        "heartbeatd.client",
        "heartbeatd.testing",
    ),
    "heartbeatd.config": (
        "heartbeatd.cluster",
        *_ABOVE_CLUSTER,
        "heartbeatd.client",
        "heartbeatd.testing",
    ),
    "heartbeatd.cluster": (*_ABOVE_CLUSTER, "heartbeatd.client", "heartbeatd.testing"),
    "heartbeatd.server": (
        "heartbeatd.websocket",
        "heartbeatd.daemon",
        "heartbeatd.client",
        "heartbeatd.testing",
    ),
    "heartbeatd.websocket": ("heartbeatd.daemon", "heartbeatd.client", "heartbeatd.testing"),
    "heartbeatd.client": (
        "heartbeatd.config",  # the daemon's YAML schema: the client has its own (client/config)
        "heartbeatd.server",
        "heartbeatd.websocket",
        "heartbeatd.cluster",
        "heartbeatd.daemon",
        "heartbeatd.testing",
    ),
    "heartbeatd.daemon": ("heartbeatd.testing",),
    # Test helpers for applications: an in-memory server and a client, never the daemon.
    "heartbeatd.testing": ("heartbeatd.daemon",),
}
SHARED = ("heartbeatd._validation", "heartbeatd._logging", "heartbeatd._direct_write")


def forbidden_imports(name: str, targets: set[str]) -> list[str]:
    """``name -> target`` for each import of ``targets`` that breaks ``name``'s room's rule."""
    return [
        f"{name} -> {target}"
        for room, rule in FORBIDDEN.items()
        if under([name], room)
        for target in under(sorted(targets), *rule)
    ]


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_imports_point_down(room: str) -> None:
    wrong = {
        line
        for name, targets in GRAPH.items()
        if under([name], room)
        for line in forbidden_imports(name, targets)
    }
    assert sorted(wrong) == []


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("heartbeatd.cluster.example", "from heartbeatd.server.factory import ServerFactory"),
        ("heartbeatd.cluster.example", "from heartbeatd.daemon import tap"),
        ("heartbeatd.config", "from heartbeatd.cluster.broker import Broker"),
        ("heartbeatd.config", "import heartbeatd.server.handlers"),
        ("heartbeatd.server.example", "from heartbeatd.websocket.protocol import WebSocketSite"),
        ("heartbeatd.websocket.example", "from heartbeatd.daemon.tls import ServerTLS"),
        ("heartbeatd.wire.example", "from heartbeatd.config import Config"),
        ("heartbeatd.client.example", "from heartbeatd.config import Config"),
        ("heartbeatd.client.example", "import heartbeatd.config"),
        ("heartbeatd.testing", "from heartbeatd.daemon.tap import makeService"),
        ("heartbeatd.testing", "import heartbeatd.daemon.config"),
    ],
)
def test_the_rules_see_an_upward_import(name: str, source: str) -> None:
    assert forbidden_imports(name, imports_in(source, name)) != []


def test_the_websocket_room_loads_no_wsproto_until_asked() -> None:
    """The daemon checks for the extra through the front door, which must load nothing."""
    loaded = loaded_modules("import heartbeatd.websocket")
    assert under(loaded, "wsproto", "h11", "heartbeatd.server", "heartbeatd.daemon") == []


def test_shared_private_modules_import_no_room() -> None:
    rooms = (
        "heartbeatd.config",
        "heartbeatd.cluster",
        "heartbeatd.server",
        "heartbeatd.websocket",
        "heartbeatd.client",
        "heartbeatd.daemon",
        "heartbeatd.testing",
    )
    wrong = [f"{m} -> {t}" for m in SHARED for t in under(sorted(GRAPH[m]), *rooms)]
    assert wrong == []


def test_the_client_loads_no_yaml_at_import_time() -> None:
    """A static check to go with the runtime one: ``import yaml`` only inside functions."""
    for name in under(sorted(MODULES), "heartbeatd.client"):
        tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
        top_level = [
            alias.name
            for node in tree.body
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        ]
        modules = [n.module for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert "yaml" not in top_level and "yaml" not in modules, name


# -- exports ---------------------------------------------------------------------------------

FRONT_DOORS = ["heartbeatd", "heartbeatd.wire", "heartbeatd.server", "heartbeatd.client"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_name_in_all_exists(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        assert name not in FRONT_DOORS, f"{name} is a front door and needs __all__"
        return
    assert len(set(exported)) == len(exported), f"{name}.__all__ has duplicates"
    missing = [n for n in exported if not hasattr(module, n)]
    assert missing == [], f"{name}.__all__ names what it lacks"

"""The dependency floors pyproject.toml claims are the versions ``make test`` runs on.

`make test` runs the suite twice: in .venv with the newest releases, and in .venv-oldest
installed with ``-c tests/oldest-constraints.txt``, the ``>=`` floor of every runtime
dependency and of the websocket extra (with ``HEARTBEATD_OLDEST=1`` set).  These tests keep
the two files in step and check that the second run really is on the floors.
"""

from __future__ import annotations

import os
import re
from importlib.metadata import version
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: hatchling (a test extra) brings tomli
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = Path(__file__).resolve().parent / "oldest-constraints.txt"


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


#: Extras whose floors the oldest run pins too (the test extra installs them).
PINNED_EXTRAS = ("websocket",)


def floors() -> dict[str, str]:
    """Runtime dependency -> its ``>=`` floor, from pyproject.toml (with `PINNED_EXTRAS`)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    extras = project["optional-dependencies"]
    requirements = [*project["dependencies"], *(r for e in PINNED_EXTRAS for r in extras[e])]
    for requirement in requirements:
        spec = requirement.split(";", 1)[0].replace(" ", "")
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)>=([0-9][0-9A-Za-z.]*)", spec)
        assert match, f"{requirement!r}: give every runtime dependency a plain >= floor"
        out[normalise(match.group(1))] = match.group(2)
    return out


def pins() -> dict[str, str]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            out[normalise(name)] = pinned
    return out


def same_release(a: str, b: str) -> bool:
    """``23.10`` and ``23.10.0`` name the same release."""

    def parts(v: str) -> list[str]:
        p = v.split(".")
        while len(p) > 1 and p[-1] == "0":
            p.pop()
        return p

    return parts(a) == parts(b)


def test_every_floor_is_pinned_for_the_oldest_run() -> None:
    claimed, pinned = floors(), pins()
    assert sorted(claimed) == sorted(pinned)
    wrong = {name: (claimed[name], pinned[name]) for name in claimed}
    wrong = {k: v for k, v in wrong.items() if not same_release(*v)}
    assert wrong == {}, "pyproject.toml floor vs tests/oldest-constraints.txt pin"


@pytest.mark.skipif(not os.environ.get("HEARTBEATD_OLDEST"), reason="not the oldest-versions run")
def test_the_oldest_run_is_on_the_floors() -> None:
    installed = {name: version(name) for name in pins()}
    assert installed == pins()

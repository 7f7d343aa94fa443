"""Types for users (issue 22): ``py.typed``, and the package root's lazy exports visible to type
checkers, so ``mypy --strict`` passes on the README's handler example and on the authorizer of
docs/security.md as users write them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from docs_examples import example

import heartbeatd

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_is_marked_typed() -> None:
    assert (Path(heartbeatd.__file__).parent / "py.typed").is_file()


def test_mypy_strict_passes_on_the_documented_handler_and_authorizer(tmp_path: Path) -> None:
    (tmp_path / "readme_handler.py").write_text(example("readme-handler"))
    (tmp_path / "channel_rules.py").write_text(example("security-channel-rules"))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            "readme_handler.py",
            "channel_rules.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Success: no issues found in 2 source files" in run.stdout


def test_mypy_sees_the_lazy_exports(tmp_path: Path) -> None:
    """A wrong use is an error: the types are really read, not Any."""
    (tmp_path / "wrong.py").write_text(
        "from heartbeatd import Session\n\n\n"
        "def who(session: Session) -> int:\n"
        "    return session.identity\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "c"), "wrong.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1
    assert 'got "str | None", expected "int"' in run.stdout

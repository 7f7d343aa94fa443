"""Building the optional C hot path: with a compiler the wheel carries it, without one the
wheel is pure Python and runs (hatch_build.py).

Each test builds a wheel from this checkout with the venv's own hatchling (no network), and
runs the unpacked wheel, not the editable install, in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Imports the unpacked wheel and pushes two frames through the decoder it selected.
PROBE = (
    "import heartbeatd, heartbeatd.wire as w;"
    "d = w.Int32Framing.decoder(100);"
    "assert d.feed(b'\\0\\0\\0\\x02hi\\0\\0') == [b'hi'] and d.buffered == 2;"
    "print(w.ACCELERATED, type(d).__module__, heartbeatd.__file__)"
)


def _build(out: Path, source: Path = ROOT, **env: str) -> Path:
    environ = {k: v for k, v in os.environ.items() if k != "HEARTBEATD_NO_EXTENSIONS"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**environ, **env},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = out.glob("heartbeatd-*.whl")
    return built


def _probe(wheel: Path, site: Path) -> list[str]:
    zipfile.ZipFile(wheel).extractall(site)
    environ = {k: v for k, v in os.environ.items() if k != "HEARTBEATD_NO_EXTENSIONS"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environ, "PYTHONPATH": str(site)},
        cwd=site,
    )
    assert result.returncode == 0, result.stderr
    accelerated, module, where = result.stdout.split()
    assert where.startswith(str(site)), where  # the wheel's copy, not the checkout
    return [accelerated, module]


@pytest.mark.scenario
def test_with_a_compiler_the_wheel_carries_the_c_hot_path(tmp_path: Path) -> None:
    # Strict: a compiler warning (-Wall -Wextra) fails the build, so it fails this test.
    wheel = _build(tmp_path / "dist", HEARTBEATD_STRICT_BUILD="1")
    assert not wheel.name.endswith("-py3-none-any.whl"), wheel.name  # a platform wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if n.startswith("heartbeatd/wire/_speedups.") and n.endswith(".so")]
    assert not [n for n in names if n.endswith((".c", ".h"))]  # sources stay in the sdist
    assert "twisted/plugins/heartbeatd_plugin.py" in names
    assert _probe(wheel, tmp_path / "site") == ["c", "heartbeatd.wire._speedups"]


def test_without_a_compiler_the_wheel_is_pure_python_and_runs(tmp_path: Path) -> None:
    wheel = _build(tmp_path / "dist", CC="/bin/false")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith(".so")]
    assert "twisted/plugins/heartbeatd_plugin.py" in names
    assert _probe(wheel, tmp_path / "site") == ["python", "heartbeatd.wire.int32"]


def test_heartbeatd_no_extensions_at_build_time_builds_pure_python(tmp_path: Path) -> None:
    wheel = _build(tmp_path / "dist", HEARTBEATD_NO_EXTENSIONS="1")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name


@pytest.mark.scenario
def test_the_sdist_carries_the_c_sources_and_its_wheel_the_c_hot_path(tmp_path: Path) -> None:
    """pip installs from the sdist where no wheel fits: both C files must be in it."""
    result = subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "sdist", "-d", str(tmp_path / "sd")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (sdist,) = (tmp_path / "sd").glob("heartbeatd-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames()}
        assert {"heartbeatd/wire/_speedups.c", "heartbeatd/wire/_lift.h"} <= names
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(tmp_path / "src", **safe)  # type: ignore[arg-type]
    (tree,) = (tmp_path / "src").iterdir()
    wheel = _build(tmp_path / "dist", source=tree, HEARTBEATD_STRICT_BUILD="1")
    assert _probe(wheel, tmp_path / "site") == ["c", "heartbeatd.wire._speedups"]

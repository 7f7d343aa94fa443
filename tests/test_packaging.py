"""Packaging: twistd finds the plugin from the editable install and from a wheel."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from daemon import TWISTD
from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin, getPlugins

import heartbeatd

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "twisted_plugins" / "heartbeatd_plugin.py"


def test_twistd_help_lists_heartbeatd() -> None:
    result = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "heartbeatd" in result.stdout
    assert "Unable to write to plugin cache" not in result.stdout + result.stderr


def test_plugin_points_at_the_tap_module() -> None:
    (maker,) = [p for p in getPlugins(IServiceMaker) if p.tapname == "heartbeatd"]
    assert maker.module == "heartbeatd.daemon.tap"
    assert callable(maker.options) and callable(maker.makeService)


def test_installed_shim_is_current_and_its_cache_fresh() -> None:
    import twisted.plugins

    installed = [Path(p) / "heartbeatd_plugin.py" for p in twisted.plugins.__path__]
    (shim,) = [p for p in installed if p.exists()]
    assert shim.read_text() == SHIM.read_text(), "plugin shim changed: run `make` to reinstall"
    cache = shim.parent / "dropin.cache"
    assert cache.exists()
    before = cache.stat().st_mtime_ns
    list(getPlugins(IServiceMaker))
    # Nothing to rewrite, so a read-only site-packages (system install) raises no error.
    assert cache.stat().st_mtime_ns == before


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("heartbeatd-*.whl")
    return built


def test_wheel_puts_the_shim_where_twisted_scans(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/heartbeatd_plugin.py" in names
    # An __init__.py there would shadow Twisted's own twisted.plugins package.
    assert "twisted/plugins/__init__.py" not in names
    assert "twisted/__init__.py" not in names
    assert {
        "heartbeatd/__init__.py",
        "heartbeatd/daemon/tap.py",
        "heartbeatd/wire/framing.py",
        "heartbeatd/client/__init__.py",
        "heartbeatd/server/protocol.py",
    } <= names


def test_wheel_shim_provides_the_service_maker(wheel: Path, tmp_path: Path) -> None:
    zipfile.ZipFile(wheel).extractall(tmp_path)
    path = tmp_path / "twisted" / "plugins" / "heartbeatd_plugin.py"
    spec = importlib.util.spec_from_file_location("wheel_heartbeatd_plugin", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    maker = module.heartbeatd
    assert IPlugin.providedBy(maker) and IServiceMaker.providedBy(maker)
    assert (maker.tapname, maker.module) == ("heartbeatd", "heartbeatd.daemon.tap")


def test_public_exports_exist() -> None:
    for name in heartbeatd.__all__:
        assert getattr(heartbeatd, name) is not None, name

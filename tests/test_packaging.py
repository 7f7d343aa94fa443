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


SHIPPED = (
    "heartbeatd.yaml",
    "heartbeatd.service",
    "heartbeatd.socket",
    "heartbeatd.service.d/socket-activation.conf",
    "sysctl.d/60-heartbeatd.conf",
    "heartbeatd-dashboard.json",
    "heartbeatd.rules.yml",
)


def test_wheel_carries_the_config_and_units_as_in_config(wheel: Path, tmp_path: Path) -> None:
    from heartbeatd.daemon.files import FILES

    assert set(FILES) == set(SHIPPED)
    archive = zipfile.ZipFile(wheel)
    for name in SHIPPED:  # config/ is the one copy; the wheel's are made from it
        packaged = archive.read(f"heartbeatd/daemon/data/{name}").decode()
        assert packaged == (ROOT / "config" / name).read_text(), name
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in archive.namelist())

    # From the installed wheel (no checkout around it), the documented command serves them.
    site = tmp_path / "site"
    archive.extractall(site)
    command = [sys.executable, "-m", "heartbeatd.daemon.files"]
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    shown = subprocess.run(
        [*command, "show", "heartbeatd.yaml"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == (ROOT / "config" / "heartbeatd.yaml").read_text()
    where = subprocess.run(
        [sys.executable, "-c", "import heartbeatd.daemon.files as f; print(f.data_dir())"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr

    etc = tmp_path / "etc"
    written = subprocess.run(
        [*command, "write", str(etc)], capture_output=True, text=True, timeout=60, env=env
    )
    assert written.returncode == 0, written.stderr
    for name in SHIPPED:
        assert (etc / name).read_text() == (ROOT / "config" / name).read_text()
    again = subprocess.run(
        [*command, "write", str(etc)], capture_output=True, text=True, timeout=60, env=env
    )
    assert again.returncode == 1 and "--force" in again.stderr  # never overwrites silently


def test_license_file_is_mit() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert (
        text.startswith("MIT License")
        and 'license = "MIT"' in (ROOT / "pyproject.toml").read_text()
    )

"""Build the optional C hot path (heartbeatd/wire/_speedups.c) when a compiler is there.

hatchling runs this hook for every wheel, editable ones included. It compiles the one C
file with the compiler Python was built with (``CC`` overrides it), as aiohttp, yarl and
msgpack ship theirs: if that fails, or ``HEARTBEATD_NO_EXTENSIONS`` is set, the wheel is
pure Python and heartbeatd runs its Python twin (docs/development.md).

* A wheel gets the module from a temporary directory and a platform tag.
* An editable install puts it beside the source (``heartbeatd/wire/``, ignored by git), since
  the package is imported from there; a stale one is removed first.

Run directly (``python hatch_build.py``) it builds the module in place.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SOURCE = ROOT / "heartbeatd" / "wire" / "_speedups.c"
MODULE = "heartbeatd/wire/_speedups"
#: Warnings are errors in our own CI build only (``HEARTBEATD_STRICT_BUILD=1``).
FLAGS = ["-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-std=c11", "-fno-strict-aliasing"]


def extension_name() -> str:
    return MODULE.rsplit("/", 1)[1] + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def compiler() -> list[str]:
    """``CC`` if set, else the compiler Python was built with, else ``cc`` or ``gcc``."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    built_with = shlex.split(sysconfig.get_config_var("CC") or "")
    for candidate in (built_with, ["cc"], ["gcc"]):
        if candidate and shutil.which(candidate[0]):
            return candidate
    return built_with or ["cc"]


def compile_extension(out_dir: Path) -> Path | None:
    """Compile the module into ``out_dir``; None (with a warning) when it cannot be."""
    if os.environ.get("HEARTBEATD_NO_EXTENSIONS"):
        print("heartbeatd: HEARTBEATD_NO_EXTENSIONS is set: pure Python", file=sys.stderr)
        return None
    if sys.implementation.name != "cpython":
        return None
    cc = compiler()
    include = sysconfig.get_paths()["include"]
    target = out_dir / extension_name()
    flags = [*FLAGS, *(["-Werror"] if os.environ.get("HEARTBEATD_STRICT_BUILD") else [])]
    if sys.platform == "darwin":  # symbols resolve against the interpreter at load time
        flags += ["-undefined", "dynamic_lookup"]
    command = [*cc, *flags, f"-I{include}", str(SOURCE), "-o", str(target)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"heartbeatd: no C compiler ({e}): pure Python", file=sys.stderr)
        return None
    if result.returncode != 0 or not target.exists():
        print(
            f"heartbeatd: building the C hot path failed, so it is pure Python:\n"
            f"{shlex.join(command)}\n{result.stdout}{result.stderr}",
            file=sys.stderr,
        )
        target.unlink(missing_ok=True)
        return None
    if result.stderr.strip():  # warnings: shown, never silent
        print(result.stderr, file=sys.stderr)
    return target


try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # run as a script without hatchling
    BuildHookInterface = object  # type: ignore[assignment,misc]


class SpeedupsBuildHook(BuildHookInterface):  # type: ignore[misc,valid-type]
    """Compile the C hot path into the wheel, or leave the wheel pure Python."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:  # type: ignore[type-arg]
        if self.target_name != "wheel":
            return
        if version == "editable":
            in_tree = SOURCE.parent / extension_name()
            in_tree.unlink(missing_ok=True)
            built = compile_extension(SOURCE.parent)
            if built is not None:
                build_data["pure_python"] = False
                build_data["infer_tag"] = True
            return
        self._tmp = tempfile.TemporaryDirectory()
        built = compile_extension(Path(self._tmp.name))
        if built is None:
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        build_data["force_include"][str(built)] = f"{MODULE.rsplit('/', 1)[0]}/{built.name}"

    def finalize(self, version: str, build_data: dict, artifact_path: str) -> None:  # type: ignore[type-arg]
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    built = compile_extension(SOURCE.parent)
    print(built if built is not None else "not built (see above)")
    sys.exit(0 if built is not None else 1)

"""The files an installation needs beside the code: the commented config, the systemd units,
the kernel settings (sysctl), and the monitoring (a Grafana dashboard, Prometheus rules).

A user who installed the wheel has no checkout, so the wheel carries them (hatch copies
``config/`` into ``heartbeatd/daemon/data/`` at build time: ``config/`` stays the one
canonical copy).  Print or write them with::

    python -m heartbeatd.daemon.files list
    python -m heartbeatd.daemon.files show heartbeatd.yaml
    python -m heartbeatd.daemon.files write DIR [--force]

From a source checkout or an editable install the same command reads ``config/`` directly.
"""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.abc import Traversable

__all__ = ["FILES", "data_dir", "main", "read"]

#: What ships, as paths relative to the data directory (and to ``config/``).
FILES = (
    "heartbeatd.yaml",
    "heartbeatd.service",
    "heartbeatd.socket",
    "heartbeatd.service.d/socket-activation.conf",
    "sysctl.d/60-heartbeatd.conf",
    "heartbeatd-dashboard.json",
    "heartbeatd.rules.yml",
)


def data_dir() -> Traversable:
    """Where the shipped files are: the wheel's data directory, else the checkout's config/."""
    packaged = files("heartbeatd.daemon").joinpath("data")
    if packaged.joinpath(FILES[0]).is_file():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "config"
    if (checkout / FILES[0]).is_file():
        return checkout
    raise FileNotFoundError("the packaged files are missing (a broken installation?)")


def read(name: str) -> str:
    if name not in FILES:
        raise KeyError(name)
    return data_dir().joinpath(name).read_text(encoding="utf-8")


def write(directory: Path, force: bool = False) -> list[Path]:
    """Write every file under ``directory``; refuse to overwrite unless ``force``."""
    targets = [directory / name for name in FILES]
    existing = [t for t in targets if t.exists()]
    if existing and not force:
        names = ", ".join(str(t) for t in existing)
        raise FileExistsError(f"{names} already exist(s); use --force to overwrite")
    for name, target in zip(FILES, targets, strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(read(name), encoding="utf-8")
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m heartbeatd.daemon.files",
        description=(
            "Print or write heartbeatd's commented default config, systemd units, sysctl "
            "settings, Grafana dashboard and Prometheus rules."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="list the shipped files")
    show = commands.add_parser("show", help="print one file to stdout")
    show.add_argument("name", choices=FILES, metavar="NAME", help=", ".join(FILES))
    write_cmd = commands.add_parser("write", help="write every file under DIR")
    write_cmd.add_argument("directory", type=Path, metavar="DIR")
    write_cmd.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            print("\n".join(FILES))
        elif args.command == "show":
            sys.stdout.write(read(args.name))
        else:
            for path in write(args.directory, args.force):
                print(f"wrote {path}")
    except (OSError, KeyError) as e:
        sys.stderr.write(f"heartbeatd.daemon.files: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

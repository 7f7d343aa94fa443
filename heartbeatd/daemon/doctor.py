"""``heartbeat doctor --config FILE``: what on this machine would limit the daemon.

A preflight check, run before a start or when clients are refused: it reads the config and the
machine (resource limits, ``/proc/sys``, ``/proc/meminfo``, ``/proc/net/netstat``) and
prints one line per check, ``ok``, ``WARN`` (works, but degrades) or ``FAIL`` (would break:
clients refused below the configured count, memory exhausted, Redis unreachable):

* the open-file limit against ``limits.max_connections`` and ``workers`` (and ``fs.nr_open``,
  ``fs.file-max``);
* the listen backlog against ``net.core.somaxconn`` (a larger one is capped silently) and
  ``net.ipv4.tcp_max_syn_backlog``;
* a memory estimate for the connection count against ``MemAvailable``;
* when a daemon answers on the configured port, the kernel's listen-overflow and SYN-drop
  counters, and whether they grow;
* when ``cluster.redis`` is set, whether Redis answers a PING.

Exit status: 0 (nothing would break; warnings are printed), 1 (something would), 2 (the
config cannot be read).  It lives in the daemon's room because it reads the daemon's YAML;
the ``heartbeat`` command (which never loads YAML) runs it as ``python -m
heartbeatd.daemon.doctor``.  The per-connection figures are measured (docs/tuning.md).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import resource
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from heartbeatd.config import FD_RESERVE, LOW_CONNECTION_LIMIT, Config, ConfigError
from heartbeatd.daemon.config import load_config
from heartbeatd.wire._accelerated import ACCELERATED, NO_EXTENSIONS

__all__ = ["Check", "Machine", "diagnose", "main"]

#: Daemon RSS per idle connection, bytes (bench/tuning_figures.py: 1,232 in one process,
#: up to 1,365 in a worker; docs/benchmarks.md), rounded up.
DAEMON_BYTES_PER_CONN = 1_400
#: Kernel memory per idle server-side TCP socket, bytes: half the slab growth per loopback
#: pair measured by bench/tuning_figures.py (10.5 KB: socket, inode, file, epoll item on
#: both ends), rounded up.  Socket buffers come on top while data is in flight.
KERNEL_BYTES_PER_CONN = 5_300
#: RSS of one daemon process before any client (Python, Twisted, prometheus-client).
BASE_BYTES_PER_PROCESS = 60 * 2**20
#: Twisted's listen backlog when the endpoint string gives none.
TWISTED_DEFAULT_BACKLOG = 50
#: A connection limit from which a small backlog overflows in a reconnect storm.
STORM_SIZE = 10_000
#: TcpExt counters of connections the kernel dropped before accept().
KERNEL_DROPS = (
    "ListenOverflows",
    "ListenDrops",
    "TCPReqQFullDrop",
    "TCPReqQFullDoCookies",
    "SyncookiesSent",
)

OK, WARN, FAIL = "ok", "WARN", "FAIL"


@dataclass(frozen=True)
class Check:
    level: str
    topic: str
    text: str


@dataclass(frozen=True)
class Machine:
    """What the checks read from the machine (a test can give its own)."""

    nofile_soft: int
    nofile_hard: int
    sysctl: Callable[[str], str | None]
    meminfo: dict[str, int]
    netstat: Callable[[], dict[str, int]]
    cores: int

    @classmethod
    def this(cls, limit_nofile: int | None = None) -> Machine:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if limit_nofile is not None:
            soft = hard = limit_nofile
        return cls(soft, hard, _sysctl, _meminfo(), _netstat, os.cpu_count() or 1)


def _sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return None


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields = value.split()
            if fields and fields[0].isdigit():
                out[key] = int(fields[0]) * (1024 if fields[1:2] == ["kB"] else 1)
    except OSError:
        pass
    return out


def _netstat() -> dict[str, int]:
    """TcpExt counters from /proc/net/netstat (what ``netstat -s`` and ``nstat`` show)."""
    out: dict[str, int] = {}
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return out
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            for name, value in zip(names.split()[1:], values.split()[1:], strict=False):
                out[name] = int(value)
    return out


def _count(n: float) -> str:
    return f"{n:,.0f}"


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


def _int(value: str | None) -> int | None:
    try:
        return int(str(value).split()[0])
    except (ValueError, IndexError):
        return None


# -- the checks ----------------------------------------------------------------------------


def check_open_files(config: Config, machine: Machine) -> list[Check]:
    """Each process needs max_connections + FD_RESERVE descriptors; the daemon raises its soft
    limit to the hard one at start, so the hard limit is what counts."""
    hard = machine.nofile_hard
    workers = config.workers
    configured = config.limits.max_connections
    per_process = 10**9 if hard == resource.RLIM_INFINITY else hard
    room = max(1, per_process - FD_RESERVE)
    where = (
        f"open-file limit {_count(per_process)} (hard RLIMIT_NOFILE; the daemon raises its "
        "soft limit to it)"
    )
    checks = []
    if not configured:
        low = room < LOW_CONNECTION_LIMIT
        checks.append(
            Check(
                WARN if low else OK,
                "open files",
                f"limits.max_connections 0: {'only ' if low else ''}{_count(room)} connections "
                f"per process from the {where}, less {FD_RESERVE}"
                + (f"; {_count(room * workers)} for {workers} workers" if workers > 1 else "")
                + (
                    f". Raise LimitNOFILE= in the unit (or ulimit -n) well above "
                    f"{_count(LOW_CONNECTION_LIMIT + FD_RESERVE)}, or set limits.max_connections"
                    if low
                    else ""
                ),
            )
        )
    elif configured > room:
        checks.append(
            Check(
                FAIL,
                "open files",
                f"limits.max_connections {_count(configured)} needs "
                f"{_count(configured + FD_RESERVE)} file descriptors per process, but the "
                f"{where}: the daemon would cap it to "
                f"{_count(room)}. Raise LimitNOFILE= in the unit (or ulimit -n) to at least "
                f"{_count(configured + FD_RESERVE)}",
            )
        )
    else:
        checks.append(
            Check(
                OK,
                "open files",
                f"limits.max_connections {_count(configured)} (+{FD_RESERVE} reserve) fits the "
                f"{where}" + (f", in each of {workers} workers" if workers > 1 else ""),
            )
        )
    need = (configured or room) + FD_RESERVE
    nr_open = _int(machine.sysctl("fs.nr_open"))
    if nr_open is not None and configured and configured + FD_RESERVE > nr_open:
        checks.append(
            Check(
                FAIL,
                "open files",
                f"fs.nr_open is {_count(nr_open)}: no process may open more, so LimitNOFILE "
                f"cannot reach {_count(configured + FD_RESERVE)}; raise fs.nr_open (sysctl)",
            )
        )
    file_max = _int(machine.sysctl("fs.file-max"))
    total = need * workers
    if file_max is not None and configured and total > file_max:
        checks.append(
            Check(
                FAIL,
                "open files",
                f"fs.file-max is {_count(file_max)} for the whole machine; {workers} process(es) "
                f"x {_count(need)} descriptors = {_count(total)}; raise fs.file-max (sysctl)",
            )
        )
    return checks


def listen_backlog(description: str) -> int | None:
    """The backlog a server endpoint string asks for; None for systemd's (its Backlog=)."""
    kind = description.split(":", 1)[0].strip().lower()
    if kind == "systemd":
        return None
    match = re.search(r"(?:^|:)backlog=(\d+)", description)
    return int(match.group(1)) if match else TWISTED_DEFAULT_BACKLOG


def check_backlog(config: Config, machine: Machine) -> list[Check]:
    backlog = listen_backlog(config.listen)
    somaxconn = _int(machine.sysctl("net.core.somaxconn"))
    syn = _int(machine.sysctl("net.ipv4.tcp_max_syn_backlog"))
    checks = []
    if backlog is None:
        text = "listen is a systemd socket: its Backlog= (default: somaxconn) applies"
        return [Check(OK, "backlog", f"{text}; net.core.somaxconn is {somaxconn}")]
    if somaxconn is not None and backlog > somaxconn:
        checks.append(
            Check(
                WARN,
                "backlog",
                f"listen asks for backlog={backlog}, but net.core.somaxconn is {somaxconn}: "
                f"the kernel caps it to {somaxconn} without a word; raise net.core.somaxconn "
                "(config/sysctl.d/60-heartbeatd.conf)",
            )
        )
    else:
        limit = config.limits.max_connections or (machine.nofile_hard - FD_RESERVE)
        if backlog < 1024 and limit * config.workers >= STORM_SIZE:
            checks.append(
                Check(
                    WARN,
                    "backlog",
                    f"listen backlog is {backlog} for up to {_count(limit * config.workers)} "
                    "clients: a reconnect storm overflows it (clients retry after 1 s, 3 s...); "
                    "add :backlog=4096 to listen",
                )
            )
        else:
            checks.append(
                Check(OK, "backlog", f"listen backlog {backlog} (net.core.somaxconn {somaxconn})")
            )
    if syn is not None and backlog > syn:
        checks.append(
            Check(
                WARN,
                "backlog",
                f"net.ipv4.tcp_max_syn_backlog is {syn}, below the listen backlog {backlog}: "
                "half-open connections beyond it are dropped (or answered with SYN cookies)",
            )
        )
    return checks


def check_memory(config: Config, machine: Machine) -> list[Check]:
    available = machine.meminfo.get("MemAvailable")
    if available is None:
        return [Check(WARN, "memory", "MemAvailable unknown (/proc/meminfo unreadable)")]
    workers = config.workers
    configured = config.limits.max_connections
    per_process = configured or max(1, machine.nofile_hard - FD_RESERVE)
    connections = per_process * workers
    processes = workers + (1 if workers > 1 else 0)  # and the supervisor
    per_conn = DAEMON_BYTES_PER_CONN + KERNEL_BYTES_PER_CONN
    estimate = connections * per_conn + processes * BASE_BYTES_PER_PROCESS
    text = (
        f"{_count(connections)} idle connections x {_count(per_conn)} B (daemon "
        f"{_count(DAEMON_BYTES_PER_CONN)} + kernel {_count(KERNEL_BYTES_PER_CONN)}) + "
        f"{processes} x {_size(BASE_BYTES_PER_PROCESS)} = {_size(estimate)}, against "
        f"MemAvailable {_size(available)}"
    )
    auto = "" if configured else " (limits.max_connections 0: the open-file limit's count)"
    if estimate > available:
        level = FAIL if configured else WARN
        return [
            Check(
                level,
                "memory",
                f"{text}{auto}: not enough memory; lower "
                "limits.max_connections or add nodes (docs/tuning.md)",
            )
        ]
    if estimate > 0.8 * available:
        return [Check(WARN, "memory", f"{text}{auto}: over 80%; messages in flight need more")]
    return [Check(OK, "memory", text + auto)]


def daemon_address(config: Config) -> tuple[str, int] | None:
    """host and port of a ``tcp:``/``tcp6:`` listen string (None for unix: and systemd:).

    Parsed by Twisted's own endpoint-string parser, so escapes (``interface=\\:\\:1``) and
    keyword arguments in any order (``tcp:interface=...:port=9000``) read as the daemon reads
    them; a wildcard interface is probed on the loopback of its family."""
    from twisted.internet.endpoints import _parse  # the parser serverFromString uses

    try:
        args, kwargs = _parse(config.listen)
    except Exception:  # a string the daemon would refuse too: nothing to probe
        return None
    if not args or args[0].lower() not in ("tcp", "tcp6"):
        return None
    v6 = args[0].lower() == "tcp6"
    port = kwargs.get("port", args[1] if len(args) > 1 else "")
    host = kwargs.get("interface", args[2] if len(args) > 2 else "")
    if host in ("0.0.0.0", "::", ""):
        host = "::1" if v6 else "127.0.0.1"
    port = str(port)
    return (host, int(port)) if port.isdigit() and int(port) else None


def daemon_running(config: Config, timeout: float = 1.0) -> bool:
    address = daemon_address(config)
    if address is None:
        return False
    try:
        with socket.create_connection(address, timeout=timeout):
            return True
    except OSError:
        return False


def check_kernel_drops(config: Config, machine: Machine, sample: float) -> list[Check]:
    if not daemon_running(config):
        return [Check(OK, "kernel drops", "no daemon answers on listen; counters not read")]
    first = machine.netstat()
    if not first:
        return [Check(WARN, "kernel drops", "/proc/net/netstat is unreadable")]
    since_boot = ", ".join(f"{name} {first.get(name, 0):,}" for name in KERNEL_DROPS)
    checks = [Check(OK, "kernel drops", f"since boot (every listener): {since_boot}")]
    if sample > 0:
        time.sleep(sample)  # the CLI's own pause between two readings; no reactor here
        second = machine.netstat()
        grew = {n: second.get(n, 0) - first.get(n, 0) for n in KERNEL_DROPS}
        growing = {n: d for n, d in grew.items() if d > 0}
        if growing:
            what = ", ".join(f"{n} +{d}" for n, d in growing.items())
            checks.append(
                Check(
                    WARN,
                    "kernel drops",
                    f"growing now ({what} in {sample:g}s): connections are dropped before "
                    "accept(); raise the backlog and net.core.somaxconn, or add workers",
                )
            )
        else:
            checks.append(Check(OK, "kernel drops", f"not growing over {sample:g}s"))
    elif first.get("ListenOverflows", 0):
        checks.append(
            Check(
                WARN,
                "kernel drops",
                "ListenOverflows is not zero: watch whether it grows (nstat -az "
                "TcpExtListenOverflows), or run with --sample 5",
            )
        )
    return checks


def check_redis(config: Config, timeout: float = 2.0) -> list[Check]:
    url = config.cluster.redis
    if not url:
        return []
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    shown = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            if parts.password:
                password = unquote(parts.password).encode()
                sock.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(password), password))
                answer = sock.recv(256)
                if not answer.startswith(b"+OK"):
                    reply = answer.decode(errors="replace").strip()
                    return [Check(FAIL, "redis", f"{shown} refused the password: {reply}")]
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            answer = sock.recv(256)
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        return [Check(FAIL, "redis", f"cluster.redis {shown} is unreachable: {reason}")]
    if answer.startswith(b"+PONG"):
        return [Check(OK, "redis", f"cluster.redis {shown} answers PING")]
    reply = answer.decode(errors="replace").strip()
    return [Check(FAIL, "redis", f"cluster.redis {shown} answered PING with {reply!r}")]


def check_hot_path() -> list[Check]:
    """Which per-message path this install runs: the compiled one, or pure Python."""
    if ACCELERATED == "c":
        return [Check(OK, "hot path", "compiled (C): heartbeatd.wire._speedups")]
    if NO_EXTENSIONS:
        return [Check(OK, "hot path", "pure Python, as HEARTBEATD_NO_EXTENSIONS asks")]
    return [
        Check(
            WARN,
            "hot path",
            "pure Python: the C hot path was not built (no compiler when heartbeatd was "
            "installed?); reinstall with gcc and the Python headers (docs/development.md)",
        )
    ]


def diagnose(config: Config, machine: Machine, sample: float = 0.0) -> list[Check]:
    return [
        *check_hot_path(),
        *check_open_files(config, machine),
        *check_backlog(config, machine),
        *check_memory(config, machine),
        *check_kernel_drops(config, machine, sample),
        *check_redis(config),
    ]


#: The longest --sample: the doctor sleeps that long between two readings.
MAX_SAMPLE = 3600.0


def _sample(text: str) -> float:
    """``--sample``: a finite number of seconds in 0..MAX_SAMPLE (argparse exits 2 otherwise)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 <= value <= MAX_SAMPLE:
        raise argparse.ArgumentTypeError(
            f"a number of seconds from 0 to {MAX_SAMPLE:g}, not {text!r}"
        )
    return value


def _limit(text: str) -> int:
    """``--limit-nofile``: a positive whole number of descriptors."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a positive number of open files, not {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="heartbeat doctor",
        description="Check this machine against a heartbeatd configuration: open files, "
        "listen backlog, memory, the kernel's drop counters, Redis. Exit 0: nothing would "
        "break (warnings may be printed); 1: something would; 2: the config is unreadable.",
    )
    parser.add_argument("--config", "-c", metavar="FILE", help="the daemon's YAML file")
    parser.add_argument(
        "--limit-nofile",
        type=_limit,
        metavar="N",
        help="check against this open-file limit (the unit's LimitNOFILE=) instead of this "
        "shell's hard limit",
    )
    parser.add_argument(
        "--sample",
        type=_sample,
        default=0.0,
        metavar="SECONDS",
        help="with a daemon running, read the kernel's drop counters twice, this far apart",
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        sys.stderr.write("heartbeat doctor: invalid configuration:\n")
        sys.stderr.write("".join(f"  {line}\n" for line in e.errors))
        return 2
    machine = Machine.this(args.limit_nofile)
    available = machine.meminfo.get("MemAvailable", 0)
    print(
        f"heartbeat doctor: {args.config or 'built-in defaults'} on {socket.gethostname()} "
        f"({machine.cores} cores, {_size(available)} available)"
    )
    checks = diagnose(config, machine, args.sample)
    for check in checks:
        print(f"  {check.level:<4}  {check.topic}: {check.text}")
    failed = sum(c.level == FAIL for c in checks)
    warned = sum(c.level == WARN for c in checks)
    if failed:
        print(f"{failed} problem(s) would break the daemon; {warned} warning(s).")
        return 1
    print(f"Nothing would break the daemon; {warned} warning(s).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

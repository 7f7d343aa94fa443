"""The supervisor's side of ``workers: N``: bind the sockets, run the workers, speak for them.

With ``workers > 1`` the twistd process is a `Supervisor`: it binds the listening and admin
sockets, spawns the workers (``twistd heartbeatd`` again, see `heartbeatd.daemon.worker`),
replaces those that exit, relays their logs and status, and answers systemd and the operator
for all of them.  The whole design is in `heartbeatd.daemon.workers`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from heartbeatd._logging import get_logger
from heartbeatd._version import __version__
from heartbeatd.config import Config, ConfigError, private_unix_endpoint, worker_node_id
from heartbeatd.daemon.config import load_config
from heartbeatd.daemon.sdnotify import Notifier
from heartbeatd.daemon.service import HOT_PATHS
from heartbeatd.daemon.signals import ShutdownSignals
from heartbeatd.daemon.worker import ADMIN_FD, LISTEN_FD, MAX_LINE, STATUS_FD, WORKER_ENV
from heartbeatd.server.protocol import format_address
from heartbeatd.wire import ACCELERATED

__all__ = ["Supervisor", "WorkerProcess"]

# One namespace for both sides, as before the split: operators filter logs on it.
log = get_logger("heartbeatd.daemon.workers")

#: Environment only the supervisor may act on (systemd talks to the main process only).
_SUPERVISOR_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


class _SharedSocket(protocol.Factory):
    """The supervisor binds with this but never accepts (it stops reading); workers do."""

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


class WorkerProcess(protocol.ProcessProtocol):
    """The supervisor's view of one worker: its pipes and its state."""

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid: int | None = None
        self.ready_at: float | None = None
        self.status = "starting"
        self.ended = False
        self._buffers: dict[int, bytes] = {}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def command(self, line: bytes) -> None:
        if not self.ended and self.transport is not None:
            self.transport.write(line + b"\n")

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffer = self._buffers.get(childFD, b"") + data
        *lines, rest = buffer.split(b"\n")
        if len(rest) > MAX_LINE:  # a line without end: pass on what we have, keep no more
            lines.append(rest[:MAX_LINE])
            rest = b""
        self._buffers[childFD] = rest
        for line in lines:
            text = line.decode("utf-8", "replace").rstrip("\r")
            if not text:
                continue
            if childFD == STATUS_FD:
                self.supervisor.worker_status(self, text)
            else:
                self.supervisor.relay(self, text)

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        for fd, rest in self._buffers.items():
            if rest and fd != STATUS_FD:
                self.supervisor.relay(self, rest.decode("utf-8", "replace"))
        self._buffers.clear()
        self.supervisor.worker_ended(self, reason)


def _describe_exit(reason: Failure) -> str:
    """ "exit status 3" or "killed by signal 9", for a worker's end."""
    value: Any = reason.value
    sig = getattr(value, "signal", None)
    if sig:
        return f"killed by signal {sig}"
    return f"exit status {getattr(value, 'exitCode', None) or 0}"


class Supervisor(Service):
    """Binds the sockets, runs ``config.workers`` workers on them, and speaks for them all."""

    #: A worker that served this long has its crash count reset.
    STABLE_AFTER = 10.0
    #: Seconds between STATUS= updates to systemd.
    STATUS_INTERVAL = 5.0
    #: Seconds workers get to report a reload before the supervisor reports READY anyway.
    RELOAD_TIMEOUT = 30.0
    #: Seconds beyond the drain and close timeouts before remaining workers are killed.
    STOP_MARGIN = 10.0

    def __init__(
        self,
        config: Config,
        config_path: str | None,
        overrides: Mapping[str, Any],
        reactor: Any,
        notifier: Notifier | None = None,
        executable: str = sys.executable,
        admin_token: str = "",
        startup: Any = None,
    ) -> None:
        self.config = config
        #: Where a start-up failure is written besides the log (a `LaunchStderr`).
        self.startup = startup
        self.admin_token = admin_token
        self.config_path = config_path
        self.overrides = dict(overrides)
        self._reactor = reactor
        self.notifier = notifier or Notifier({})
        self.executable = executable
        if config.cluster.node_id:
            self.node_base = config.cluster.node_id
        else:  # one random base per start, as a single daemon gets
            from heartbeatd.cluster.redis import default_node_id

            self.node_base = default_node_id()
        self.count = config.workers
        self.workers: dict[int, WorkerProcess] = {}
        self.port: IListeningPort | None = None
        self.admin_port: IListeningPort | None = None
        self.restarts = 0
        self.stopping = False
        self._failures = [0] * self.count
        self._pending: dict[int, Any] = {}  # index -> the delayed call that respawns it
        self._policy = backoffPolicy(
            initialDelay=0.2, maxDelay=30.0, factor=2.0, jitter=lambda: random.uniform(0, 0.1)
        )
        self._all_ready = False
        self._reloading: set[int] = set()
        self._reload_timer: Any = None
        self._all_exited: list[Deferred[None]] = []
        self._status_loop: LoopingCall | None = None
        #: The private directory of the workers' admin sockets, and each index's current one.
        self._admin_dir: str | None = None
        self._admin_sockets: dict[int, str] = {}
        self._admin_serial = 0

    # -- sockets -----------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        from twisted.internet.endpoints import serverFromString

        from heartbeatd.daemon.service import _bind

        super().privilegedStartService()
        config = self.config
        endpoint = serverFromString(self._reactor, config.listen)
        self.port = _bind(endpoint, _SharedSocket(), config.listen, self.startup)
        self.port.stopReading()  # type: ignore[attr-defined]
        log.info(
            "heartbeatd {version} listening on {address} ({count} workers, {framing} framing, "
            "hot path in {path})",
            version=__version__,
            address=format_address(self.port.getHost()),
            count=self.count,
            framing=config.framing,
            path=HOT_PATHS[ACCELERATED],
            accelerated=ACCELERATED,
        )
        if config.admin.listen:
            from heartbeatd.daemon.admin import admin_policy
            from heartbeatd.daemon.supervisor_admin import supervisor_site

            site = supervisor_site(
                self,
                self._reactor,
                self.admin_token or config.admin.token,
                admin_policy(config.admin, self.admin_token),
                config.admin.access_log,
            )
            endpoint = serverFromString(self._reactor, private_unix_endpoint(config.admin.listen))
            self.admin_port = _bind(endpoint, site, config.admin.listen, self.startup)
            log.info(
                "admin API listening on {address} (answering for all {count} workers)",
                address=format_address(self.admin_port.getHost()),
                count=self.count,
            )
        if self.startup is not None:  # started: let go of the launching stderr
            self.startup.close()

    def _admin_socket_for(self, index: int) -> socket.socket | None:
        """A new listening UNIX socket for worker ``index``'s private admin API.

        A fresh path per worker process: Twisted unlinks a UNIX port's path when the port
        stops, so a replacement cannot reuse its predecessor's.
        """
        try:
            if self._admin_dir is None:  # made after twistd dropped privileges: ours
                self._admin_dir = tempfile.mkdtemp(prefix="heartbeatd-admin-")
            self._admin_serial += 1
            path = os.path.join(self._admin_dir, f"w{index}-{self._admin_serial}.sock")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(path)
                sock.listen(64)
            except OSError:
                sock.close()
                raise
        except OSError as e:
            log.error(
                "Worker {index}: cannot make its private admin socket ({error}); the admin "
                "API will not reach it",
                index=index,
                error=e,
            )
            return None
        self._forget_admin_socket(index)
        self._admin_sockets[index] = path
        return sock

    def _forget_admin_socket(self, index: int) -> None:
        path = self._admin_sockets.pop(index, None)
        if path is not None:
            with contextlib.suppress(OSError):  # a worker that stopped cleanly removed it
                os.unlink(path)

    # -- lifecycle ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self._running)

    def _running(self) -> None:
        ShutdownSignals(self._reactor, self.reload).install()
        log.info(
            "Supervisor (pid {pid}) starting {count} workers, cluster nodes {first} .. {last}",
            pid=os.getpid(),
            count=self.count,
            first=worker_node_id(self.node_base, 0),
            last=worker_node_id(self.node_base, self.count - 1),
        )
        for index in range(self.count):
            self._spawn(index)
        self.notifier.start_watchdog(self._reactor)
        if self.notifier.enabled:
            self._status_loop = LoopingCall(lambda: self.notifier.status(self.status()))
            self._status_loop.clock = self._reactor
            self._status_loop.start(self.STATUS_INTERVAL, now=False)

    def _spawn(self, index: int) -> None:
        self._pending.pop(index, None)
        if self.stopping or self.port is None:
            return
        admin = self._admin_socket_for(index) if self.admin_port is not None else None
        settings = {
            "index": index,
            "node_id": worker_node_id(self.node_base, index),
            "admin": admin is not None,
            "overrides": self.overrides,
        }
        env = {k: v for k, v in os.environ.items() if k not in _SUPERVISOR_ONLY}
        env[WORKER_ENV] = json.dumps(settings)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", STATUS_FD: "r"}
        child_fds[LISTEN_FD] = self.port.fileno()  # type: ignore[attr-defined]
        if admin is not None:
            child_fds[ADMIN_FD] = admin.fileno()
        argv = [
            self.executable,
            "-c",
            _TWISTD,
            "--nodaemon",
            "--pidfile=",
            "--logger=heartbeatd.daemon.worker.worker_observer",
            "heartbeatd",
        ]
        if self.config_path is not None:
            argv += ["--config", self.config_path]
        worker = WorkerProcess(self, index)
        self.workers[index] = worker
        try:
            self._reactor.spawnProcess(worker, self.executable, argv, env=env, childFDs=child_fds)
        finally:
            if admin is not None:  # the worker has its copy; the path stays for connecting
                admin.close()
        log.info("Worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def worker_ended(self, worker: WorkerProcess, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
            self._forget_admin_socket(worker.index)
        self._reloading.discard(worker.index)
        how = _describe_exit(reason)
        if self.stopping:
            log.info(
                "Worker {index} (pid {pid}) exited: {how}",
                index=worker.index,
                pid=worker.pid,
                how=how,
            )
            if not self.workers:
                waiters, self._all_exited = self._all_exited, []
                for d in waiters:
                    d.callback(None)
            return
        now = self._reactor.seconds()
        if worker.ready_at is not None and now - worker.ready_at >= self.STABLE_AFTER:
            self._failures[worker.index] = 0
        delay = self._policy(self._failures[worker.index])
        self._failures[worker.index] += 1
        self.restarts += 1
        log.warn(
            "Worker {index} (pid {pid}) exited unexpectedly ({how}); replacing it in {delay:.2f}s",
            index=worker.index,
            pid=worker.pid,
            how=how,
            delay=delay,
        )
        self._pending[worker.index] = self._reactor.callLater(delay, self._spawn, worker.index)

    def stopService(self) -> Deferred[None]:
        """Tell every worker to stop (each drains its clients), then close the sockets."""
        super().stopService()
        self.stopping = True
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        self.notifier.stopping(f"stopping {len(self.workers)} worker(s)")
        self.notifier.stop_watchdog()
        if self._status_loop is not None and self._status_loop.running:
            self._status_loop.stop()
        if self._reload_timer is not None and self._reload_timer.active():
            self._reload_timer.cancel()
        exited: Deferred[None] = succeed(None)
        if self.workers:
            log.info("Stopping {count} worker(s)", count=len(self.workers))
            exited = Deferred()
            self._all_exited.append(exited)
            for worker in list(self.workers.values()):
                worker.command(b"stop")
            shutdown = self.config.shutdown
            deadline = shutdown.drain_timeout + shutdown.close_timeout + self.STOP_MARGIN
            killer = self._reactor.callLater(deadline, self._kill_remaining)
            exited.addBoth(lambda r: (killer.cancel() if killer.active() else None, r)[1])

        def close_sockets(_: object) -> None:
            for port in (self.port, self.admin_port):
                if port is not None:
                    port.stopListening()
            self.port = self.admin_port = None
            if self._admin_dir is not None:
                shutil.rmtree(self._admin_dir, ignore_errors=True)
                self._admin_dir = None
                self._admin_sockets.clear()
            log.info("All workers stopped")

        return exited.addCallback(close_sockets)

    def _kill_remaining(self) -> None:
        for worker in list(self.workers.values()):
            log.warn(
                "Worker {index} (pid {pid}) did not stop in time; killing it",
                index=worker.index,
                pid=worker.pid,
            )
            with contextlib.suppress(Exception):  # already gone: processEnded follows
                worker.transport.signalProcess("KILL")

    # -- reload and readiness ----------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: every worker re-reads the file; READY again once all have."""
        if self.stopping or not self.workers:
            return
        log.info("SIGHUP: reloading {count} worker(s)", count=len(self.workers))
        self._check_restart_keys()
        self.notifier.reloading()
        self._reloading = set(self.workers)
        for worker in self.workers.values():
            worker.command(b"reload")
        if self._reload_timer is not None and self._reload_timer.active():
            self._reload_timer.cancel()
        self._reload_timer = self._reactor.callLater(self.RELOAD_TIMEOUT, self._reload_done)

    def _check_restart_keys(self) -> None:
        """Say so when the file changes ``workers``: it applies at the next start only.

        The workers re-read the rest and report what they keep (``listen``, ``admin``, ...),
        as a single daemon does; they run with ``workers: 1`` and cannot see this key.
        """
        if self.config_path is None:
            return
        try:
            new = load_config(self.config_path, self.overrides)
        except ConfigError:
            return  # every worker rejects the file and says why
        if new.workers != self.count:
            log.warn(
                "{key} cannot change while running; keeping {old!r} (restart to use {new!r})",
                key="workers",
                old=self.count,
                new=new.workers,
            )

    def _reload_done(self) -> None:
        if self._reloading:
            late = sorted(self._reloading)
            log.warn("Workers {indexes} did not report their reload", indexes=late)
        self._reloading.clear()
        if self._reload_timer is not None and self._reload_timer.active():
            self._reload_timer.cancel()
        self._reload_timer = None
        self.notifier.ready(self.status())

    def worker_status(self, worker: WorkerProcess, line: str) -> None:
        try:
            fields = json.loads(line)
        except ValueError:
            fields = None
        if not isinstance(fields, dict):
            log.warn(
                "Worker {index} sent a bad status line {line!r}",
                index=worker.index,
                line=line[:200],
            )
            return
        if "STATUS" in fields:
            worker.status = str(fields["STATUS"])
        if str(fields.get("READY")) != "1":
            return
        first = worker.ready_at is None
        if first:
            worker.ready_at = self._reactor.seconds()
            if self._all_ready:
                log.info(
                    "Worker {index} (pid {pid}) serving again", index=worker.index, pid=worker.pid
                )
        if not self._all_ready and self.ready_count() == self.count:
            self._all_ready = True
            log.info(
                "heartbeatd is ready: {count} workers serving (supervisor pid {pid})",
                count=self.count,
                pid=os.getpid(),
            )
            self.notifier.ready(self.status())
        elif not first and worker.index in self._reloading:
            self._reloading.discard(worker.index)
            if not self._reloading:
                log.info("Reload done in every worker")
                self._reload_done()

    def worker_states(self) -> dict[int, str]:
        """Each index's state: serving, starting, restarting (waiting to respawn) or stopped."""
        states = {}
        for index in range(self.count):
            worker = self.workers.get(index)
            if worker is None:
                states[index] = "restarting" if index in self._pending else "stopped"
            else:
                states[index] = "starting" if worker.ready_at is None else "serving"
        return states

    def worker_pid(self, index: int) -> int | None:
        worker = self.workers.get(index)
        return None if worker is None else worker.pid

    def admin_socket(self, index: int) -> str | None:
        """The path of worker ``index``'s private admin socket, when it has one."""
        return self._admin_sockets.get(index) if index in self.workers else None

    def ready_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.ready_at is not None)

    def status(self) -> str:
        """One line for systemd's STATUS=: the workers, and what each reported."""
        parts = [f"w{i}: {self.workers[i].status}" for i in sorted(self.workers)]
        return f"{self.ready_count()}/{self.count} workers serving; " + ", ".join(parts)

    # -- logs --------------------------------------------------------------------------------

    def relay(self, worker: WorkerProcess, line: str) -> None:
        """Write a worker's log event out through our observer, with its index and pid."""
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "text" not in record:
            # Not an event: output before logging started, or an interpreter crash.
            log.warn("[worker {worker}] {text}", worker=worker.index, text=line)
            return
        try:
            level = LogLevel.levelWithName(str(record.get("level", "info")))
        except Exception:
            level = LogLevel.info
        text = str(record["text"])
        if "traceback" in record:
            text += "\n" + str(record["traceback"])
        fields = {
            k: v
            for k, v in record.items()
            if k not in ("time", "level", "text", "traceback", "format")
        }
        fields["worker_namespace"] = fields.pop("namespace", "")
        fields["worker_pid"] = worker.pid
        fields.update(worker=worker.index, text=text)
        log.emit(level, "[worker {worker}] {text}", **fields)

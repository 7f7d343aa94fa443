"""``workers: N``: one listening socket served by N worker processes under a supervisor.

With ``workers > 1`` the twistd process is a **supervisor**: it binds the listening socket (or
adopts systemd's) and the admin socket itself, never accepts on them, and spawns N workers
with `spawnProcess`.  Each worker is a full heartbeatd server (``twistd heartbeatd`` again)
that adopts the inherited socket (``adoptStreamPort``) and joins the cluster through Redis as
node ``{cluster.node_id}-w{index}``, so push, broadcast, presence and channels span them.

Why one inherited socket rather than SO_REUSEPORT: the socket outlives every worker, so a
worker that dies or is replaced drops no queued connection (with SO_REUSEPORT the kernel
resets those in the dead socket's queue), it works unchanged with systemd socket activation
(one fd), and no other process of the same user can bind into the group.  The price: the
kernel does not balance accepts evenly (whichever worker wakes first accepts).

The supervisor talks to each worker over pipes: it writes ``stop``/``reload`` lines to the
worker's stdin (a worker whose stdin closes, because the supervisor died, drains and exits),
the worker writes its sd_notify messages (READY, STATUS, RELOADING) as JSON lines on fd 5,
and its log events as JSON lines on stdout, which the supervisor writes out in its own
``log.format`` with the worker's index.  The supervisor sends READY to systemd once every
worker serves, replaces a worker that exits (with backoff, so a crash loop does not spin),
turns SIGTERM into ``stop`` for all (exit 0 when all have exited) and SIGHUP into ``reload``.

The supervisor serves the admin API itself, for the whole daemon
(`heartbeatd.daemon.supervisor_admin`): each worker serves its own admin API on a private UNIX
socket the supervisor binds (a fresh one per worker process, in a directory only our user can
enter) and passes as fd 4; the supervisor asks them, each request with a deadline.

The code is in two modules, one per side: `heartbeatd.daemon.worker` (what a worker runs) and
`heartbeatd.daemon.supervisor` (what the supervisor runs); this one names both.
"""

from __future__ import annotations

from heartbeatd.daemon.supervisor import Supervisor, WorkerProcess
from heartbeatd.daemon.worker import (
    ADMIN_FD,
    LISTEN_FD,
    STATUS_FD,
    WORKER_ENV,
    PipeNotifier,
    WorkerFactory,
    WorkerLink,
    WorkerSettings,
    adopted_endpoint,
    worker_observer,
    worker_settings,
)

__all__ = [
    "ADMIN_FD",
    "LISTEN_FD",
    "STATUS_FD",
    "WORKER_ENV",
    "PipeNotifier",
    "Supervisor",
    "WorkerFactory",
    "WorkerLink",
    "WorkerProcess",
    "WorkerSettings",
    "adopted_endpoint",
    "worker_observer",
    "worker_settings",
]

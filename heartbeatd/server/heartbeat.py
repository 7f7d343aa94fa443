"""The heartbeat sweep: ping quiet clients, evict silent ones, never blame clients for our stalls.

Cost model, so the sweep holds at 100k connections:

* Clients live in an insertion-ordered dict that each read moves to the end, so the dict is
  ordered by last-seen time.  A sweep walks it from the front and stops at the first client
  heard within the interval: it touches only clients that are due, never the busy ones.
* The due clients are then handled ``sweep_batch`` at a time, yielding to the reactor between
  batches (``callLater(0)``), so even 100k due clients do not block I/O for long.
* The ping frame is encoded once per sweep and shared by every client.

Liveness is a complete frame: `last_seen` moves only when one arrives.  A frame that is still
arriving protects its client from the silence rule for up to ``frame_timeout`` seconds after
it began (a large frame on a slow link gets through), and no longer: a peer that trickles a
frame it never finishes is closed with ``frame_timeout``.  New connections get
``first_frame_timeout`` seconds to send their first frame; a client that only listens is
pinged halfway through, and its pong counts.

Stalls: when the reactor was blocked (a slow handler, swapping, a paused VM), the sweep runs
late, and the frames clients sent meanwhile are still unread in the sockets, because a
reactor runs due timers before it polls for I/O.  Evicting then would punish healthy clients
for the daemon's own stall (socket.io, autobahn and Netty users report exactly this).  So
silence is measured on an *alive clock* that stops during stalls: every detected stall is
added to `stalled` and subtracted from the reactor's time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from heartbeatd._logging import get_logger

__all__ = ["HeartbeatMonitor", "Watched"]

log = get_logger(__name__)


class Watched(Protocol):
    """What the sweep needs of a connection (`heartbeatd.server.connection.Connection`)."""

    last_seen: float
    frame_started: float | None
    awaiting_first_frame: bool
    pings_unanswered: int
    connected: bool
    close_reason: str | None

    def send_heartbeat(self, frame: Any, now: float) -> None: ...

    def evict(self, reason: str, detail: str = "") -> None: ...


class HeartbeatMonitor:
    """Runs the sweep from a `LoopingCall` on an injected clock."""

    #: A sweep later than this fraction of the interval (and at least `MIN_STALL` s) is a stall.
    STALL_FRACTION = 0.1
    MIN_STALL = 0.05

    def __init__(
        self,
        clients: Mapping[str, Watched],
        clock: IReactorTime,
        interval: float,
        timeout: float,
        ping_frame: Callable[[int], Any],
        batch: int = 1000,
        *,
        frame_timeout: float = 60.0,
        first_frame_timeout: float = 0.0,
        on_sweep: Callable[[], object] | None = None,
        after_sweep: Callable[[], object] | None = None,
    ) -> None:
        self._clients = clients
        self._clock = clock
        self.interval = interval
        self.timeout = timeout
        self.batch = batch
        self._ping_frame = ping_frame
        self.frame_timeout = frame_timeout
        self.first_frame_timeout = first_frame_timeout
        self._on_sweep = on_sweep
        #: Called once each sweep's last batch is done (the daemon gives back the memory the
        #: sweep freed: heartbeatd.daemon.malloc.give_back_free_memory).
        self.after_sweep = after_sweep
        self._loop: LoopingCall | None = None
        #: Connections that have not sent a frame yet, oldest first.  Their start is their
        #: ``last_seen`` (set on connect, and moved only by a frame, which ends the wait), so
        #: no (time, client) tuple is kept per connection: ~90 bytes each, for 10 s.
        self._newcomers: deque[Watched] = deque()
        self._newcomer_loop: LoopingCall | None = None
        self._last_due = 0.0
        self._sequence = 0
        #: Seconds of detected reactor stall, excluded from every client's silence.
        self.stalled = 0.0
        self.stalls = 0
        self.sweeps = 0
        self.pings_sent = 0
        self.evicted = 0
        #: Reactor seconds the last sweep spent in its batches, and how many clients were due.
        self.last_sweep_busy = 0.0
        self.last_sweep_due = 0
        #: The longest single batch of the last sweep: how long it blocked the reactor at once.
        self.last_sweep_longest_batch = 0.0
        #: How late the last sweep ran (seconds): the reactor's lag, measured once per interval.
        self.last_lateness = 0.0

    def now(self) -> float:
        """The alive clock: reactor time minus every stall detected so far."""
        return self._clock.seconds() - self.stalled

    @property
    def running(self) -> bool:
        return self._loop is not None and self._loop.running

    def start(self) -> None:
        if self.running:
            return
        loop = LoopingCall.withCount(self._sweep)
        loop.clock = self._clock
        self._loop = loop
        self._last_due = self._clock.seconds()
        loop.start(self.interval, now=False).addErrback(self._loop_died)
        if self.first_frame_timeout > 0:
            newcomers = LoopingCall(self._check_newcomers)
            newcomers.clock = self._clock
            self._newcomer_loop = newcomers
            # A quarter period: a newcomer is pinged between 1/2 and 3/4 of its time and
            # closed by 5/4 of it at the latest.
            newcomers.start(self.first_frame_timeout / 4, now=False).addErrback(self._loop_died)

    def stop(self) -> None:
        if self.running:
            assert self._loop is not None
            self._loop.stop()
        self._loop = None
        if self._newcomer_loop is not None and self._newcomer_loop.running:
            self._newcomer_loop.stop()
        self._newcomer_loop = None

    def reconfigure(
        self, interval: float, timeout: float, *, first_frame_timeout: float | None = None
    ) -> None:
        """Apply a new interval/timeouts to the running sweep (live reload)."""
        self.timeout = timeout
        restart = interval != self.interval
        if first_frame_timeout is not None and first_frame_timeout != self.first_frame_timeout:
            self.first_frame_timeout = first_frame_timeout
            restart = True
        self.interval = interval
        if restart and self.running:
            self.stop()
            self.start()

    # -- new connections ----------------------------------------------------------------------

    def watch_newcomer(self, client: Watched) -> None:
        """Track a new connection until its first frame (``first_frame_timeout``)."""
        if self.first_frame_timeout > 0:
            self._newcomers.append(client)

    def _check_newcomers(self) -> None:
        # Must never raise (it runs in a LoopingCall).  Newcomers are in arrival order, so
        # the walk stops at the first one too young to need anything.
        try:
            now = self.now()
            limit = self.first_frame_timeout
            newcomers = self._newcomers
            keep: list[Watched] = []
            frame: bytes | None = None
            while newcomers:
                client = newcomers[0]
                if not client.awaiting_first_frame or not client.connected:
                    newcomers.popleft()
                    continue
                age = now - client.last_seen
                if age < limit / 2:
                    break
                newcomers.popleft()
                if age >= limit:
                    if client.close_reason is None:
                        client.evict(
                            "first_frame_timeout",
                            f"no complete frame within {limit:g}s of connecting "
                            "(limits.first_frame_timeout)",
                        )
                    continue
                if client.pings_unanswered == 0:
                    if frame is None:
                        self._sequence += 1
                        frame = self._ping_frame(self._sequence)
                    self.pings_sent += 1
                    client.send_heartbeat(frame, self._clock.seconds())
                keep.append(client)
            newcomers.extendleft(reversed(keep))
        except Exception:
            log.failure("Checking new connections failed; the check runs again")

    def _loop_died(self, failure: Failure) -> None:
        log.failure("The heartbeat loop stopped unexpectedly", failure)

    # -- the sweep --------------------------------------------------------------------------

    def _sweep(self, count: int) -> Deferred[None] | None:
        # Must never raise: an exception would stop the LoopingCall for good.
        try:
            self._note_lateness(count)
            if self._on_sweep is not None:
                self._on_sweep()
            return self._start_sweep()
        except Exception:
            log.failure("Heartbeat sweep failed; it will run again next interval")
            return None

    def _note_lateness(self, count: int) -> None:
        real_now = self._clock.seconds()
        lateness = real_now - (self._last_due + self.interval)
        self._last_due += count * self.interval
        self.last_lateness = max(lateness, 0.0)
        if lateness > max(self.MIN_STALL, self.STALL_FRACTION * self.interval):
            self.stalled += lateness
            self.stalls += 1
            log.warn(
                "Reactor stalled: heartbeat sweep ran {lateness:.3f}s late; client deadlines "
                "extended by the same amount",
                lateness=lateness,
            )

    def _start_sweep(self) -> Deferred[None] | None:
        self.sweeps += 1
        cutoff = self.now() - self.interval
        due: list[Watched] = []
        for client in self._clients.values():  # oldest first: stop at the first fresh one
            if client.last_seen > cutoff:
                break
            due.append(client)
        self.last_sweep_due = len(due)
        self.last_sweep_busy = 0.0
        self.last_sweep_longest_batch = 0.0
        if not due:
            return None
        self._sequence += 1
        frame = self._ping_frame(self._sequence)
        done: Deferred[None] = Deferred()
        self._run_batch(due, 0, frame, done)
        return done

    def _run_batch(
        self, due: list[Watched], start: int, frame: bytes, done: Deferred[None]
    ) -> None:
        clock = self._clock
        began = clock.seconds()
        now = self.now()
        cutoff = now - self.interval
        timeout = self.timeout
        frame_timeout = self.frame_timeout
        end = min(start + self.batch, len(due))
        for client in due[start:end]:
            if not client.connected or client.close_reason is not None:
                continue
            if client.last_seen > cutoff:
                continue  # heard from while earlier batches ran
            silent = now - client.last_seen
            started = client.frame_started
            try:
                if started is not None and now - started > frame_timeout:
                    self.evicted += 1
                    client.evict(
                        "frame_timeout",
                        f"a frame began {now - started:.1f}s ago and is still incomplete "
                        f"(limits.frame_timeout is {frame_timeout:g}s)",
                    )
                elif started is not None:
                    continue  # a frame is still arriving: not silent, not yet too slow
                elif silent > timeout and client.pings_unanswered > 0:
                    self.evicted += 1
                    client.evict(
                        "heartbeat_timeout",
                        f"silent for {silent:.1f}s (timeout {timeout:g}s), "
                        f"{client.pings_unanswered} ping(s) unanswered",
                    )
                else:
                    self.pings_sent += 1
                    client.send_heartbeat(frame, began)
            except Exception:
                log.failure("Heartbeat of one client failed; the sweep goes on")
        spent = clock.seconds() - began
        self.last_sweep_busy += spent
        self.last_sweep_longest_batch = max(self.last_sweep_longest_batch, spent)
        if end < len(due):
            clock.callLater(0, self._run_batch, due, end, frame, done)
        else:
            if self.after_sweep is not None:
                try:
                    self.after_sweep()
                except Exception:
                    log.failure("The after-sweep step failed; the sweep goes on")
            done.callback(None)

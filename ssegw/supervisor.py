"""The supervisor: N worker processes, restarted when they die, replaced without downtime.

Strategy (after gunicorn's arbiter, on asyncio):
- The supervisor creates one listening socket per worker *slot*, each bound to the public
  port with SO_REUSEPORT, and keeps them open for its whole life.  A worker inherits its
  slot's socket.  Because the supervisor never closes a slot socket, the connections queued
  in it are never reset: a crashed worker's replacement, or a reloaded generation, simply
  accepts them.  (Closing a SO_REUSEPORT socket resets whatever sits in its accept queue;
  this is how reload avoids that.)
- Signal handlers only enqueue; one loop dispatches ``handle_<name>``.
- A worker that exits while it should be running is restarted with exponential backoff
  (0.25 s doubling to 30 s, reset once a worker has run for a minute); the others keep
  serving meanwhile.
- ``SIGHUP``: start a new generation (same slots), wait until each new worker answers
  ``/readyz`` on its control socket, then send the old generation SIGTERM (they drain).
  If the new generation is not ready in time it is stopped and the old one keeps serving.
- ``SIGTERM``/``SIGINT``: ``/readyz`` answers 503 at once; every worker gets SIGTERM and
  drains (jittered ``retry:``, closes spread over drain_timeout); after
  drain_timeout + grace the stragglers get SIGKILL; exit 0.
- Each worker serves the admin routes on a unix control socket; the supervisor's own admin
  listener answers ``/metrics`` and ``/admin/stats`` by asking every worker, so one scrape
  covers the host.
- Heartbeats (gunicorn's worker timeout, done by asking rather than by a file's mtime): every
  ``heartbeat`` (1 s, less for a short worker_timeout) the supervisor asks each worker for its
  ``/internal/snapshot`` over the control socket.  The answer proves the worker's event loop
  runs, and carries its counters.  A worker that answered once and then stays silent longer
  than ``worker_timeout`` is stalled: it is killed (SIGKILL), logged once with how long it was
  silent, and restarted like a crash.  A worker that has not answered yet is starting (waiting
  for its broker, at most READY_TIMEOUT), not stalled.
- systemd (:mod:`ssegw.notify`; every call a no-op without ``$NOTIFY_SOCKET``): ``READY=1``
  once every slot's worker answers; ``RELOADING=1`` + ``MONOTONIC_USEC`` when a SIGHUP reload
  starts and ``READY=1`` when it ends (either way: a failed reload keeps the old generation
  serving); ``STOPPING=1`` at drain; ``STATUS=`` every few seconds.  ``WATCHDOG=1`` goes out at
  half ``$WATCHDOG_USEC`` only while every worker that has answered once answered within the
  last two heartbeats -- so a worker stalled for longer than systemd's ``WatchdogSec`` gets the
  whole service restarted, while one the supervisor replaces sooner (``worker_timeout`` below
  ``WatchdogSec``) costs a few withheld pings only.
- Counters never go backwards while the supervisor lives: per worker it keeps the highest
  counter values seen (every heartbeat and scrape), and when a worker exits -- crash, kill or
  reload -- adds them to a *retired* total that ``/metrics`` reports as one more snapshot.
  What a worker counted after its last answer is lost (at most one heartbeat's worth); no
  value ever reported is taken back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable

import orjson

from .config import Config, ConfigError
from .metrics import LABELLED, METRICS
from .notify import Notifier, child_env, keep_alive, report_status

log = logging.getLogger("ssegw.supervisor")

#: Restart backoff bounds (seconds) and how long a worker must live to reset the backoff.
BACKOFF_MIN, BACKOFF_MAX, STABLE_AFTER = 0.25, 30.0, 60.0
#: How long a new generation may take to become ready on reload before we give up on it.
READY_TIMEOUT = 30.0
#: Extra time after drain_timeout before draining workers are killed.
KILL_GRACE = 5.0
#: Bound on one control-socket round trip.
CONTROL_TIMEOUT = 3.0
#: Heartbeat period: each worker is asked for its snapshot this often (at most a quarter of
#: worker_timeout, so that a stall is seen several heartbeats before the worker is killed).
HEARTBEAT_S = 1.0
#: Floor of the heartbeat period (a tiny worker_timeout must not make it a busy loop).
HEARTBEAT_MIN_S = 0.05
#: How often the systemd STATUS= line is refreshed.
STATUS_S = 5.0

ENV_FD = "SSEGW__LISTEN_FD"
ENV_CONTROL = "SSEGW__CONTROL"


class WorkerProc:
    __slots__ = ("slot", "gen", "proc", "control", "started", "retiring", "last_seen", "probing", "killed",
                 "exiting", "gone", "snap", "counters")

    def __init__(self, slot: int, gen: int, proc: asyncio.subprocess.Process, control: str) -> None:
        self.slot = slot
        self.gen = gen
        self.proc = proc
        self.control = control
        self.started = time.monotonic()
        self.retiring = False
        self.last_seen: float | None = None  # monotonic time of its last answer; None: starting
        self.probing = False  # a heartbeat is in flight
        self.killed = False  # killed as stalled (logged once)
        self.exiting = False  # drained: its control socket is closed, it is on its way out
        self.gone = False  # reaped: its counters are in the retired total
        self.snap: dict[str, object] | None = None  # its last snapshot
        self.counters: dict[tuple[str, str], float] = {}  # the highest counter values it reported


# -- counters that survive their worker ------------------------------------------------------

#: Snapshot keys of plain counters and of labelled counters (``{label: n}``); histograms are
#: recognised by shape (``{"counts": [...], "sum": x}``).  Gauges are everything else.
_COUNTER_KEYS = frozenset(m[3] for m in METRICS if m[1] == "counter")
_LABELLED_KEYS = frozenset(m[3] for m in LABELLED)


def counters_of(snap: dict[str, object]) -> dict[tuple[str, str], float]:
    """The monotonic part of a worker snapshot, flat: ``(key, "")`` for a counter,
    ``(key, label)`` for a labelled counter, ``(key, "#i")``/``(key, "sum")`` for histogram
    bucket counts and sums.  Gauges are left out."""
    out: dict[tuple[str, str], float] = {}
    for key, v in snap.items():
        if key in _COUNTER_KEYS:
            if isinstance(v, (int, float)):
                out[(key, "")] = v
        elif key in _LABELLED_KEYS:
            if isinstance(v, dict):
                for label, n in v.items():
                    if isinstance(n, (int, float)):
                        out[(key, str(label))] = n
        elif isinstance(v, dict) and isinstance(v.get("counts"), list) and isinstance(v.get("sum"), (int, float)):
            for i, n in enumerate(v["counts"]):
                out[(key, f"#{i}")] = n
            out[(key, "sum")] = v["sum"]
    return out


def as_snapshot(flat: dict[tuple[str, str], float]) -> dict[str, object]:
    """The inverse of :func:`counters_of`: a snapshot the metrics collector sums."""
    snap: dict[str, object] = {}
    hists: dict[str, dict[int, float]] = {}
    sums: dict[str, float] = {}
    for (key, sub), v in flat.items():
        if key in _LABELLED_KEYS:
            labels = snap.setdefault(key, {})
            assert isinstance(labels, dict)
            labels[sub] = v
        elif sub == "":
            snap[key] = v
        elif sub == "sum":
            sums[key] = v
        else:
            hists.setdefault(key, {})[int(sub[1:])] = v
    for key, counts in hists.items():
        snap[key] = {"counts": [counts.get(i, 0) for i in range(max(counts) + 1)], "sum": sums.get(key, 0)}
    return snap


class Supervisor:
    def __init__(self, cfg: Config, argv: list[str], listen: Callable[[], socket.socket],
                 notifier: Notifier | None = None, reload_config: Callable[[], Config] | None = None) -> None:
        """Args:
            cfg: the effective configuration (``workers`` already resolved to N >= 1).
            argv: the ``serve`` arguments to start workers with.
            listen: makes one SO_REUSEPORT listening socket on the public address.
            notifier: where systemd notifications go (default: nowhere).
            reload_config: reads the configuration again on SIGHUP (raises ConfigError); the
                supervisor's own settings (drain_timeout, worker_timeout) follow it.
        """
        self.cfg = cfg
        self.argv = argv
        self.n = cfg.workers or (os.cpu_count() or 1)
        self.sockets = [listen() for _ in range(self.n)]
        self.dir = tempfile.mkdtemp(prefix="ssegw-")
        self.workers: dict[int, WorkerProc] = {}  # pid -> worker
        self.gen = 0
        self.draining = False
        self.restarts = 0
        self.backoff = [BACKOFF_MIN] * self.n
        self.signals: asyncio.Queue[str] = asyncio.Queue()
        self.done: asyncio.Future[None] | None = None
        self._reloading = False
        self.notifier = notifier if notifier is not None else Notifier({})
        self.reload_config = reload_config
        self.retired: dict[tuple[str, str], float] = {}  # counters of workers that exited
        self.watchdog_misses = 0  # heartbeats a running worker did not answer in time
        self._steady_since = time.monotonic()  # the heartbeat has run without a gap since
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def heartbeat(self) -> float:
        return max(HEARTBEAT_MIN_S, min(HEARTBEAT_S, self.cfg.worker_timeout / 4))

    @property
    def late_after(self) -> float:
        """A worker silent for longer than this missed a heartbeat: no WATCHDOG=1 meanwhile."""
        return min(2 * self.heartbeat, self.cfg.worker_timeout)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        for sig, name in ((signal.SIGTERM, "term"), (signal.SIGINT, "term"), (signal.SIGHUP, "hup")):
            loop.add_signal_handler(sig, self.signals.put_nowait, name)
        self.gen = 1
        for slot in range(self.n):
            await self.spawn(slot)
        self._tasks += [loop.create_task(self._dispatch()), loop.create_task(self._heartbeat()),
                        loop.create_task(self._announce_ready()),
                        loop.create_task(keep_alive(self.notifier, self.responsive))]
        if self.notifier.enabled:
            self._tasks.append(loop.create_task(report_status(self.notifier, self._status_text, STATUS_S)))

    async def wait(self) -> None:
        assert self.done is not None
        await self.done
        for t in self._tasks:
            t.cancel()
        for s in self.sockets:
            s.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    async def _dispatch(self) -> None:
        while True:
            name = await self.signals.get()
            try:
                await getattr(self, f"handle_{name}")()
            except Exception:  # a bug of ours must not leave the workers unsupervised
                log.exception("handling %s failed", name)

    async def spawn(self, slot: int) -> WorkerProc:
        sock = self.sockets[slot]
        control = os.path.join(self.dir, f"w{slot}-g{self.gen}-{random.getrandbits(24):06x}.sock")
        env = dict(child_env(dict(os.environ)))  # only the supervisor speaks to systemd
        env[ENV_FD] = str(sock.fileno())
        env[ENV_CONTROL] = control
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ssegw", "serve", *self.argv,
            env=env, pass_fds=(sock.fileno(),), stdin=asyncio.subprocess.DEVNULL,
        )
        wp = WorkerProc(slot, self.gen, proc, control)
        self.workers[proc.pid] = wp
        asyncio.get_running_loop().create_task(self._reap(wp))
        log.info("worker %d started (slot %d, generation %d)", proc.pid, slot, self.gen)
        return wp

    async def _reap(self, wp: WorkerProc) -> None:
        code = await wp.proc.wait()
        self.workers.pop(wp.proc.pid, None)
        # Its counters join the retired total in the same step as it leaves self.workers, so
        # a scrape never counts them twice nor misses them.
        wp.gone = True
        for k, v in wp.counters.items():
            self.retired[k] = self.retired.get(k, 0) + v
        try:
            os.unlink(wp.control)
        except OSError:
            pass  # the worker removed it, or never created it
        if self.draining or wp.retiring:
            log.info("worker %d exited (%s)", wp.proc.pid, code)
            self._check_done()
            return
        lived = time.monotonic() - wp.started
        if lived > STABLE_AFTER:
            self.backoff[wp.slot] = BACKOFF_MIN
        delay = self.backoff[wp.slot]
        self.backoff[wp.slot] = min(delay * 2, BACKOFF_MAX)
        self.restarts += 1
        log.error("worker %d died (exit %s) after %.1fs; restarting slot %d in %.2fs",
                  wp.proc.pid, code, lived, wp.slot, delay)
        await asyncio.sleep(delay)
        if not self.draining and not any(w.slot == wp.slot and not w.retiring for w in self.workers.values()):
            await self.spawn(wp.slot)

    def _check_done(self) -> None:
        if self.draining and not self.workers and self.done is not None and not self.done.done():
            self.done.set_result(None)

    # -- signals ------------------------------------------------------------------------

    async def handle_term(self) -> None:
        if self.draining:
            log.warning("second stop signal: killing workers")
            for wp in list(self.workers.values()):
                _signal(wp, signal.SIGKILL)
            return
        self.draining = True
        log.info("draining %d workers over %.1fs", len(self.workers), self.cfg.drain_timeout)
        self.notifier.stopping(self._status_text())
        for wp in list(self.workers.values()):
            _signal(wp, signal.SIGTERM)
        self._check_done()
        await asyncio.sleep(self.cfg.drain_timeout + KILL_GRACE)
        for wp in list(self.workers.values()):
            log.warning("worker %d still running after the drain; killing it", wp.proc.pid)
            _signal(wp, signal.SIGKILL)

    async def handle_hup(self) -> None:
        if self.draining or self._reloading:
            return
        self._reloading = True
        self.notifier.reloading()
        outcome = "reload failed"
        try:
            cfg = self.cfg
            if self.reload_config is not None:
                try:
                    cfg = self.reload_config()  # checked here: a bad config starts no workers
                except ConfigError as e:
                    log.error("reload: %s; keeping generation %d", e, self.gen)
                    outcome = f"reload failed: {e}"
                    return
            outcome = await self._reload()
            if outcome.startswith("reloaded"):
                self._adopt(cfg)
        finally:
            self._reloading = False
            # READY=1 either way: a failed reload leaves the old generation serving.
            self.notifier.ready(f"{outcome}; {self._status_text()}")

    def _adopt(self, cfg: Config) -> None:
        """Take a re-read configuration for the supervisor's own settings.  The slots and
        their sockets stay: a changed address or worker count needs a restart."""
        for key in ("host", "port", "workers"):
            if getattr(cfg, key) != getattr(self.cfg, key):
                log.warning("reload: %s changed; it takes effect on restart", key)
        self.cfg = cfg

    async def _reload(self) -> str:
        """Start a new generation, wait for it, retire the old one; returns the outcome."""
        old = [wp for wp in self.workers.values() if not wp.retiring]
        self.gen += 1
        log.info("reload: starting generation %d", self.gen)
        new = [await self.spawn(slot) for slot in range(self.n)]
        deadline = time.monotonic() + READY_TIMEOUT
        pending = list(new)
        while pending and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            pending = [wp for wp in pending if wp.proc.returncode is None and not await self._ready(wp)]
            if any(wp.proc.returncode is not None for wp in new):
                break
        if pending or any(wp.proc.returncode is not None for wp in new):
            log.error("reload: generation %d did not become ready; keeping generation %d", self.gen, self.gen - 1)
            for wp in new:
                wp.retiring = True
                _signal(wp, signal.SIGKILL)
            return f"reload failed: generation {self.gen} did not become ready"
        log.info("reload: generation %d ready; draining the previous one", self.gen)
        for wp in old:
            wp.retiring = True
            _signal(wp, signal.SIGTERM)
        return f"reloaded: generation {self.gen}"

    # -- control sockets ----------------------------------------------------------------

    async def _get(self, wp: WorkerProc, path: str, timeout: float = CONTROL_TIMEOUT) -> tuple[int, bytes]:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(wp.control), timeout)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n".encode())
            data = await asyncio.wait_for(reader.read(), timeout)
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 502
        return status, body

    async def _ready(self, wp: WorkerProc) -> bool:
        try:
            status, _ = await self._get(wp, "/readyz")
        except (TimeoutError, OSError, ValueError, IndexError):
            return False
        return status == 200

    async def _gather(self, path: str) -> list[dict[str, object]]:
        live = [wp for wp in self.workers.values() if not wp.retiring]

        async def one(wp: WorkerProc) -> dict[str, object] | None:
            try:
                status, body = await self._get(wp, path)
            except (TimeoutError, OSError, ValueError, IndexError):
                return None
            if status != 200:
                return None
            return orjson.loads(body)  # type: ignore[no-any-return]

        results = await asyncio.gather(*(one(wp) for wp in live))
        return [r for r in results if r is not None]

    # -- the admin source (see server.handlers.LocalAdmin) ---------------------------------

    def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.workers:
            return False, "no worker running"
        return self._last_ready

    _last_ready: tuple[bool, str] = (False, "starting")

    async def refresh_ready(self) -> None:
        """Poll the workers' readiness (the admin /readyz answers from the last poll)."""
        while True:
            live = [wp for wp in self.workers.values() if not wp.retiring]
            states = await asyncio.gather(*(self._ready(wp) for wp in live))
            if any(states):
                self._last_ready = (True, "ready")
            else:
                self._last_ready = (False, "no worker ready (broker unavailable?)")
            await asyncio.sleep(0.2)

    async def snapshots(self) -> list[dict[str, object]]:
        """One snapshot per running worker (fresh, or its last one if it does not answer now;
        a retiring worker's with ``workers`` and ``broker_up`` 0), the retired counters, and
        the supervisor's own."""
        await asyncio.gather(*(self._fetch(wp, CONTROL_TIMEOUT) for wp in list(self.workers.values())))
        # No await from here on: the workers and the retired total are read in one step.
        snaps = []
        for wp in self.workers.values():
            if wp.snap is None:
                continue
            s = dict(wp.snap)
            s.update(as_snapshot(wp.counters))  # never below what an earlier answer showed
            if wp.retiring:
                s["workers"] = s["broker_up"] = 0  # what it serves counts; it does not
            snaps.append(s)
        if self.retired:
            snaps.append(as_snapshot(self.retired))
        snaps.append({"worker_restarts": self.restarts, "watchdog_misses": self.watchdog_misses})
        return snaps

    async def stats(self) -> list[dict[str, object]]:
        out = []
        for s in await self._gather("/admin/stats"):
            out.extend(s.get("workers", []))  # type: ignore[arg-type]
        return out

    async def subscribers(self, topic: str) -> int:
        return int((await self._topic(topic))["subscribers"])

    async def keys(self, topic: str) -> int:
        return int((await self._topic(topic))["keys"])

    async def _topic(self, topic: str) -> dict[str, int]:
        """A live worker's ``/admin/topics/NAME`` answer (it asks the cluster)."""
        for wp in list(self.workers.values()):
            if wp.retiring:
                continue
            try:
                status, body = await self._get(wp, f"/admin/topics/{topic}")
            except (TimeoutError, OSError, ValueError, IndexError):
                continue
            if status == 200:
                return orjson.loads(body)  # type: ignore[no-any-return]
        raise OSError("no worker answered")

    # -- heartbeats, watchdog and status -------------------------------------------------------

    async def _fetch(self, wp: WorkerProc, timeout: float) -> str:
        """Ask ``wp`` for its snapshot and note the answer.  Returns ``"answered"``,
        ``"silent"`` (no answer in time: a stalled loop still has its connections accepted by
        the kernel) or ``"closed"`` (no control socket: starting, or exiting)."""
        snap = None
        try:
            status, body = await self._get(wp, "/internal/snapshot", timeout)
            snap = orjson.loads(body) if status == 200 else None
        except TimeoutError:
            return "silent"
        except OSError:
            return "closed"
        except (ValueError, IndexError):  # it answered, if not with a snapshot: its loop runs
            pass
        if wp.gone:
            return "answered"  # reaped meanwhile: its counters are already retired
        wp.last_seen = time.monotonic()
        if isinstance(snap, dict):
            wp.snap = snap
            # Highest value per counter: answers may arrive out of order (a heartbeat and a
            # scrape in flight together), and a worker's counters only grow.
            c = wp.counters
            for k, v in counters_of(snap).items():
                if v > c.get(k, 0):
                    c[k] = v
        return "answered"

    async def _probe(self, wp: WorkerProc) -> None:
        wp.probing = True
        try:
            outcome = await self._fetch(wp, self.late_after)
        finally:
            wp.probing = False
        if wp.last_seen is None or wp.gone or wp.proc.returncode is not None:
            return
        if outcome == "silent":
            self.watchdog_misses += 1  # it answered before: a missed heartbeat
        elif outcome == "closed" and (wp.retiring or self.draining):
            # A drained worker closes its control socket before it exits (it still closes
            # its broker): not a stalled loop.  The drain's own deadline bounds it.
            wp.exiting = True

    async def _heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        prev = time.monotonic()
        while True:
            hb = self.heartbeat
            await asyncio.sleep(hb)
            now = time.monotonic()
            if now - prev > hb + self.late_after:
                # Our own loop stalled (or we were stopped): the workers' silence meanwhile
                # says nothing about them.  Count it from now.
                log.warning("supervisor heartbeat ran %.1fs late", now - prev - hb)
                self._steady_since = now
            prev = now
            for wp in list(self.workers.values()):
                if wp.proc.returncode is not None or wp.killed or wp.exiting:
                    continue
                silent = self._silence(wp, now)
                limit = self.cfg.worker_timeout if wp.last_seen is not None else max(self.cfg.worker_timeout,
                                                                                   READY_TIMEOUT)
                if silent > limit:
                    wp.killed = True
                    log.error("worker %d (slot %d, generation %d) stalled: no answer for %.1fs "
                              "(worker_timeout %.1fs); killing it", wp.proc.pid, wp.slot, wp.gen, silent,
                              self.cfg.worker_timeout)
                    _signal(wp, signal.SIGKILL)
                elif not wp.probing:
                    loop.create_task(self._probe(wp))

    def _silence(self, wp: WorkerProc, now: float) -> float:
        return now - max(wp.last_seen if wp.last_seen is not None else wp.started, self._steady_since)

    def responsive(self) -> bool:
        """Every running worker that has answered once answered within ``late_after``."""
        now = time.monotonic()
        return not any(wp.last_seen is not None and wp.proc.returncode is None and not wp.exiting
                       and self._silence(wp, now) > self.late_after for wp in self.workers.values())

    async def _announce_ready(self) -> None:
        """READY=1 once every slot has a worker that answers (it accepts by then: a worker
        opens its control socket after its public listener)."""
        while not self.draining:
            waiting = [wp for wp in self.workers.values() if wp.last_seen is None and not wp.retiring]
            slots = {wp.slot for wp in self.workers.values() if wp.last_seen is not None and not wp.retiring}
            if len(slots) == self.n:
                self.notifier.ready(self._status_text())
                return
            await asyncio.gather(*(self._fetch(wp, CONTROL_TIMEOUT) for wp in waiting if not wp.probing),
                                 asyncio.sleep(0.1))

    def _status_text(self) -> str:
        live = sum(1 for wp in self.workers.values() if not wp.retiring)
        conns = sum(int(wp.snap.get("connections_open", 0) or 0)  # type: ignore[call-overload]
                    for wp in self.workers.values() if wp.snap is not None)
        state = "draining" if self.draining else f"reloading (generation {self.gen})" if self._reloading \
            else "serving"
        return f"{state}: {live} worker{'s' if live != 1 else ''}, {conns} connections"


def _signal(wp: WorkerProc, sig: int) -> None:
    try:
        wp.proc.send_signal(sig)
    except ProcessLookupError:
        pass  # already gone; the reaper will notice

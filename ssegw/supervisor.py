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

from .config import Config

log = logging.getLogger("ssegw.supervisor")

#: Restart backoff bounds (seconds) and how long a worker must live to reset the backoff.
BACKOFF_MIN, BACKOFF_MAX, STABLE_AFTER = 0.25, 30.0, 60.0
#: How long a new generation may take to become ready on reload before we give up on it.
READY_TIMEOUT = 30.0
#: Extra time after drain_timeout before draining workers are killed.
KILL_GRACE = 5.0
#: Bound on one control-socket round trip.
CONTROL_TIMEOUT = 3.0

ENV_FD = "SSEGW__LISTEN_FD"
ENV_CONTROL = "SSEGW__CONTROL"


class WorkerProc:
    __slots__ = ("slot", "gen", "proc", "control", "started", "retiring")

    def __init__(self, slot: int, gen: int, proc: asyncio.subprocess.Process, control: str) -> None:
        self.slot = slot
        self.gen = gen
        self.proc = proc
        self.control = control
        self.started = time.monotonic()
        self.retiring = False


class Supervisor:
    def __init__(self, cfg: Config, argv: list[str], listen: Callable[[], socket.socket]) -> None:
        """Args:
            cfg: the effective configuration (``workers`` already resolved to N >= 1).
            argv: the ``serve`` arguments to start workers with.
            listen: makes one SO_REUSEPORT listening socket on the public address.
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

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        for sig, name in ((signal.SIGTERM, "term"), (signal.SIGINT, "term"), (signal.SIGHUP, "hup")):
            loop.add_signal_handler(sig, self.signals.put_nowait, name)
        self.gen = 1
        for slot in range(self.n):
            await self.spawn(slot)
        loop.create_task(self._dispatch())

    async def wait(self) -> None:
        assert self.done is not None
        await self.done
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
        env = dict(os.environ)
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
        try:
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
                return
            log.info("reload: generation %d ready; draining the previous one", self.gen)
            for wp in old:
                wp.retiring = True
                _signal(wp, signal.SIGTERM)
        finally:
            self._reloading = False

    # -- control sockets ----------------------------------------------------------------

    async def _get(self, wp: WorkerProc, path: str) -> tuple[int, bytes]:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(wp.control), CONTROL_TIMEOUT)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n".encode())
            data = await asyncio.wait_for(reader.read(), CONTROL_TIMEOUT)
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
        snaps = await self._gather("/internal/snapshot")
        snaps.append({"worker_restarts": self.restarts})
        return snaps

    async def stats(self) -> list[dict[str, object]]:
        out = []
        for s in await self._gather("/admin/stats"):
            out.extend(s.get("workers", []))  # type: ignore[arg-type]
        return out

    async def subscribers(self, topic: str) -> int:
        for wp in list(self.workers.values()):
            if wp.retiring:
                continue
            try:
                status, body = await self._get(wp, f"/admin/topics/{topic}")
            except (TimeoutError, OSError, ValueError, IndexError):
                continue
            if status == 200:
                return int(orjson.loads(body)["subscribers"])
        raise OSError("no worker answered")


def _signal(wp: WorkerProc, sig: int) -> None:
    try:
        wp.proc.send_signal(sig)
    except ProcessLookupError:
        pass  # already gone; the reaper will notice

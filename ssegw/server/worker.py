"""One worker: a uvloop event loop serving the public and admin listeners.

Everything time-driven hangs off two loop callbacks, never one per connection:
- the *tick* (every ``TICK_MS``) advances the single timer wheel, which holds every
  connection's head/idle timeout, heartbeat and close deadline (lifetime, token expiry,
  drain), and does periodic housekeeping;
- the *flush* runs the batched broadcast.  It is scheduled when events arrive: at once if
  the last flush was ``flush_interval`` ago or there is little to coalesce (a directed
  message to a few subscribers should not wait), else at ``last_flush + flush_interval``.
  Under heavy fan-out a sweep itself takes longer than the interval, so every flush
  carries all events since the previous one in one write per connection.

A worker is a :class:`~ssegw.server.context.Context` (its connections and their events);
this module adds the loop's side: listeners, flush scheduling, the tick, drain and stop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import cast

from .. import logs
from ..broker.base import Broker
from ..config import Config, tls_context
from ..core.conn import (
    CLOSED,
    DROP_BUFFER,
    DROP_STALL,
    HEAD,
    RESPOND,
    STARTING,
    STREAM,
    next_check,
    verdict,
)
from ..core.history import Event
from ..core.sse import HEARTBEAT, encode_retry
from ..core.wheel import Timer, TimerWheel
from ..policy.limits import in_networks
from . import allocator, handlers
from .acceptor import Acceptor, ProxyPolicy
from .context import T_DRAIN, T_EXPIRE, T_LIFETIME, TICK_MS, Context
from .protocol import T_HEAD, T_HEARTBEAT, HTTPProtocol, Request
from .proxy import Proxies
from .sockets import bind_socket, descriptor_budget
from .upstream import SharedRoutes

log = logging.getLogger("ssegw.worker")


#: A flush writing to at most this many connections is done at once instead of waiting for
#: the batching interval: coalescing buys nothing for a handful of writes, and directed
#: traffic (one subscriber per topic) must not pay the interval in latency.
EAGER_WRITES = 64
#: Housekeeping period (history trimming, token-bucket pruning) in ticks.
HOUSEKEEPING_TICKS = 20
#: Subscriber writes per slice of a sweep (~10-15 ms of loop time here): a sweep over many
#: subscribers yields to the loop between slices instead of blocking it for the whole pass.
SLICE_WRITES = 1_000
#: Python's cyclic GC: a full (generation 2) collection traverses every long-lived object --
#: every connection and every event held in history -- and was measured at 120-150 ms with
#: 10,000 streams, a loop stall that shows up as p99.9 latency.  Automatic full collections
#: are switched off; the tick runs one every FULL_GC_S or more instead (almost all our garbage is
#: acyclic and freed by reference counting).
#: The young generations are aged by the tick too (``age_young``): every tick collects
#: generation 0 and moves its survivors out of the collector's sight (``gc.freeze``), so an
#: object is traversed once while young instead of again in generation 1 -- whose collections,
#: under a publish load that keeps every event in history, took ~30 ms each and a third of
#: the collector's time (tuning.md "Publish ingest").  Frozen objects are looked at again by
#: the full collection only (``full_collect``), as generation 2 was before.
FULL_GC_S = 300.0
#: The full collection stops the loop while it traverses every object held, events in history
#: included (~0.4 s per million events: tuning.md, ``bench/gccost.py``), and what it is for --
#: cyclic garbage among long-lived objects -- is rare: closed connections leave none
#: (tests/test_worker_gc.py).  So one that finds nothing puts the next twice as far off, up to
#: FULL_GC_MAX_S; one that finds anything brings the interval back to FULL_GC_S
#: (``next_full_gc_interval``).  Cyclic garbage then waits at most FULL_GC_MAX_S.
FULL_GC_MAX_S = 3600.0
#: After this many public connections closed since the peak (a flood, a reconnect storm, a
#: drained generation), the memory they held is handed back to the OS (_release_memory).
RELEASE_AFTER_CLOSED = 1024
GC_THRESHOLDS = (10_000, 10, 1_000_000_000)
#: After a drain has nothing else to wait for, how long connections that were accepted but
#: have not sent a request yet still get to ask (they are answered 503 draining).
UNASKED_GRACE = 0.5
#: How long a starting worker waits for its broker before accepting connections anyway.
BROKER_START_WAIT = 10.0
#: Seconds a stopping worker gives its broker to close (presence removal, connections).
BROKER_CLOSE_TIMEOUT = 5.0


def age_young() -> None:
    """Collect generation 0, then freeze what survived (see ``FULL_GC_S``): O(young objects)."""
    gc.collect(0)
    gc.freeze()


def next_full_gc_interval(interval: float, found: int) -> float:
    """Seconds to the next full collection after one that ran ``interval`` after the one
    before and found ``found`` unreachable objects (see ``FULL_GC_MAX_S``)."""
    return FULL_GC_S if found else min(interval * 2, FULL_GC_MAX_S)


def full_collect() -> int:
    """A full collection over every object, frozen ones included; returns the unreachable
    objects found.  What survives is frozen again."""
    gc.unfreeze()
    try:
        return gc.collect(2)
    finally:
        gc.freeze()


class Worker(Context):
    def __init__(self, cfg: Config, broker: Broker, *, extra_startup: Callable[[Worker], None] | None = None) -> None:
        super().__init__(cfg, broker)
        if any(r.mode == "shared" for r in cfg.routes):
            self.upstreams = SharedRoutes(self)
        if any(r.mode == "proxy" for r in cfg.routes):
            self.proxies = Proxies(self)
        self.stopping: asyncio.Future[None] | None = None
        self.acceptors: list[Acceptor] = []
        self.admin_servers: list[asyncio.Server] = []
        self.extra_startup = extra_startup
        self.parent_pid = 0  # set under a supervisor: drain if it disappears
        self.admin_source = handlers.LocalAdmin(self)
        # The protocol calls these for every request: the handlers' functions bound to this
        # worker (C partials), not the methods below, which would add a Python call each.
        self.handle = partial(handlers.handle, self)  # type: ignore[method-assign]
        self.check_head = partial(handlers.check_head, self)  # type: ignore[method-assign]
        self.cors_headers = partial(handlers.cors_headers, self)  # type: ignore[method-assign]
        # Flush scheduling.
        self.flush_handle: asyncio.Handle | None = None
        self.last_flush = 0.0
        self.sweep_started = 0.0  # perf_counter() at the start of the current sweep
        self.sweep_oldest_ms = 0  # ts_ms of its oldest event (wall clock, ms)
        self.sweep_delay = 0.0  # that event's age when the sweep started (s)
        self.tick_due = 0.0  # loop.time() the next tick is due at
        self.next_full_gc = 0.0
        self.full_gc_interval = FULL_GC_S
        self.conn_peak = 0  # most public connections open since memory was last released
        self.release_at = 0.0  # loop.time() to release at, once the drop was seen (0 = none due)
        self.interval = cfg.flush_interval


    # -- start / stop -----------------------------------------------------------------

    async def start(self, public_socks: list[socket.socket] | None = None,
                    admin_socks: list[socket.socket] | None = None, control_path: str | None = None) -> None:
        """Bind (or adopt) the listeners and start serving.  Does not wait.

        Args:
            public_socks: listening sockets to adopt (a supervisor's slot socket); None binds
                ``host:port``; an empty list serves no public listener (a supervisor's admin).
            admin_socks: likewise for the admin listener.
            control_path: serve the admin routes on this unix socket instead of TCP (a
                worker under a supervisor).
        """
        loop = self.loop = asyncio.get_running_loop()
        cfg = self.cfg
        self.wheel = TimerWheel(TICK_MS, self.now_ms())
        gc.set_threshold(*GC_THRESHOLDS)
        self.next_full_gc = loop.time() + FULL_GC_S
        self.stopping = loop.create_future()
        await self.broker.start(self.on_events, self.on_gap)
        if public_socks != []:
            # Accept only once the broker is reachable (bounded): a worker replacing a
            # crashed one, or a new generation on reload, would otherwise answer the
            # connections queued in its slot socket with 503.  If the broker stays down we
            # serve anyway (streams get 503 until it is back; /readyz tells).
            if not await self.broker.wait_ready(BROKER_START_WAIT):
                log.warning("broker not reachable after %.0fs; serving anyway", BROKER_START_WAIT)
        if public_socks is None:
            public_socks = [bind_socket(cfg.host, cfg.port, backlog=cfg.backlog)]
        nofile, self.fd_capacity = descriptor_budget()
        # (A supervisor's own admin worker serves no public listener: nothing to warn about.)
        if public_socks and 0 < cfg.max_connections and self.fd_capacity < cfg.max_connections:
            log.warning("max_connections gives this worker %d connections but the open-files limit (%d) leaves "
                        "room for %d public connections in it", cfg.max_connections, nofile, self.fd_capacity)
        tls = tls_context(cfg.tls_cert, cfg.tls_key, cfg.tls_min_version, cfg.tls_ciphers) if cfg.tls_cert else None
        proxy = None
        if cfg.proxy_protocol:
            trusted = cfg.trusted_proxies
            proxy = ProxyPolicy(lambda ip: in_networks(ip, trusted), cfg.head_timeout, self.count_refused)
        for s in public_socks:
            self.flow.socket_options(s, self.hb_ms)  # inherited by every accepted socket
            acc = Acceptor(loop, s, self._public_protocol, tls=tls, tls_timeout=cfg.head_timeout,
                           tls_failed=lambda: self.count_refused("tls_handshake"), proxy=proxy)
            acc.start()
            self.acceptors.append(acc)
        if control_path is not None:
            self.admin_servers.append(await loop.create_unix_server(lambda: HTTPProtocol(self, True), path=control_path))
        else:
            if admin_socks is None:
                admin_socks = [bind_socket(cfg.admin_host, cfg.admin_port)]
            for s in admin_socks:
                self.admin_servers.append(await loop.create_server(lambda: HTTPProtocol(self, True), sock=s))
        self.tick_due = loop.time() + TICK_MS / 1000
        loop.call_at(self.tick_due, self._tick)
        logs.buffer_lines(True)  # the tick writes them out (logs.flush)
        if self.extra_startup is not None:
            self.extra_startup(self)

    def _public_protocol(self, client: str | None) -> HTTPProtocol:
        """A public connection's protocol; ``client``: the address a PROXY header named."""
        p = HTTPProtocol(self, False)
        if client is not None:
            p.ip = client
        return p

    def bound_ports(self) -> tuple[int, int]:
        pub = self.acceptors[0].sock.getsockname()[1] if self.acceptors else 0
        adm = 0
        if self.admin_servers:
            name = self.admin_servers[0].sockets[0].getsockname()
            adm = name[1] if isinstance(name, tuple) else 0
        return pub, adm

    def install_signals(self) -> None:
        assert self.loop is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.drain)
        self.loop.add_signal_handler(signal.SIGHUP, self._sighup)

    def _sighup(self) -> None:
        log.warning("SIGHUP: reload needs the supervisor (--workers); ignored in single-process mode")

    async def wait_stopped(self) -> None:
        assert self.stopping is not None
        await self.stopping
        for s in self.admin_servers:
            s.close()
        if self.upstreams is not None:
            await self.upstreams.close()  # before the broker: give the upstream leases up
        try:
            # Bounded: a broker that cannot say goodbye (Redis gone silent) must not keep a
            # drained worker alive until the supervisor kills it.
            await asyncio.wait_for(self.broker.close(), BROKER_CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("broker did not close within %.0fs; exiting anyway", BROKER_CLOSE_TIMEOUT)
        finally:
            logs.buffer_lines(False)  # this worker's tick no longer writes them

    def stop_accepting(self, admin: bool = False) -> None:
        """Close the public listeners (and the admin ones if ``admin``): this worker's
        sockets only -- with a supervisor or a reloading process, duplicates of listeners
        that stay open elsewhere.  Connections already accepted go on."""
        for acc in self.acceptors:
            acc.close()
        if admin:
            for srv in self.admin_servers:
                srv.close()

    def drain(self) -> None:
        """Stop accepting, answer /readyz 503, close streams spread over drain_timeout."""
        if self.draining:
            log.warning("second stop signal: closing everything now")
            self._stop_now()
            return
        log.info("draining: %d streams over %.1fs", self.table.streams, self.cfg.drain_timeout)
        self.draining = True
        assert self.loop is not None
        self.drain_started = self.loop.time()
        self.stop_accepting()
        now = self.now_ms()
        drain_ms = int(self.cfg.drain_timeout * 1000)
        for p in list(self.records()):
            if p is None:
                continue
            if p.state == STREAM:
                self.set_deadline(p, now + int(random.uniform(0, drain_ms)), T_DRAIN)
            elif p.state == HEAD and not p.rx and p.served and not p.admin:
                # An idle public keep-alive connection.  A connection that has not sent its
                # first request yet stays: it was accepted, so it gets an answer (a stream
                # request gets 503 draining with Retry-After), not a silent close.  Admin
                # connections stay so that a probe arriving now gets its /readyz 503.
                p.close()
        assert self.loop is not None
        self.loop.call_later(self.cfg.drain_timeout + 2.0, self._stop_now)
        self._check_drained()

    def _check_drained(self) -> None:
        if not self.draining or self.stopping is None or self.stopping.done():
            return
        unasked = False
        for p in self.records():
            if p is None or p.admin or p.state == CLOSED:
                continue
            if p.state == HEAD and not p.rx:
                unasked = True  # accepted, nothing asked yet
                continue
            return
        assert self.loop is not None
        grace_end = self.drain_started + UNASKED_GRACE
        if unasked and self.loop.time() < grace_end:
            # A client whose request is still in flight gets an answer (503 draining), not
            # a close -- but it does not hold the exit up for longer than the grace.
            self.loop.call_at(grace_end, self._check_drained)
            return
        self._stop_now()

    def _stop_now(self) -> None:
        for p in list(self.records()):
            if p is not None and p.state != CLOSED:
                if p.state == STREAM:
                    p.end_stream(encode_retry(self.jittered_retry()), "shutdown")
                else:
                    p.abort("shutdown")
        if self.stopping is not None and not self.stopping.done():
            self.stopping.set_result(None)

    # -- what the request handlers provide -------------------------------------------

    def cors_headers(self, p: HTTPProtocol) -> list[tuple[bytes, bytes]]:
        return handlers.cors_headers(self, p)

    def handle(self, p: HTTPProtocol, req: Request, body: bytes) -> None:
        handlers.handle(self, p, req, body)

    def check_head(self, p: HTTPProtocol, req: Request) -> None:
        handlers.check_head(self, p, req)

    def begin_stream(self, p: HTTPProtocol, args: tuple) -> None:
        handlers.begin_stream(self, p, *args)

    # -- events and flushing ----------------------------------------------------------

    def on_events(self, events: list[Event]) -> None:
        """Broker callback: events in sequence order, ready to fan out."""
        self.schedule_flush(self.fanout.publish_many(events))

    def schedule_flush(self, queued: int) -> None:
        if self.flush_handle is not None or not self.fanout.dirty:
            return  # one is coming, or nothing waits (events for topics nobody here follows)
        loop = self.loop
        assert loop is not None
        now = loop.time()
        due = self.last_flush + self.interval
        if queued <= EAGER_WRITES or now >= due:
            self.flush_handle = loop.call_soon(self.flush)
        else:
            self.flush_handle = loop.call_at(due, self.flush)

    def flush(self) -> None:
        """Run one slice of the current sweep (starting one if needed); reschedule."""
        self.flush_handle = None
        loop = self.loop
        assert loop is not None
        fan = self.fanout
        if fan.current is None:
            dirty = fan.dirty
            if not dirty:
                return  # nothing to sweep: not a flush, and nothing is observed
            self.last_flush = loop.time()
            # loop.time() is the time this loop iteration began (uvloop: whole ms): a
            # duration needs a clock read now.
            self.sweep_started = time.perf_counter()
            # The sweep's oldest event (core.table types a topic's batch loosely; it holds
            # Events); its age now and when its last write is done are observed at the end,
            # if the sweep wrote anything.  Wall clock, like ts_ms.
            oldest = self.sweep_oldest_ms = min(cast(Event, ts.batch[0]).ts_ms for ts in dirty)
            self.sweep_delay = max(0.0, time.time() - oldest / 1000)
        st = fan.stats
        flushes = st.flushes
        now = self.now_ms()
        done, plan = fan.sweep_step(now, SLICE_WRITES)
        self.flow.carry_out(plan, now)
        if not done:
            # Let the loop breathe between slices (publishes, new streams, heartbeats);
            # events published meanwhile join this sweep for those not written yet.
            self.flush_handle = loop.call_soon(self.flush)
            return
        if st.flushes != flushes and st.last_writes:
            # A sweep ended here and wrote to at least one socket.  Delivery lag is sampled:
            # one event per flush, the oldest, to the flush's last write.
            end = time.perf_counter()
            self.hist_writes.observe(st.last_writes)
            self.hist_events.observe(st.last_events)
            self.hist_flush.observe(end - self.sweep_started)
            self.hist_delay.observe(self.sweep_delay)
            self.hist_lag.observe(max(0.0, time.time() - self.sweep_oldest_ms / 1000))
        if fan.dirty:
            self.schedule_flush(fan.queued_writes)

    # -- the tick -----------------------------------------------------------------------

    def _tick(self) -> None:
        loop = self.loop
        assert loop is not None and self.wheel is not None
        if self.stopping is not None and self.stopping.done():
            logs.flush()
            return
        logs.flush()  # access lines, written once a tick (logs._Handler)
        # How late this tick is.  loop.time() and time.monotonic() share a clock (asyncio
        # by definition; uvloop's is libuv's CLOCK_MONOTONIC in whole ms), and the clock must
        # be read now: loop.time() is when this iteration began.
        self.hist_loop.observe(max(0.0, time.monotonic() - self.tick_due))
        self.tick_due = loop.time() + TICK_MS / 1000
        loop.call_at(self.tick_due, self._tick)
        now = self.now_ms()
        for t in self.wheel.advance(now):
            if not t.active:  # cancelled by an earlier callback of this same batch
                continue
            self.timer_fires += 1
            try:
                self._fire(t, now)
            except Exception:  # a bug of ours must not stop the tick for every connection
                log.exception("timer callback failed")
        self.tick_count += 1
        age_young()
        if self.tick_count % HOUSEKEEPING_TICKS == 0:
            if loop.time() >= self.next_full_gc:
                t0 = time.perf_counter()
                found = full_collect()
                self.full_gc_interval = next_full_gc_interval(self.full_gc_interval, found)
                self.next_full_gc = loop.time() + self.full_gc_interval
                log.debug("full gc: %d unreachable, %.1f ms; the next in %.0f s", found,
                          (time.perf_counter() - t0) * 1000, self.full_gc_interval)
            self._release_memory(loop.time())
            if self.parent_pid and os.getppid() != self.parent_pid and not self.draining:
                log.error("supervisor %d is gone: draining", self.parent_pid)
                self.drain()
            self.broker.tick(now)
            if self.presence_dirty:
                dirty, self.presence_dirty = self.presence_dirty, set()
                self.broker.presence({t: self.table.subscribers(t) for t in dirty})
            rate = self.admission.rate
            if rate is not None:
                rate.prune(now)

    def _release_memory(self, t: float) -> None:
        """Hand memory back to the OS after many connections closed.

        Connection records, buffers and parsers of a burst are freed when the connections
        close (and their wheel entries expire, within ``head_timeout``), but the C allocator
        keeps the pages: a flood of 6,000 connections left the worker ~11 MiB larger for
        good.  ``malloc_trim(0)`` (glibc) returns free pages, from the middle of the heap too;
        it runs once per such drop, a few ms.

        No full collection here: a closed connection leaves no cyclic garbage (uvloop drops
        its transport's reference to the protocol on close; tests/test_worker_gc.py closes
        real connections of every kind and finds none), so one found nothing after every
        burst measured, while it stopped the loop for as long as it took to traverse every
        object held -- 30-50 ms with 5,000 streams, 120-150 ms with 10,000 -- right when the
        subscribers of a flood or a reconnect storm wait for their events.  Cyclic garbage
        from elsewhere is found by the periodic full collection (``FULL_GC_MAX_S``).
        """
        n = self.connections_open
        if n >= self.conn_peak:
            self.conn_peak = n
            self.release_at = 0.0
            return
        if self.conn_peak - n < RELEASE_AFTER_CLOSED:
            return
        if not self.release_at:
            self.release_at = t + self.cfg.head_timeout + 1.0  # the burst's wheel entries are gone
            return
        if t < self.release_at:
            return
        self.conn_peak = n
        self.release_at = 0.0
        t0 = time.perf_counter()
        # The burst's cancelled timers, left in buckets until they come up, go first.
        if self.wheel is not None:
            self.wheel.purge()
        allocator.release()
        log.debug("released memory after closes: %.1f ms", (time.perf_counter() - t0) * 1000)

    def _fire(self, t: Timer, now: int) -> None:
        # Every wheel entry of a worker targets one of its connections (see schedule calls).
        p = cast(HTTPProtocol, t.target)
        kind = t.kind
        if p.state == CLOSED:
            return
        if kind == T_HEARTBEAT or kind == T_HEAD:
            if p.timer is not t:
                return
            p.timer = None
            if kind == T_HEARTBEAT:
                if p.state == STREAM:
                    self._liveness(p, now, t)
            else:
                self._head_due(p, now)
            return
        if p.deadline is not t or p.state != STREAM:
            return
        p.deadline = None
        if kind == T_LIFETIME:
            self.closed_lifetime += 1
            reason = "lifetime"
        elif kind == T_EXPIRE:
            self.closed_expired += 1
            reason = "token_expired"
        else:
            reason = "drain"  # draining, or a history gap (Context.on_gap)
        p.end_stream(encode_retry(self.jittered_retry()), reason)

    def _head_due(self, p: HTTPProtocol, now: int) -> None:
        wheel = self.wheel
        assert wheel is not None
        if p.state == RESPOND or p.state == STARTING:
            # The request is in: the wait is ours (a broker round trip), not the client's.
            p.due_ms = now + self.idle_ms
        if now < p.due_ms:  # the deadline moved since this entry was armed (keep-alive)
            p.timer = wheel.schedule(p.due_ms, T_HEAD, p)
        elif p.state == HEAD and not p.rx:
            # Nothing of a request: an idle keep-alive connection, or one that never sent a
            # byte (that one is a head timeout too: slowloris starts that way).
            if not p.served:
                self.head_timeouts += 1
                self.count_refused("head_timeout")
            p.close()
        else:
            self.head_timeouts += 1
            self.count_refused("head_timeout")
            p.refuse(408, "request_timeout", f"request not received within head_timeout ({self.cfg.head_timeout}s)")

    def _liveness(self, p: HTTPProtocol, now: int, t: Timer) -> None:
        """A stream's one timer (``t``, just fired): a heartbeat when it has been silent for
        an interval; for a held stream, the slow-consumer verdict.  It re-arms itself only
        as far as something can be due -- a stalled stream is not looked at again before
        its stall or grace deadline."""
        wheel = self.wheel
        assert wheel is not None
        if p.wpaused or p.backlog is not None:
            conflate = self.fanout.conflate_only(p)
            v = verdict(p, now, self.grace_ms, self.stall_ms, conflate)
            if v == DROP_BUFFER:
                self.drop(p, "buffer")
                return
            if v == DROP_STALL:
                self.drop(p, "stall")
                return
            if conflate and p.wpaused and now - p.progress_ms >= self.stall_ms and self.flow.peer_dead(p):
                self.drop(p, "dead_peer")
                return
            if not p.wpaused:
                self.flow.pump(p, now)  # owed, and writable: catch up now
                if p.state != STREAM:
                    return
            if p.backlog is not None or p.wpaused:
                p.timer = wheel.rearm(t, next_check(p, now, self.grace_ms, self.stall_ms))
                return
        if now - p.last_write_ms >= self.hb_ms - TICK_MS:
            p.send_stream(HEARTBEAT)
            p.last_write_ms = now
            self.heartbeats += 1
        p.timer = wheel.rearm(t, max(p.last_write_ms + self.hb_ms, now + TICK_MS))


__all__ = ["Worker"]

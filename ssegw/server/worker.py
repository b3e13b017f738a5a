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

Closing rules: a connection we close is detached from the topic index at once (so no
flush writes to it), except during a flush sweep, where detaching is deferred to the end
of the sweep; its slot is freed in ``connection_lost``.
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
from collections import deque
from collections.abc import Callable

from ..config import Config
from ..core.fanout import Fanout
from ..core.history import Event
from ..core.sse import HEARTBEAT, encode_retry
from ..core.table import CLOSED, HEAD, STREAM, Table
from ..core.wheel import TimerWheel
from ..metrics import FLUSH_EVENT_BUCKETS, FLUSH_MS_BUCKETS, FLUSH_WRITE_BUCKETS, Histogram
from ..policy.auth import Authenticator
from ..policy.limits import Admission, ConnCounter, IPFilter, TokenBuckets
from . import handlers
from .protocol import T_HEAD, T_HEARTBEAT, HTTPProtocol
from .sockets import bind_socket

log = logging.getLogger("ssegw.worker")

#: Resolution of the timer wheel.  Heartbeats and timeouts are seconds-scale; 50 ms keeps
#: the idle wake-up rate at 20/s while nothing fires more than 50 ms late.
TICK_MS = 50
#: A flush writing to at most this many connections is done at once instead of waiting for
#: the batching interval: coalescing buys nothing for a handful of writes, and directed
#: traffic (one subscriber per topic) must not pay the interval in latency.
EAGER_WRITES = 64
#: How long an idle keep-alive connection (publisher, scraper) is kept (nginx's default).
KEEPALIVE_IDLE_MS = 75_000
#: Housekeeping period (history trimming, token-bucket pruning) in ticks.
HOUSEKEEPING_TICKS = 20
#: Streams closed because the broker lost events are closed over this window (ms), so their
#: clients do not all reconnect in the same instant.
GAP_CLOSE_SPREAD_MS = 2_000
#: Subscriber writes per slice of a sweep (~10-15 ms of loop time here): a sweep over many
#: subscribers yields to the loop between slices instead of blocking it for the whole pass.
SLICE_WRITES = 1_000
#: Stream-start pacing, as a budget of loop time: stream starts (subscribe + replay + first
#: write, measured) may use at most this share of the loop, in bursts of at most
#: START_BURST_S.  During a reconnect storm the other half stays with the streams already
#: open (flushes, heartbeats); a start that finds the budget spent waits in a FIFO.
START_SHARE, START_BURST_S = 0.5, 0.020
#: Python's cyclic GC: a full (generation 2) collection traverses every long-lived object --
#: every connection and every event held in history -- and was measured at 120-150 ms with
#: 10,000 streams, a loop stall that shows up as p99.9 latency.  Automatic full collections
#: are switched off; the tick runs one every FULL_GC_S instead (young generations stay
#: automatic, and almost all our garbage is acyclic and freed by reference counting).
FULL_GC_S = 300.0
GC_THRESHOLDS = (10_000, 10, 1_000_000_000)
#: After a drain has nothing else to wait for, how long connections that were accepted but
#: have not sent a request yet still get to ask (they are answered 503 draining).
UNASKED_GRACE = 0.5
#: How long a starting worker waits for its broker before accepting connections anyway.
BROKER_START_WAIT = 10.0
#: Seconds a stopping worker gives its broker to close (presence removal, connections).
BROKER_CLOSE_TIMEOUT = 5.0
#: Bounds on the dead-peer / write-stall timeout (2 x heartbeat_interval, clamped).
DEAD_PEER_MIN_MS, DEAD_PEER_MAX_MS = 5_000, 120_000
# Close-deadline kinds (wheel timer kinds beyond the protocol's).
T_LIFETIME, T_EXPIRE, T_DRAIN = 4, 5, 6


class Worker:
    T_LIFETIME, T_EXPIRE, T_DRAIN = T_LIFETIME, T_EXPIRE, T_DRAIN

    def __init__(self, cfg: Config, broker: object, *, extra_startup: Callable[[Worker], None] | None = None) -> None:
        self.cfg = cfg
        self.broker = broker
        self.loop: asyncio.AbstractEventLoop | None = None
        self.table = Table(conflate_for=lambda t: cfg.topic_settings(t)[0] == "conflate")
        self.fanout = Fanout(self.table, cfg.max_buffer, self._drop)
        self.wheel: TimerWheel | None = None
        a = cfg.auth
        self.auth = Authenticator(
            algorithm=a.jwt_algorithm, secret=a.jwt_secret, public_key=a.jwt_public_key,
            audience=a.audience, issuer=a.issuer, leeway=a.leeway, cookie=a.cookie,
            publish_keys=a.publish_keys,
        )
        # Subscribers need a token only when a JWT key is configured; publish_keys alone
        # protect publishing and leave subscribing open.
        self.subscribe_auth = bool(a.jwt_secret or a.jwt_public_key)
        self.admission = Admission(
            ip_filter=IPFilter(cfg.ip_allow, cfg.ip_deny),
            per_ip=ConnCounter(cfg.max_conns_per_ip),
            rate=TokenBuckets(cfg.conn_rate, cfg.conn_burst) if cfg.conn_rate > 0 else None,
            max_connections=cfg.max_connections,
        )
        self.draining = False
        self.drain_started = 0.0
        self.stopping: asyncio.Future[None] | None = None
        self.servers: list[asyncio.AbstractServer] = []
        self.admin_servers: list[asyncio.AbstractServer] = []
        self.extra_startup = extra_startup
        self.parent_pid = 0  # set under a supervisor: drain if it disappears
        # What the admin routes report: this worker, or (in a supervisor) all workers.
        self.admin_source: object = handlers.LocalAdmin(self)
        self.started_at = time.time()
        # Flush scheduling.
        self.flush_handle: asyncio.Handle | None = None
        self.last_flush = 0.0
        self.sweep_started = 0.0
        self.next_full_gc = 0.0
        self.in_flush = False
        self.deferred: list[HTTPProtocol] = []
        self.interval = cfg.flush_interval
        # Timing in ms.
        self.retry_ms = int(cfg.retry * 1000)
        self.hb_ms = int(cfg.heartbeat_interval * 1000)
        self.head_ms = int(cfg.head_timeout * 1000)
        self.idle_ms = max(KEEPALIVE_IDLE_MS, self.head_ms)
        # A peer is presumed dead when what we sent stays unacknowledged this long, and a
        # paused "drop" stream is closed when it could not be written to this long.
        self.dead_ms = min(max(2 * self.hb_ms, DEAD_PEER_MIN_MS), DEAD_PEER_MAX_MS)
        self.sndbuf = max(16 * 1024, cfg.max_buffer // 2)
        self.tick_count = 0
        # Counters (plain ints; read by metrics at scrape time).
        self.connections_open = 0
        self.connections_accepted = 0
        self.streams_opened = 0
        self.events_published = 0
        self.events_replayed = 0
        self.heartbeats = 0
        self.resets = 0
        self.publish_requests = 0
        self.head_timeouts = 0
        self.protocol_errors = 0
        self.closed_lifetime = 0
        self.closed_expired = 0
        self.responses: dict[str, int] = {}  # by status code as text (JSON keys)
        self.slow_closed: dict[str, int] = {}
        self.presence_dirty: set[str] = set()  # topics whose local subscriber count changed
        # Stream-start pacing (token bucket) and the streams waiting for a token.
        self.start_tokens = START_BURST_S  # seconds of loop time stream starts may still use
        self.start_refill = 0.0
        self.parked: deque[tuple] = deque()
        self.unpark_handle: asyncio.Handle | None = None
        self.paced = 0
        self.hist_writes = Histogram(FLUSH_WRITE_BUCKETS)
        self.hist_events = Histogram(FLUSH_EVENT_BUCKETS)
        self.hist_flush = Histogram(FLUSH_MS_BUCKETS)
        self.hist_delay = Histogram(FLUSH_MS_BUCKETS)

    # -- clocks -----------------------------------------------------------------------

    def now_ms(self) -> int:
        assert self.loop is not None
        return int(self.loop.time() * 1000)

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
        await self.broker.start(self.on_events, self.on_gap)  # type: ignore[attr-defined]
        wait_ready = getattr(self.broker, "wait_ready", None)
        if wait_ready is not None and public_socks != []:
            # Accept only once the broker is reachable (bounded): a worker replacing a
            # crashed one, or a new generation on reload, would otherwise answer the
            # connections queued in its slot socket with 503.  If the broker stays down we
            # serve anyway (streams get 503 until it is back; /readyz tells).
            if not await wait_ready(BROKER_START_WAIT):
                log.warning("broker not reachable after %.0fs; serving anyway", BROKER_START_WAIT)
        if public_socks is None:
            public_socks = [bind_socket(cfg.host, cfg.port)]
        for s in public_socks:
            self.servers.append(await loop.create_server(lambda: HTTPProtocol(self, False), sock=s, backlog=4096))
        if control_path is not None:
            self.admin_servers.append(await loop.create_unix_server(lambda: HTTPProtocol(self, True), path=control_path))
        else:
            if admin_socks is None:
                admin_socks = [bind_socket(cfg.admin_host, cfg.admin_port)]
            for s in admin_socks:
                self.admin_servers.append(await loop.create_server(lambda: HTTPProtocol(self, True), sock=s))
        loop.call_at(loop.time() + TICK_MS / 1000, self._tick)
        if self.extra_startup is not None:
            self.extra_startup(self)

    def bound_ports(self) -> tuple[int, int]:
        pub = self.servers[0].sockets[0].getsockname()[1] if self.servers else 0
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
        try:
            # Bounded: a broker that cannot say goodbye (Redis gone silent) must not keep a
            # drained worker alive until the supervisor kills it.
            await asyncio.wait_for(self.broker.close(), BROKER_CLOSE_TIMEOUT)  # type: ignore[attr-defined]
        except TimeoutError:
            log.warning("broker did not close within %.0fs; exiting anyway", BROKER_CLOSE_TIMEOUT)

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
        for s in self.servers:
            s.close()
        now = self.now_ms()
        drain_ms = int(self.cfg.drain_timeout * 1000)
        for p in list(self.table.records):
            if p is None:
                continue
            if p.state == STREAM:
                self.set_deadline(p, now + int(random.uniform(0, drain_ms)), T_DRAIN)  # type: ignore[arg-type]
            elif p.state == HEAD and p.line == 0 and p.served and not p.admin:  # type: ignore[attr-defined]
                # An idle public keep-alive connection.  A connection that has not sent its
                # first request yet stays: it was accepted, so it gets an answer (a stream
                # request gets 503 draining with Retry-After), not a silent close.  Admin
                # connections stay so that a probe arriving now gets its /readyz 503.
                p.close()  # type: ignore[attr-defined]
        assert self.loop is not None
        self.loop.call_later(self.cfg.drain_timeout + 2.0, self._stop_now)
        self._check_drained()

    def _check_drained(self) -> None:
        if not self.draining or self.stopping is None or self.stopping.done():
            return
        unasked = False
        for p in self.table.records:
            if p is None or p.admin or p.state == CLOSED:  # type: ignore[attr-defined]
                continue
            if p.state == HEAD and p.line == 0 and p.inbound == 0:  # type: ignore[attr-defined]
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
        for p in list(self.table.records):
            if p is not None and p.state != CLOSED:
                if p.state == STREAM:
                    p.end_stream(encode_retry(self.jittered_retry()))  # type: ignore[attr-defined]
                else:
                    p.abort()  # type: ignore[attr-defined]
        if self.stopping is not None and not self.stopping.done():
            self.stopping.set_result(None)

    # -- connection events (called by the protocol) -------------------------------------

    def on_connect(self, p: HTTPProtocol) -> None:
        self.table.add(p)
        if not p.admin:
            self.connections_open += 1
            self.connections_accepted += 1
        assert self.wheel is not None
        p.timer = self.wheel.schedule(self.now_ms() + self.head_ms, T_HEAD, p)
        # Bound what one socket can buffer in user space before pause_writing: small
        # enough that max_buffer, not the transport, holds a slow client's backlog.
        p.transport.set_write_buffer_limits(high=min(64 * 1024, self.cfg.max_buffer // 2))  # type: ignore[attr-defined]
        if not p.admin:
            self._dead_peer_options(p)

    def _dead_peer_options(self, p: HTTPProtocol) -> None:
        """Make the kernel notice a peer that vanished without FIN or RST.

        Heartbeats keep data in flight on every stream at least every heartbeat_interval;
        TCP_USER_TIMEOUT aborts the connection when data stays unacknowledged for
        ``dead_ms``, so a black-holed client is gone within heartbeat_interval + dead_ms.
        Keepalive probes cover connections with nothing in flight (a request being read).
        """
        sock = p.transport.get_extra_info("socket")  # type: ignore[attr-defined]
        if sock is None:
            return
        idle = max(1, self.hb_ms // 1000)
        try:
            # A fixed send buffer (no autotuning): otherwise the kernel absorbs up to
            # tcp_wmem[2] (4 MiB) per stalled client before the transport ever pauses, and
            # max_buffer bounds nothing (measured: 0.93 MiB per stalled reader).  The kernel
            # doubles the value, so kernel + held output stay within ~2 x max_buffer.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 3))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, self.dead_ms)
        except (OSError, AttributeError):  # not TCP (tests over unix sockets) or not Linux
            pass

    def on_closing(self, p: HTTPProtocol) -> None:
        if self.in_flush:
            self.deferred.append(p)
        else:
            self._detach(p)

    def on_close(self, p: HTTPProtocol) -> None:
        self._detach(p)
        if p.slot >= 0:
            self.table.remove(p)
            if not p.admin:
                self.connections_open -= 1
        if self.draining:
            self._check_drained()

    def subscribe(self, p: HTTPProtocol, topics: tuple[str, ...]) -> None:
        for t in self.table.subscribe(p, topics):
            self.broker.interest(t, True)  # type: ignore[attr-defined]
        self.presence_dirty.update(p.topics)

    def unsubscribe(self, p: HTTPProtocol) -> None:
        topics = p.topics
        for t in self.table.unsubscribe(p):
            self.broker.interest(t, False)  # type: ignore[attr-defined]
        self.presence_dirty.update(topics)

    def abandon_stream(self, p: HTTPProtocol) -> None:
        """A stream that could not start (its replay failed): undo its subscription."""
        if p.topics:
            self.unsubscribe(p)
        if p.held_ip:
            p.held_ip = False
            self.admission.per_ip.release(p.ip)
        p.paused = False
        p.pending = None
        p.pending_bytes = 0
        p.floor = None

    def on_gap(self, topics: list[str] | None) -> None:
        """The broker lost events it cannot fill (history too short, or Redis lost its data):
        close the affected streams, spread over a couple of seconds, so that their clients
        resume from their last id and get ``ssegw.reset`` instead of a silent gap."""
        now = self.now_ms()
        wanted = None if topics is None else set(topics)
        for p in self.table.records:
            if p is None or p.state != STREAM:
                continue
            if wanted is None or any(t in wanted for t in p.topics):
                self.set_deadline(p, now + int(random.uniform(0, GAP_CLOSE_SPREAD_MS)), T_DRAIN)  # type: ignore[arg-type]

    def _detach(self, p: HTTPProtocol) -> None:
        if p.topics:
            self.unsubscribe(p)
        if p.held_ip:
            p.held_ip = False
            self.admission.per_ip.release(p.ip)
        wheel = self.wheel
        if wheel is not None:
            if p.timer is not None:
                wheel.cancel(p.timer)  # type: ignore[arg-type]
                p.timer = None
            if p.deadline is not None:
                wheel.cancel(p.deadline)  # type: ignore[arg-type]
                p.deadline = None
        p.pending = None
        p.pending_bytes = 0

    def on_resume(self, p: HTTPProtocol) -> None:
        self.fanout.resume(p, self.now_ms())

    def _drop(self, p: object, reason: str) -> None:
        """Slow-consumer verdict from the fan-out: close at once, discarding its backlog."""
        self.slow_closed[reason] = self.slow_closed.get(reason, 0) + 1
        p.abort()  # type: ignore[attr-defined]

    def _all_conflate(self, p: HTTPProtocol) -> bool:
        topics = self.table.topics
        return all((ts := topics.get(t)) is not None and ts.conflate for t in p.topics)

    def arm_idle(self, p: HTTPProtocol) -> None:
        wheel = self.wheel
        assert wheel is not None
        if p.timer is not None:
            wheel.cancel(p.timer)  # type: ignore[arg-type]
        p.timer = wheel.schedule(self.now_ms() + self.idle_ms, T_HEAD, p)

    def count_protocol_error(self) -> None:
        self.protocol_errors += 1

    def count_response(self, status: int) -> None:
        key = str(status)
        self.responses[key] = self.responses.get(key, 0) + 1

    def cors_headers(self, p: HTTPProtocol) -> list[tuple[bytes, bytes]]:
        return handlers.cors_headers(self, p)

    def handle(self, p: HTTPProtocol, req: object, body: bytes) -> None:
        handlers.handle(self, p, req, body)

    # -- streams ----------------------------------------------------------------------

    def stream_gate(self) -> bool:
        """May a stream start now?  False: the caller parks it (FIFO behind others)."""
        if self.parked:
            self.paced += 1
            return False
        self._refill()
        if self.start_tokens > 0.0:
            return True
        self.paced += 1
        self._schedule_unpark()
        return False

    def start_stream(self, p: HTTPProtocol, args: tuple) -> None:
        """Start a stream and charge its measured cost to the pacing budget."""
        t0 = time.perf_counter()
        try:
            handlers.begin_stream(self, p, *args)
        finally:
            self.start_tokens -= time.perf_counter() - t0

    def _refill(self) -> None:
        assert self.loop is not None
        now = self.loop.time()
        self.start_tokens = min(START_BURST_S, self.start_tokens + (now - self.start_refill) * START_SHARE)
        self.start_refill = now

    def _schedule_unpark(self) -> None:
        if self.unpark_handle is None:
            assert self.loop is not None
            self.unpark_handle = self.loop.call_later(0.01, self._unpark)

    def _unpark(self) -> None:
        self.unpark_handle = None
        self._refill()
        parked = self.parked
        while parked and self.start_tokens > 0.0:
            p, args = parked.popleft()
            if p.state == CLOSED:
                continue
            try:
                self.start_stream(p, args)
            except Exception:  # a bug of ours: drop this one, keep starting the others
                log.exception("starting a paced stream failed")
                p.abort()
        if parked:
            self._schedule_unpark()

    def jittered_retry(self) -> int:
        """The ``retry:`` hint for a stream we close: 0.5x..1.5x ``retry`` so that the
        clients of a drained worker do not all come back in the same millisecond."""
        return int(self.retry_ms * random.uniform(0.5, 1.5))

    def schedule_heartbeat(self, p: HTTPProtocol, first: bool) -> None:
        assert self.wheel is not None
        if first:
            # Spread the first heartbeat of streams opened together over half an interval.
            due = self.now_ms() + int(self.hb_ms * random.uniform(0.5, 1.0))
        else:
            due = p.last_write_ms + self.hb_ms
        p.timer = self.wheel.schedule(due, T_HEARTBEAT, p)

    def set_deadline(self, p: HTTPProtocol, due_ms: int, kind: int) -> None:
        """Make ``due_ms`` the stream's close deadline if it is earlier than the current one."""
        wheel = self.wheel
        assert wheel is not None
        cur = p.deadline
        if cur is not None:
            if cur.active and cur.deadline_ms <= due_ms:  # type: ignore[attr-defined]
                return
            wheel.cancel(cur)  # type: ignore[arg-type]
        p.deadline = wheel.schedule(due_ms, kind, p)

    # -- events and flushing ----------------------------------------------------------

    def on_events(self, events: list[Event]) -> None:
        """Broker callback: events in sequence order, ready to fan out."""
        fan = self.fanout
        queued = 0
        for ev in events:
            queued = fan.publish(ev)
        self.schedule_flush(queued)

    def schedule_flush(self, queued: int) -> None:
        if self.flush_handle is not None:
            return
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
            self.last_flush = self.sweep_started = loop.time()
            dirty = fan.dirty
            if dirty:
                # Publish-to-sweep delay of the oldest waiting event (wall clock, like ts_ms).
                oldest = min(ts.batch[0].ts_ms for ts in dirty)  # type: ignore[attr-defined]
                self.hist_delay.observe(max(0, time.time_ns() // 1_000_000 - oldest))
        self.in_flush = True
        try:
            done, _ = fan.sweep_step(self.now_ms(), SLICE_WRITES)
        finally:
            self.in_flush = False
            deferred = self.deferred
            if deferred:
                self.deferred = []
                for p in deferred:
                    self._detach(p)
        if not done:
            # Let the loop breathe between slices (publishes, new streams, heartbeats);
            # events published meanwhile join this sweep for those not written yet.
            self.flush_handle = loop.call_soon(self.flush)
            return
        st = fan.stats
        if st.last_writes:
            self.hist_writes.observe(st.last_writes)
            self.hist_events.observe(st.last_events)
            self.hist_flush.observe(int((loop.time() - self.sweep_started) * 1000))
        if fan.dirty:
            self.schedule_flush(fan.queued_writes)

    # -- the tick -----------------------------------------------------------------------

    def _tick(self) -> None:
        loop = self.loop
        assert loop is not None and self.wheel is not None
        if self.stopping is not None and self.stopping.done():
            return
        loop.call_at(loop.time() + TICK_MS / 1000, self._tick)
        now = self.now_ms()
        for t in self.wheel.advance(now):
            if not t.active:  # cancelled by an earlier callback of this same batch
                continue
            try:
                self._fire(t, now)
            except Exception:  # a bug of ours must not stop the tick for every connection
                log.exception("timer callback failed")
        self.tick_count += 1
        if self.tick_count % HOUSEKEEPING_TICKS == 0:
            if loop.time() >= self.next_full_gc:
                self.next_full_gc = loop.time() + FULL_GC_S
                t0 = time.perf_counter()
                found = gc.collect(2)
                log.debug("full gc: %d unreachable, %.1f ms", found, (time.perf_counter() - t0) * 1000)
            if self.parent_pid and os.getppid() != self.parent_pid and not self.draining:
                log.error("supervisor %d is gone: draining", self.parent_pid)
                self.drain()
            self.broker.tick(now)  # type: ignore[attr-defined]
            if self.presence_dirty:
                dirty, self.presence_dirty = self.presence_dirty, set()
                presence = getattr(self.broker, "presence", None)
                if presence is not None:
                    presence({t: self.table.subscribers(t) for t in dirty})
            rate = self.admission.rate
            if rate is not None:
                rate.prune(now)

    def _fire(self, t: object, now: int) -> None:
        p: HTTPProtocol = t.target  # type: ignore[attr-defined]
        kind = t.kind  # type: ignore[attr-defined]
        if p.state == CLOSED:
            return
        if kind == T_HEARTBEAT:
            if p.timer is not t or p.state != STREAM:
                return
            if not p.paused:
                if now - p.last_write_ms >= self.hb_ms - TICK_MS:
                    p.send_stream(HEARTBEAT)
                    p.last_write_ms = now
                    self.heartbeats += 1
            elif now - p.last_write_ms >= self.dead_ms and not self._all_conflate(p):
                # Write stall: the client has taken nothing for dead_ms.  Under "drop" it
                # is closed (it resumes from history); "conflate" keeps its newest values.
                self._drop(p, "stall")
                return
            self.schedule_heartbeat(p, False)
        elif kind == T_HEAD:
            if p.timer is not t:
                return
            p.timer = None
            if p.state == HEAD and p.line == 0:
                p.close()  # idle keep-alive connection: nothing to answer
            elif p.state != STREAM:
                self.head_timeouts += 1
                p._refuse(408, "request_timeout", f"request not received within head_timeout ({self.cfg.head_timeout}s)")
        else:
            if p.deadline is not t or p.state != STREAM:
                return
            p.deadline = None
            if kind == T_LIFETIME:
                self.closed_lifetime += 1
            elif kind == T_EXPIRE:
                self.closed_expired += 1
            p.end_stream(encode_retry(self.jittered_retry()))

    # -- introspection ------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        st = self.fanout.stats
        return {
            "workers": 1,
            "connections_open": self.connections_open,
            "streams_open": self.table.streams,
            "slots_in_use": len(self.table),
            "topics_active": len(self.table.topics),
            "connections_accepted": self.connections_accepted,
            "streams_opened": self.streams_opened,
            "events_published": self.events_published,
            "events_delivered": st.events_delivered,
            "events_replayed": self.events_replayed,
            "bytes_written": st.bytes_written,
            "flushes": st.flushes,
            "writes": st.writes,
            "held": st.held,
            "conflated": st.conflated,
            "heartbeats": self.heartbeats,
            "resets": self.resets,
            "publish_requests": self.publish_requests,
            "head_timeouts": self.head_timeouts,
            "paced": self.paced,
            "protocol_errors": self.protocol_errors,
            "closed_lifetime": self.closed_lifetime,
            "closed_expired": self.closed_expired,
            "responses": dict(self.responses),
            "slow_closed": dict(self.slow_closed),
            "hist_writes": self.hist_writes.snapshot(),
            "hist_events": self.hist_events.snapshot(),
            "hist_flush_ms": self.hist_flush.snapshot(),
            "hist_delay_ms": self.hist_delay.snapshot(),
        }


__all__ = ["Worker"]

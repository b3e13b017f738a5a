"""What every part of a worker shares: its connections, their events, timers and counters.

A :class:`Context` holds one worker's state -- config, broker, connection table, fan-out,
flow control, timer wheel, admission and auth, counters -- and the handling of connection
events that the protocol feeds it (connect, pause/resume, close), subscriptions, the
stream-start pacing budget and per-stream timers.  It imports nothing above it: the
request handlers (``handlers.py``) take a Context, and the event loop's driver
(``worker.py``: listeners, flushes, the tick, drain) is a Context.  So the request
handlers and the worker never import each other.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Sequence
from typing import Protocol, cast

from ..broker.base import Broker
from ..config import Config
from ..core.conn import CLOSED, HEAD, STREAM, set_wpaused
from ..core.errors import ProtocolError
from ..core.fanout import Fanout
from ..core.publish import Message
from ..core.table import Table
from ..core.wheel import TimerWheel
from ..metrics import (
    EVENT_AGE_BUCKETS,
    FLUSH_EVENT_BUCKETS,
    FLUSH_SECONDS_BUCKETS,
    FLUSH_WRITE_BUCKETS,
    LOOP_LAG_BUCKETS,
    PUBLISH_BUCKETS,
    Histogram,
)
from ..policy.auth import Authenticator
from ..policy.limits import Admission, ConnCounter, IPFilter, TokenBuckets, client_ip, in_networks
from .access import configure_access
from .flow import Flow
from .protocol import T_HEAD, T_HEARTBEAT, HTTPProtocol, Request

log = logging.getLogger("ssegw.worker")

#: Resolution of the timer wheel.  Heartbeats and timeouts are seconds-scale; 50 ms keeps
#: the idle wake-up rate at 20/s while nothing fires more than 50 ms late.
TICK_MS = 50
#: How long an idle keep-alive connection (publisher, scraper) is kept (nginx's default).
KEEPALIVE_IDLE_MS = 75_000
#: Streams closed because the broker lost events are closed over this window (ms), so their
#: clients do not all reconnect in the same instant.
GAP_CLOSE_SPREAD_MS = 2_000
#: Stream-start pacing, as a budget of loop time: stream starts (subscribe + replay + first
#: write, measured) may use at most this share of the loop, in bursts of at most
#: START_BURST_S.  During a reconnect storm the other half stays with the streams already
#: open (flushes, heartbeats); a start that finds the budget spent waits in a FIFO.
START_SHARE, START_BURST_S = 0.5, 0.020
#: Bounds on the stall / dead-peer timeout (2 x heartbeat_interval, clamped).
STALL_MIN_MS, STALL_MAX_MS = 5_000, 120_000
#: Per-connection user-space write buffer (the transport's high-water mark): past it the
#: transport pauses and further output is held as references in the backlog.
WRITE_HIGH = 64 * 1024
# Close-deadline kinds (wheel timer kinds beyond the protocol's).
T_LIFETIME, T_EXPIRE, T_DRAIN = 4, 5, 6
#: A slow-consumer verdict (``ssegw_slow_closed_total{reason}``) as an access line's close
#: reason.
DROP_REASONS = {"buffer": "slow_buffer", "stall": "slow_stall", "dead_peer": "dead_peer"}
#: ``ssegw_refused_total{reason}`` for admission's refusals (policy/limits.py raises them
#: without a ``reason``; its details are fixed sentences, so they name the reason).
#: tests/test_metrics_honest.py drives every one of them through ``Admission``.
ADMISSION_REASONS = {
    "client address denied": "ip_denied",
    "draining": "draining",
    "at capacity": "capacity",
    "connection rate exceeded": "rate",
    "too many connections from this address": "per_ip",
}


class AdminSource(Protocol):
    """What the admin routes report from: one worker (``handlers.LocalAdmin``) or, on a
    supervisor's admin listener, every worker (``supervisor.Supervisor``)."""

    def ready(self) -> tuple[bool, str]: ...

    async def snapshots(self) -> list[dict[str, object]]: ...

    async def stats(self) -> list[dict[str, object]]: ...

    async def subscribers(self, topic: str) -> int: ...

    async def keys(self, topic: str) -> int: ...


class SharedRouteHooks(Protocol):
    """What the rest of the worker asks of server/upstream.py's SharedRoutes."""

    def interest(self, topic: str, on: bool) -> None: ...

    def subscribed(self, p: HTTPProtocol, topics: tuple[str, ...]) -> None: ...

    def refuse_routed(self, msgs: Sequence[Message]) -> None: ...

    def snapshot(self) -> dict[str, object]: ...

    async def close(self) -> None: ...


class ProxyHooks(Protocol):
    """What the rest of the worker asks of server/proxy.py's Proxies."""

    def forget(self, p: HTTPProtocol) -> None: ...

    def snapshot(self) -> dict[str, object]: ...


class Context:
    T_LIFETIME, T_EXPIRE, T_DRAIN = T_LIFETIME, T_EXPIRE, T_DRAIN

    def __init__(self, cfg: Config, broker: Broker) -> None:
        self.cfg = cfg
        self.broker = broker
        # Per process (a module setting of protocol.py): the newest generation's config wins.
        configure_access(cfg.access_log, cfg.access_log_sample)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.table = Table(conflate_for=lambda t: cfg.topic_settings(t)[0] == "conflate")
        self.grace_ms = int(cfg.slow_grace * 1000)
        self.fanout = Fanout(self.table, cfg.max_buffer, self.grace_ms)
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
        self.trusted_proxies = cfg.trusted_proxies
        self.admission = Admission(
            ip_filter=IPFilter(cfg.ip_allow, cfg.ip_deny),
            per_ip=ConnCounter(cfg.max_conns_per_ip),
            rate=TokenBuckets(cfg.conn_rate, cfg.conn_burst) if cfg.conn_rate > 0 else None,
            max_connections=cfg.max_connections,
        )
        self.draining = False
        self.drain_started = 0.0
        self.started_at = time.time()
        # What the admin routes report: this worker, or (in a supervisor) all workers.
        self.admin_source: AdminSource | None = None
        # Timing in ms.
        self.retry_ms = int(cfg.retry * 1000)
        self.hb_ms = int(cfg.heartbeat_interval * 1000)
        self.head_ms = int(cfg.head_timeout * 1000)
        self.idle_ms = max(KEEPALIVE_IDLE_MS, self.head_ms)
        # A peer is presumed dead when what we sent stays unacknowledged this long, and a
        # paused "drop" stream is closed when the client took nothing for this long.
        self.stall_ms = min(max(2 * self.hb_ms, STALL_MIN_MS), STALL_MAX_MS)
        self.write_high = min(WRITE_HIGH, max(4096, cfg.max_buffer // 2))
        self.flow = Flow(self.fanout, self.drop, self.stall_ms)
        self.tick_count = 0
        self.timer_fires = 0
        self.refused_capacity = 0
        # Public connections that fit in the open-files limit (Worker.start measures it),
        # and whether we are at it now (logged once each way).
        self.fd_capacity = 1 << 30
        self.fd_full = False
        # Counters (plain ints; read by metrics at scrape time).
        self.connections_open = 0
        self.connections_accepted = 0
        self.streams_opened = 0
        self.events_published = 0
        self.events_replayed = 0
        self.heartbeats = 0
        self.resets = 0
        self.compacted = 0  # ssegw.compacted sent
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
        # By reason (fixed sets, metrics.AUTH_REASONS / REFUSED_REASONS); broker replays
        # that failed (the broker counts its own publish errors and reconnects).
        self.auth_failures: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.replay_errors = 0
        # Histograms, observed only when the thing happened (see metrics.HISTOGRAMS).
        self.hist_writes = Histogram(FLUSH_WRITE_BUCKETS)
        self.hist_events = Histogram(FLUSH_EVENT_BUCKETS)
        self.hist_flush = Histogram(FLUSH_SECONDS_BUCKETS)
        self.hist_delay = Histogram(EVENT_AGE_BUCKETS)
        self.hist_lag = Histogram(EVENT_AGE_BUCKETS)
        self.hist_publish = Histogram(PUBLISH_BUCKETS)
        self.hist_loop = Histogram(LOOP_LAG_BUCKETS)
        # perf_counter() when a POST /publish head came in, until its handler runs (empty
        # but for publishes whose body is still on its way; entries leave on close).
        #: Publishes whose head passed check_head: when it came in (perf_counter), and the
        #: publisher's Authorization and loopback-ness, decided then.
        self.publish_t0: dict[HTTPProtocol, tuple[float, str | None, bool]] = {}
        #: Shared upstream routes (server/upstream.py), when any are configured; the worker
        #: makes them (they sit above this module and use it).
        self.upstreams: SharedRouteHooks | None = None
        #: Proxy routes' streams (server/proxy.py), likewise.
        self.proxies: ProxyHooks | None = None

    def now_ms(self) -> int:
        assert self.loop is not None
        return int(self.loop.time() * 1000)

    def records(self) -> list[HTTPProtocol | None]:
        """The connection table's slots (the table itself, not a copy)."""
        # The core table knows its records as Conn; a worker adds nothing but its
        # HTTPProtocol objects (on_connect).
        return cast("list[HTTPProtocol | None]", self.table.records)

    # -- connection events (called by the protocol) -------------------------------------

    def on_connect(self, p: HTTPProtocol) -> None:
        self.table.add(p)
        now = self.now_ms()
        p.transport.set_write_buffer_limits(high=self.write_high)
        if p.admin:
            p.due_ms = now + self.head_ms
            assert self.wheel is not None
            p.timer = self.wheel.schedule(p.due_ms, T_HEAD, p)
            return
        self.connections_open += 1
        self.connections_accepted += 1
        limit = self.admission.max_connections
        if limit > 0 and self.connections_open > limit:
            # Every open connection counts (idle, mid-request, keep-alive, parked, streaming):
            # one over the limit is answered at once and closed, never kept.
            self.refused_capacity += 1
            self.count_refused("capacity")
            p.refuse(503, "unavailable", "at capacity", (("Retry-After", str(self.admission.retry_after)),))
            return
        if self.connections_open > self.fd_capacity:
            # The open-files limit, less a reserve kept for the admin listener and the
            # broker: refuse here, with an answer, rather than reach EMFILE (sockets.py).
            self.refused_capacity += 1
            self.count_refused("descriptors")
            if not self.fd_full:
                self.fd_full = True
                log.warning("open-files limit reached: %d public connections open; refusing new ones "
                            "with 503 until some close (raise LimitNOFILE, or lower max_connections)",
                            self.connections_open - 1)
            p.refuse(503, "unavailable", "at capacity", (("Retry-After", str(self.admission.retry_after)),))
            return
        if not self.trusted_proxies or not in_networks(p.ip, self.trusted_proxies):
            # conn_rate and max_conns_per_ip count connections, not only streams.  A trusted
            # proxy's connections carry many clients: those are counted per forwarded client
            # when a request says who it is (handlers.open_stream).
            try:
                self.admission.admit_connection(p.ip, now)
            except ProtocolError as e:
                self.count_refusal(e)
                p.refuse(e.status_hint, e.code, e.detail, e.headers)
                return
            p.held_ip = True
        p.due_ms = now + self.head_ms
        assert self.wheel is not None
        p.timer = self.wheel.schedule(p.due_ms, T_HEAD, p)

    def on_closing(self, p: HTTPProtocol) -> None:
        # Uncounted as soon as we close it, not when the transport reports it lost (the next
        # loop iteration): connections refused in one accept batch must not count against
        # the ones admitted in the same batch.  (Their descriptors are still open until then:
        # sockets.FD_RESERVE leaves room for one batch.)
        self._detach(p)
        self._forget(p)

    def on_close(self, p: HTTPProtocol) -> None:
        self._detach(p)
        if self.publish_t0:
            self.publish_t0.pop(p, None)  # a publish whose handler never ran: no answer, no duration
        self._forget(p)
        if self.draining:
            self._check_drained()

    def _forget(self, p: HTTPProtocol) -> None:
        """Take ``p`` out of the table and the open count (once)."""
        if p.slot >= 0:
            self.table.remove(p)
            if not p.admin:
                self.connections_open -= 1
                if self.fd_full and self.connections_open < self.fd_capacity - self.fd_capacity // 16:
                    self.fd_full = False
                    log.warning("below the open-files limit again: %d public connections open; accepting",
                                self.connections_open)

    def on_pause(self, p: HTTPProtocol) -> None:
        set_wpaused(p, True, self.now_ms())
        if p.state == STREAM and self.fanout.conflate_only(p):
            self.flow.user_timeout(p, False)

    def on_resume(self, p: HTTPProtocol) -> None:
        now = self.now_ms()
        set_wpaused(p, False, now)
        state = p.state
        if state == STREAM:
            conflate = self.fanout.conflate_only(p)
            if conflate:
                self.flow.user_timeout(p, True)
            self.flow.pump(p, now)
            if p.backlog is None and not p.wpaused:
                self.rearm_liveness(p, now)
        elif state == HEAD:
            p.next_request()

    def client_ip(self, p: HTTPProtocol, req: Request) -> str:
        """The client of a request: the peer, or, from a ``trusted_proxies`` peer, the
        rightmost untrusted address of every ``X-Forwarded-For`` line read as one list (the
        first line alone may be the client's own ``X-Forwarded-For: 127.0.0.1``, with the
        proxy's line, the real address, after it)."""
        trusted = self.cfg.trusted_proxies
        if not trusted:
            return p.ip
        return client_ip(p.ip, req.field_list(b"x-forwarded-for"), trusted)

    def admit_stream(self, p: HTTPProtocol, req: Request) -> str:
        """Admission of a stream (``/events`` or a proxy route), before any token is
        verified -- a denied or rate-limited address must not make us run signature checks.
        Returns the client's address.

        A connection counted when it was accepted holds its per-IP slot already; one from a
        trusted proxy is counted here, per forwarded client, for as long as its stream lives.

        Raises:
            ProtocolError: the refusal (counted).
        """
        ip = self.client_ip(p, req)
        counted = p.held_ip
        try:
            self.admission.admit(ip, self.connections_open - 1, self.now_ms(), self.draining, counted)
        except ProtocolError as e:
            self.count_refusal(e)
            raise
        if not counted:
            p.ip = ip
            p.held_ip = True
        return ip

    def unadmit_stream(self, p: HTTPProtocol, ip: str, counted: bool) -> None:
        """Give back the per-IP slot ``admit_stream`` took for this stream (``counted``:
        whether the connection held it already, from its accept), when a refusal follows
        admission (a bad token)."""
        if not counted:
            p.held_ip = False
            self.admission.per_ip.release(ip)

    def subscribe(self, p: HTTPProtocol, topics: tuple[str, ...]) -> None:
        ups = self.upstreams
        for t in self.table.subscribe(p, topics):
            self.broker.interest(t, True)
            if ups is not None:
                ups.interest(t, True)
        if ups is not None:
            ups.subscribed(p, topics)
        self.presence_dirty.update(p.topics)

    def unsubscribe(self, p: HTTPProtocol) -> None:
        topics = p.topics
        ups = self.upstreams
        for t in self.table.unsubscribe(p):
            self.broker.interest(t, False)
            if ups is not None:
                ups.interest(t, False)
        self.presence_dirty.update(topics)

    def abandon_stream(self, p: HTTPProtocol) -> None:
        """A stream that could not start (its replay failed): undo its subscription and
        everything held for it, so that nothing of a stream is ever written into the HTTP
        answer that follows."""
        self._release(p)
        p.backlog = None
        p.floor = None
        p.over_ms = 0

    def on_gap(self, topics: list[str] | None) -> None:
        """The broker lost events it cannot fill (history too short, or Redis lost its data):
        close the affected streams, spread over a couple of seconds, so that their clients
        resume from their last id and get ``ssegw.reset`` instead of a silent gap."""
        now = self.now_ms()
        wanted = None if topics is None else set(topics)
        for p in self.records():
            if p is None or p.state != STREAM:
                continue
            if wanted is None or any(t in wanted for t in p.topics):
                self.set_deadline(p, now + int(random.uniform(0, GAP_CLOSE_SPREAD_MS)), T_DRAIN)

    def _release(self, p: HTTPProtocol) -> None:
        if p.topics:
            self.unsubscribe(p)
        if p.held_ip:
            p.held_ip = False
            self.admission.per_ip.release(p.ip)

    def _detach(self, p: HTTPProtocol) -> None:
        self._release(p)
        if self.proxies is not None:
            self.proxies.forget(p)  # closes its upstream request, if it is a proxied stream
        wheel = self.wheel
        if wheel is not None:
            if p.timer is not None:
                wheel.cancel(p.timer)
                p.timer = None
            if p.deadline is not None:
                wheel.cancel(p.deadline)
                p.deadline = None
        p.backlog = None

    def drop(self, p: HTTPProtocol, reason: str) -> None:
        """Slow-consumer verdict: close at once, discarding its backlog (the client resumes
        from history when it reconnects)."""
        if p.state == CLOSED:
            return
        self.slow_closed[reason] = self.slow_closed.get(reason, 0) + 1
        p.abort(DROP_REASONS.get(reason, reason))

    def arm_idle(self, p: HTTPProtocol) -> None:
        """Keep-alive: the connection may idle for ``idle_ms``.  Lazy: the deadline moves on
        the record, and the one wheel entry re-arms itself when it fires early -- not a
        cancel and a schedule per response."""
        p.due_ms = self.now_ms() + self.idle_ms
        if p.timer is None:
            assert self.wheel is not None
            p.timer = self.wheel.schedule(p.due_ms, T_HEAD, p)

    def count_protocol_error(self) -> None:
        self.protocol_errors += 1
        self.count_refused("bad_request")

    def count_response(self, status: int) -> None:
        key = str(status)
        self.responses[key] = self.responses.get(key, 0) + 1
        if status == 413 or status == 414:
            # Body over max_body, batch over max_batch, request line too long.  (431, a head
            # over max_head_size, is a protocol error: counted as bad_request.)
            self.count_refused("too_large")

    def count_refused(self, reason: str) -> None:
        """One refusal for ``ssegw_refused_total``; ``reason`` from metrics.REFUSED_REASONS."""
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def count_refusal(self, e: ProtocolError) -> None:
        """Count an admission refusal (policy/limits.py's, or one that names its reason)."""
        self.count_refused(e.reason or ADMISSION_REASONS.get(e.detail, "other"))

    def count_auth_failure(self, e: ProtocolError) -> None:
        """Count a refusal from policy/auth.py for ``ssegw_auth_failures_total``."""
        reason = e.reason or "other"
        self.auth_failures[reason] = self.auth_failures.get(reason, 0) + 1

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
            self.begin_stream(p, args)
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

    def schedule_heartbeat(self, p: HTTPProtocol) -> None:
        """Arm a new stream's liveness timer; its first heartbeat is spread over half an
        interval so that streams opened together do not beat together."""
        assert self.wheel is not None
        p.timer = self.wheel.schedule(self.now_ms() + int(self.hb_ms * random.uniform(0.5, 1.0)), T_HEARTBEAT, p)

    def rearm_liveness(self, p: HTTPProtocol, now: int) -> None:
        """A held stream caught up: its liveness timer may be set far out (a stall check);
        bring it back to the heartbeat.  Once per catch-up, not per write."""
        t = p.timer
        due = p.last_write_ms + self.hb_ms
        if t is not None and t.deadline_ms <= due:
            return
        wheel = self.wheel
        assert wheel is not None
        if t is not None:
            wheel.cancel(t)
        p.timer = wheel.schedule(max(due, now + TICK_MS), T_HEARTBEAT, p)

    def set_deadline(self, p: HTTPProtocol, due_ms: int, kind: int) -> None:
        """Make ``due_ms`` the stream's close deadline if it is earlier than the current one."""
        wheel = self.wheel
        assert wheel is not None
        cur = p.deadline
        if cur is not None:
            if cur.active and cur.deadline_ms <= due_ms:
                return
            wheel.cancel(cur)
        p.deadline = wheel.schedule(due_ms, kind, p)

    def _buffered(self) -> dict[str, int]:
        """Output waiting in user space: transport buffers plus backlogs (O(connections),
        at scrape time only)."""
        total = peak = owed = 0
        for p in self.records():
            if p is None or p.state == CLOSED:
                continue
            try:
                n = p.transport.get_write_buffer_size()
            except (AttributeError, RuntimeError):
                n = 0
            b = p.backlog
            if b is not None:
                n += b.nbytes
                owed += 1
            total += n
            if n > peak:
                peak = n
        return {"output_buffered": total, "output_buffered_max": peak, "streams_behind": owed}

    def snapshot(self) -> dict[str, object]:
        st = self.fanout.stats
        return {
            "workers": 1,
            "connections_open": self.connections_open,
            # The connections this worker takes before refusing: max_connections (its share)
            # or the open-files budget, whichever is lower.
            "connections_max": min(self.admission.max_connections or self.fd_capacity, self.fd_capacity),
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
            "compacted": self.compacted,
            "publish_requests": self.publish_requests,
            "head_timeouts": self.head_timeouts,
            "paced": self.paced,
            "protocol_errors": self.protocol_errors,
            "closed_lifetime": self.closed_lifetime,
            "closed_expired": self.closed_expired,
            "timer_fires": self.timer_fires,
            "wheel_stored": self.wheel.stored if self.wheel is not None else 0,
            "refused_capacity": self.refused_capacity,
            "write_errors": st.write_errors,
            **self._buffered(),
            "responses": dict(self.responses),
            "slow_closed": dict(self.slow_closed),
            "auth_failures": dict(self.auth_failures),
            "refused": dict(self.refused),
            "replay_errors": self.replay_errors,
            "hist_writes": self.hist_writes.snapshot(),
            "hist_events": self.hist_events.snapshot(),
            "hist_flush_s": self.hist_flush.snapshot(),
            "hist_delay_s": self.hist_delay.snapshot(),
            "hist_lag_s": self.hist_lag.snapshot(),
            "hist_publish_s": self.hist_publish.snapshot(),
            "hist_loop_s": self.hist_loop.snapshot(),
            **(self.upstreams.snapshot() if self.upstreams is not None else {}),
            **(self.proxies.snapshot() if self.proxies is not None else {}),
        }

    # -- what the worker provides ------------------------------------------------------

    def begin_stream(self, p: HTTPProtocol, args: tuple) -> None:
        """Subscribe, replay and start an admitted stream (the request handlers')."""
        raise NotImplementedError

    def check_head(self, p: HTTPProtocol, req: Request) -> None:
        """Refuse from the head what need not wait for the body (the request handlers')."""
        raise NotImplementedError

    def handle(self, p: HTTPProtocol, req: Request, body: bytes) -> None:
        """Serve a complete request (the request handlers')."""
        raise NotImplementedError

    def cors_headers(self, p: HTTPProtocol) -> list[tuple[bytes, bytes]]:
        raise NotImplementedError

    def _check_drained(self) -> None:
        """Stop once a drain has nothing left to wait for (the worker's)."""


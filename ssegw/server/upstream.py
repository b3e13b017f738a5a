"""Shared upstream routes: one upstream SSE stream per routed topic, fanned out to every subscriber.

Strategy (docs/api.md "Upstream routes").
- A topic matching a shared ``[[routes]]`` entry gets a *claim* task on every worker that has
  a local subscriber of it (``Context.subscribe`` calls :meth:`SharedRoutes.interest`).  Every
  ``RENEW_S`` the claim asks the broker for the topic's lease (``Broker.lease``: ``SET NX PX``
  on Redis, always granted on the embedded broker).  The worker that holds it runs the
  upstream stream (the *pump*) and renews; the others only read the lease's note (the
  upstream's status) to tell their own subscribers.  A holder that dies stops renewing: its
  lease expires after ``LEASE_MS`` and the next claim anywhere takes over, resuming from the
  upstream id stored in the note (at most ``RENEW_S`` old: a takeover may repeat a second of
  events, never skip one the upstream still has).
- The holder keeps the stream while the topic has a subscriber anywhere (cluster presence,
  ``Broker.subscribers``), and closes it and gives the lease up ``linger`` after the last one
  left.
- The pump publishes every upstream event through the broker like ``POST /publish`` does, so
  ids, history, resume and the slow-consumer policies are the gateway's own.  Upstream event
  names are kept; data is published as a string.  A publish to a routed topic from outside
  is refused 409 (:meth:`SharedRoutes.refuse_routed`).
- The pump reconnects after ``retry`` (the upstream's ``retry:``, else 0) plus full jitter
  over an exponential backoff (``BACKOFF_BASE`` doubling per consecutive failure, capped at
  ``BACKOFF_MAX``), sending the upstream's own last id as ``Last-Event-ID``.  A failed attempt
  (unreachable, not 200, not ``text/event-stream``, silent for longer than the stall allowance,
  malformed, over ``max_body``) makes the topic *down*; the first good response after that
  makes it *up*.  Each transition is one log line, one ``event: ssegw.upstream`` to the
  topic's subscribers (no ``id:``: not a published event) and a metric -- never one per retry.
  A clean end of the upstream's body is not a failure: the next attempt decides.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import socket
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING

import orjson

from ..broker.base import BrokerUnavailable, PublishUnresolved
from ..config import RouteRule
from ..core.conn import STREAM
from ..core.errors import ProtocolError
from ..core.publish import Message, topics_of
from ..core.sse import RESERVED_EVENT_PREFIX, data_lines, encode_body, validate_event_name
from ..core.sseparse import SSEParser, UpEvent
from .upstream_client import FAILURE_REASONS, Target, UpstreamFailure, UpstreamStream

if TYPE_CHECKING:
    from .context import Context
    from .protocol import HTTPProtocol

log = logging.getLogger("ssegw.upstream")

#: Lease lifetime (ms): how long a dead holder keeps a topic's upstream from being taken over.
LEASE_MS = 5_000
#: How often a claim renews or asks for its lease, and the holder checks cluster presence (s).
RENEW_S = 1.0
#: Reconnect backoff: full jitter over BACKOFF_BASE * 2**failures, capped (s).
BACKOFF_BASE, BACKOFF_MAX = 0.5, 30.0
#: The stall allowance: an upstream silent (not even a comment) for 2 heartbeat intervals
#: plus this margin is presumed stalled.
STALL_MARGIN_S = 1.0
#: How many times a new stream's "down" notice is retried while its replay is in flight.
NOTICE_TRIES = 50


class _Topic:
    __slots__ = ("name", "route", "target", "local", "holding", "claim", "pump", "status", "detail", "last_id",
                 "retry_ms", "idle_since", "renewed", "seen")

    def __init__(self, name: str, route: RouteRule, target: Target) -> None:
        self.name = name
        self.route = route
        self.target = target
        self.local = False  # a subscriber of it on this worker
        self.holding = False  # this worker holds the lease
        self.claim: asyncio.Task[None] | None = None
        self.pump: asyncio.Task[None] | None = None
        self.status = "up"  # as this worker last told its subscribers
        self.detail = ""
        self.last_id: str | None = None
        self.retry_ms: int | None = None
        self.idle_since = 0.0
        self.renewed = 0.0
        self.seen = ""  # the note's status as a non-holder last read it


class SharedRoutes:
    """A worker's side of the shared routes (one per Context, when any are configured)."""

    def __init__(self, w: Context) -> None:
        self.w = w
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self.topics: dict[str, _Topic] = {}
        self.targets = {id(r): Target(r) for r in w.cfg.routes if r.mode == "shared"}
        self.stall_s = 2 * w.cfg.heartbeat_interval + STALL_MARGIN_S
        self.closed = False
        # Counters (metrics.py: ssegw_upstream_*).
        self.connects = 0
        self.events = 0
        self.publish_errors = 0
        self.failures = dict.fromkeys(FAILURE_REASONS, 0)
        self.transitions = 0

    # -- hooks -------------------------------------------------------------------------

    def interest(self, topic: str, on: bool) -> None:
        """This worker gained its first / lost its last subscriber of ``topic``."""
        st = self.topics.get(topic)
        if not on:
            if st is not None:
                st.local = False
            return
        if st is None:
            route = self.w.cfg.shared_route(topic)
            if route is None:
                return
            st = self.topics[topic] = _Topic(topic, route, self.targets[id(route)])
        st.local = True
        if not self.closed and (st.claim is None or st.claim.done()):
            st.claim = asyncio.get_running_loop().create_task(self._claim(st), name=f"ssegw-upstream-{topic}")

    def subscribed(self, p: HTTPProtocol, topics: tuple[str, ...]) -> None:
        """A new stream: if one of its topics' upstreams is down, tell it once it has started."""
        for t in topics:
            st = self.topics.get(t)
            if st is not None and st.status == "down":
                self._notice_later(p, st, NOTICE_TRIES)

    def refuse_routed(self, msgs: Sequence[Message]) -> None:
        """``POST /publish`` to a topic a shared route feeds: 409 (its events come from upstream)."""
        cfg = self.w.cfg
        for topic in topics_of(msgs):
            route = cfg.shared_route(topic)
            if route is not None:
                # The route's URL is not named: its query may carry a backend credential.
                raise ProtocolError(
                    f"topic {topic!r} is fed by a shared upstream route ({route.topics.source if route.topics else ''}); "
                    "it cannot be published to", status_hint=409, code="routed_topic")

    # -- the claim: lease, presence, linger ----------------------------------------------

    async def _claim(self, st: _Topic) -> None:
        broker = self.w.broker
        name = f"upstream:{st.name}"
        loop = asyncio.get_running_loop()
        while not self.closed and (st.local or st.holding):
            try:
                await self._round(st, name, loop.time())
            except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
                raise
            except Exception:  # a bug of ours, or a broker error we do not know: next round
                log.exception("upstream %s: lease round failed", st.name)
                await asyncio.sleep(RENEW_S)
        if st.holding:
            self._stop_pump(st)
            if self.closed:
                return  # close() releases
            await broker.release(name, self.owner)
        if not st.local and self.topics.get(st.name) is st:
            del self.topics[st.name]

    async def _round(self, st: _Topic, name: str, now: float) -> None:
        """One round of a claim: ask for (or renew) the lease, act on the answer, wait."""
        broker = self.w.broker
        note = None
        if st.holding:
            note = orjson.dumps({"status": st.status, "detail": st.detail, "last_id": st.last_id}).decode()
        try:
            held, stored = await broker.lease(name, self.owner, LEASE_MS, note)
        except BrokerUnavailable as e:
            if st.holding and now - st.renewed > LEASE_MS / 1000:
                # Someone else may hold it by now: never two streams for one topic.
                log.warning("upstream %s: lease not renewed for %.0fs (%s); closing the upstream stream",
                            st.name, LEASE_MS / 1000, e)
                self._stop_pump(st)
            await asyncio.sleep(RENEW_S)
            return
        if held:
            st.renewed = now
            if not st.holding:
                st.holding = True
                st.idle_since = 0.0
                if stored:
                    self._adopt(st, stored)
                st.pump = asyncio.get_running_loop().create_task(self._pump(st), name=f"ssegw-upstream-pump-{st.name}")
            if await self._lingered(st, now):
                self._stop_pump(st)
                await broker.release(name, self.owner)
                log.info("upstream %s: no subscriber for %gs; stream closed", st.name, st.route.linger)
                return
        else:
            if st.holding:
                log.warning("upstream %s: lease lost to another gateway; closing our stream", st.name)
                self._stop_pump(st)
            if stored:
                self._follow(st, stored)
        await asyncio.sleep(RENEW_S)

    async def _lingered(self, st: _Topic, now: float) -> bool:
        """Whether the holder should let go: no subscriber anywhere for ``linger``."""
        w = self.w
        try:
            total = await w.broker.subscribers(st.name, w.table.subscribers(st.name))
        except (BrokerUnavailable, OSError):
            return False  # cannot tell: keep it
        if total > 0:
            st.idle_since = 0.0
            return False
        if not st.idle_since:
            st.idle_since = now
        return now - st.idle_since >= st.route.linger

    def _adopt(self, st: _Topic, stored: str) -> None:
        """A new holder starts from where the last one's note says the upstream got to."""
        try:
            note = orjson.loads(stored)
            if st.last_id is None and isinstance(note.get("last_id"), str):
                st.last_id = note["last_id"]
        except (orjson.JSONDecodeError, AttributeError):
            pass  # a note from another version: start without an id

    def _follow(self, st: _Topic, stored: str) -> None:
        """A non-holder: tell our subscribers when the holder's note changes status."""
        try:
            note = orjson.loads(stored)
            status, detail = note["status"], str(note.get("detail", ""))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        if status in ("up", "down") and status != st.seen:
            st.seen = status
            if status != st.status:
                st.status, st.detail = status, detail
                self._tell(st)

    def _stop_pump(self, st: _Topic) -> None:
        st.holding = False
        if st.pump is not None:
            st.pump.cancel()
            st.pump = None

    # -- the pump: one upstream stream, reconnected --------------------------------------

    async def _pump(self, st: _Topic) -> None:
        cfg = self.w.cfg
        failures = 0
        while True:
            parser = SSEParser(cfg.max_body, cfg.max_body, st.last_id)
            stream = UpstreamStream(parser, self.stall_s, cfg.max_head_size)
            try:
                await stream.open(st.target, st.target.target(st.name), [], st.last_id)
                self.connects += 1
                failures = 0
                self._status(st, "up", "upstream connected")
                await stream.events(functools.partial(self._publish, st, parser))
            except UpstreamFailure as e:
                self.failures[e.reason] += 1
                if e.reason != "closed":
                    failures += 1
                    self._status(st, "down", e.detail)
            except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
                raise
            except Exception:  # a bug of ours: logged, and the stream is retried like a failure
                log.exception("upstream %s: the stream failed unexpectedly", st.name)
                failures += 1
                self._status(st, "down", "internal error")
            finally:
                if parser.retry_ms is not None:
                    st.retry_ms = parser.retry_ms
                if parser.last_id is not None:
                    st.last_id = parser.last_id
                stream.close()
            retry = (st.retry_ms or 0) / 1000
            await asyncio.sleep(retry + random.uniform(0, min(BACKOFF_MAX, BACKOFF_BASE * 2 ** min(failures, 16))))

    def _publish(self, st: _Topic, parser: SSEParser, evs: list[UpEvent]) -> Awaitable[None] | None:
        """Publish one read's events: at once on the embedded broker (same loop turn as the
        bytes); on one that must wait, the returned awaitable (the stream pauses reading)."""
        msgs = []
        for ev in evs:
            name = ev.event
            if name is not None:
                try:
                    validate_event_name(name)
                except ProtocolError as e:
                    raise UpstreamFailure("malformed", f"upstream event name: {e.detail}") from None
                if name.startswith(RESERVED_EVENT_PREFIX):
                    raise UpstreamFailure("malformed", f"upstream event name {name[:60]!r} uses the reserved "
                                                       f"prefix {RESERVED_EVENT_PREFIX!r}")
            msgs.append(Message(st.name, name, None, encode_body(name, data_lines(ev.data))))
        if self.w.broker.publish_now(msgs) is not None:
            self.events += len(msgs)
            st.last_id = parser.last_id
            return None
        return self._publish_wait(st, parser, msgs)

    async def _publish_wait(self, st: _Topic, parser: SSEParser, msgs: list[Message]) -> None:
        try:
            await self.w.broker.publish(msgs)
        except (BrokerUnavailable, PublishUnresolved) as e:
            # Nothing to hand them to: they are lost for the gateway (the upstream may still
            # have them; a takeover resumes from the last id noted).  Counted, logged at debug:
            # the broker logs its own outage once.
            self.publish_errors += len(msgs)
            log.debug("upstream %s: %d events not published: %s", st.name, len(msgs), e)
        else:
            self.events += len(msgs)
        st.last_id = parser.last_id

    # -- status --------------------------------------------------------------------------

    def _status(self, st: _Topic, status: str, detail: str) -> None:
        if status == st.status:
            st.detail = detail if status == "down" else st.detail
            return
        st.status, st.detail = status, detail
        self.transitions += 1
        if status == "down":
            log.warning("upstream %s down: %s", st.name, detail)
        else:
            log.info("upstream %s up again", st.name)
        self._tell(st)

    def _frame(self, st: _Topic) -> bytes:
        data = orjson.dumps({"topic": st.name, "status": st.status, "detail": st.detail})
        return b"event: ssegw.upstream\ndata: " + data + b"\n\n"

    def _tell(self, st: _Topic) -> None:
        """The status event to every local stream of the topic that is writable now (a held,
        slow stream is skipped: the event is not in history and must not jump its backlog)."""
        ts = self.w.table.topics.get(st.name)
        if ts is None:
            return
        frame = self._frame(st)
        conns = list(ts.subs.values())
        for tset in ts.sets:
            conns.extend(tset.subs.values())
        for c in conns:
            p: HTTPProtocol = c  # type: ignore[assignment]
            if p.state == STREAM and p.backlog is None and not p.wpaused:
                p.send_stream(frame)

    def _notice_later(self, p: HTTPProtocol, st: _Topic, tries: int) -> None:
        loop = asyncio.get_running_loop()

        def notice() -> None:
            if st.status != "down" or p.slot < 0:
                return
            if p.state == STREAM:
                p.send_stream(self._frame(st))
            elif tries > 1:
                self._notice_later(p, st, tries - 1)

        loop.call_later(0.02 if tries == NOTICE_TRIES else 0.1, notice)

    # -- lifecycle and metrics -----------------------------------------------------------

    async def close(self) -> None:
        """Stop every claim and pump and give the leases up (the worker is stopping)."""
        self.closed = True
        for st in list(self.topics.values()):
            for task in (st.claim, st.pump):
                if task is not None:
                    task.cancel()
            if st.holding:
                st.holding = False
                await self.w.broker.release(f"upstream:{st.name}", self.owner)

    def snapshot(self) -> dict[str, object]:
        held = [st for st in self.topics.values() if st.holding]
        return {
            "upstream_streams": len(held),
            "upstream_down": sum(1 for st in held if st.status == "down"),
            "upstream_connects": self.connects,
            "upstream_events": self.events,
            "upstream_publish_errors": self.publish_errors,
            "upstream_transitions": self.transitions,
            "upstream_failures": dict(self.failures),
        }

"""Batched broadcast as write plans: one write per connection per flush, the same bytes for all.

Strategy.  Publishing does not touch subscribers: the event (encoded once) is appended to
its topic's ``batch`` and the topic is marked dirty -- O(1) whatever the fan-out.  A sweep
then walks the dirty topics.  For each topic the batch is joined once, and chunk-framed
once, and every single-topic subscriber whose ``route`` is LIVE (core/conn.py) gets that
object.  Streams of several topics are grouped by topic set (core/table.py): each touched
set gets one merged buffer (its topics' events in arrival order), shared by its members.

The sweep decides; it does not write.  :meth:`Fanout.sweep_step` returns a :class:`Plan` --
"these bytes to these connections", "these events to that one", "close that one for this
reason" -- and the server carries it out, each write isolated, so one failing socket never
stalls the rest of a pass.  A plan's shared bytes come in :class:`Segment` s of at most
``segment_bytes``: the server stops writing a connection's segments once its transport
pauses and hands the rest to :meth:`Fanout.hold`, so no transport ever buffers more than its
high-water mark plus one segment, however large a publisher's burst.

Slow consumers (routes HOLD).  Events for a connection whose transport is paused, which
still owes a backlog, or which is starting, go to its backlog (core/conn.py ``Backlog``) as
references to the shared frames; the server pumps the backlog out as the client reads.
Policy per topic: ``drop`` keeps every event; ``conflate`` keeps only the newest per
``(topic, key)``.  A connection whose backlog stays over ``max_buffer`` for ``grace_ms``
is closed (verdict ``"buffer"``) and resumes from history when it reconnects; a burst the
client drains within the grace is not slowness.

Replay floors.  A new stream is subscribed *before* its replay is fetched, and the replay
covers each topic up to the broker's head at that moment, so the first flushes may carry
events it already got (still in a batch, or on their way from the broker).  Its ``floor``
maps topic -> highest sequence the replay covered; events at or under it are skipped, and
the floor disappears with the first event above it, returning the connection to the fast
path.
"""

from __future__ import annotations

from .conn import HOLD, LIVE, STREAM, Backlog, Conn, owed, refresh
from .history import Event
from .sse import chunk
from .table import Table, TopicState

#: Largest shared write, in bytes of SSE frames (a larger flush is cut into segments; a
#: single larger event is one segment of its own).  64 KiB is the transport's default
#: high-water mark: per connection, user-space output stays within two of these.
SEGMENT_BYTES = 64 * 1024


class FlushStats:
    """Plain-int counters the metrics layer reads; no locking, no per-event objects."""

    __slots__ = ("flushes", "writes", "events_delivered", "bytes_written", "held", "conflated",
                 "last_writes", "last_events", "caught_up", "write_errors")

    def __init__(self) -> None:
        self.flushes = 0
        self.writes = 0
        self.events_delivered = 0
        self.bytes_written = 0
        self.held = 0
        self.conflated = 0
        self.last_writes = 0
        self.last_events = 0
        self.caught_up = 0
        self.write_errors = 0


class Segment:
    """Consecutive events joined once: ``raw`` SSE bytes and the same ``framed`` as one
    HTTP chunk (chunked streams get ``framed``, HTTP/1.0 ones ``raw``)."""

    __slots__ = ("events", "raw", "framed")

    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self.raw = events[0].frame if len(events) == 1 else b"".join([e.frame for e in events])
        self.framed = chunk(self.raw)


def segments(events: list[Event], limit: int = SEGMENT_BYTES) -> list[Segment]:
    """Cut ``events`` into segments of about ``limit`` bytes (one when they fit)."""
    if len(events) == 1:
        return [Segment(events)]
    out: list[Segment] = []
    start = size = 0
    for i, e in enumerate(events):
        n = len(e.frame)
        if size and size + n > limit:
            out.append(Segment(events[start:i]))
            start, size = i, 0
        size += n
    if start < len(events):
        out.append(Segment(events[start:] if start else events))
    return out


class Plan:
    """What one sweep step decided, for the server to carry out in this order:
    ``shared`` (connections, segments every one of them gets), ``single`` (a connection and
    events of its own: a filtered or merged list), ``drops`` (connection, reason)."""

    __slots__ = ("shared", "single", "drops")

    def __init__(self) -> None:
        self.shared: list[tuple[list[Conn], list[Segment]]] = []
        self.single: list[tuple[Conn, list[Event]]] = []
        self.drops: list[tuple[Conn, str]] = []

    def __bool__(self) -> bool:
        return bool(self.shared or self.single or self.drops)


class _Item:
    """One part of a sweep: a topic's single-topic subscribers (``ts`` set), or a topic
    set's members (``ts`` None), and the events they get."""

    __slots__ = ("ts", "events", "segs", "subs", "pos", "caught", "extended", "cache")

    def __init__(self, ts: TopicState | None, subs: list[Conn], events: list[Event]) -> None:
        self.ts = ts
        self.events = events
        self.segs = segments(events)
        self.subs = subs
        self.pos = 0
        self.caught = events[-1].seq
        self.extended = False
        # floor -> (events above it, their segments): the streams that caught up in the same
        # slice of the previous sweep share one floor, so they share these bytes too.
        self.cache: dict[int, tuple[list[Event], list[Segment]]] = {}


class _Sweep:
    __slots__ = ("items", "idx", "writes", "nevents")

    def __init__(self) -> None:
        self.items: list[_Item] = []
        self.idx = 0
        self.writes = 0
        self.nevents = 0


class Fanout:
    def __init__(self, table: Table, max_buffer: int, grace_ms: int) -> None:
        self.table = table
        self.max_buffer = max_buffer
        self.grace_ms = grace_ms
        self.dirty: list[TopicState] = []
        self.queued_writes = 0  # subscriber-writes waiting for the next flush
        self.arrivals = 0  # events queued so far: each one's ``n``
        self.sweeps = 0
        self.current: _Sweep | None = None  # the sweep in progress, if any
        self.stats = FlushStats()

    # -- publish side ---------------------------------------------------------------

    def publish(self, ev: Event) -> int:
        """Queue ``ev`` for its topic's subscribers.  Returns the writes now queued.

        Only a queued event is numbered (``n``: a flush's events of several topics go to a
        stream in that order); one nobody here follows keeps ``n`` 0 -- no int object of its
        own in history, ~32 bytes an event."""
        ts = self.table.topics.get(ev.topic)
        if ts is None or not ts.count:
            return self.queued_writes
        self.arrivals += 1
        ev.n = self.arrivals
        if not ts.batch:
            self.dirty.append(ts)
            self.queued_writes += ts.count
        ts.batch.append(ev)
        return self.queued_writes

    def publish_many(self, events: list[Event]) -> int:
        """:meth:`publish` for each of ``events``, inlined.  Returns the writes now queued."""
        topics = self.table.topics
        n = self.arrivals
        for ev in events:
            ts = topics.get(ev.topic)
            if ts is None or not ts.count:
                continue
            n += 1
            ev.n = n
            if not ts.batch:
                self.dirty.append(ts)
                self.queued_writes += ts.count
            ts.batch.append(ev)
        self.arrivals = n
        return self.queued_writes

    # -- sweep side -----------------------------------------------------------------

    def sweep_step(self, now_ms: int, quota: int) -> tuple[bool, Plan]:
        """Advance the current sweep (starting one if anything is dirty) by about ``quota``
        subscribers.  Returns (done, plan).

        Between steps the caller lets the event loop run; events of a topic published
        meanwhile are added ("catch-up") for its subscribers this sweep has not reached
        yet, who then carry a floor so that the next sweep skips them.
        """
        plan = Plan()
        sw = self.current
        if sw is None:
            if not self.dirty:
                return True, plan
            sw = self.current = self._begin()
        items = sw.items
        while quota > 0 and sw.idx < len(items):
            it = items[sw.idx]
            ts = it.ts
            if ts is not None and ts.batch and ts.batch[-1].seq > it.caught:  # type: ignore[attr-defined]
                self._catch_up(it)
            subs = it.subs
            end = min(len(subs), it.pos + quota)
            caught = it.caught if it.extended else 0
            live: list[Conn] = []
            floored: dict[int, list[Conn]] = {}
            if caught:
                name = ts.name  # type: ignore[union-attr]
                for i in range(it.pos, end):
                    conn = subs[i]
                    route = conn.route
                    if route == LIVE:
                        live.append(conn)
                        conn.floor = {name: caught}
                        conn.route = HOLD
                    elif route == HOLD:
                        self._slow(conn, it, caught, plan, now_ms, floored)
            else:
                # The hot loop: a route check and an append per connection.
                add = live.append
                for conn in subs[it.pos:end] if it.pos or end < len(subs) else subs:
                    route = conn.route
                    if route == LIVE:
                        add(conn)
                    elif route == HOLD:
                        self._slow(conn, it, 0, plan, now_ms, floored)
            if live:
                plan.shared.append((live, it.segs))
                sw.writes += len(live)
            for f, conns in floored.items():
                plan.shared.append((conns, it.cache[f][1]))
                sw.writes += len(conns)
            quota -= max(1, end - it.pos)
            it.pos = end
            if end >= len(subs):
                sw.idx += 1
        done = sw.idx >= len(items)
        if done:
            self.current = None
            st = self.stats
            st.flushes += 1
            st.last_writes = sw.writes
            st.last_events = sw.nevents
        return done, plan

    def _begin(self) -> _Sweep:
        dirty = self.dirty
        self.dirty = []
        self.queued_writes = 0
        self.sweeps += 1
        mark = self.sweeps
        sw = _Sweep()
        topics = self.table.topics
        batches: dict[str, list[Event]] = {}
        touched = []
        for ts in dirty:
            batch: list[Event] = ts.batch  # type: ignore[assignment]
            ts.batch = []
            if not ts.count:
                if topics.get(ts.name) is ts:
                    del topics[ts.name]
                continue
            sw.nevents += len(batch)
            if ts.subs:
                sw.items.append(_Item(ts, list(ts.subs.values()), batch))
            for tset in ts.sets:
                if tset.mark != mark:
                    tset.mark = mark
                    touched.append(tset)
            if ts.sets:
                batches[ts.name] = batch
        # Sets whose dirty topics are the same get the same events: one item (one merged
        # buffer) for all of them.  "A shared topic plus one of my own" gives every stream
        # its own set, but in a flush where only the shared topic moved they all share.
        merged: dict[tuple[int, ...], _Item] = {}
        for tset in touched:
            lists = [b for b in (batches.get(name) for name in tset.topics) if b]
            key = tuple(map(id, lists))
            it = merged.get(key)
            if it is not None:
                it.subs.extend(tset.subs.values())
                continue
            if len(lists) == 1:
                evs = lists[0]
            else:
                # Interleave topics in the order the events came: with one broker shard
                # that is publish (seq) order; with several, seqs of different shards are
                # unrelated and each frame's vector id is only right in arrival order.
                evs = [e for b in lists for e in b]
                evs.sort(key=_arrival)
            it = merged[key] = _Item(None, list(tset.subs.values()), evs)
            sw.items.append(it)
        return sw

    def _catch_up(self, it: _Item) -> None:
        """Add events published since the sweep began to the rest of this topic's pass."""
        batch: list[Event] = it.ts.batch  # type: ignore[union-attr, assignment]
        new = [e for e in batch if e.seq > it.caught]
        if not new:
            return
        it.events = it.events + new
        it.caught = new[-1].seq
        it.extended = True
        it.segs = segments(it.events)
        it.cache = {}
        self.stats.caught_up += len(new)

    def _slow(self, conn: Conn, it: _Item, caught: int, plan: Plan, now_ms: int,
              floored: dict[int, list[Conn]]) -> None:
        """A HOLD connection: filter by its floor, then write (only a floor held it) or hold.
        Writable streams of one topic that share a floor value are collected in ``floored``
        and get one shared write per value."""
        evs = it.events
        floor = conn.floor
        shared = -1
        if floor is not None:
            ts = it.ts
            if ts is not None:
                f = floor.get(ts.name)
                if f is not None:
                    # Subscribers that caught up in the same slice of the previous sweep
                    # share one floor: filter and join once per floor value.
                    cached = it.cache.get(f)
                    if cached is None:
                        kept = [e for e in evs if e.seq > f]
                        cached = it.cache[f] = (kept, segments(kept) if kept else [])
                    evs = cached[0]
                    if evs:
                        del floor[ts.name]
                        shared = f
            else:
                evs = apply_floor(floor, evs)
            if not floor:
                conn.floor = None
                refresh(conn)
            if not evs:
                return
        if caught:
            set_floor(conn, it.ts.name, caught)  # type: ignore[union-attr]
        if conn.route == HOLD and (conn.state != STREAM or conn.wpaused or conn.backlog is not None):
            if self.hold(conn, evs, now_ms, False):
                plan.drops.append((conn, "buffer"))
            return
        if shared >= 0:
            group = floored.get(shared)
            if group is None:
                floored[shared] = [conn]
            else:
                group.append(conn)
            return
        plan.single.append((conn, evs))

    # -- slow consumers -------------------------------------------------------------

    def hold(self, conn: Conn, evs: list[Event], now_ms: int, replay: bool) -> bool:
        """Add ``evs`` to what ``conn`` owes, by topic policy (a ``replay`` is never
        conflated: a resuming client gets every event).  Returns True when the connection
        must now be dropped: its backlog has stayed over ``max_buffer`` for ``grace_ms``."""
        b = conn.backlog
        if b is None:
            b = conn.backlog = Backlog()
            refresh(conn)
        stats = self.stats
        if replay:
            for ev in evs:
                b.push(ev, False)
        else:
            topics = self.table.topics
            for ev in evs:
                ts = topics.get(ev.topic)
                if b.push(ev, ts is not None and ts.conflate):
                    stats.conflated += 1
            stats.held += len(evs)
        owed(conn, now_ms, self.max_buffer)
        return bool(conn.over_ms) and now_ms - conn.over_ms >= self.grace_ms

    def conflate_only(self, conn: Conn) -> bool:
        """Every topic of ``conn`` has the ``conflate`` policy."""
        topics = self.table.topics
        return bool(conn.topics) and all((ts := topics.get(t)) is not None and ts.conflate for t in conn.topics)


def set_floor(conn: Conn, topic: str, seq: int) -> None:
    floor = conn.floor
    if floor is None:
        conn.floor = {topic: seq}
        refresh(conn)
    elif floor.get(topic, 0) < seq:
        floor[topic] = seq


def apply_floor(floor: dict[str, int], evs: list[Event]) -> list[Event]:
    """Drop events a new stream already got from its replay (seq <= its topic's floor).

    A topic's floor is removed once an event above it passes: sequences only grow, so
    nothing later can fall under it; the caller clears an emptied floor.
    """
    out = []
    for e in evs:
        f = floor.get(e.topic)
        if f is None:
            out.append(e)
        elif e.seq > f:
            del floor[e.topic]
            out.append(e)
    return out


def _arrival(e: Event) -> int:
    return e.n

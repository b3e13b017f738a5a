"""Batched broadcast: one write per connection per flush, the same bytes for every subscriber.

Strategy.  Publishing does not touch subscribers: the event (encoded once) is appended to
its topic's ``batch`` and the topic is marked dirty -- O(1) whatever the fan-out.  A flush
then walks the dirty topics.  For each topic the batch is joined once, and chunk-framed
once, into one bytes object, and every subscriber of the topic gets that object in a
single ``transport.write``.  Per connection and per flush that is one attribute check and
one write; there is no per-subscriber encoding or buffering on the fast path.

Connections subscribed to several topics cannot share one topic's joined bytes (their
events from different topics must be interleaved in sequence order), so they are collected
during the sweep and get their own merged write at the end -- still one write each.  The
same slow path serves paused connections and new streams with a replay floor.

Slow consumers.  A connection whose transport called ``pause_writing`` is ``paused``; its
events are held in ``pending`` instead of written.  Policy per topic:
- ``drop``: events are held until ``max_buffer`` bytes; past that the connection is
  closed (verdict ``"buffer"``) and the client resumes from history when it reconnects.
- ``conflate``: events are held keyed by ``(topic, key)`` (key = None when the message had
  none), so a newer event replaces the held older one: the client gets the newest value per
  key, in sequence order.  If even that exceeds ``max_buffer`` the connection is dropped.
When the transport resumes, everything held goes out in one write.

Replay floors.  A new stream is subscribed *before* its replay is fetched, and the replay
covers each topic up to the broker's head at that moment, so the first flushes may carry
events it already got (still in a batch, or on their way from the broker).  Its ``floor``
maps topic -> highest sequence the replay covered; events at or under it are skipped, and
the floor disappears with the first event above it, returning the connection to the fast
path.  Held events are kept in sequence order across topics, so a client that resumes from
the last id it saw never skips an earlier event of another topic.
"""

from __future__ import annotations

from collections.abc import Callable

from .history import Event
from .sse import chunk
from .table import CLOSED, Conn, Table, TopicState


class FlushStats:
    """Plain-int counters the metrics layer reads; no locking, no per-event objects."""

    __slots__ = ("flushes", "writes", "events_delivered", "bytes_written", "held", "conflated",
                 "last_writes", "last_events", "caught_up")

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


class _Item:
    """One topic's part of a sweep: the subscribers to write and the bytes they get."""

    __slots__ = ("ts", "base", "events", "raw", "framed", "subs", "pos", "caught", "extended", "cache")

    def __init__(self, ts: TopicState, batch: list[Event]) -> None:
        self.ts = ts
        self.base = batch  # the events every subscriber of this sweep gets
        self.events = batch  # base plus catch-up events for those not written yet
        self.raw = batch[0].frame if len(batch) == 1 else b"".join([e.frame for e in batch])
        self.framed = chunk(self.raw)
        self.subs: list[Conn] = list(ts.subs.values())
        self.pos = 0
        self.caught = batch[-1].seq
        self.extended = False
        self.cache: dict[int, tuple[list[Event], bytes, bytes]] = {}  # floor -> filtered bytes


class _Sweep:
    __slots__ = ("items", "idx", "multi", "writes", "nevents")

    def __init__(self) -> None:
        self.items: list[_Item] = []
        self.idx = 0
        self.multi: dict[Conn, list[Event]] = {}
        self.writes = 0
        self.nevents = 0


class Fanout:
    def __init__(self, table: Table, max_buffer: int, on_drop: Callable[[Conn, str], None]) -> None:
        self.table = table
        self.max_buffer = max_buffer
        self.on_drop = on_drop  # called for a connection that must be closed, with a reason
        self.dirty: list[TopicState] = []
        self.queued_writes = 0  # subscriber-writes waiting for the next flush
        self.arrivals = 0  # events queued so far: each one's ``n``
        self.current: _Sweep | None = None  # the sweep in progress, if any
        self.stats = FlushStats()

    # -- publish side ---------------------------------------------------------------

    def publish(self, ev: Event) -> int:
        """Queue ``ev`` for its topic's subscribers.  Returns the writes now queued."""
        self.arrivals += 1
        ev.n = self.arrivals
        ts = self.table.topics.get(ev.topic)
        if ts is None or not ts.subs:
            return self.queued_writes
        if not ts.batch:
            self.dirty.append(ts)
            self.queued_writes += len(ts.subs)
        ts.batch.append(ev)
        return self.queued_writes

    # -- flush side -----------------------------------------------------------------

    def flush(self, now_ms: int) -> int:
        """Finish the sweep in progress, if any, and sweep until nothing is dirty (the
        whole thing at once, without yielding).  Returns writes done."""
        writes = 0
        while True:
            done, n = self.sweep_step(now_ms, 1 << 62)
            writes += n
            if done and not self.dirty:
                return writes

    def sweep_step(self, now_ms: int, quota: int) -> tuple[bool, int]:
        """Advance the current sweep by up to ``quota`` subscriber writes.

        Returns (done, writes).  Between steps the caller lets the event loop run; events
        published meanwhile are added ("catch-up") for the subscribers this sweep has not
        written yet, who then carry a floor so the next sweep skips them.
        """
        sw = self.current
        if sw is None:
            if not self.dirty:
                return True, 0
            sw = self.current = self._begin()
        items = sw.items
        writes = 0
        nbytes = 0
        delivered = 0
        while quota > 0 and sw.idx < len(items):
            it = items[sw.idx]
            ts = it.ts
            if ts.batch and ts.batch[-1].seq > it.caught:  # type: ignore[attr-defined]
                self._catch_up(it)
            subs = it.subs
            end = min(len(subs), it.pos + quota)
            framed, raw, n = it.framed, it.raw, len(it.events)
            lf, lr = len(framed), len(raw)
            caught = it.caught if it.extended else 0
            w = 0
            fast = 0
            for i in range(it.pos, end):
                conn = subs[i]
                if conn.state == CLOSED:
                    continue
                if conn.paused or conn.floor is not None or len(conn.topics) > 1:
                    # Slow path: merged later (several topics), filtered (a floor), or held.
                    if not conn.topics:
                        continue  # its stream was abandoned mid-sweep
                    if len(conn.topics) > 1:
                        lst = sw.multi.get(conn)
                        if lst is None:
                            sw.multi[conn] = list(it.base)
                        else:
                            lst.extend(it.base)
                        continue
                    evs = it.events
                    data = framed if conn.chunked else raw
                    floor = conn.floor
                    if floor is not None:
                        f = floor.get(ts.name)
                        if f is not None:
                            # Subscribers that caught up in the same slice of the previous
                            # sweep share one floor: filter and join once per floor value.
                            cached = it.cache.get(f)
                            if cached is None:
                                kept = [e for e in evs if e.seq > f]
                                kraw = b"".join([e.frame for e in kept])
                                cached = it.cache[f] = (kept, kraw, chunk(kraw))
                            evs = cached[0]
                            data = cached[2] if conn.chunked else cached[1]
                            if evs:
                                del floor[ts.name]
                                if not floor:
                                    conn.floor = None
                            if not evs:
                                continue
                    if caught:
                        self._set_floor(conn, ts.name, caught)
                    if conn.paused:
                        self.hold(conn, evs)
                        continue
                    conn.transport.write(data)  # type: ignore[attr-defined]
                    conn.last_write_ms = now_ms
                    nbytes += len(data)
                    w += 1
                    delivered += len(evs)
                    continue
                if conn.chunked:
                    conn.transport.write(framed)  # type: ignore[attr-defined]
                    nbytes += lf
                else:
                    conn.transport.write(raw)  # type: ignore[attr-defined]
                    nbytes += lr
                conn.last_write_ms = now_ms
                if caught:
                    conn.floor = {ts.name: caught}
                w += 1
                fast += 1
            delivered += fast * n
            writes += w
            quota -= max(1, end - it.pos)
            it.pos = end
            if end >= len(subs):
                sw.idx += 1
        done = sw.idx >= len(items)
        if done:
            for conn, evs in sw.multi.items():
                if conn.state == CLOSED:
                    continue
                # Interleave topics in the order the events came: with one broker shard
                # that is publish (seq) order; with several, seqs of different shards are
                # unrelated and each frame's vector id is only right in arrival order.
                evs.sort(key=_arrival)
                if conn.floor is not None:
                    evs = self._apply_floor(conn, evs)
                    if not evs:
                        continue
                if conn.paused:
                    self.hold(conn, evs)
                    continue
                nbytes += self._write_events(conn, evs, now_ms)
                writes += 1
                delivered += len(evs)
            self.current = None
        stats = self.stats
        stats.writes += writes
        stats.events_delivered += delivered
        stats.bytes_written += nbytes
        sw.writes += writes
        if done:
            stats.flushes += 1
            stats.last_writes = sw.writes
            stats.last_events = sw.nevents
        return done, writes

    def _begin(self) -> _Sweep:
        dirty = self.dirty
        self.dirty = []
        self.queued_writes = 0
        sw = _Sweep()
        topics = self.table.topics
        for ts in dirty:
            batch: list[Event] = ts.batch  # type: ignore[assignment]
            ts.batch = []
            if not ts.subs:
                if topics.get(ts.name) is ts:
                    del topics[ts.name]
                continue
            sw.nevents += len(batch)
            sw.items.append(_Item(ts, batch))
        return sw

    def _catch_up(self, it: _Item) -> None:
        """Add events published since the sweep began to the rest of this topic's pass."""
        batch: list[Event] = it.ts.batch  # type: ignore[assignment]
        new = [e for e in batch if e.seq > it.caught]
        if not new:
            return
        it.events = it.events + new
        it.caught = new[-1].seq
        it.extended = True
        it.raw = b"".join([e.frame for e in it.events])
        it.framed = chunk(it.raw)
        it.cache = {}
        self.stats.caught_up += len(new)

    @staticmethod
    def _set_floor(conn: Conn, topic: str, seq: int) -> None:
        floor = conn.floor
        if floor is None:
            conn.floor = {topic: seq}
        elif floor.get(topic, 0) < seq:
            floor[topic] = seq

    @staticmethod
    def _apply_floor(conn: Conn, evs: list[Event]) -> list[Event]:
        """Drop events a new stream already got from its replay (seq <= its topic's floor).

        A topic's floor is removed once an event above it passes: sequences only grow, so
        nothing later can fall under it; when no floor is left the connection is back on
        the fast path.
        """
        floor = conn.floor
        assert floor is not None
        out = []
        for e in evs:
            f = floor.get(e.topic)
            if f is None:
                out.append(e)
            elif e.seq > f:
                del floor[e.topic]
                out.append(e)
        if not floor:
            conn.floor = None
        return out

    def _write_events(self, conn: Conn, evs: list[Event], now_ms: int) -> int:
        raw = evs[0].frame if len(evs) == 1 else b"".join([e.frame for e in evs])
        data = chunk(raw) if conn.chunked else raw
        conn.transport.write(data)  # type: ignore[attr-defined]
        conn.last_write_ms = now_ms
        return len(data)

    # -- slow consumers -------------------------------------------------------------

    def hold(self, conn: Conn, evs: list[Event]) -> None:
        """Keep ``evs`` (ascending by seq) for a paused connection, by topic policy."""
        if conn.state == CLOSED:
            return
        pending = conn.pending
        if pending is None:
            pending = conn.pending = {}
        size = conn.pending_bytes
        stats = self.stats
        topics = self.table.topics
        for ev in evs:
            ts = topics.get(ev.topic)
            if ts is not None and ts.conflate:
                k: object = (ev.topic, ev.key)
                old = pending.pop(k, None)  # re-inserted at the end: keeps seq order
                if old is not None:
                    size -= len(old.frame)  # type: ignore[attr-defined]
                    stats.conflated += 1
            else:
                k = (ev.topic, ev.seq)  # a seq alone is not unique across broker shards
            pending[k] = ev
            size += len(ev.frame)
            stats.held += 1
        conn.pending_bytes = size
        if size > self.max_buffer:
            self.on_drop(conn, "buffer")

    def resume(self, conn: Conn, now_ms: int) -> None:
        """The transport can take more: send everything held, in one write."""
        conn.paused = False
        pending = conn.pending
        if not pending:
            return
        conn.pending = None
        conn.pending_bytes = 0
        evs: list[Event] = list(pending.values())  # type: ignore[arg-type]
        n = self._write_events(conn, evs, now_ms)
        self.stats.writes += 1
        self.stats.events_delivered += len(evs)
        self.stats.bytes_written += n


def _arrival(e: Event) -> int:
    return e.n

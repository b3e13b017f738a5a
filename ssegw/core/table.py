"""The connection table: slot records with a free list, and the topic -> subscribers index.

Strategy: every accepted socket gets a slot, an integer index into ``Table.records``.  Freed
slots go on a free list and are reused lowest-last (LIFO, so the table stays dense).  The
record itself is the protocol object (it subclasses :class:`~ssegw.core.conn.Conn`), so a
connection costs one Python object, not two; its lifecycle lives in ``core/conn.py``.

There is no asyncio Task, Future or TimerHandle per connection: timers are entries in the
worker's single wheel (``timer``/``deadline``), flow control is the ``wpaused`` flag, and
output owed to a slow client lives in its ``backlog``.

The index.  A stream of one topic sits in that topic's ``subs``.  A stream of several topics
sits in a :class:`TopicSet` -- one per distinct set of topics, shared by every stream with the
same set -- and each of those topics points at the set.  A flush then builds one merged
buffer per touched set and writes it to every member, instead of merging and joining once
per connection (CONTRACT "Subscribers with the same topic set share one merged buffer").
Subscribers of a topic are dicts keyed by slot: O(1) add/remove, fast iteration.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from .conn import Conn


class TopicSet:
    """Streams subscribed to exactly the same several topics."""

    __slots__ = ("topics", "subs", "mark")

    def __init__(self, topics: tuple[str, ...]) -> None:
        self.topics = topics
        self.subs: dict[int, Conn] = {}
        self.mark = 0  # the sweep that last took this set (see core/fanout.py)


class TopicState:
    """Subscribers of one topic plus the events published since the last flush."""

    __slots__ = ("name", "subs", "sets", "count", "batch", "conflate")

    def __init__(self, name: str, conflate: bool) -> None:
        self.name = name
        self.subs: dict[int, Conn] = {}  # single-topic streams
        self.sets: list[TopicSet] = []  # multi-topic sets including this topic
        self.count = 0  # every stream of the topic, in subs or in a set
        self.batch: list[object] = []
        self.conflate = conflate


class Table:
    """Slots, free list and the topic index of one worker."""

    def __init__(self, conflate_for: Callable[[str], bool] | None = None) -> None:
        self.records: list[Conn | None] = []
        # Free slot numbers as C ints, not int objects: a freed slot's number would be an
        # object allocated at close time and kept for good, and a flood's closes would leave
        # those scattered over the allocator's arenas, pinning each (measured: 4,000 idle
        # connections left 3-4 MiB of arenas held by ~100 KB of ints).
        self.free = array("l")
        self.used = 0
        self.streams = 0
        self.topics: dict[str, TopicState] = {}
        self.sets: dict[tuple[str, ...], TopicSet] = {}
        # conflate_for(topic) -> bool: the topic's slow-consumer policy is "conflate".
        self._conflate_for = conflate_for

    def __len__(self) -> int:
        return self.used

    def add(self, conn: Conn) -> int:
        """Give ``conn`` a slot.  Returns the slot index."""
        if self.free:
            slot = self.free.pop()
            self.records[slot] = conn
        else:
            slot = len(self.records)
            self.records.append(conn)
        conn.slot = slot
        self.used += 1
        return slot

    def remove(self, conn: Conn) -> None:
        """Free the slot of ``conn`` (idempotent) and drop its subscriptions."""
        slot = conn.slot
        if slot < 0 or self.records[slot] is not conn:
            return
        self.unsubscribe(conn)
        self.records[slot] = None
        self.free.append(slot)
        self.used -= 1
        conn.slot = -1

    def topic(self, name: str) -> TopicState:
        ts = self.topics.get(name)
        if ts is None:
            conflate = bool(self._conflate_for(name)) if self._conflate_for is not None else False
            ts = self.topics[name] = TopicState(name, conflate)
        return ts

    def subscribe(self, conn: Conn, topics: tuple[str, ...]) -> list[str]:
        """Add ``conn`` to the index under ``topics`` (distinct names).  Returns the topics
        that had no subscriber before (the broker's interest changes)."""
        self.streams += 1
        fresh: list[str] = []
        states = [self.topic(name) for name in topics]
        for ts in states:
            if not ts.count:
                fresh.append(ts.name)
            ts.count += 1
        if len(states) == 1:
            ts = states[0]
            ts.subs[conn.slot] = conn
            conn.topics = (ts.name,)  # share one string per topic, not one per connection
            return fresh
        key = tuple(sorted(topics))
        tset = self.sets.get(key)
        if tset is None:
            tset = self.sets[key] = TopicSet(tuple(ts.name for ts in states))
            for ts in states:
                ts.sets.append(tset)
        tset.subs[conn.slot] = conn
        conn.topics = tset.topics  # one tuple per set, shared by its members
        return fresh

    def unsubscribe(self, conn: Conn) -> list[str]:
        """Remove ``conn`` from the index.  Returns the topics left without subscribers."""
        topics = conn.topics
        if not topics:
            return []
        self.streams -= 1
        conn.topics = ()
        key = tuple(sorted(topics)) if len(topics) > 1 else None
        emptied = None
        if key is not None:
            tset = self.sets.get(key)
            if tset is not None:
                tset.subs.pop(conn.slot, None)
                if not tset.subs:
                    del self.sets[key]
                    emptied = tset
        gone: list[str] = []
        for name in topics:
            ts = self.topics.get(name)
            if ts is None:
                continue
            if key is None:
                ts.subs.pop(conn.slot, None)
            elif emptied is not None:
                ts.sets.remove(emptied)
            ts.count -= 1
            if not ts.count:
                gone.append(name)
                if not ts.batch:
                    del self.topics[name]
        return gone

    def subscribers(self, topic: str) -> int:
        ts = self.topics.get(topic)
        return ts.count if ts is not None else 0

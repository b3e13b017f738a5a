"""The connection table: slot records with a free list, and the topic -> subscribers index.

Strategy: every accepted socket gets a slot, an integer index into ``Table.records``.  Freed
slots go on a free list and are reused lowest-last (LIFO, so the table stays dense).  Each
reuse bumps the slot's generation, so a stale reference (``slot``, ``gen``) can be detected.
The record itself is a ``__slots__`` object; the server's protocol class *is* the record
(it subclasses :class:`Conn`), so a connection costs one Python object, not two.

There is no asyncio Task, Future or TimerHandle per connection: timers are entries in the
worker's single wheel (``timer``/``deadline``), flow control is the ``paused`` flag, and
output waiting for a slow client lives in ``pending`` (bounded by ``max_buffer``).

Subscribers of a topic are kept in a dict keyed by slot: O(1) add/remove and fast iteration
for the fan-out sweep.
"""

from __future__ import annotations

# Connection states.  A connection starts in HEAD (reading a request head), may go through
# BODY (reading a /publish body) and WAIT (a handler is running), returns to HEAD on
# keep-alive, or becomes a STREAM.  CLOSED is terminal.
HEAD, BODY, WAIT, STREAM, CLOSED = 0, 1, 2, 3, 4


class Conn:
    """One connection's record.  Subclassed by the protocol class."""

    __slots__ = (
        "slot",
        "gen",
        "state",
        "transport",
        "ip",
        "topics",
        "chunked",
        "paused",
        "pending",
        "pending_bytes",
        "last_write_ms",
        "timer",
        "deadline",
        "floor",
    )

    def init_conn(self) -> None:
        self.slot = -1
        self.gen = 0
        self.state = HEAD
        self.transport: object = None
        self.ip = ""
        self.topics: tuple[str, ...] = ()
        self.chunked = True
        self.paused = False
        # Events held while the transport is paused: {seq or (topic, key): Event}, in
        # delivery order.  None while nothing is held (the common case costs nothing).
        self.pending: dict[object, object] | None = None
        self.pending_bytes = 0
        self.last_write_ms = 0
        self.timer: object = None  # head/idle timeout, then heartbeat
        self.deadline: object = None  # lifetime / token expiry / drain close
        # topic -> highest seq its replay covered; None once live (see core/fanout.py).
        self.floor: dict[str, int] | None = None


class TopicState:
    """Subscribers of one topic plus the events published since the last flush."""

    __slots__ = ("name", "subs", "batch", "conflate")

    def __init__(self, name: str, conflate: bool) -> None:
        self.name = name
        self.subs: dict[int, Conn] = {}
        self.batch: list[object] = []
        self.conflate = conflate


class Table:
    """Slots, free list, generations and the topic index of one worker."""

    def __init__(self, conflate_for: object = None) -> None:
        self.records: list[Conn | None] = []
        self.gens: list[int] = []
        self.free: list[int] = []
        self.used = 0
        self.streams = 0
        self.topics: dict[str, TopicState] = {}
        # conflate_for(topic) -> bool: the topic's slow-consumer policy is "conflate".
        self._conflate_for = conflate_for

    def __len__(self) -> int:
        return self.used

    def add(self, conn: Conn) -> int:
        """Give ``conn`` a slot.  Returns the slot index."""
        if self.free:
            slot = self.free.pop()
            self.records[slot] = conn
            self.gens[slot] += 1
        else:
            slot = len(self.records)
            self.records.append(conn)
            self.gens.append(0)
        conn.slot = slot
        conn.gen = self.gens[slot]
        self.used += 1
        return slot

    def get(self, slot: int, gen: int) -> Conn | None:
        """The record in ``slot`` if it is still generation ``gen``."""
        if 0 <= slot < len(self.records) and self.gens[slot] == gen:
            return self.records[slot]
        return None

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

    def subscribe(self, conn: Conn, topics: tuple[str, ...]) -> list[str]:
        """Add ``conn`` to the index under ``topics``.  Returns the topics that had no
        subscriber before (the broker's interest changes)."""
        self.streams += 1
        fresh: list[str] = []
        names: list[str] = []
        for name in topics:
            ts = self.topics.get(name)
            if ts is None:
                conflate = bool(self._conflate_for(name)) if self._conflate_for else False  # type: ignore[operator]
                ts = self.topics[name] = TopicState(name, conflate)
            if not ts.subs:
                fresh.append(name)
            ts.subs[conn.slot] = conn
            names.append(ts.name)  # share one string per topic, not one per connection
        conn.topics = tuple(names)
        return fresh

    def unsubscribe(self, conn: Conn) -> list[str]:
        """Remove ``conn`` from the index.  Returns the topics left without subscribers."""
        if not conn.topics:
            return []
        self.streams -= 1
        gone: list[str] = []
        for name in conn.topics:
            ts = self.topics.get(name)
            if ts is None:
                continue
            ts.subs.pop(conn.slot, None)
            if not ts.subs:
                gone.append(name)
                if not ts.batch:
                    del self.topics[name]
        conn.topics = ()
        return gone

    def subscribers(self, topic: str) -> int:
        ts = self.topics.get(topic)
        return len(ts.subs) if ts is not None else 0

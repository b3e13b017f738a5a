"""Keyed state of one topic: the newest event of every ``key``, beside the topic's history.

Rules (each is one line of :class:`TopicKeys`):

- ``entries`` maps key -> the newest event published with that key; events without a key
  share the key ``None`` (CONTRACT "Ids, history and resume": they count as one key).
- An update moves its key to the end of the dict, so the dict is in the order of each
  key's last update -- publish (seq) order of the events it holds -- and its front is the
  least recently updated key.  A snapshot is the values in dict order; a compacted resume
  after seq S is the tail of values with seq > S, found walking back from the end.
- Bounds: at most ``max_keys`` keys (past it the front key is *evicted*), and no entry
  older than ``ttl_ms`` (front entries are *expired*; ages follow seq order).  ``max_keys``
  0 keeps nothing: every event is evicted as it arrives.
- ``floor`` is the highest seq of any entry evicted or expired.  An entry replaced by a newer
  event of its key is not lost (its key is still represented), so it does not move the
  floor.  A resume after S is covered by keyed state exactly when ``S >= floor``: no key
  that changed after S has lost its newest event.
- ``snap`` caches the snapshot list until the next change, so that every subscriber asking
  between two publishes shares one list of shared frames (a reconnect storm on a
  10,000-key topic builds it once, not once per client).

Memory: a dict slot and a reference per key; frames are the history's own bytes objects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .event import Event

#: Keys kept per topic unless configured otherwise (``max_keys``).
DEFAULT_MAX_KEYS = 10_000


class TopicKeys:
    __slots__ = ("entries", "floor", "max_keys", "ttl_ms", "counts", "snap")

    def __init__(self, max_keys: int, ttl_ms: int, floor: int = 0, counts: list[int] | None = None) -> None:
        """Args:
            max_keys: keys kept at most (0: none).
            ttl_ms: age limit of entries (0: none).
            floor: the starting floor (a topic the store forgot keeps it conservative).
            counts: ``[evicted, expired]`` counters, shared by every topic of a store so that
                they never go backwards when a topic is forgotten.
        """
        self.entries: dict[str | None, Event] = {}
        self.floor = floor
        self.max_keys = max_keys
        self.ttl_ms = ttl_ms
        self.counts = counts if counts is not None else [0, 0]
        self.snap: list[Event] | None = None

    def put(self, ev: Event) -> None:
        """Record ``ev`` as its key's newest event (callers append in seq order)."""
        entries = self.entries
        key = ev.key
        # pop + insert moves the key to the end (dict order = last update order).
        entries.pop(key, None)
        entries[key] = ev
        self.snap = None
        if len(entries) > self.max_keys:
            self.evict()

    def evict(self) -> None:
        """Evict least recently updated keys down to ``max_keys``."""
        entries = self.entries
        while len(entries) > self.max_keys:
            old = entries.pop(next(iter(entries)))
            if old.seq > self.floor:
                self.floor = old.seq
            self.counts[0] += 1

    def trim(self, now_ms: int) -> None:
        """Expire entries older than ``ttl_ms`` (from the front: oldest update first)."""
        if not self.ttl_ms or not self.entries:
            return
        horizon = now_ms - self.ttl_ms
        entries = self.entries
        while entries:
            key = next(iter(entries))
            ev = entries[key]
            if ev.ts_ms >= horizon:
                break
            del entries[key]
            if ev.seq > self.floor:
                self.floor = ev.seq
            self.counts[1] += 1
            self.snap = None

    def covers(self, after_seq: int) -> bool:
        """Whether every key changed after ``after_seq`` still has its newest event here."""
        return after_seq >= self.floor

    def snapshot(self, upto: int) -> list[Event]:
        """The newest event of every key with ``seq <= upto``, in publish order.  The list
        may be shared with other callers: do not mutate it."""
        snap = self.snap
        if snap is None:
            snap = self.snap = list(self.entries.values())
        if snap and snap[-1].seq > upto:
            return [e for e in snap if e.seq <= upto]
        return snap

    def changed_after(self, after_seq: int, upto: int) -> list[Event]:
        """The newest event of every key updated after ``after_seq`` (and at or under
        ``upto``), in publish order."""
        out: list[Event] = []
        for ev in reversed(self.entries.values()):
            if ev.seq <= after_seq:
                break
            if ev.seq <= upto:
                out.append(ev)
        out.reverse()
        return out

    def count_changed_after(self, after_seq: int, limit: int) -> int:
        """How many keys changed after ``after_seq``, counting at most ``limit``."""
        n = 0
        for ev in reversed(self.entries.values()):
            if ev.seq <= after_seq or n >= limit:
                break
            n += 1
        return n

    def newest(self) -> int:
        """The highest seq held (or the floor when empty)."""
        if self.entries:
            return next(reversed(self.entries.values())).seq
        return self.floor

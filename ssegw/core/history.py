"""Per-topic history: a bounded ring of events plus the one number that makes resume honest.

Each topic keeps at most ``size`` events no older than ``ttl_ms``.  ``trimmed_upto`` is the
highest sequence ever evicted from this topic.  A resume "after seq S" is covered exactly
when ``S >= trimmed_upto``: every event of the topic newer than S is still here.  Otherwise
the caller sends ``ssegw.reset`` for the topic -- never a silent gap.

A store drops the whole history of a topic that has emptied (by age) to keep memory bounded
with millions of short-lived topics; it then raises ``forgotten_upto`` so that coverage for
a topic it no longer knows stays conservative.

Beside each topic's ring, a store made with ``max_keys`` keeps the topic's keyed state (the
newest event of every key, ``core/keyed.py``), updated in the same call as the ring and
trimmed by the same ``history_ttl``; a topic is forgotten only when both are empty.

Until a topic gets its first keyed event (or a reader asks for its keyed state), that state
is *implied by the ring*: every event so far shares the key ``None``, so the keyed state is
``{None: newest event}`` -- the ring's last event -- while the ring holds any, and empty
(with its floor raised to that event, and counted as expired) once the ring has emptied by
age, which is exactly when the same ``history_ttl`` would have expired that entry.  Nothing
per publish is spent on it; :meth:`TopicHistory.keyed` makes the real
:class:`~ssegw.core.keyed.TopicKeys` from the ring when it is needed.  (On the publish path
the keyed state's update was ~10 % of a batch publish: three more objects touched per
message, tuning.md "Publish ingest".)  Only for topics with ``history_size`` >= 1 and
``max_keys`` >= 1; ``tests/test_keyed.py`` holds the two forms to the same answers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from itertools import islice

from .event import Event
from .keyed import TopicKeys


class TopicHistory:
    __slots__ = ("events", "trimmed_upto", "size", "ttl_ms", "touched", "keys", "oldest", "kmax", "kfloor",
                 "kcounts", "name")

    def __init__(self, size: int, ttl_ms: int, name: str = "") -> None:
        #: the topic, as the store's key: every event kept refers to this one string (a
        #: publish parses its own copy of the name, which then goes with the request)
        self.name = name
        self.events: deque[Event] = deque()
        self.trimmed_upto = 0
        self.size = size
        self.ttl_ms = ttl_ms  # 0 = no age limit
        self.touched = 0  # HistoryStore's stamp of the last publish to it
        self.keys: TopicKeys | None = None  # keyed state, when the store keeps it
        # At most the age stamp of the ring's oldest event (0: unknown), so that a publish
        # need not read that event -- cold in memory -- to know nothing has aged out yet.
        # Set by trim(); popping from the front only makes the true value larger.
        self.oldest = 0
        # Keyed state implied by the ring (module docstring): its max_keys (> 0 while it is
        # implied), its floor and the store's [evicted, expired] counters.
        self.kmax = 0
        self.kfloor = 0
        self.kcounts: list[int] | None = None

    def append(self, ev: Event, now_ms: int) -> None:
        keys = self.keys
        if keys is None and ev.key is not None and self.kmax:
            keys = self.keyed()  # from the ring as it is before ev
        self.events.append(ev)
        while len(self.events) > self.size:
            self.trimmed_upto = self.events.popleft().seq
        if keys is not None:
            keys.put(ev)
        self.trim(now_ms)

    def keyed(self) -> TopicKeys | None:
        """The topic's keyed state, made from the ring if it was implied (module docstring);
        None if the store keeps none."""
        keys = self.keys
        if keys is None and self.kmax:
            keys = self.keys = TopicKeys(self.kmax, self.ttl_ms, self.kfloor, self.kcounts)
            if self.events:
                keys.entries[None] = self.events[-1]
            self.kmax = 0
        return keys

    def keyed_covers(self, after_seq: int) -> bool:
        keys = self.keys
        if keys is not None:
            return keys.covers(after_seq)
        return bool(self.kmax) and after_seq >= self.kfloor

    def keyed_count(self) -> int:
        """How many keys the keyed state holds (without making it from the ring)."""
        keys = self.keys
        if keys is not None:
            return len(keys.entries)
        return 1 if self.kmax and self.events else 0

    def trim(self, now_ms: int) -> None:
        if not self.ttl_ms:
            return
        if self.keys is not None:
            self.keys.trim(now_ms)
        horizon = now_ms - self.ttl_ms
        events = self.events
        if events and events[0].ts_ms < horizon:
            while events and events[0].ts_ms < horizon:
                self.trimmed_upto = events.popleft().seq
            if not events and self.kmax:
                # The implied keyed state's one entry, the newest event, expired with it.
                if self.trimmed_upto > self.kfloor:
                    self.kfloor = self.trimmed_upto
                self.kcounts[1] += 1  # type: ignore[index]
        self.oldest = events[0].ts_ms if events else 0

    def covers(self, after_seq: int) -> bool:
        return after_seq >= self.trimmed_upto

    def after(self, after_seq: int, upto: int) -> list[Event]:
        """Events with ``after_seq < seq <= upto``, oldest first."""
        out = [e for e in reversed(self.events) if e.seq > after_seq]
        out.reverse()
        return [e for e in out if e.seq <= upto]

    def last(self, upto: int) -> Event | None:
        for e in reversed(self.events):
            if e.seq <= upto:
                return e
        return None

    def all(self, upto: int) -> list[Event]:
        return [e for e in self.events if e.seq <= upto]


#: Topics with history one store keeps at most.  Each costs a few hundred bytes even with one
#: small event, so without a bound a client spraying one-off topics grows memory for
#: ``history_ttl`` (measured: 50,000 such topics, ~42 MB).  Past it the topic published to
#: least recently is forgotten first (its resumes get ``ssegw.reset``, never a gap).
MAX_HISTORY_TOPICS = 100_000


class HistoryStore:
    """Histories of all topics of one shard, with per-topic bounds from a settings callback,
    and at most ``max_topics`` topics (the least recently published is forgotten first)."""

    def __init__(self, settings: object, max_topics: int = MAX_HISTORY_TOPICS,
                 max_keys: Callable[[str], int] | None = None) -> None:
        # settings(topic) -> (history_size, history_ttl_ms); max_keys(topic) -> keys kept
        # (None: no keyed state at all).
        self._settings = settings
        self._max_keys = max_keys
        # [evicted by max_keys, expired by ttl] over every topic, forgotten ones included.
        self.keyed_counts = [0, 0]
        self.topics: dict[str, TopicHistory] = {}
        # The same topics, each with the stamp it had when it was put here, oldest first.  A
        # publish only stamps its topic (``touched``); the order is mended lazily, when the
        # topic budget must forget one: a topic at the front whose stamp moved on goes to the
        # back instead (one move per publish at most, amortised O(1)).  Reordering this dict
        # on every publish cost a dict delete and insert per message on the publish path.
        self._recent: dict[str, int] = {}
        self._stamp = 0
        self.max_topics = max_topics
        self.forgotten_upto = 0
        self.evicted = 0
        #: False: every topic gets its TopicKeys at once (the reference the tests compare
        #: the implied form with).
        self.imply_keys = True

    def append(self, ev: Event, now_ms: int) -> None:
        topic = ev.topic
        h = self.topics.get(topic)
        self._stamp += 1
        if h is None:
            h = self._new_topic(topic)
        ev.topic = h.name
        h.touched = self._stamp
        h.append(ev, now_ms)

    def _new_topic(self, topic: str) -> TopicHistory:
        size, ttl_ms = self._settings(topic)  # type: ignore[operator]
        h = self.topics[topic] = TopicHistory(size, ttl_ms, topic)
        h.trimmed_upto = self.forgotten_upto
        if self._max_keys is not None:
            max_keys = self._max_keys(topic)
            if max_keys >= 1 and size >= 1 and self.imply_keys:
                h.kmax, h.kfloor, h.kcounts = max_keys, self.forgotten_upto, self.keyed_counts
            else:
                h.keys = TopicKeys(max_keys, ttl_ms, self.forgotten_upto, self.keyed_counts)
        recent = self._recent
        if len(recent) >= self.max_topics:
            self._forget(self._least_recent())
        recent[topic] = h.touched = self._stamp
        return h

    def _least_recent(self) -> str:
        recent = self._recent
        topics = self.topics
        while True:
            name, stamp = next(iter(recent.items()))
            touched = topics[name].touched
            if touched == stamp:
                return name
            del recent[name]  # published to since it was put here: to the back
            recent[name] = touched

    def extend(self, events: list[Event], now_ms: int) -> None:
        """:meth:`append` for each of ``events``, inlined (the publish path's hot loop)."""
        topics = self.topics
        self._stamp += 1
        stamp = self._stamp
        for ev in events:
            h = topics.get(ev.topic)
            if h is None:
                h = self._new_topic(ev.topic)
            ev.topic = h.name  # one string per topic, not one per event held (~56 B each)
            h.touched = stamp
            keys = h.keys
            if keys is None and ev.key is not None and h.kmax:
                keys = h.keyed()  # the first keyed event: from the ring as it is before ev
            q = h.events
            q.append(ev)
            while len(q) > h.size:
                h.trimmed_upto = q.popleft().seq
            if keys is not None:
                # TopicKeys.put, inlined.  Keyed entries are aged by trim() (replays, sweeps,
                # an aged ring front): until then an expired entry only costs memory that
                # max_keys already bounds.
                entries = keys.entries
                entries.pop(ev.key, None)
                entries[ev.key] = ev
                keys.snap = None
                if len(entries) > keys.max_keys:
                    keys.evict()
            if h.ttl_ms and h.oldest < now_ms - h.ttl_ms:
                h.trim(now_ms)

    def _forget(self, topic: str) -> None:
        """Drop a topic's history; resumes on it are no longer covered (reset, not a gap)."""
        h = self.topics.pop(topic)
        del self._recent[topic]
        newest = h.events[-1].seq if h.events else h.trimmed_upto
        if h.keys is not None:
            newest = max(newest, h.keys.newest())
        if newest > self.forgotten_upto:
            self.forgotten_upto = newest
        self.evicted += 1

    def get(self, topic: str, now_ms: int) -> TopicHistory | None:
        h = self.topics.get(topic)
        if h is not None:
            h.trim(now_ms)
        return h

    def covers(self, topic: str, after_seq: int) -> bool:
        h = self.topics.get(topic)
        if h is None:
            return after_seq >= self.forgotten_upto
        return h.covers(after_seq)

    def keyed_covers(self, topic: str, after_seq: int) -> bool:
        """Whether the topic's keyed state holds the newest event of every key changed after
        ``after_seq`` (false when the store keeps no keyed state)."""
        h = self.topics.get(topic)
        if h is None:
            return self._max_keys is not None and after_seq >= self.forgotten_upto
        return h.keyed_covers(after_seq)

    def sweep(self, now_ms: int, budget: int = 10_000) -> int:
        """Trim by age and forget emptied topics, looking at most at ``budget`` topics.

        Topics that are kept move to the end of the dict, so successive sweeps rotate
        through all of them in O(budget) each.
        """
        topics = self.topics
        dropped = 0
        for name in list(islice(topics, budget)):
            h = topics.pop(name)
            h.trim(now_ms)
            keys = h.keys
            if h.events or (keys is not None and keys.entries):
                topics[name] = h
                continue
            del self._recent[name]
            floor = h.trimmed_upto if keys is None else max(h.trimmed_upto, keys.floor)
            if floor > self.forgotten_upto:
                self.forgotten_upto = floor
            dropped += 1
        return dropped

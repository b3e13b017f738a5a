"""The embedded broker: one process, one shard, history in memory.

It is the reference implementation of :class:`~ssegw.broker.base.Broker`: a publish takes
the next sequence number, appends to the topic's history and hands the events to the
worker's fan-out in the same loop turn -- so "accepted" and "on its way to every
subscriber" are the same moment, and a publish can never half-succeed.

Beside history it keeps each topic's keyed state (``core/keyed.py``) for ``since=snapshot``
and compacted resumes; both are updated by the same synchronous publish, so they can never
disagree with each other or with the sequence.

The epoch is random per process start: ids issued before a restart cannot be placed (their
history is gone), so clients presenting them get ``ssegw.reset`` instead of a silent gap.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from itertools import repeat

from ..core.history import Event, HistoryStore, TopicHistory
from ..core.keyed import DEFAULT_MAX_KEYS
from ..core.publish import Message, PlainBatch
from .base import LocalLeases, Replay

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def new_epoch() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(8))


def _default_keyed(topic: str) -> tuple[int, bool]:
    return DEFAULT_MAX_KEYS, False


class MemoryBroker(LocalLeases):
    kind = "memory"
    keyed = True

    def __init__(self, settings: Callable[[str], tuple[int, int]], clock_ms: Callable[[], int],
                 keyed: Callable[[str], tuple[int, bool]] = _default_keyed) -> None:
        """Args:
            settings: topic -> (history_size, history_ttl_ms).
            clock_ms: wall-clock milliseconds (history ages are wall-clock).
            keyed: topic -> (max_keys, whether a resume is compacted whenever that sends
                fewer events than history would: topics with ``slow_consumer = "conflate"``).
        """
        self.epoch = new_epoch()
        # An event's frame as a format of (seq, body): encode_frame(format_id(epoch, seq), body).
        self._frame_fmt = b"id: %s-%%d\n%%s\n" % self.epoch.replace("%", "%%").encode("ascii")
        self.seq = 0
        self._keyed = keyed
        self.history = HistoryStore(settings, max_keys=lambda t: keyed(t)[0])
        self._clock_ms = clock_ms
        self._deliver: Callable[[list[Event]], None] | None = None
        self.published = 0

    async def start(self, deliver: Callable[[list[Event]], None],
                    on_gap: Callable[[list[str] | None], None] | None = None) -> None:
        """``on_gap`` is never called: the embedded broker cannot lose events."""
        self._deliver = deliver

    async def close(self) -> None:
        self._deliver = None

    def ready(self) -> bool:
        return True

    async def wait_ready(self, timeout: float) -> bool:
        return True

    def publish_now(self, messages: Sequence[Message]) -> list[str]:
        """Synchronous publish (the embedded broker never waits)."""
        now = self._clock_ms()
        if len(messages) == 1:  # a single publish: no column passes for one message
            m = messages[0]
            s = self.seq = self.seq + 1
            events = [Event(m.topic, s, now, self._frame_fmt % (s, m.body), m.key)]
            return self._published(events, now, [f"{self.epoch}-{s}"])
        first = self.seq + 1
        self.seq += len(messages)
        # Column by column, in C loops (map over bound methods and the Event class): a batch
        # of 100 messages is the common case and per-message Python overhead is the cost of
        # publishing (tuning.md).  A PlainBatch is already columns (no event names or keys).
        # The frame is encode_frame(format_id(epoch, s), body) in one bytes formatting
        # (tests/test_history.py holds the two to the same bytes).
        if type(messages) is PlainBatch:
            topics, bodies, keys = messages.topics, messages.bodies, repeat(None)
        else:
            topics = [m.topic for m in messages]
            bodies = [m.body for m in messages]
            keys = [m.key for m in messages]  # type: ignore[assignment]
        seqs = range(first, self.seq + 1)
        events = list(map(Event, topics, seqs, repeat(now), map(self._frame_fmt.__mod__, zip(seqs, bodies, strict=True)),
                          keys))
        epoch = self.epoch
        return self._published(events, now, [f"{epoch}-{s}" for s in seqs])  # format_id (f-string: ~3x str % int)

    def _published(self, events: list[Event], now: int, ids: list[str]) -> list[str]:
        self.history.extend(events, now)
        self.published += len(events)
        if self._deliver is not None:
            self._deliver(events)
        return ids

    async def publish(self, messages: Sequence[Message]) -> list[str]:
        return self.publish_now(messages)

    def replay_now(
        self, topics: tuple[str, ...], after: tuple[str, tuple[int, ...]] | None, since: str | None
    ) -> Replay:
        now = self._clock_ms()
        head = self.seq
        store = self.history
        if after is None and since is None:
            return Replay([], [])
        # Trim by age first: coverage must account for events that aged out since the last
        # sweep, or they would vanish without a reset.
        hist = {t: store.get(t, now) for t in topics}
        if after is not None:
            epoch, seqs = after
            if epoch != self.epoch or len(seqs) != 1 or seqs[0] > head:
                # An id we cannot place: not covered for any topic (CONTRACT "Ids").
                return Replay([], list(topics))
            return self._resume(hist, seqs[0], head)
        floors = {t: head for t in topics}
        if since == "last":
            evs = [e for e in (h.last(head) for h in hist.values() if h is not None) if e is not None]
            evs.sort(key=_seq)
            return Replay(evs, [], floors)
        if since == "snapshot":
            lists = [k.snapshot(head) for h in hist.values() if h is not None and (k := h.keyed()) is not None]
            return Replay(_merge(lists), [], floors)
        lists = [h.all(head) for h in hist.values() if h is not None]
        return Replay(_merge(lists), [], floors)

    def _resume(self, hist: dict[str, TopicHistory | None], s: int, head: int) -> Replay:
        """A resume after seq ``s``, per topic: the history's events when it covers the gap
        (unless the topic prefers compacting and that is shorter), else the keyed state's
        changed keys when it covers the gap (``ssegw.compacted``), else ``ssegw.reset``."""
        store = self.history
        reset: list[str] = []
        compacted: list[str] = []
        lists: list[list[Event]] = []
        for t, h in hist.items():
            if store.covers(t, s):
                if h is None:
                    continue  # nothing published after s (the store forgot the topic's past)
                evs = h.after(s, head)
                keys = h.keyed() if len(evs) > 1 and self._keyed(t)[1] else None
                if keys is not None and keys.covers(s) and keys.count_changed_after(s, len(evs)) < len(evs):
                    compacted.append(t)
                    evs = keys.changed_after(s, head)
                lists.append(evs)
            elif store.keyed_covers(t, s):
                compacted.append(t)
                keys = h.keyed() if h is not None else None
                if keys is not None:
                    lists.append(keys.changed_after(s, head))
            else:
                reset.append(t)
        floors = {t: head for t in hist if t not in reset}
        return Replay(_merge(lists), reset, floors, compacted)

    async def replay(
        self, topics: tuple[str, ...], after: tuple[str, tuple[int, ...]] | None, since: str | None
    ) -> Replay:
        return self.replay_now(topics, after, since)

    def interest(self, topic: str, on: bool) -> None:
        """Every published event is handed to the local fan-out; nothing to (un)subscribe."""

    async def subscribers(self, topic: str, local: int) -> int:
        return local

    async def keys(self, topic: str) -> int:
        h = self.history.get(topic, self._clock_ms())
        return h.keyed_count() if h is not None else 0

    def presence(self, counts: dict[str, int]) -> None:
        """One process: its own counts are the whole picture."""

    def tick(self, now_ms: int) -> None:
        self.history.sweep(self._clock_ms())

    def stats(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "epoch": self.epoch,
            "seq": self.seq,
            "topics_with_history": len(self.history.topics),
            "topics_forgotten": self.history.evicted,
            "keyed_evicted": self.history.keyed_counts[0],
            "keyed_expired": self.history.keyed_counts[1],
        }


def _merge(lists: list[list[Event]]) -> list[Event]:
    if not lists:
        return []
    if len(lists) == 1:
        return lists[0]
    out = [e for lst in lists for e in lst]
    out.sort(key=_seq)
    return out


def _seq(e: Event) -> int:
    return e.seq

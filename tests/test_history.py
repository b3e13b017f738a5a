"""Tests for ssegw.core.history: bounded per-topic rings, coverage, and the store's sweep.

All times are integer milliseconds passed in; nothing sleeps.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ssegw.core.history import Event, HistoryStore, TopicHistory


def ev(seq: int, topic: str = "t", ts: int = 0, key: str | None = None) -> Event:
    return Event(topic, seq, ts, b"id: e-%d\ndata: x\n\n" % seq, key)


def seqs(events: list[Event]) -> list[int]:
    return [e.seq for e in events]


# -- TopicHistory ----------------------------------------------------------------------


def test_size_bound_keeps_newest_and_records_trim() -> None:
    h = TopicHistory(size=3, ttl_ms=0)
    for s in range(1, 6):
        h.append(ev(s), now_ms=0)
    assert seqs(list(h.events)) == [3, 4, 5]
    assert h.trimmed_upto == 2
    assert not h.covers(1)
    assert h.covers(2) and h.covers(4) and h.covers(99)


def test_nothing_trimmed_covers_everything() -> None:
    h = TopicHistory(size=10, ttl_ms=0)
    h.append(ev(7), 0)
    assert h.trimmed_upto == 0
    assert h.covers(0)


def test_ttl_trims_by_integer_now() -> None:
    h = TopicHistory(size=100, ttl_ms=1000)
    h.append(ev(1, ts=0), 0)
    h.append(ev(2, ts=500), 500)
    h.append(ev(3, ts=1000), 1000)
    assert seqs(list(h.events)) == [1, 2, 3]  # 1 is exactly ttl old: kept
    h.trim(1001)
    assert seqs(list(h.events)) == [2, 3]
    assert h.trimmed_upto == 1
    h.trim(1500)
    assert seqs(list(h.events)) == [2, 3]
    h.trim(1501)
    assert seqs(list(h.events)) == [3]
    assert h.trimmed_upto == 2
    h.trim(10**12)
    assert list(h.events) == [] and h.trimmed_upto == 3
    assert not h.covers(2) and h.covers(3)


def test_ttl_zero_means_no_age_limit() -> None:
    h = TopicHistory(size=5, ttl_ms=0)
    h.append(ev(1, ts=0), 0)
    h.trim(10**15)
    assert seqs(list(h.events)) == [1]


def test_append_applies_ttl() -> None:
    h = TopicHistory(size=100, ttl_ms=10)
    h.append(ev(1, ts=0), 0)
    h.append(ev(2, ts=100), 100)
    assert seqs(list(h.events)) == [2]
    assert h.trimmed_upto == 1


def test_after_with_upper_bound() -> None:
    h = TopicHistory(size=10, ttl_ms=0)
    for s in (2, 5, 7, 9):
        h.append(ev(s), 0)
    assert seqs(h.after(0, 100)) == [2, 5, 7, 9]
    assert seqs(h.after(5, 100)) == [7, 9]
    assert seqs(h.after(4, 7)) == [5, 7]
    assert seqs(h.after(2, 6)) == [5]
    assert h.after(9, 100) == []
    assert h.after(5, 5) == []
    assert h.after(0, 1) == []


def test_last_and_all_respect_upto() -> None:
    h = TopicHistory(size=10, ttl_ms=0)
    assert h.last(100) is None and h.all(100) == []
    for s in (2, 5, 7):
        h.append(ev(s), 0)
    assert h.last(100).seq == 7
    assert h.last(6).seq == 5
    assert h.last(1) is None
    assert seqs(h.all(100)) == [2, 5, 7]
    assert seqs(h.all(5)) == [2, 5]


@given(
    size=st.integers(1, 8),
    gaps=st.lists(st.integers(1, 3), min_size=0, max_size=30),
    after=st.integers(0, 100),
    upto=st.integers(0, 100),
)
def test_ring_properties(size: int, gaps: list[int], after: int, upto: int) -> None:
    h = TopicHistory(size=size, ttl_ms=0)
    published = []
    s = 0
    for g in gaps:
        s += g
        published.append(s)
        h.append(ev(s), 0)
    kept = seqs(list(h.events))
    assert kept == published[-size:]  # exactly the newest `size`
    # covers(after) <=> every published event newer than `after` is still kept.
    newer = [x for x in published if x > after]
    assert h.covers(after) == all(x in kept for x in newer)
    if h.covers(after):
        assert seqs(h.after(after, upto)) == [x for x in newer if x <= upto]


# -- HistoryStore ----------------------------------------------------------------------


def settings_for(sizes: dict[str, tuple[int, int]], default: tuple[int, int] = (100, 0)):
    return lambda topic: sizes.get(topic, default)


def test_store_uses_per_topic_settings() -> None:
    store = HistoryStore(settings_for({"small": (2, 0)}))
    for s in range(1, 6):
        store.append(ev(s, "small"), 0)
        store.append(ev(s + 100, "big"), 0)
    assert seqs(list(store.topics["small"].events)) == [4, 5]
    assert len(store.topics["big"].events) == 5
    assert not store.covers("small", 1)
    assert store.covers("small", 3)
    assert store.covers("big", 0)


def test_store_unknown_topic_is_covered_until_something_is_forgotten() -> None:
    store = HistoryStore(settings_for({}))
    assert store.covers("never", 0)
    assert store.get("never", 0) is None


def test_get_trims_by_age() -> None:
    store = HistoryStore(settings_for({}, (100, 1000)))
    store.append(ev(1, "a", ts=0), 0)
    store.append(ev(2, "a", ts=900), 900)
    h = store.get("a", 1500)
    assert h is not None and seqs(list(h.events)) == [2]
    assert not store.covers("a", 0)


def test_sweep_forgets_empty_topics_and_raises_forgotten_upto() -> None:
    store = HistoryStore(settings_for({}, (100, 1000)))
    store.append(ev(1, "old", ts=0), 0)
    store.append(ev(2, "old", ts=0), 0)
    store.append(ev(3, "young", ts=5000), 5000)
    assert store.sweep(5500) == 1
    assert "old" not in store.topics and "young" in store.topics
    assert store.forgotten_upto == 2
    # Conservative coverage for topics it no longer knows, including never-seen ones.
    assert not store.covers("old", 1)
    assert not store.covers("other", 0)
    assert store.covers("old", 2)
    assert store.covers("young", 0)


def test_new_history_after_forgetting_inherits_forgotten_upto() -> None:
    store = HistoryStore(settings_for({}, (100, 1000)))
    store.append(ev(5, "a", ts=0), 0)
    store.sweep(2000)
    assert store.forgotten_upto == 5
    store.append(ev(9, "a", ts=2000), 2000)
    assert store.topics["a"].trimmed_upto == 5
    assert not store.covers("a", 3)  # event 5 is gone: a gap, not a silent skip
    assert store.covers("a", 5)
    assert seqs(store.get("a", 2000).after(5, 100)) == [9]


def test_forgotten_upto_never_decreases() -> None:
    store = HistoryStore(settings_for({}, (100, 10)))
    store.append(ev(8, "a", ts=0), 0)
    store.sweep(100)
    assert store.forgotten_upto == 8
    store.append(ev(3, "b", ts=100), 100)  # lower seq (another shard order) forgotten later
    store.sweep(1000)
    assert store.forgotten_upto == 8


def test_sweep_keeps_non_empty_topics() -> None:
    store = HistoryStore(settings_for({}, (100, 0)))
    for i, t in enumerate("abc"):
        store.append(ev(i + 1, t), 0)
    assert store.sweep(10**12) == 0
    assert set(store.topics) == {"a", "b", "c"}
    assert store.forgotten_upto == 0


def test_size_zero_topic_is_forgotten_by_sweep() -> None:
    store = HistoryStore(settings_for({"z": (0, 0)}))
    store.append(ev(4, "z"), 0)
    assert list(store.topics["z"].events) == []
    assert not store.covers("z", 3)
    store.sweep(0)
    assert "z" not in store.topics and store.forgotten_upto == 4


def test_rotating_sweep_with_small_budget_visits_all_topics() -> None:
    store = HistoryStore(settings_for({}, (100, 1000)))
    names = [f"t{i}" for i in range(7)]
    for i, name in enumerate(names):
        # Only the last topic is old; the others stay.
        ts = 0 if name == "t6" else 10_000
        store.append(ev(i + 1, name, ts=ts), ts)
    dropped = 0
    sweeps = 0
    while "t6" in store.topics:
        dropped += store.sweep(10_500, budget=2)
        sweeps += 1
        assert sweeps <= 4, "a budget-2 sweep must reach the 7th topic within ceil(7/2) sweeps"
    assert dropped == 1
    assert set(store.topics) == set(names[:6])


def test_sweep_budget_bounds_the_work() -> None:
    store = HistoryStore(settings_for({}, (100, 1000)))
    for i in range(10):
        store.append(ev(i + 1, f"t{i}", ts=0), 0)
    assert store.sweep(5000, budget=3) == 3
    assert len(store.topics) == 7
    assert store.sweep(5000, budget=100) == 7
    assert store.topics == {}
    assert store.forgotten_upto == 10

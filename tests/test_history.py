"""Tests for ssegw.core.history (bounded per-topic rings, coverage, the store's sweep) and for
ssegw.broker.memory, the reference broker built on it (ids, replay, resume, reset).

All times are integer milliseconds passed in; nothing sleeps.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sse_parser import parse

from ssegw.broker.memory import MemoryBroker
from ssegw.core.history import Event, HistoryStore, TopicHistory
from ssegw.core.ids import format_id, parse_id
from ssegw.core.publish import parse_message


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


# -- the memory broker: ids, history and resume on top of the store ---------------------
# (ssegw/broker/memory.py is the reference broker; these drive its sync publish_now /
# replay_now and, once, the async API through asyncio.run.)


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> int:
        return self.ms


def msg(topic: str, data: object = "x", key: str | None = None):
    obj = {"topic": topic, "data": data}
    if key is not None:
        obj["key"] = key
    return parse_message(obj, orjson.dumps)


def make_broker(size: int = 100, ttl_ms: int = 0,
                max_keys: int = 10_000) -> tuple[MemoryBroker, Clock, list[list[Event]]]:
    """max_keys=0: no keyed state, so coverage is history's alone (tests/test_keyed.py has
    the compacted resumes keyed state gives)."""
    clock = Clock()
    b = MemoryBroker(lambda topic: (size, ttl_ms), clock, lambda topic: (max_keys, False))
    delivered: list[list[Event]] = []
    asyncio.run(b.start(delivered.append))
    return b, clock, delivered


def after(b: MemoryBroker, seq: int) -> tuple[str, tuple[int, ...]]:
    return parse_id(format_id(b.epoch, seq))


def test_ids_increase_and_are_delivered_in_order() -> None:
    b, _, delivered = make_broker()
    ids = b.publish_now([msg("a"), msg("b"), msg("a")]) + b.publish_now([msg("c")])
    parsed = [parse_id(i) for i in ids]
    assert [p[0] for p in parsed] == [b.epoch] * 4
    assert [p[1] for p in parsed] == [(1,), (2,), (3,), (4,)]
    assert len(set(ids)) == 4
    assert [[e.seq for e in batch] for batch in delivered] == [[1, 2, 3], [4]]
    assert b.published == 4 and b.seq == 4
    # Each event's frame carries its own id, once, and parses back to the message.
    for batch in delivered:
        for e in batch:
            p = parse(e.frame.decode())
            assert [x.id for x in p.events] == [format_id(b.epoch, e.seq)]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b.c"]), st.text(max_size=40), st.sampled_from([None, "tick"])),
                min_size=1, max_size=20))
def test_published_frames_are_exactly_encode_frame_of_their_id(items) -> None:  # noqa: ANN001
    """The broker builds frames in one bytes formatting, not through encode_frame; they must
    be the same bytes."""
    from ssegw.core.sse import encode_frame

    b, _, delivered = make_broker()
    msgs = [parse_message({"topic": t, "data": d, **({"event": e} if e else {})}, orjson.dumps) for t, d, e in items]
    ids = b.publish_now(msgs)
    evs = delivered[-1]
    assert [e.frame for e in evs] == [encode_frame(i, m.body) for i, m in zip(ids, msgs, strict=True)]
    assert ids == [format_id(b.epoch, e.seq) for e in evs]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b.c", "m.7"]),
                          st.one_of(st.text(max_size=40), st.integers(-(2**63), 2**63 - 1), st.lists(st.integers(0, 99), max_size=3),
                                    st.dictionaries(st.text(max_size=5), st.integers(0, 99), max_size=3))),
                min_size=1, max_size=20))
def test_a_plain_batch_publishes_what_its_messages_publish(items) -> None:  # noqa: ANN001
    """A batch of plain messages reaches the broker as columns (core.publish.PlainBatch); the
    events, frames, ids and history are those of the same messages published one list of
    Message objects at a time."""
    from ssegw.core.publish import Message, PlainBatch, parse_publish
    from ssegw.core.sse import encode_frame

    body = [{"topic": t, "data": d} for t, d in items]
    batch = parse_publish(body, 1000, orjson.dumps)
    assert type(batch) is PlainBatch and len(batch) == len(items)
    as_list = [Message(m.topic, m.event, m.key, m.body) for m in batch]
    b1, _, d1 = make_broker()
    b2, _, d2 = make_broker()
    ids1 = b1.publish_now(batch)
    ids2 = b2.publish_now(as_list)
    assert [i.split("-")[1] for i in ids1] == [i.split("-")[1] for i in ids2]
    assert ids1 == [format_id(b1.epoch, e.seq) for e in d1[-1]]
    assert [e.frame for e in d1[-1]] == [encode_frame(i, m.body) for i, m in zip(ids1, as_list, strict=True)]
    assert [(e.topic, e.seq, e.key) for e in d1[-1]] == [(e.topic, e.seq, e.key) for e in d2[-1]]
    assert {t: [e.seq for e in h.events] for t, h in b1.history.topics.items()} == {
        t: [e.seq for e in h.events] for t, h in b2.history.topics.items()}


def test_epochs_differ_between_brokers() -> None:
    assert make_broker()[0].epoch != make_broker()[0].epoch


def test_async_api_matches_sync() -> None:
    b, _, _ = make_broker()

    async def go() -> tuple[list[str], object]:
        ids = await b.publish([msg("a", "1"), msg("b", "2")])
        return ids, await b.replay(("a", "b"), None, "earliest")

    ids, replay = asyncio.run(go())
    assert [parse_id(i)[1] for i in ids] == [(1,), (2,)]
    assert [e.seq for e in replay.events] == [1, 2] and replay.reset == []
    assert b.ready()


def test_replay_after_id_merges_topics_in_seq_order_exactly_once() -> None:
    b, _, _ = make_broker()
    b.publish_now([msg("a"), msg("b"), msg("c"), msg("a"), msg("b"), msg("a")])
    r = b.replay_now(("a", "b"), after(b, 2), None)
    assert [(e.topic, e.seq) for e in r.events] == [("a", 4), ("b", 5), ("a", 6)]
    assert r.reset == []
    # The id of an event of another topic places the resume point just as well.
    r = b.replay_now(("a",), after(b, 3), None)
    assert [e.seq for e in r.events] == [4, 6]
    r = b.replay_now(("a", "b"), after(b, 6), None)
    assert r.events == [] and r.reset == []


def test_since_last_and_earliest() -> None:
    b, _, _ = make_broker()
    b.publish_now([msg("a", "1"), msg("b", "2"), msg("a", "3"), msg("c", "4")])
    r = b.replay_now(("a", "b", "none"), None, "last")
    assert [(e.topic, e.seq) for e in r.events] == [("b", 2), ("a", 3)]
    r = b.replay_now(("a", "b", "none"), None, "earliest")
    assert [(e.topic, e.seq) for e in r.events] == [("a", 1), ("b", 2), ("a", 3)]
    r = b.replay_now(("a",), None, None)
    assert r.events == [] and r.reset == []


def test_last_event_id_wins_over_since() -> None:
    b, _, _ = make_broker()
    b.publish_now([msg("a"), msg("a"), msg("a")])
    r = b.replay_now(("a",), after(b, 2), "earliest")
    assert [e.seq for e in r.events] == [3]


def test_reset_only_for_topics_history_no_longer_covers() -> None:
    b, _, _ = make_broker(size=2, max_keys=0)
    b.publish_now([msg("a"), msg("a"), msg("a"), msg("a"), msg("b")])  # a: 1..4 (keeps 3,4), b: 5
    r = b.replay_now(("a", "b"), after(b, 1), None)
    assert r.reset == ["a"]
    assert [(e.topic, e.seq) for e in r.events] == [("b", 5)]
    r = b.replay_now(("a", "b"), after(b, 2), None)
    assert r.reset == []
    assert [e.seq for e in r.events] == [3, 4, 5]


@pytest.mark.parametrize(
    "case",
    ["other_epoch", "future_seq", "two_shards", "zero_shards_epoch_only"],
)
def test_ids_that_cannot_be_placed_reset_every_topic(case: str) -> None:
    b, _, _ = make_broker()
    b.publish_now([msg("a"), msg("b")])
    other = "zz" if b.epoch != "zz" else "yy"
    parsed = {
        "other_epoch": (other, (1,)),
        "future_seq": (b.epoch, (3,)),
        "two_shards": (b.epoch, (1, 1)),
        "zero_shards_epoch_only": (b.epoch, ()),
    }[case]
    r = b.replay_now(("a", "b", "c"), parsed, None)
    assert r.events == []
    assert sorted(r.reset) == ["a", "b", "c"]


def test_resume_at_head_is_covered_and_empty() -> None:
    b, _, _ = make_broker()
    b.publish_now([msg("a"), msg("b")])
    r = b.replay_now(("a", "b"), after(b, 2), None)
    assert r.events == [] and r.reset == []


def test_tick_sweeps_aged_topics_and_keeps_coverage_conservative() -> None:
    b, clock, _ = make_broker(size=100, ttl_ms=1000)
    b.publish_now([msg("a"), msg("a")])
    clock.ms += 5000
    b.tick(0)
    assert b.stats()["topics_with_history"] == 0
    r = b.replay_now(("a", "never"), after(b, 1), None)
    assert sorted(r.reset) == ["a", "never"] and r.events == []
    r = b.replay_now(("a",), after(b, 2), None)
    assert r.reset == [] and r.events == []


def test_events_aged_out_since_the_last_sweep_are_a_reset_not_a_silent_gap() -> None:
    b, clock, _ = make_broker(size=100, ttl_ms=1000)
    b.publish_now([msg("a", "seen")])
    b.publish_now([msg("a", "missed")])
    clock.ms += 5000  # both events are past the TTL; no tick (sweep) has run yet
    r = b.replay_now(("a",), after(b, 1), None)
    # Either event 2 is still replayed, or "a" is reset.  Never neither.
    assert [e.seq for e in r.events] == [2] or r.reset == ["a"]


@settings(deadline=None, max_examples=150)
@given(
    size=st.integers(1, 4),
    batches=st.lists(st.lists(st.sampled_from("abcd"), min_size=1, max_size=3), min_size=0, max_size=10),
    subset=st.lists(st.sampled_from("abcdz"), min_size=1, max_size=5, unique=True),
)
def test_every_resume_point_replays_exactly_what_followed(
    size: int, batches: list[list[str]], subset: list[str]
) -> None:
    b, _, _ = make_broker(size=size, max_keys=0)
    published: list[tuple[int, str]] = []
    for batch in batches:
        ids = b.publish_now([msg(t) for t in batch])
        published += [(parse_id(i)[1][0], t) for i, t in zip(ids, batch, strict=True)]
    topics = tuple(subset)
    for s in range(0, b.seq + 1):
        r = b.replay_now(topics, after(b, s), None)
        got = [(e.seq, e.topic) for e in r.events]
        assert [x[0] for x in got] == sorted({x[0] for x in got}), "ascending seq, no duplicates"
        assert set(r.reset) <= set(topics) and len(r.reset) == len(set(r.reset))
        for t in topics:
            want = [(q, tt) for q, tt in published if tt == t and q > s]
            mine = [x for x in got if x[1] == t]
            if t in r.reset:
                assert mine == [], "nothing replayed for a reset topic"
                # History keeps at least `size` events: a gap that small must be covered.
                assert len(want) > size
            else:
                assert mine == want
    # since=last / earliest agree with the same history.
    last = b.replay_now(topics, None, "last")
    for t in topics:
        mine = [e.seq for e in last.events if e.topic == t]
        all_t = [q for q, tt in published if tt == t]
        assert mine == all_t[-1:]
    earliest = b.replay_now(topics, None, "earliest")
    assert [e.seq for e in earliest.events] == sorted(e.seq for e in earliest.events)
    for t in topics:
        all_t = [q for q, tt in published if tt == t]
        mine = [e.seq for e in earliest.events if e.topic == t]
        assert mine == all_t[len(all_t) - len(mine) :] and len(mine) >= min(size, len(all_t))


def test_topic_budget_forgets_the_least_recently_published_topic() -> None:
    """Spraying one-off topics cannot grow history without bound: past ``max_topics`` the
    topic published to least recently is forgotten, and a resume on it is not covered
    (``ssegw.reset``), while a topic still being published stays."""
    store = HistoryStore(settings_for({}, (100, 0)), max_topics=3)
    seq = 0

    def pub(topic: str) -> int:
        nonlocal seq
        seq += 1
        store.append(ev(seq, topic), 0)
        return seq

    pub("ticker")
    a = pub("spray.1")
    pub("spray.2")
    pub("ticker")  # the ticker is recent again
    pub("spray.3")  # over budget: spray.1 (least recently published) goes
    assert set(store.topics) == {"ticker", "spray.2", "spray.3"} and store.evicted == 1
    assert not store.covers("spray.1", a - 1)  # its event is gone: reset, not a gap
    assert store.covers("ticker", 0)
    for i in range(4, 1000):
        pub(f"spray.{i}")
        pub("ticker")
    assert len(store.topics) == 3 and "ticker" in store.topics


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40), st.integers(1, 4)), min_size=1, max_size=60),
       st.integers(1, 5), st.sampled_from([0, 7, 30]))
def test_extend_ages_out_as_append_does(steps, size, ttl_ms) -> None:
    """The publish path (``HistoryStore.extend``) inlines ``TopicHistory.append`` and trims
    by age only when the oldest event has aged out; it must keep exactly what ``append``
    (which calls ``trim`` on every event) keeps: same events, same ``trimmed_upto``."""
    store = HistoryStore(lambda topic: (size, ttl_ms))
    ref: dict[str, TopicHistory] = {}
    now, seq = 0, 0
    for topic_i, dt, n in steps:
        now += dt
        topic = f"t{topic_i}"
        batch = []
        for _ in range(n):
            seq += 1
            batch.append(Event(topic, seq, now, b"", None))
        store.extend(batch, now)
        h = ref.setdefault(topic, TopicHistory(size, ttl_ms))
        for ev in batch:
            h.append(ev, now)
        got = store.topics[topic]
        assert seqs(list(got.events)) == seqs(list(h.events)), (topic, now)
        assert got.trimmed_upto == h.trimmed_upto


def test_events_held_share_their_topic_string() -> None:
    """A publish parses its own copy of each topic name; an event kept in history refers to
    the store's one string per topic instead (~56 B less per event held), through both
    append and extend, and the events are still found under their topic."""
    store = HistoryStore(lambda t: (10, 0))
    name = "".join(["pri", "ces"])  # built at run time: not the literal's interned object
    copies = ["".join(["pri", "ces"]) for _ in range(4)]
    assert all(c == name and c is not name for c in copies)
    store.append(Event(name, 1, 0, b"", None), 0)
    store.append(Event(copies[0], 2, 0, b"", None), 0)
    store.extend([Event(c, 3 + i, 0, b"", None) for i, c in enumerate(copies[1:])], 0)
    held = list(store.topics["prices"].events)
    assert [e.seq for e in held] == [1, 2, 3, 4, 5]
    assert all(e.topic is name for e in held)

"""Keyed state (``ssegw/core/keyed.py``) and what the embedded broker builds on it:
``since=snapshot`` and compacted resumes (docs/api.md "Ids, history and resume").

Sans-I/O: integer clocks, no sockets.  The property tests hold the store to a model that
keeps every published event: whatever the bounds evicted or expired, a resume the keyed
state claims to cover gives exactly the newest event of every key changed after it.
"""

from __future__ import annotations

import asyncio

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from ssegw.broker.memory import MemoryBroker
from ssegw.core.history import Event, HistoryStore, TopicHistory
from ssegw.core.ids import format_id, parse_id
from ssegw.core.keyed import TopicKeys
from ssegw.core.publish import parse_message


def ev(seq: int, key: str | None, ts: int = 0, topic: str = "t") -> Event:
    return Event(topic, seq, ts, b"id: e-%d\ndata: x\n\n" % seq, key)


# -- TopicKeys --------------------------------------------------------------------------------


def test_newest_per_key_in_publish_order() -> None:
    k = TopicKeys(10, 0)
    for i, key in enumerate(["a", "b", "a", None, "c", None], 1):
        k.put(ev(i, key))
    assert [(e.seq, e.key) for e in k.snapshot(99)] == [(2, "b"), (3, "a"), (5, "c"), (6, None)]
    assert k.floor == 0 and k.covers(0), "superseded entries are not lost: no floor"
    assert [e.seq for e in k.changed_after(3, 99)] == [5, 6]
    assert [e.seq for e in k.changed_after(2, 5)] == [3, 5]
    assert k.count_changed_after(0, 99) == 4 and k.count_changed_after(0, 2) == 2


def test_max_keys_evicts_least_recently_updated_and_raises_the_floor() -> None:
    k = TopicKeys(2, 0)
    k.put(ev(1, "a"))
    k.put(ev(2, "b"))
    k.put(ev(3, "a"))  # a is now the most recent
    k.put(ev(4, "c"))  # evicts b (seq 2)
    assert [e.key for e in k.snapshot(99)] == ["a", "c"]
    assert k.floor == 2 and k.counts == [1, 0]
    assert not k.covers(1) and k.covers(2)
    zero = TopicKeys(0, 0)
    zero.put(ev(7, "a"))
    assert zero.snapshot(99) == [] and zero.floor == 7, "max_keys 0 keeps nothing"


def test_ttl_expires_from_the_front() -> None:
    k = TopicKeys(10, 1000)
    k.put(ev(1, "a", ts=0))
    k.put(ev(2, "b", ts=500))
    k.put(ev(3, "a", ts=900))
    k.trim(1400)  # horizon 400: b (500) and a (900) stay
    assert [e.seq for e in k.snapshot(99)] == [2, 3] and k.floor == 0
    k.trim(1600)  # horizon 600: b expires
    assert [e.seq for e in k.snapshot(99)] == [3] and k.floor == 2 and k.counts == [0, 1]


def test_snapshot_is_shared_until_the_next_change() -> None:
    k = TopicKeys(10, 0)
    k.put(ev(1, "a"))
    k.put(ev(2, "b"))
    s1 = k.snapshot(2)
    assert k.snapshot(2) is s1, "one list for every subscriber between two publishes"
    assert [e.seq for e in k.snapshot(1)] == [1], "never past upto"
    k.put(ev(3, "a"))
    assert k.snapshot(3) is not s1 and [e.seq for e in s1] == [1, 2], "a shared list is never mutated"


OPS = st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d", None]), st.integers(0, 400)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(OPS, st.integers(0, 4), st.sampled_from([0, 500]))
def test_keyed_state_against_a_model(ops: list[tuple[str | None, int]], max_keys: int, ttl: int) -> None:
    k = TopicKeys(max_keys, ttl)
    published: list[Event] = []
    now = 0
    for seq, (key, dt) in enumerate(ops, 1):
        now += dt
        e = ev(seq, key, now)
        published.append(e)
        k.put(e)
        k.trim(now)
        snap = k.snapshot(seq)
        assert len(snap) <= max_keys
        assert [x.seq for x in snap] == sorted({x.seq for x in snap})
        newest = {p.key: p for p in published}
        assert all(newest[x.key] is x for x in snap), "only each key's newest event"
        assert all(not ttl or x.ts_ms >= now - ttl for x in snap)
        for s in range(0, seq + 1):
            if k.covers(s):
                want = sorted((p for p in newest.values() if p.seq > s), key=lambda p: p.seq)
                assert k.changed_after(s, seq) == want, f"compacted resume after {s}"
        # The floor is honest: a resume at the floor is covered, one just under it is not
        # when something was lost there.
        assert k.floor <= seq


# -- the embedded broker: snapshot and compacted resume ----------------------------------------


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> int:
        return self.ms


def msg(topic: str, data: object = "x", key: str | None = None):  # noqa: ANN201
    obj: dict[str, object] = {"topic": topic, "data": data}
    if key is not None:
        obj["key"] = key
    return parse_message(obj, orjson.dumps)


def broker(size: int = 100, ttl_ms: int = 0, max_keys: int = 100, conflate: bool = False) -> tuple[MemoryBroker, Clock]:
    clock = Clock()
    b = MemoryBroker(lambda t: (size, ttl_ms), clock, lambda t: (max_keys, conflate))
    asyncio.run(b.start(lambda evs: None))
    return b, clock


def after(b: MemoryBroker, seq: int) -> tuple[str, tuple[int, ...]]:
    return parse_id(format_id(b.epoch, seq))


def keys_of(evs: list[Event]) -> list[tuple[str, str | None, int]]:
    return [(e.topic, e.key, e.seq) for e in evs]


def test_snapshot_per_topic_with_and_without_unkeyed_events() -> None:
    b, _ = broker()
    b.publish_now([msg("p", 1, "AAPL"), msg("p", 2, "MSFT"), msg("q", 3), msg("p", 4, "AAPL"), msg("q", 5),
                   msg("p", 6)])
    r = b.replay_now(("p", "q"), None, "snapshot")
    assert keys_of(r.events) == [("p", "MSFT", 2), ("p", "AAPL", 4), ("q", None, 5), ("p", None, 6)]
    assert r.reset == [] and r.compacted == [] and r.floors == {"p": 6, "q": 6}
    assert b.replay_now(("nothing",), None, "snapshot").events == []


def test_compacted_resume_after_history_trimmed() -> None:
    b, _ = broker(size=3)
    ids = b.publish_now([msg("p", i, k) for i, k in enumerate("abcabcab")])  # seqs 1..8
    r = b.replay_now(("p",), after(b, 2), None)  # history keeps 6..8: gap 3..5 uncovered
    assert r.reset == [] and r.compacted == ["p"]
    assert keys_of(r.events) == [("p", "c", 6), ("p", "a", 7), ("p", "b", 8)]
    assert r.floors == {"p": 8} and len(ids) == 8
    r = b.replay_now(("p",), after(b, 6), None)  # covered by history: the full replay
    assert r.compacted == [] and [e.seq for e in r.events] == [7, 8]


def test_reset_when_a_changed_key_was_evicted() -> None:
    b, _ = broker(size=2, max_keys=2)
    b.publish_now([msg("p", 0, "a"), msg("p", 1, "b"), msg("p", 2, "c"), msg("p", 3, "c")])  # a evicted (seq 1)
    assert b.replay_now(("p",), after(b, 0), None).reset == ["p"], "a changed after 0 and was evicted"
    r = b.replay_now(("p",), after(b, 1), None)
    assert r.compacted == ["p"] and keys_of(r.events) == [("p", "b", 2), ("p", "c", 4)]


def test_ttl_expiry_of_keyed_state_resets() -> None:
    b, clock = broker(size=1, ttl_ms=1000)
    b.publish_now([msg("p", 0, "a")])
    clock.ms += 600
    b.publish_now([msg("p", 1, "b"), msg("p", 2, "c")])
    r = b.replay_now(("p",), after(b, 0), None)
    assert r.compacted == ["p"] and [e.seq for e in r.events] == [1, 2, 3]
    clock.ms += 500  # a (seq 1) is past the ttl
    assert [e.seq for e in b.replay_now(("p",), None, "snapshot").events] == [2, 3]
    r = b.replay_now(("p",), after(b, 0), None)
    assert r.reset == ["p"] and r.events == []
    assert b.stats()["keyed_expired"] == 1 and b.stats()["keyed_evicted"] == 0


def test_conflate_topics_resume_compacted_when_that_is_shorter() -> None:
    b, _ = broker(conflate=True)
    b.publish_now([msg("p", i, "ab"[i % 2]) for i in range(6)])  # history covers all
    r = b.replay_now(("p",), after(b, 0), None)
    assert r.compacted == ["p"] and [e.seq for e in r.events] == [5, 6]
    r = b.replay_now(("p",), after(b, 4), None)  # 2 events, 2 keys: not shorter, full replay
    assert r.compacted == [] and [e.seq for e in r.events] == [5, 6]
    plain, _ = broker(conflate=False)
    plain.publish_now([msg("p", i, "ab"[i % 2]) for i in range(6)])
    r = plain.replay_now(("p",), after(plain, 0), None)
    assert r.compacted == [] and len(r.events) == 6, "drop topics replay history in full"


def test_multi_topic_resume_is_decided_per_topic() -> None:
    b, _ = broker(size=2, max_keys=2)
    b.publish_now([msg("full", 0, "x")])
    b.publish_now([msg("comp", i, "ab"[i % 2]) for i in range(5)])  # seqs 2..6, history keeps 5,6
    b.publish_now([msg("gone", i, "abc"[i]) for i in range(3)])  # seqs 7..9; a evicted (7)
    b.publish_now([msg("full", 9, "x")])  # seq 10
    r = b.replay_now(("full", "comp", "gone"), after(b, 1), None)
    assert r.reset == ["gone"] and r.compacted == ["comp"]
    assert keys_of(r.events) == [("comp", "b", 5), ("comp", "a", 6), ("full", "x", 10)]
    assert set(r.floors) == {"full", "comp"}


TOPICS = st.sampled_from(["p", "q"])
KEYS = st.sampled_from(["a", "b", "c", None])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.tuples(TOPICS, KEYS), min_size=1, max_size=4), min_size=1, max_size=10),
       st.integers(1, 4), st.integers(0, 3), st.booleans())
def test_every_resume_point_is_replayed_compacted_or_reset_honestly(
    batches: list[list[tuple[str, str | None]]], size: int, max_keys: int, conflate: bool
) -> None:
    b, _ = broker(size=size, max_keys=max_keys, conflate=conflate)
    published: list[tuple[int, str, str | None]] = []
    for batch in batches:
        ids = b.publish_now([msg(t, "x", k) for t, k in batch])
        published += [(parse_id(i)[1][0], t, k) for i, (t, k) in zip(ids, batch, strict=True)]
    for s in range(0, b.seq + 1):
        r = b.replay_now(("p", "q"), after(b, s), None)
        assert [e.seq for e in r.events] == sorted({e.seq for e in r.events})
        assert not set(r.reset) & set(r.compacted)
        for t in ("p", "q"):
            mine = [(e.seq, e.key) for e in r.events if e.topic == t]
            want = [(q, k) for q, tt, k in published if tt == t and q > s]
            if t in r.reset:
                assert mine == [] and len(want) > size
            elif t in r.compacted:
                newest = {k: q for q, k in want}
                assert mine == sorted((q, k) for k, q in newest.items()), "newest of each changed key"
                assert conflate or len(want) > size
            else:
                assert mine == want
    snap = b.replay_now(("p", "q"), None, "snapshot")
    for t in ("p", "q"):
        newest = {k: q for q, tt, k in published if tt == t}
        got = [(e.seq, e.key) for e in snap.events if e.topic == t]
        assert len(got) <= max_keys and all(newest[k] == q for q, k in got)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["a", "b", "c", None]), min_size=1, max_size=5), min_size=1, max_size=30),
       st.integers(0, 3))
def test_the_publish_paths_inlined_update_keeps_what_put_keeps(batches: list[list[str | None]], max_keys: int) -> None:
    """``HistoryStore.extend`` inlines ``TopicKeys.put``: the same keys, in the same order,
    with the same events and floor."""
    store = HistoryStore(lambda topic: (1000, 0), max_keys=lambda topic: max_keys)
    ref = TopicKeys(max_keys, 0)
    seq = 0
    for keys in batches:
        batch = []
        for key in keys:
            seq += 1
            batch.append(Event("t", seq, 0, b"", key))
        store.extend(batch, 0)
        for e in batch:
            ref.put(e)
        assert keyed_view(store.topics["t"]) == ([(k, e.seq) for k, e in ref.entries.items()], ref.floor)


def keyed_view(h: TopicHistory) -> tuple[list[tuple[str | None, int]], int]:
    """A topic's keyed state as (key, seq) pairs and floor, read without making it from the
    ring when it is implied (core/history.py)."""
    if h.keys is not None:
        return [(k, e.seq) for k, e in h.keys.entries.items()], h.keys.floor
    assert h.kmax > 0, "a store with keyed state"
    return ([(None, h.events[-1].seq)] if h.events else []), h.kfloor


STORE_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("pub"), st.lists(st.tuples(st.sampled_from("pqr"), st.sampled_from(["a", "b", None, None])),
                                          min_size=1, max_size=4), st.integers(0, 60)),
        st.tuples(st.just("read"), st.sampled_from("pqr"), st.integers(0, 30)),
        st.tuples(st.just("get"), st.sampled_from("pqr"), st.integers(0, 60)),
        st.tuples(st.just("sweep"), st.just(""), st.integers(0, 60)),
    ),
    max_size=40,
)


@settings(max_examples=400, deadline=None)
@given(STORE_OPS, st.integers(1, 3), st.integers(1, 3), st.sampled_from([0, 100]), st.integers(1, 3))
def test_keyed_state_implied_by_the_ring_answers_as_the_real_one(ops, size: int, max_keys: int, ttl: int,  # noqa: ANN001
                                                                 max_topics: int) -> None:
    """Until a topic's first keyed event (or a read), its keyed state is implied by the ring
    (core/history.py).  The same publishes, reads, age trims, sweeps and forgotten topics on a
    store that implies it and on one that keeps a TopicKeys for every topic from the start:
    the same snapshots, changed keys, coverage, floors and counters, every step."""
    lazy = HistoryStore(lambda t: (size, ttl), max_topics=max_topics, max_keys=lambda t: max_keys)
    eager = HistoryStore(lambda t: (size, ttl), max_topics=max_topics, max_keys=lambda t: max_keys)
    eager.imply_keys = False
    seq = now = 0

    def same(topic: str, s: int) -> None:
        assert lazy.covers(topic, s) == eager.covers(topic, s)
        assert lazy.keyed_covers(topic, s) == eager.keyed_covers(topic, s), (topic, s)

    for op, arg, n in ops:
        if op == "pub":
            now += n
            batch = []
            for topic, key in arg:
                seq += 1
                batch.append(Event(topic, seq, now, b"", key))
            lazy.extend(batch, now)
            eager.extend(batch, now)
        elif op == "get":
            now += n
            hl, he = lazy.get(arg, now), eager.get(arg, now)
            assert (hl is None) == (he is None)
            if hl is not None and he is not None:
                assert hl.keyed_count() == he.keyed_count()
                assert [e.seq for e in hl.events] == [e.seq for e in he.events]
        elif op == "sweep":
            now += n
            assert lazy.sweep(now) == eager.sweep(now)
        else:
            hl, he = lazy.topics.get(arg), eager.topics.get(arg)
            assert (hl is None) == (he is None)
            if hl is not None and he is not None:
                kl, ke = hl.keyed(), he.keyed()
                assert kl is not None and ke is not None
                assert [(e.seq, e.key) for e in kl.snapshot(seq)] == [(e.seq, e.key) for e in ke.snapshot(seq)]
                s = min(n, seq)
                assert [e.seq for e in kl.changed_after(s, seq)] == [e.seq for e in ke.changed_after(s, seq)]
                assert kl.floor == ke.floor
        for topic in "pqr":
            for s in range(seq + 1):
                same(topic, s)
        assert lazy.keyed_counts == eager.keyed_counts
        assert lazy.forgotten_upto == eager.forgotten_upto and lazy.evicted == eager.evicted

"""Tests for ssegw.core.table: slots, free list, generations and the topic index."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ssegw.core.table import CLOSED, HEAD, Conn, Table


def conn() -> Conn:
    c = Conn()
    c.init_conn()
    return c


def test_fresh_record_defaults() -> None:
    c = conn()
    assert (c.slot, c.gen, c.state) == (-1, 0, HEAD)
    assert c.topics == () and c.chunked and not c.paused
    assert c.pending is None and c.pending_bytes == 0


def test_slots_are_dense_and_reused_lifo() -> None:
    t = Table()
    cs = [conn() for _ in range(4)]
    assert [t.add(c) for c in cs] == [0, 1, 2, 3]
    assert [c.gen for c in cs] == [0, 0, 0, 0]
    t.remove(cs[1])
    t.remove(cs[3])
    assert len(t) == 2
    a, b, c = conn(), conn(), conn()
    assert t.add(a) == 3  # last freed, first reused
    assert t.add(b) == 1
    assert t.add(c) == 4  # free list empty: append
    assert len(t.records) == 5 and len(t) == 5


def test_generation_bumps_on_reuse_and_get_detects_stale() -> None:
    t = Table()
    old = conn()
    slot = t.add(old)
    gen = old.gen
    assert t.get(slot, gen) is old
    t.remove(old)
    assert old.slot == -1
    assert t.get(slot, gen) is None  # freed, not yet reused
    new = conn()
    assert t.add(new) == slot
    assert new.gen == gen + 1
    assert t.get(slot, gen) is None  # stale reference to the old connection
    assert t.get(slot, new.gen) is new
    t.remove(new)
    newer = conn()
    t.add(newer)
    assert newer.gen == gen + 2


def test_get_out_of_range() -> None:
    t = Table()
    t.add(conn())
    assert t.get(-1, 0) is None
    assert t.get(1, 0) is None
    assert t.get(10**9, 0) is None


def test_remove_is_idempotent() -> None:
    t = Table()
    a, b = conn(), conn()
    t.add(a)
    t.add(b)
    t.remove(a)
    t.remove(a)
    assert len(t) == 1 and t.free == [0]
    # A removed record whose slot was reused must not evict the new owner.
    c = conn()
    t.add(c)
    a.slot = c.slot  # a stale record pointing at the reused slot
    t.remove(a)
    assert t.get(c.slot, c.gen) is c and len(t) == 2


def test_remove_never_added_is_a_noop() -> None:
    t = Table()
    t.remove(conn())
    assert len(t) == 0 and t.free == []


def test_subscribe_and_unsubscribe_maintain_the_index() -> None:
    t = Table()
    a, b = conn(), conn()
    t.add(a)
    t.add(b)
    assert t.subscribe(a, ("x", "y")) == ["x", "y"]  # both topics gained their first subscriber
    assert t.subscribe(b, ("y", "z")) == ["z"]
    assert t.streams == 2
    assert a.topics == ("x", "y")
    assert set(t.topics) == {"x", "y", "z"}
    assert t.subscribers("y") == 2 and t.subscribers("x") == 1 and t.subscribers("nope") == 0
    assert t.topics["y"].subs == {a.slot: a, b.slot: b}
    assert sorted(t.unsubscribe(a)) == ["x"]  # x lost its last subscriber; y still has b
    assert set(t.topics) == {"y", "z"}
    assert a.topics == () and t.streams == 1
    assert t.unsubscribe(a) == []  # idempotent
    assert t.streams == 1
    assert sorted(t.unsubscribe(b)) == ["y", "z"]
    assert t.topics == {} and t.streams == 0


def test_topic_with_a_pending_batch_outlives_its_last_subscriber() -> None:
    # The fan-out flush still owns the batch; it deletes the topic afterwards.
    t = Table()
    a = conn()
    t.add(a)
    t.subscribe(a, ("x",))
    t.topics["x"].batch.append(object())
    assert t.unsubscribe(a) == ["x"]
    assert "x" in t.topics and t.topics["x"].subs == {}
    b = conn()
    t.add(b)
    assert t.subscribe(b, ("x",)) == ["x"]  # interest comes back for the surviving state


def test_remove_drops_subscriptions() -> None:
    t = Table()
    a = conn()
    t.add(a)
    t.subscribe(a, ("x",))
    t.remove(a)
    assert t.topics == {} and t.streams == 0 and len(t) == 0


def test_conflate_policy_is_looked_up_per_topic_once() -> None:
    asked: list[str] = []

    def conflate_for(topic: str) -> bool:
        asked.append(topic)
        return topic.startswith("tick.")

    t = Table(conflate_for=conflate_for)
    a, b = conn(), conn()
    t.add(a)
    t.add(b)
    t.subscribe(a, ("tick.A", "news"))
    t.subscribe(b, ("tick.A",))
    assert t.topics["tick.A"].conflate and not t.topics["news"].conflate
    assert asked == ["tick.A", "news"]
    plain = Table()  # no callback: every topic is "drop"
    c = conn()
    plain.add(c)
    plain.subscribe(c, ("tick.A",))
    assert not plain.topics["tick.A"].conflate


@settings(max_examples=100)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["add", "remove", "sub", "unsub"]),
            st.integers(0, 7),
            st.lists(st.sampled_from("abcd"), max_size=3, unique=True),
        ),
        max_size=60,
    )
)
def test_random_operations_keep_the_table_consistent(ops: list[tuple[str, int, list[str]]]) -> None:
    t = Table()
    conns = [conn() for _ in range(8)]
    live: set[int] = set()  # indexes into conns that hold a slot
    seen_refs: list[tuple[int, int, Conn]] = []
    for op, i, topics in ops:
        c = conns[i]
        if op == "add" and i not in live:
            t.add(c)
            live.add(i)
            seen_refs.append((c.slot, c.gen, c))
        elif op == "remove":
            t.remove(c)
            live.discard(i)
            c.state = CLOSED
            conns[i] = conn()  # a closed record is never re-added
        elif op == "sub" and i in live and not c.topics and topics:
            t.subscribe(c, tuple(topics))
        elif op == "unsub":
            t.unsubscribe(c)
        # Invariants.
        assert len(t) == len(live) == sum(r is not None for r in t.records)
        assert sorted(t.free) == sorted(s for s, r in enumerate(t.records) if r is None)
        assert len(set(t.free)) == len(t.free)
        subscribed = [conns[j] for j in live if conns[j].topics]
        assert t.streams == len(subscribed)
        for name, ts in t.topics.items():
            assert ts.subs, f"empty topic {name} kept without a batch"
            for slot, rec in ts.subs.items():
                assert rec.slot == slot and name in rec.topics and t.records[slot] is rec
        for c2 in subscribed:
            for name in c2.topics:
                assert t.topics[name].subs[c2.slot] is c2
    for slot, gen, c in seen_refs:
        got = t.get(slot, gen)
        assert got is None or got is c
        assert (got is c) == (c.slot == slot and t.records[slot] is c)
    for i in list(live):
        t.remove(conns[i])
    assert len(t) == 0 and t.streams == 0 and t.topics == {}

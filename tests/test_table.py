"""Tests for ssegw.core.table: slots with a free list, and the topic index (single-topic
subscribers per topic, multi-topic streams in shared TopicSets, ``TopicState.count``)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ssegw.core.conn import HEAD, OFF, Conn
from ssegw.core.table import Table, TopicSet


def conn() -> Conn:
    c = Conn()
    c.init_conn()
    return c


def added(t: Table, n: int) -> list[Conn]:
    cs = [conn() for _ in range(n)]
    for c in cs:
        t.add(c)
    return cs


def test_fresh_record_defaults() -> None:
    c = conn()
    assert (c.slot, c.state, c.route) == (-1, HEAD, OFF)
    assert c.topics == () and c.chunked and not c.wpaused
    assert c.backlog is None and c.floor is None and c.over_ms == 0


def test_slots_are_dense_and_reused_lifo() -> None:
    t = Table()
    cs = [conn() for _ in range(4)]
    assert [t.add(c) for c in cs] == [0, 1, 2, 3]
    t.remove(cs[1])
    t.remove(cs[3])
    assert len(t) == 2
    assert cs[1].slot == -1 and t.records[1] is None
    a, b, c = conn(), conn(), conn()
    assert t.add(a) == 3  # last freed, first reused
    assert t.add(b) == 1
    assert t.add(c) == 4  # free list empty: append
    assert len(t.records) == 5 and len(t) == 5
    assert [t.records[i] for i in (1, 3, 4)] == [b, a, c]


def test_remove_is_idempotent() -> None:
    t = Table()
    a, _b = added(t, 2)
    t.remove(a)
    t.remove(a)
    assert len(t) == 1 and list(t.free) == [0]
    # A removed record whose slot was reused must not evict the new owner.
    c = conn()
    t.add(c)
    a.slot = c.slot  # a stale record pointing at the reused slot
    t.remove(a)
    assert t.records[c.slot] is c and len(t) == 2 and list(t.free) == []


def test_remove_never_added_is_a_noop() -> None:
    t = Table()
    t.remove(conn())
    assert len(t) == 0 and list(t.free) == []


def test_subscribe_and_unsubscribe_maintain_the_index() -> None:
    t = Table()
    a, b = added(t, 2)
    assert t.subscribe(a, ("x", "y")) == ["x", "y"]  # both topics gained their first subscriber
    assert t.subscribe(b, ("y", "z")) == ["z"]
    assert t.streams == 2
    assert a.topics == ("x", "y")
    assert set(t.topics) == {"x", "y", "z"}
    assert t.subscribers("y") == 2 and t.subscribers("x") == 1 and t.subscribers("nope") == 0
    assert t.topics["y"].count == 2
    assert sorted(t.unsubscribe(a)) == ["x"]  # x lost its last subscriber; y still has b
    assert set(t.topics) == {"y", "z"}
    assert a.topics == () and t.streams == 1
    assert t.unsubscribe(a) == []  # idempotent
    assert t.streams == 1
    assert sorted(t.unsubscribe(b)) == ["y", "z"]
    assert t.topics == {} and t.streams == 0 and t.sets == {}


def test_single_topic_streams_sit_in_the_topic_subs() -> None:
    t = Table()
    a, b = added(t, 2)
    t.subscribe(a, ("x",))
    t.subscribe(b, ("x",))
    ts = t.topics["x"]
    assert ts.subs == {a.slot: a, b.slot: b} and ts.sets == [] and ts.count == 2
    assert a.topics[0] is ts.name and b.topics[0] is ts.name  # one string per topic


def test_multi_topic_streams_share_one_topic_set_per_distinct_set() -> None:
    t = Table()
    a, b, c, d = added(t, 4)
    t.subscribe(a, ("x", "y"))
    t.subscribe(b, ("y", "x"))  # the same set in another order
    t.subscribe(c, ("x", "y", "z"))
    t.subscribe(d, ("x",))
    assert set(t.sets) == {("x", "y"), ("x", "y", "z")}
    xy, xyz = t.sets[("x", "y")], t.sets[("x", "y", "z")]
    assert isinstance(xy, TopicSet) and xy.subs == {a.slot: a, b.slot: b} and xyz.subs == {c.slot: c}
    assert a.topics is b.topics is xy.topics  # one tuple per set, shared by its members
    x, y, z = (t.topics[n] for n in "xyz")
    assert x.subs == {d.slot: d}  # multi-topic streams are not in a topic's subs
    assert x.sets == [xy, xyz] and y.sets == [xy, xyz] and z.sets == [xyz]
    assert (x.count, y.count, z.count) == (4, 3, 1)
    # The set goes when its last member leaves, and each topic forgets it.
    assert t.unsubscribe(a) == []
    assert ("x", "y") in t.sets and x.count == 3
    assert t.unsubscribe(b) == []
    assert ("x", "y") not in t.sets and x.sets == [xyz] and y.sets == [xyz]
    assert sorted(t.unsubscribe(c)) == ["y", "z"]
    assert t.sets == {} and set(t.topics) == {"x"} and t.topics["x"].sets == []


def test_topic_with_a_pending_batch_outlives_its_last_subscriber() -> None:
    # The fan-out sweep still owns the batch; it deletes the topic afterwards.
    t = Table()
    (a,) = added(t, 1)
    t.subscribe(a, ("x",))
    t.topics["x"].batch.append(object())
    assert t.unsubscribe(a) == ["x"]
    assert "x" in t.topics and t.topics["x"].subs == {} and t.topics["x"].count == 0
    (b,) = added(t, 1)
    assert t.subscribe(b, ("x",)) == ["x"]  # interest comes back for the surviving state
    assert t.topics["x"].count == 1


def test_remove_drops_subscriptions() -> None:
    t = Table()
    a, b = added(t, 2)
    t.subscribe(a, ("x",))
    t.subscribe(b, ("x", "y"))
    t.remove(a)
    t.remove(b)
    assert t.topics == {} and t.sets == {} and t.streams == 0 and len(t) == 0


def test_conflate_policy_is_looked_up_per_topic_once() -> None:
    asked: list[str] = []

    def conflate_for(topic: str) -> bool:
        asked.append(topic)
        return topic.startswith("tick.")

    t = Table(conflate_for=conflate_for)
    a, b = added(t, 2)
    t.subscribe(a, ("tick.A", "news"))
    t.subscribe(b, ("tick.A",))
    assert t.topics["tick.A"].conflate and not t.topics["news"].conflate
    assert asked == ["tick.A", "news"]
    plain = Table()  # no callback: every topic is "drop"
    (c,) = added(plain, 1)
    plain.subscribe(c, ("tick.A",))
    assert not plain.topics["tick.A"].conflate


def check_index(t: Table, conns: list[Conn], live: set[int]) -> None:
    """The index agrees with a recomputation from the records."""
    assert len(t) == len(live) == sum(r is not None for r in t.records)
    assert sorted(t.free) == sorted(s for s, r in enumerate(t.records) if r is None)
    assert len(set(t.free)) == len(t.free)
    subscribed = [conns[j] for j in live if conns[j].topics]
    assert t.streams == len(subscribed)
    names = {n for c in subscribed for n in c.topics}
    assert set(t.topics) == names, "a topic without subscribers or batch was kept (or one was lost)"
    for name, ts in t.topics.items():
        assert ts.name == name
        on = [c for c in subscribed if name in c.topics]
        assert ts.count == len(on)
        assert ts.subs == {c.slot: c for c in on if len(c.topics) == 1}
        assert sorted(map(id, ts.sets)) == sorted(id(s) for k, s in t.sets.items() if name in k)
    multi = [c for c in subscribed if len(c.topics) > 1]
    assert set(t.sets) == {tuple(sorted(c.topics)) for c in multi}
    for key, tset in t.sets.items():
        assert key == tuple(sorted(tset.topics))
        assert tset.subs == {c.slot: c for c in multi if tuple(sorted(c.topics)) == key}
        for slot, rec in tset.subs.items():
            assert rec.slot == slot and t.records[slot] is rec and rec.topics is tset.topics


@settings(max_examples=150, deadline=None)
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
    for op, i, topics in ops:
        c = conns[i]
        if op == "add" and i not in live:
            t.add(c)
            live.add(i)
        elif op == "remove":
            t.remove(c)
            live.discard(i)
            conns[i] = conn()  # a closed record is never re-added
        elif op == "sub" and i in live and not c.topics and topics:
            t.subscribe(c, tuple(topics))
        elif op == "unsub":
            t.unsubscribe(c)
        check_index(t, conns, live)
    for i in list(live):
        t.remove(conns[i])
    assert len(t) == 0 and t.streams == 0 and t.topics == {} and t.sets == {}

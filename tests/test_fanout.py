"""Tests for ssegw.core.fanout as the server runs it: sweep plans carried out by the real
executor (ssegw.server.flow.Flow) on fake connections (tests/fanout_rig.py).  What is
checked is what a client sees: writes are de-chunked and parsed with the independent SSE
parser."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from fanout_rig import FakeConn, Rig, ev, seen, seqs
from hypothesis import given, settings
from hypothesis import strategies as st

from ssegw.broker.memory import MemoryBroker
from ssegw.core.conn import (
    ACCEPT_STREAM,
    CLOSE,
    CLOSED,
    DROP_BUFFER,
    HOLD,
    KEEP,
    LIVE,
    REQUEST,
    REQUEST_DONE,
    STREAM_OPEN,
    advance,
    verdict,
)
from ssegw.core.history import Event
from ssegw.core.publish import parse_message
from ssegw.core.sse import chunk

# -- the fast path ---------------------------------------------------------------------


def test_one_write_per_connection_per_flush_and_shared_bytes() -> None:
    r = Rig()
    subs = [r.conn("a") for _ in range(5)]
    assert all(c.route == LIVE for c in subs)
    assert r.publish(ev(1, "a"), ev(2, "a"), ev(3, "a")) == 5
    assert r.flush(now_ms=7) == 5
    assert all(len(c.writes) == 1 for c in subs)
    first = subs[0].writes[0]
    assert all(c.writes[0] is first for c in subs), "one bytes object shared by every subscriber"
    assert seqs(subs[0]) == [1, 2, 3]
    assert all(c.last_write_ms == 7 for c in subs)
    assert r.fan.stats.writes == 5 and r.fan.stats.events_delivered == 15
    assert r.fan.stats.last_writes == 5 and r.fan.stats.last_events == 3
    # Nothing dirty: the next flush writes nothing.
    assert r.flush(8) == 0
    assert all(len(c.writes) == 1 for c in subs)


def test_topics_are_isolated() -> None:
    r = Rig()
    a, b = r.conn("a"), r.conn("b")
    r.publish(ev(1, "a"), ev(2, "b"), ev(3, "a"))
    r.flush()
    assert seqs(a) == [1, 3] and seqs(b) == [2]


def test_publish_without_subscribers_queues_nothing() -> None:
    r = Rig()
    assert r.publish(ev(1, "nobody")) == 0
    assert r.fan.dirty == []
    assert r.flush() == 0
    assert "nobody" not in r.table.topics


def test_only_queued_events_are_numbered() -> None:
    """``Event.n`` orders a flush's events for multi-topic streams; an event nobody here
    follows is kept (in history) without a number object of its own, and the numbers of
    queued events still follow the order they were published in."""
    r = Rig()
    r.conn("a", "b")
    evs = [ev(1, "a"), ev(2, "nobody"), ev(3, "b"), ev(4, "nobody"), ev(5, "a")]
    r.publish(*evs)
    assert [e.n for e in evs if e.topic == "nobody"] == [0, 0]
    queued = [e.n for e in evs if e.topic != "nobody"]
    assert queued == sorted(queued) and len(set(queued)) == 3 and 0 not in queued
    more = [ev(6, "nobody"), ev(7, "b"), ev(8, "nobody"), ev(9, "a")]
    r.fan.publish_many(more)  # the worker's path: a whole publish at once
    assert [e.n for e in more] == [0, queued[-1] + 1, 0, queued[-1] + 2]


def test_multi_topic_connection_gets_events_merged_in_seq_order_in_one_write() -> None:
    r = Rig()
    m = r.conn("a", "b", "c")
    a = r.conn("a")
    r.publish(ev(1, "b"), ev(2, "a"), ev(3, "c"), ev(4, "a"), ev(5, "b"))
    r.flush()
    assert len(m.writes) == 1
    assert seqs(m) == [1, 2, 3, 4, 5]
    assert seqs(a) == [2, 4]


def test_multi_topic_connection_with_one_dirty_topic() -> None:
    r = Rig()
    m = r.conn("a", "b")
    r.publish(ev(1, "a"))
    r.flush()
    assert len(m.writes) == 1 and seqs(m) == [1]


def test_non_chunked_connections_get_raw_bytes() -> None:
    r = Rig()
    c1, c2 = r.conn("a"), r.conn("a")
    h1, h2 = r.conn("a", chunked=False), r.conn("a", chunked=False)
    hm = r.conn("a", "b", chunked=False)
    r.publish(ev(1, "a"), ev(2, "b"))
    r.flush()
    raw = ev(1, "a").frame
    assert h1.writes == [raw] and h1.writes[0] is h2.writes[0]
    assert c1.writes == [chunk(raw)] and c1.writes[0] is c2.writes[0]
    assert hm.writes == [raw + ev(2, "b").frame]


def test_same_topic_set_shares_one_bytes_object_and_other_sets_get_their_own() -> None:
    r = Rig()
    m1, m2, m3 = r.conn("a", "b"), r.conn("a", "b"), r.conn("b", "a")  # one set, any order
    m4 = r.conn("a", "b", "c")
    s1, s2, s3 = r.conn("a"), r.conn("a"), r.conn("b")
    r.publish(ev(1, "a"), ev(2, "b"), ev(3, "c"), ev(4, "a"))
    r.flush()
    assert all(len(c.writes) == 1 for c in (m1, m2, m3, m4, s1, s2, s3))
    assert m1.writes[0] is m2.writes[0] is m3.writes[0]
    assert s1.writes[0] is s2.writes[0]
    shared = {id(c.writes[0]) for c in (m1, m4, s1, s3)}
    assert len(shared) == 4, "each distinct topic set (and topic) has its own buffer"
    assert seqs(m1) == seqs(m3) == [1, 2, 4]
    assert seqs(m4) == [1, 2, 3, 4] and seqs(s1) == [1, 4] and seqs(s3) == [2]


@settings(deadline=None, max_examples=60)
@given(
    plan=st.lists(
        st.lists(st.tuples(st.sampled_from("abc"), st.text(max_size=30)), max_size=6), min_size=1, max_size=5
    ),
    chunked=st.booleans(),
)
def test_chunk_framing_is_valid_across_flushes(plan: list[list[tuple[str, str]]], chunked: bool) -> None:
    r = Rig()
    single = r.conn("a", chunked=chunked)
    multi = r.conn("a", "b", "c", chunked=chunked)
    seq = 0
    sent: list[tuple[int, str, str]] = []
    for batch in plan:
        for topic, text in batch:
            seq += 1
            r.publish(ev(seq, topic, text))
            sent.append((seq, topic, text))
        r.flush()
    norm = [(f"e-{s}", t.replace("\r\n", "\n").replace("\r", "\n")) for s, tp, t in sent if tp == "a"]
    assert seen(single) == norm
    assert seen(multi) == [(f"e-{s}", t.replace("\r\n", "\n").replace("\r", "\n")) for s, _, t in sent]
    assert len(single.writes) == sum(1 for b in plan if any(tp == "a" for tp, _ in b))


# -- arrival order across shards ------------------------------------------------------


def test_multi_topic_connection_gets_events_in_arrival_order_not_seq_order() -> None:
    """With several broker shards, seqs of different topics are unrelated: a connection on
    topics of two shards must get a sweep's events in the order they were queued."""
    r = Rig()
    c = r.conn("a", "b")
    c3 = r.conn("a", "b", "c")
    r.publish(ev(10, "a"), ev(3, "b"), ev(7, "c"), ev(11, "a"), ev(4, "b"))
    r.flush()
    assert seqs(c) == [10, 3, 11, 4]
    assert seqs(c3) == [10, 3, 7, 11, 4]


def test_held_multi_topic_events_keep_arrival_order() -> None:
    r = Rig()
    c = r.conn("a", "b")
    r.pause(c)
    r.publish(ev(10, "a"), ev(3, "b"), ev(11, "a"))
    r.flush()
    r.publish(ev(4, "b"))
    r.flush()
    r.resume(c)
    assert seqs(c) == [10, 3, 11, 4]


def test_held_events_of_two_shards_with_the_same_seq_are_both_kept() -> None:
    r = Rig()
    c = r.conn("a", "b")
    r.pause(c)
    r.publish(ev(7, "a"), ev(7, "b"))
    r.flush()
    assert c.backlog is not None and len(c.backlog) == 2


# -- slow consumers --------------------------------------------------------------------


def test_paused_connection_holds_events_and_gets_them_in_one_write_on_resume() -> None:
    r = Rig()
    slow, fast = r.conn("a"), r.conn("a")
    r.pause(slow)
    assert slow.route == HOLD
    r.publish(ev(1, "a"))
    r.flush()
    r.publish(ev(2, "a"), ev(3, "a"))
    r.flush()
    assert slow.writes == [] and len(fast.writes) == 2
    assert slow.backlog is not None
    assert slow.backlog.nbytes == sum(len(ev(i, "a").frame) for i in (1, 2, 3))
    r.resume(slow, now_ms=9)
    assert len(slow.writes) == 1 and seqs(slow) == [1, 2, 3]
    assert not slow.wpaused and slow.backlog is None and slow.route == LIVE
    assert slow.last_write_ms == 9 and slow.progress_ms == 9
    r.resume(slow, 10)  # nothing held: no write
    assert len(slow.writes) == 1
    r.publish(ev(4, "a"))
    r.flush()
    assert seqs(slow) == [1, 2, 3, 4]
    assert r.drops == []


def test_paused_multi_topic_connection_holds_and_resumes() -> None:
    r = Rig()
    m = r.conn("a", "b")
    r.pause(m)
    r.publish(ev(1, "a"))
    r.flush()
    r.publish(ev(2, "b"))
    r.flush()
    assert m.writes == []
    r.resume(m)
    assert len(m.writes) == 1 and seqs(m) == [1, 2]


def test_drop_policy_past_max_buffer_after_grace() -> None:
    size = len(ev(1, "a").frame)
    r = Rig(max_buffer=2 * size, grace_ms=100)
    slow, fast = r.conn("a"), r.conn("a")
    r.pause(slow)
    r.publish(ev(1, "a"), ev(2, "a"))
    r.flush(10)
    assert r.drops == [] and slow.over_ms == 0  # exactly max_buffer is still allowed
    r.publish(ev(3, "a"))
    r.flush(10)
    assert r.drops == [] and slow.over_ms == 10  # over, but a burst is not slowness yet
    r.publish(ev(4, "a"))
    r.flush(109)
    assert r.drops == []
    r.publish(ev(5, "a"))
    r.flush(110)
    assert r.drops == [(slow, "buffer")] and slow.state == CLOSED
    assert seqs(fast) == [1, 2, 3, 4, 5], "a slow client never holds up the others"
    # Closed: nothing more is held for it.
    assert slow.backlog is not None
    held = slow.backlog.nbytes
    r.publish(ev(6, "a"))
    r.flush(111)
    assert slow.backlog.nbytes == held and r.drops == [(slow, "buffer")] and slow.writes == []


def test_drop_policy_for_multi_topic_connection_called_once() -> None:
    size = len(ev(1, "a").frame)
    r = Rig(max_buffer=size)
    m = r.conn("a", "b")
    r.pause(m)
    r.publish(ev(1, "a"), ev(2, "b"), ev(3, "a"), ev(4, "b"))
    r.flush(5)
    assert r.drops == [(m, "buffer")]
    assert m.writes == [] and m.aborts == 1


def test_closed_multi_topic_connection_is_skipped() -> None:
    r = Rig()
    m = r.conn("a", "b")
    advance(m, CLOSE)  # closing during this flush; detached afterwards
    r.publish(ev(1, "a"), ev(2, "b"))
    r.flush()
    assert m.writes == []


def test_conflate_keeps_newest_per_topic_and_key_in_order() -> None:
    r = Rig(conflate=("px",))
    slow = r.conn("px")
    r.pause(slow)
    r.publish(ev(1, "px", "AAPL 1", key="AAPL"), ev(2, "px", "MSFT 1", key="MSFT"), ev(3, "px", "AAPL 2", key="AAPL"))
    r.flush()
    r.publish(ev(4, "px", "GOOG 1", key="GOOG"), ev(5, "px", "MSFT 2", key="MSFT"))
    r.flush()
    assert r.fan.stats.conflated == 2
    assert slow.backlog is not None
    assert slow.backlog.nbytes == sum(
        len(ev(i, "px", t, key=k).frame)
        for i, t, k in [(3, "AAPL 2", "AAPL"), (4, "GOOG 1", "GOOG"), (5, "MSFT 2", "MSFT")]
    )
    r.resume(slow)
    assert len(slow.writes) == 1
    assert seen(slow) == [("e-3", "AAPL 2"), ("e-4", "GOOG 1"), ("e-5", "MSFT 2")]


def test_conflate_without_key_keeps_newest_per_topic() -> None:
    r = Rig(conflate=("p1", "p2"))
    slow = r.conn("p1", "p2")
    r.pause(slow)
    r.publish(ev(1, "p1"), ev(2, "p2"), ev(3, "p1"))
    r.flush()
    r.publish(ev(4, "p2"))
    r.flush()
    r.resume(slow)
    assert seqs(slow) == [3, 4]


def test_conflate_still_drops_past_max_buffer() -> None:
    # Two-digit seqs and one-char keys: every frame has the same length.
    r = Rig(max_buffer=3 * len(ev(10, "px", "v", key="1").frame), conflate=("px",))
    slow = r.conn("px")
    r.pause(slow)
    r.publish(*[ev(i, "px", "v", key=f"{i % 3}") for i in range(10, 13)])
    r.flush(5)
    assert r.drops == []
    r.publish(*[ev(i, "px", "v", key=f"{i % 3}") for i in range(13, 40)])  # the same 3 keys
    r.flush(5)
    assert slow.backlog is not None
    assert r.drops == [] and slow.backlog.nbytes == r.fan.max_buffer
    r.publish(ev(99, "px", "v", key="n"))
    r.flush(5)
    assert r.drops == [(slow, "buffer")]


def test_topic_whose_subscribers_left_before_the_flush_is_deleted() -> None:
    r = Rig()
    c = r.conn("a")
    r.publish(ev(1, "a"))
    r.table.unsubscribe(c)
    assert "a" in r.table.topics  # the batch keeps it alive until the flush
    r.flush()
    assert "a" not in r.table.topics and c.writes == []


@settings(deadline=None, max_examples=80)
@given(
    plan=st.lists(st.tuples(st.lists(st.sampled_from("abc"), max_size=5), st.booleans()), min_size=1, max_size=8),
    budgets=st.lists(st.sampled_from([None, 1, 200]), min_size=4, max_size=4),
)
def test_every_subscriber_sees_each_topic_in_order_exactly_once(
    plan: list[tuple[list[str], bool]], budgets: list[int | None]
) -> None:
    """Random publishes, flushes, pause/resume flips and transports that pause by
    themselves: nothing lost, duplicated or reordered per topic."""
    r = Rig()
    subs = {name: r.conn(*name, budget=b) for name, b in zip(("a", "b", "ab", "abc"), budgets, strict=True)}
    seq = 0
    sent: list[tuple[int, str]] = []
    for i, (topics, flip) in enumerate(plan):
        for t in topics:
            seq += 1
            r.publish(ev(seq, t))
            sent.append((seq, t))
        r.flush(i + 1)
        if flip:
            c = list(subs.values())[i % len(subs)]
            if c.wpaused:
                r.resume(c)
            else:
                r.pause(c)
    for c in subs.values():
        r.drain(c)
    assert r.drops == []
    for name, c in subs.items():
        got = seqs(c)
        assert got == [s for s, t in sent if t in name]
        assert c.transport.paused_writes == 0  # type: ignore[attr-defined]


# -- replays (fan-out together with the stream start) -----------------------------------


def test_replay_is_never_conflated() -> None:
    r = Rig(conflate=("px",))
    c = r.conn("px")
    r.pause(c)
    replay = [ev(1, "px", "A 1", key="A"), ev(2, "px", "A 2", key="A"), ev(3, "px", "B 1", key="B")]
    assert not r.fan.hold(c, replay, r.now, True)
    assert c.backlog is not None and len(c.backlog) == 3 and r.fan.stats.conflated == 0
    r.resume(c)
    assert seqs(c) == [1, 2, 3] and c.backlog is None


def _replay_then_live_update() -> tuple[Rig, FakeConn]:
    """A ticker stream whose replay is still owed (transport paused) when a live update of
    a replayed key arrives."""
    r = Rig(conflate=("px",))
    c = r.conn("px")
    r.pause(c)
    r.fan.hold(c, [ev(1, "px", "A 1", key="A"), ev(2, "px", "A 2", key="A"), ev(3, "px", "B 1", key="B")], r.now, True)
    r.publish(ev(4, "px", "A 3", key="A"))
    r.flush()
    return r, c


def test_live_update_after_a_replay_leaves_nothing_owed_once_drained() -> None:
    r, c = _replay_then_live_update()
    r.resume(c)
    assert c.backlog is None and c.route == LIVE, c.backlog and (c.backlog.live, c.backlog.nbytes, len(c.backlog.q))
    r.publish(ev(5, "px", "C 1", key="C"))
    r.flush()
    assert seqs(c)[-1] == 5, "a writable client's next event waits for a liveness tick"


def test_replayed_events_survive_a_later_live_update_of_their_key() -> None:
    r, c = _replay_then_live_update()
    r.resume(c)
    assert seqs(c) == [1, 2, 3, 4]


def test_broker_events_reach_live_subscribers_once() -> None:
    r = Rig()
    b = MemoryBroker(lambda t: (100, 0), lambda: 0)

    def deliver(events: list[Event]) -> None:
        for e in events:
            r.fan.publish(e)

    asyncio.run(b.start(deliver))
    c = r.conn("a", "b")
    b.publish_now([parse_message({"topic": t, "data": i}, orjson.dumps) for i, t in enumerate("abab")])
    r.flush()
    assert [d for _, d in seen(c)] == ["0", "1", "2", "3"]


def _open_stream(r: Rig, b: MemoryBroker, topics: tuple[str, ...], flush_while_starting: bool) -> FakeConn:
    """As handlers.begin_stream/_start: subscribe (STARTING: live events are held), fetch
    the replay, then owe replay + held events above the floors, and pump."""
    late = FakeConn(r)
    r.table.add(late)
    advance(late, REQUEST)
    advance(late, REQUEST_DONE)
    advance(late, ACCEPT_STREAM)
    r.table.subscribe(late, topics)
    if flush_while_starting:
        b.publish_now([parse_message({"topic": topics[0], "data": "during"}, orjson.dumps)])
        r.flush()
    replay = b.replay_now(topics, None, "earliest")
    if flush_while_starting:
        b.publish_now([parse_message({"topic": topics[0], "data": "after"}, orjson.dumps)])
    floors = replay.floors
    owed = list(replay.events)
    if late.backlog is not None:
        held, late.backlog = late.backlog, None
        owed.extend(e for e in held.take(1 << 62) if e.seq > floors.get(e.topic, 0))
    late.floor = dict(floors) or None
    advance(late, STREAM_OPEN)
    if owed:
        assert not r.fan.hold(late, owed, r.now, True)
    r.flow.pump(late, r.now)
    return late


@pytest.mark.parametrize("flush_while_starting", [False, True])
def test_subscriber_joining_between_publish_and_flush_sees_each_event_once(flush_while_starting: bool) -> None:
    r = Rig()
    b = MemoryBroker(lambda t: (100, 0), lambda: 0)
    asyncio.run(b.start(lambda events: [r.fan.publish(e) for e in events]))
    r.conn("a")  # an existing subscriber keeps the topic live
    b.publish_now([parse_message({"topic": "a", "data": "x"}, orjson.dumps)])
    late = _open_stream(r, b, ("a",), flush_while_starting)
    r.flush()
    b.publish_now([parse_message({"topic": "a", "data": "y"}, orjson.dumps)])
    r.flush()
    # Every event the broker has (x, [during, after,] y) exactly once, in order.
    assert seqs(late) == list(range(1, b.seq + 1)) and b.seq == (4 if flush_while_starting else 2)
    assert [d for _, d in seen(late)][-1] == "y" and late.route == LIVE and late.floor is None


# -- bursts and the grace ---------------------------------------------------------------


def test_burst_far_over_max_buffer_drained_within_grace_is_never_dropped() -> None:
    grace = 5000
    r = Rig(max_buffer=100_000, grace_ms=grace)
    reader = r.conn("a", budget=64 * 1024)
    stuck = r.conn("a", budget=64 * 1024)
    burst = [ev(i, "a", pad=25_000) for i in range(1, 41)]  # ~1 MB, ten times max_buffer
    r.publish(*burst)
    r.flush(1000)
    for c in (reader, stuck):
        assert c.wpaused and c.backlog is not None and c.backlog.nbytes > 8 * r.fan.max_buffer
        assert c.over_ms == 1000
    seq = 40
    t = 1000
    over_at_4s = False
    while t + 50 < 1000 + grace:  # the reader reads (slowly: ~4 s for the burst); events keep coming
        t += 50
        if reader.wpaused and t % 350 == 0:
            r.resume(reader, t)
        if t % 500 == 0:
            seq += 1
            r.publish(ev(seq, "a"))
            r.flush(t)
        if t == 4000:
            over_at_4s = reader.backlog is not None and reader.backlog.nbytes > r.fan.max_buffer
        assert r.drops == [], t
    assert over_at_4s, "the reader was still far behind three seconds into the grace"
    assert reader.backlog is None and reader.over_ms == 0
    assert verdict(stuck, 1000 + grace - 1, grace, 60_000, False) == KEEP
    assert verdict(stuck, 1000 + grace, grace, 60_000, False) == DROP_BUFFER
    r.publish(ev(seq + 1, "a"))
    r.flush(1000 + grace)
    assert r.drops == [(stuck, "buffer")]
    r.drain(reader)
    assert seqs(reader) == list(range(1, seq + 2))

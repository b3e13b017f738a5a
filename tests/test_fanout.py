"""Tests for ssegw.core.fanout: batched broadcast with fake transports (no sockets, no loop).

A fake transport records every ``write``; the written bytes are de-chunked with h11's client
reader and parsed with the independent SSE parser, so what is checked is what a client sees.
"""

from __future__ import annotations

import asyncio

import h11
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from sse_parser import parse

from ssegw.broker.memory import MemoryBroker
from ssegw.core.fanout import Fanout
from ssegw.core.history import Event
from ssegw.core.ids import format_id
from ssegw.core.publish import parse_message
from ssegw.core.sse import chunk, data_lines, encode_body, encode_frame
from ssegw.core.table import CLOSED, STREAM, Conn, Table


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        assert data, "zero-length write"
        self.writes.append(data)


class FakeConn(Conn):
    """A stream record, as the protocol class would be (it subclasses Conn)."""

    def __init__(self, chunked: bool = True) -> None:
        self.init_conn()
        self.transport = FakeTransport()
        self.chunked = chunked
        self.state = STREAM

    @property
    def writes(self) -> list[bytes]:
        return self.transport.writes  # type: ignore[attr-defined]


def dechunk(data: bytes) -> bytes:
    c = h11.Connection(h11.CLIENT)
    c.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    c.send(h11.EndOfMessage())
    c.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + data)
    out = b""
    while True:
        ev = c.next_event()
        if ev is h11.NEED_DATA:
            return out
        assert not isinstance(ev, h11.EndOfMessage), "a zero-length chunk ended the body"
        if isinstance(ev, h11.Data):
            out += ev.data


def seen(c: FakeConn) -> list[tuple[str, str]]:
    """(id, data) of every event the client of ``c`` has received."""
    raw = b"".join(c.writes)
    if c.chunked:
        raw = dechunk(raw)
    return [(e.id, e.data) for e in parse(raw.decode()).events]


def seqs(c: FakeConn) -> list[int]:
    return [int(eid.split("-")[1]) for eid, _ in seen(c)]


def ev(seq: int, topic: str, data: str | None = None, key: str | None = None) -> Event:
    body = encode_body(None, data_lines(data if data is not None else f"{topic}#{seq}"))
    return Event(topic, seq, 0, encode_frame(format_id("e", seq), body), key)


class Rig:
    def __init__(self, max_buffer: int = 1 << 20, conflate: tuple[str, ...] = ()) -> None:
        self.table = Table(conflate_for=lambda t: t in conflate)
        self.drops: list[tuple[Conn, str]] = []
        self.fan = Fanout(self.table, max_buffer, self.on_drop)

    def on_drop(self, c: Conn, reason: str) -> None:
        # As the worker does (abort): the connection is CLOSED at once; detaching from the
        # topic index is deferred to after the flush sweep.
        self.drops.append((c, reason))
        c.state = CLOSED

    def conn(self, *topics: str, chunked: bool = True) -> FakeConn:
        c = FakeConn(chunked)
        self.table.add(c)
        self.table.subscribe(c, topics)
        return c

    def publish(self, *events: Event) -> int:
        q = 0
        for e in events:
            q = self.fan.publish(e)
        return q


# -- the fast path ---------------------------------------------------------------------


def test_one_write_per_connection_per_flush_and_shared_bytes() -> None:
    r = Rig()
    subs = [r.conn("a") for _ in range(5)]
    assert r.publish(ev(1, "a"), ev(2, "a"), ev(3, "a")) == 5
    assert r.fan.flush(now_ms=7) == 5
    assert all(len(c.writes) == 1 for c in subs)
    first = subs[0].writes[0]
    assert all(c.writes[0] is first for c in subs), "one bytes object shared by every subscriber"
    assert seqs(subs[0]) == [1, 2, 3]
    assert all(c.last_write_ms == 7 for c in subs)
    assert r.fan.stats.writes == 5 and r.fan.stats.events_delivered == 15
    # Nothing dirty: the next flush writes nothing.
    assert r.fan.flush(8) == 0
    assert all(len(c.writes) == 1 for c in subs)


def test_topics_are_isolated() -> None:
    r = Rig()
    a, b = r.conn("a"), r.conn("b")
    r.publish(ev(1, "a"), ev(2, "b"), ev(3, "a"))
    r.fan.flush(0)
    assert seqs(a) == [1, 3] and seqs(b) == [2]


def test_publish_without_subscribers_queues_nothing() -> None:
    r = Rig()
    assert r.publish(ev(1, "nobody")) == 0
    assert r.fan.dirty == []
    assert r.fan.flush(0) == 0
    assert "nobody" not in r.table.topics


def test_multi_topic_connection_gets_events_merged_in_seq_order_in_one_write() -> None:
    r = Rig()
    m = r.conn("a", "b", "c")
    a = r.conn("a")
    r.publish(ev(1, "b"), ev(2, "a"), ev(3, "c"), ev(4, "a"), ev(5, "b"))
    r.fan.flush(0)
    assert len(m.writes) == 1
    assert seqs(m) == [1, 2, 3, 4, 5]
    assert seqs(a) == [2, 4]


def test_multi_topic_connection_with_one_dirty_topic() -> None:
    r = Rig()
    m = r.conn("a", "b")
    r.publish(ev(1, "a"))
    r.fan.flush(0)
    assert len(m.writes) == 1 and seqs(m) == [1]


def test_non_chunked_connections_get_raw_bytes() -> None:
    r = Rig()
    c1, c2 = r.conn("a"), r.conn("a")
    h1, h2 = r.conn("a", chunked=False), r.conn("a", chunked=False)
    hm = r.conn("a", "b", chunked=False)
    r.publish(ev(1, "a"), ev(2, "b"))
    r.fan.flush(0)
    raw = ev(1, "a").frame
    assert h1.writes == [raw] and h1.writes[0] is h2.writes[0]
    assert c1.writes == [chunk(raw)] and c1.writes[0] is c2.writes[0]
    assert hm.writes == [raw + ev(2, "b").frame]


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
        r.fan.flush(0)
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
    r.publish(ev(10, "a"), ev(3, "b"), ev(11, "a"), ev(4, "b"))
    r.fan.flush(0)
    assert seqs(c) == [10, 3, 11, 4]


def test_held_events_of_two_shards_with_the_same_seq_are_both_kept() -> None:
    r = Rig()
    c = r.conn("a", "b")
    c.paused = True
    r.publish(ev(7, "a"), ev(7, "b"))
    r.fan.flush(0)
    assert c.pending is not None and len(c.pending) == 2


# -- slow consumers --------------------------------------------------------------------


def test_paused_connection_holds_events_and_gets_them_in_one_write_on_resume() -> None:
    r = Rig()
    slow, fast = r.conn("a"), r.conn("a")
    slow.paused = True
    r.publish(ev(1, "a"))
    r.fan.flush(0)
    r.publish(ev(2, "a"), ev(3, "a"))
    r.fan.flush(0)
    assert slow.writes == [] and len(fast.writes) == 2
    assert slow.pending_bytes == sum(len(ev(i, "a").frame) for i in (1, 2, 3))
    r.fan.resume(slow, now_ms=9)
    assert len(slow.writes) == 1 and seqs(slow) == [1, 2, 3]
    assert not slow.paused and slow.pending is None and slow.pending_bytes == 0
    assert slow.last_write_ms == 9
    r.fan.resume(slow, 10)  # nothing held: no write
    assert len(slow.writes) == 1
    r.publish(ev(4, "a"))
    r.fan.flush(0)
    assert seqs(slow) == [1, 2, 3, 4]
    assert r.drops == []


def test_paused_multi_topic_connection_holds_and_resumes() -> None:
    r = Rig()
    m = r.conn("a", "b")
    m.paused = True
    r.publish(ev(1, "a"))
    r.fan.flush(0)
    r.publish(ev(2, "b"))
    r.fan.flush(0)
    assert m.writes == []
    r.fan.resume(m, 0)
    assert len(m.writes) == 1 and seqs(m) == [1, 2]


def test_paused_multi_topic_connection_resumes_in_seq_order() -> None:
    r = Rig()
    m = r.conn("a", "b")
    m.paused = True
    r.publish(ev(1, "a"), ev(2, "b"), ev(3, "a"))
    r.fan.flush(0)
    r.fan.resume(m, 0)
    assert seqs(m) == [1, 2, 3]


def test_drop_policy_past_max_buffer() -> None:
    size = len(ev(1, "a").frame)
    r = Rig(max_buffer=2 * size)
    slow, fast = r.conn("a"), r.conn("a")
    slow.paused = True
    r.publish(ev(1, "a"), ev(2, "a"))
    r.fan.flush(0)
    assert r.drops == []  # exactly max_buffer is still allowed
    r.publish(ev(3, "a"))
    r.fan.flush(0)
    assert r.drops == [(slow, "buffer")]
    assert seqs(fast) == [1, 2, 3], "a slow client never holds up the others"
    # Closed: nothing more is held for it.
    held = slow.pending_bytes
    r.publish(ev(4, "a"))
    r.fan.flush(0)
    assert slow.pending_bytes == held and r.drops == [(slow, "buffer")]


def test_drop_policy_for_multi_topic_connection_called_once() -> None:
    size = len(ev(1, "a").frame)
    r = Rig(max_buffer=size)
    m = r.conn("a", "b")
    m.paused = True
    r.publish(ev(1, "a"), ev(2, "b"), ev(3, "a"), ev(4, "b"))
    r.fan.flush(0)
    assert r.drops == [(m, "buffer")]
    assert m.writes == []


def test_closed_multi_topic_connection_is_skipped() -> None:
    r = Rig()
    m = r.conn("a", "b")
    m.state = CLOSED  # closing during this flush; detached afterwards
    r.publish(ev(1, "a"), ev(2, "b"))
    r.fan.flush(0)
    assert m.writes == []


def test_conflate_keeps_newest_per_topic_and_key_in_seq_order() -> None:
    r = Rig(conflate=("px",))
    slow = r.conn("px")
    slow.paused = True
    r.publish(ev(1, "px", "AAPL 1", key="AAPL"), ev(2, "px", "MSFT 1", key="MSFT"), ev(3, "px", "AAPL 2", key="AAPL"))
    r.fan.flush(0)
    r.publish(ev(4, "px", "GOOG 1", key="GOOG"), ev(5, "px", "MSFT 2", key="MSFT"))
    r.fan.flush(0)
    assert r.fan.stats.conflated == 2
    assert slow.pending_bytes == sum(
        len(ev(i, "px", t, key=k).frame)
        for i, t, k in [(3, "AAPL 2", "AAPL"), (4, "GOOG 1", "GOOG"), (5, "MSFT 2", "MSFT")]
    )
    r.fan.resume(slow, 0)
    assert len(slow.writes) == 1
    assert seen(slow) == [("e-3", "AAPL 2"), ("e-4", "GOOG 1"), ("e-5", "MSFT 2")]


def test_conflate_without_key_keeps_newest_per_topic() -> None:
    r = Rig(conflate=("p1", "p2"))
    slow = r.conn("p1", "p2")
    slow.paused = True
    r.publish(ev(1, "p1"), ev(2, "p2"), ev(3, "p1"))
    r.fan.flush(0)
    r.publish(ev(4, "p2"))
    r.fan.flush(0)
    r.fan.resume(slow, 0)
    assert seqs(slow) == [3, 4]


def test_conflate_still_drops_past_max_buffer() -> None:
    # Two-digit seqs and one-char keys: every frame has the same length.
    r = Rig(max_buffer=3 * len(ev(10, "px", "v", key="1").frame), conflate=("px",))
    slow = r.conn("px")
    slow.paused = True
    r.publish(*[ev(i, "px", "v", key=f"{i % 3}") for i in range(10, 13)])
    r.fan.flush(0)
    assert r.drops == []
    r.publish(*[ev(i, "px", "v", key=f"{i % 3}") for i in range(13, 40)])  # the same 3 keys
    r.fan.flush(0)
    assert r.drops == [] and slow.pending_bytes == r.fan.max_buffer
    r.publish(ev(99, "px", "v", key="n"))
    r.fan.flush(0)
    assert r.drops == [(slow, "buffer")]


def test_topic_whose_subscribers_left_before_the_flush_is_deleted() -> None:
    r = Rig()
    c = r.conn("a")
    r.publish(ev(1, "a"))
    r.table.unsubscribe(c)
    assert "a" in r.table.topics  # the batch keeps it alive until the flush
    r.fan.flush(0)
    assert "a" not in r.table.topics and c.writes == []


@settings(deadline=None, max_examples=80)
@given(
    plan=st.lists(st.tuples(st.lists(st.sampled_from("abc"), max_size=5), st.booleans()), min_size=1, max_size=8),
)
def test_every_subscriber_sees_each_topic_in_order_exactly_once(plan: list[tuple[list[str], bool]]) -> None:
    """Random publishes, flushes and pause/resume flips: nothing lost, duplicated or reordered per topic."""
    r = Rig()
    subs = {name: r.conn(*name) for name in ("a", "b", "ab", "abc")}
    seq = 0
    sent: list[tuple[int, str]] = []
    for i, (topics, flip) in enumerate(plan):
        for t in topics:
            seq += 1
            r.publish(ev(seq, t))
            sent.append((seq, t))
        r.fan.flush(0)
        if flip:
            c = list(subs.values())[i % len(subs)]
            if c.paused:
                r.fan.resume(c, 0)
            else:
                c.paused = True
    for c in subs.values():
        if c.paused:
            r.fan.resume(c, 0)
    for name, c in subs.items():
        got = seqs(c)
        for t in name:
            assert [s for s in got if (s, t) in sent] == [s for s, tt in sent if tt == t]
        assert sorted(got) == [s for s, t in sent if t in name]


# -- fan-out together with the reference broker (the handler's open_stream order) --------


def test_broker_events_reach_live_subscribers_once() -> None:
    r = Rig()
    clock_ms = [0]
    b = MemoryBroker(lambda t: (100, 0), lambda: clock_ms[0])

    def deliver(events: list[Event]) -> None:
        for e in events:
            r.fan.publish(e)

    asyncio.run(b.start(deliver))
    c = r.conn("a", "b")
    b.publish_now([parse_message({"topic": t, "data": i}, orjson.dumps) for i, t in enumerate("abab")])
    r.fan.flush(0)
    assert [d for _, d in seen(c)] == ["0", "1", "2", "3"]


def test_subscriber_joining_between_publish_and_flush_sees_each_event_once() -> None:
    r = Rig()
    b = MemoryBroker(lambda t: (100, 0), lambda: 0)
    asyncio.run(b.start(lambda events: [r.fan.publish(e) for e in events]))
    r.conn("a")  # an existing subscriber keeps the topic live
    b.publish_now([parse_message({"topic": "a", "data": "x"}, orjson.dumps)])
    # A new stream opens before the flush (as handlers.open_stream does): hold, subscribe,
    # replay, start the stream with the replay (plus anything held), then go live.
    late = FakeConn()
    r.table.add(late)
    late.paused = True
    r.table.subscribe(late, ("a",))
    replay = b.replay_now(("a",), None, "earliest")
    held = list((late.pending or {}).values())
    late.pending = None
    late.paused = False
    floors = replay.floors
    late.transport.write(
        chunk(
            b"".join(
                [e.frame for e in replay.events]  # type: ignore[attr-defined]
                + [e.frame for e in held if e.seq > floors.get(e.topic, 0)]
            )
        )
    )
    late.floor = dict(floors) or None  # as handlers._start does
    r.fan.flush(0)
    ids = [eid for eid, _ in seen(late)]
    assert len(ids) == len(set(ids)) == 1

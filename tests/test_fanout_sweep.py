"""The sliced sweep, carried out by the real executor (server/flow.py): a pass over many
subscribers in slices, with events published between slices joining the pass for
subscribers not written yet ("catch-up"); shared writes cut into segments that stop at a
paused transport; and a write that raises closing only its own connection.  Whatever the
interleaving, every subscriber gets every event of its topics once, in publish order."""

from __future__ import annotations

import pytest
from fanout_rig import FakeConn, Rig, ev, seqs
from hypothesis import given, settings
from hypothesis import strategies as st

from ssegw.core.conn import CLOSED, HOLD, LIVE
from ssegw.core.fanout import SEGMENT_BYTES, Plan, segments


def written(plan: Plan) -> int:
    return sum(len(conns) for conns, _ in plan.shared) + len(plan.single)


def test_catch_up_reaches_the_rest_of_the_pass_and_is_not_sent_twice() -> None:
    r = Rig()
    subs = [r.conn("a") for _ in range(30)]
    r.publish(ev(1, "a"))
    done, plan = r.step(0, 10)  # first 10 get event 1
    assert not done and written(plan) == 10
    r.publish(ev(2, "a"))  # published mid-pass
    done, plan = r.step(0, 10)  # next 10 get events 1 and 2 in one write
    assert not done and written(plan) == 10
    assert all(seqs(c) == [1] for c in subs[:10])
    assert all(seqs(c) == [1, 2] and len(c.writes) == 1 for c in subs[10:20])
    assert all(c.floor == {"a": 2} and c.route == HOLD for c in subs[10:20])
    done, _ = r.step(0, 100)
    assert done
    assert all(seqs(c) == [1, 2] for c in subs[20:])
    assert r.fan.stats.caught_up == 1
    # The next sweep carries event 2 (for the first ten) and event 3 (for everyone).
    r.publish(ev(3, "a"))
    assert r.flush(0) == 30
    assert all(seqs(c) == [1, 2, 3] for c in subs), [seqs(c) for c in subs]
    # Back on the fast path: every floor is gone after an event above it.
    assert all(c.floor is None and c.route == LIVE for c in subs)


def test_catch_up_for_a_paused_subscriber_is_held_with_its_floor() -> None:
    r = Rig()
    subs = [r.conn("a") for _ in range(4)]
    r.pause(subs[3])
    r.publish(ev(1, "a"))
    r.step(0, 2)
    r.publish(ev(2, "a"))
    r.flush(0)
    assert subs[3].floor == {"a": 2} and subs[3].backlog is not None and len(subs[3].backlog) == 2
    r.publish(ev(3, "a"))
    r.flush(0)
    r.resume(subs[3])
    assert all(seqs(c) == [1, 2, 3] for c in subs)


@settings(max_examples=150, deadline=None)
@given(
    plan=st.lists(
        st.tuples(
            st.sampled_from(["pub_a", "pub_b", "step", "pause", "resume"]),
            st.integers(min_value=0, max_value=40),
            st.integers(min_value=1, max_value=12),
        ),
        max_size=60,
    ),
    kinds=st.lists(st.sampled_from([("a",), ("b",), ("a", "b")]), min_size=1, max_size=25),
    budget=st.sampled_from([None, 1, 100]),
)
def test_any_interleaving_delivers_everything_once_in_order(plan, kinds, budget) -> None:
    r = Rig()
    conns: list[FakeConn] = [r.conn(*k, budget=budget if i % 3 == 0 else None) for i, k in enumerate(kinds)]
    published: dict[str, list[int]] = {"a": [], "b": []}
    seq = 0
    for op, idx, quota in plan:
        c = conns[idx % len(conns)]
        if op in ("pub_a", "pub_b"):
            topic = op[-1]
            seq += 1
            r.publish(ev(seq, topic))
            published[topic].append(seq)
        elif op == "step":
            r.step(0, quota)
        elif op == "pause":
            r.pause(c)
        else:
            r.resume(c)
    r.flush(0)
    r.flush(0)  # events caught up in a pass are written to the rest in the next one
    for c in conns:
        r.drain(c)
    assert r.drops == []
    for c, k in zip(conns, kinds, strict=True):
        got = seqs(c)
        want = sorted(s for t in k for s in published[t])
        assert got == want, (k, got, want)
        assert c.transport.paused_writes == 0  # type: ignore[attr-defined]


# -- one failing write ------------------------------------------------------------------
# Reproduced defect: "one failing write wedges a whole flush".  The write that raises must
# close its own connection and nothing else; the pass and later passes go on.


@pytest.mark.parametrize("quota", [1, 3, 1 << 30])
@pytest.mark.parametrize("bad_at", [0, 2, 5])
def test_a_raising_write_closes_only_its_connection(quota: int, bad_at: int) -> None:
    r = Rig()
    singles = [r.conn("a") for _ in range(6)]
    multis = [r.conn("a", "b") for _ in range(3)]
    bees = [r.conn("b") for _ in range(2)]
    bad, bad_m = singles[bad_at], multis[bad_at % 3]
    bad.transport.broken = bad_m.transport.broken = True  # type: ignore[attr-defined]
    seq = 0
    sent: list[tuple[int, str]] = []
    for _flush in range(3):
        for t in "abab":
            seq += 1
            r.publish(ev(seq, t))
            sent.append((seq, t))
        r.flush(0, quota)
    for c in (bad, bad_m):
        assert c.aborts == 1 and c.state == CLOSED and c.slot == -1 and c.writes == []
    assert r.fan.stats.write_errors == 2 and r.drops == []
    for c in singles + multis + bees:
        if c in (bad, bad_m):
            continue
        assert seqs(c) == [s for s, t in sent if t in c.topics], c.topics
        assert len(c.writes) == 3  # one write per flush
    assert r.table.subscribers("a") == 7 and r.table.subscribers("b") == 4


def test_a_raising_write_of_a_multi_segment_shared_write() -> None:
    r = Rig()
    subs = [r.conn("a") for _ in range(4)]
    subs[1].transport.broken = True  # type: ignore[attr-defined]
    r.publish(*[ev(i, "a", pad=30_000) for i in range(1, 6)])  # several segments
    r.flush(0)
    r.publish(ev(6, "a"))
    r.flush(0)
    assert subs[1].state == CLOSED and subs[1].aborts == 1
    for c in (subs[0], subs[2], subs[3]):
        assert seqs(c) == [1, 2, 3, 4, 5, 6]


def test_a_raising_write_of_a_connection_with_its_own_events() -> None:
    # Subscribers that caught up mid-pass carry a floor: the next pass filters once per
    # floor value and writes them one shared buffer (a group of their own in Plan.shared).
    r = Rig()
    subs = [r.conn("a") for _ in range(6)]
    r.publish(ev(1, "a"))
    r.step(0, 2)
    r.publish(ev(2, "a"))
    r.flush(0)
    assert all(c.floor is not None for c in subs[2:])
    subs[3].transport.broken = True  # type: ignore[attr-defined]
    r.publish(ev(3, "a"))
    done, plan = r.step(0, 1 << 30)
    assert done and not plan.single
    assert sorted(len(conns) for conns, _ in plan.shared) == [2, 4]
    floored = next(conns for conns, _ in plan.shared if len(conns) == 4)
    assert floored == subs[2:]
    assert subs[3].state == CLOSED
    r.publish(ev(4, "a"))
    r.flush(0)
    for c in subs[:3] + subs[4:]:
        assert seqs(c) == [1, 2, 3, 4]


def test_a_raising_write_while_pumping_a_backlog() -> None:
    r = Rig()
    slow, other = r.conn("a"), r.conn("a")
    r.pause(slow)
    r.pause(other)
    r.publish(ev(1, "a"), ev(2, "a"))
    r.flush(0)
    slow.transport.broken = True  # type: ignore[attr-defined]
    r.resume(slow)
    r.resume(other)
    assert slow.state == CLOSED and slow.aborts == 1
    assert seqs(other) == [1, 2] and other.backlog is None


@settings(max_examples=100, deadline=None)
@given(
    kinds=st.lists(
        st.tuples(st.sampled_from([("a",), ("b",), ("a", "b"), ("a", "b", "c")]), st.booleans()),
        min_size=1,
        max_size=12,
    ),
    rounds=st.lists(st.tuples(st.lists(st.sampled_from("abc"), max_size=6), st.integers(1, 5)), max_size=6),
)
def test_broken_connections_never_cost_others_an_event(kinds, rounds) -> None:
    r = Rig()
    conns = [(r.conn(*k), broken) for k, broken in kinds]
    for c, broken in conns:
        c.transport.broken = broken  # type: ignore[attr-defined]
    sent: list[tuple[int, str]] = []
    for topics, quota in rounds:
        for t in topics:
            sent.append((len(sent) + 1, t))
            r.publish(ev(len(sent), t))
        r.flush(0, quota)
    r.flush(0)
    for c, broken in conns:
        if broken:
            assert c.writes == [] and (c.state == CLOSED) == (c.aborts == 1)
        else:
            assert c.state != CLOSED and seqs(c) == [s for s, t in sent if t in c.topics]


# -- segments and paused transports -------------------------------------------------------


def test_segments_cut_at_the_limit_and_keep_order() -> None:
    evs = [ev(i, "a", pad=20_000) for i in range(1, 8)]
    segs = segments(evs)
    assert len(segs) > 1
    assert [e for s in segs for e in s.events] == evs
    for s in segs:
        assert s.raw == b"".join(e.frame for e in s.events)
        assert len(s.raw) <= SEGMENT_BYTES or len(s.events) == 1
    one = segments([ev(1, "a", pad=SEGMENT_BYTES * 2)])
    assert len(one) == 1 and len(one[0].events) == 1  # a single larger event is its own segment
    assert segments([]) == []


def test_shared_write_larger_than_a_segment_stops_at_the_pause_and_the_rest_is_pumped() -> None:
    r = Rig()
    fast = r.conn("big")
    slow = r.conn("big", budget=1)  # pauses after its first write
    burst = [ev(i, "big", pad=30_000) for i in range(1, 9)]  # ~240 KB: four segments
    r.publish(*burst)
    r.flush(5)
    segs = len(fast.writes)
    assert segs >= 3 and seqs(fast) == list(range(1, 9))
    assert len(slow.writes) == 1 and slow.writes[0] is fast.writes[0], "segments are shared bytes"
    assert slow.wpaused and slow.route == HOLD
    assert slow.backlog is not None
    first = len(seqs(slow))
    assert len(slow.backlog) == 8 - first and slow.backlog.nbytes == sum(len(e.frame) for e in burst[first:])
    r.publish(ev(9, "big"))  # later events queue behind the backlog
    r.flush(6)
    assert len(slow.writes) == 1
    resumes = r.drain(slow, 7)
    assert resumes > 1
    assert seqs(slow) == list(range(1, 10)) and seqs(fast) == list(range(1, 10))
    assert slow.backlog is None and slow.route == HOLD  # the last pumped write paused it again
    r.resume(slow, 8)  # the client reads it: back on the fast path
    assert slow.route == LIVE and len(seqs(slow)) == 9
    assert slow.transport.paused_writes == 0  # type: ignore[attr-defined]
    assert r.drops == []


def test_user_space_output_stays_within_the_high_water_mark_plus_one_segment() -> None:
    hwm = 64 * 1024
    big = 20_000
    r = Rig(max_buffer=1 << 24)
    c = r.conn("a", budget=hwm)
    burst = [ev(i, "a", pad=big) for i in range(1, 101)]  # ~2 MB
    r.publish(*burst)
    r.flush(1)
    # What the transport holds: up to the mark, plus the write that crossed it (one
    # segment; a pumped one may run one event past SEGMENT_BYTES), plus chunk framing.
    bound = hwm + SEGMENT_BYTES + big + 200
    assert c.transport.buffered <= bound  # type: ignore[attr-defined]
    for _ in range(1000):
        if c.backlog is None:
            break
        r.resume(c)
        assert c.transport.buffered <= bound  # type: ignore[attr-defined]
    assert seqs(c) == list(range(1, 101))


@pytest.mark.parametrize("chunked", [True, False])
def test_a_burst_to_an_http10_or_chunked_stream_survives_pauses(chunked: bool) -> None:
    r = Rig()
    c = r.conn("a", "b", chunked=chunked, budget=50_000)
    r.publish(*[ev(i, "ab"[i % 2], pad=9_000) for i in range(1, 40)])
    r.flush(1)
    r.drain(c)
    assert seqs(c) == list(range(1, 40))

"""The sliced sweep: a pass over many subscribers in slices, with events published between
slices joining the pass for subscribers not written yet ("catch-up").  Whatever the
interleaving, every subscriber gets every event of its topics once, in publish order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from test_fanout import FakeConn, Rig, ev, seqs


def test_catch_up_reaches_the_rest_of_the_pass_and_is_not_sent_twice() -> None:
    r = Rig()
    subs = [r.conn("a") for _ in range(30)]
    r.publish(ev(1, "a"))
    done, w = r.fan.sweep_step(0, 10)  # first 10 get event 1
    assert not done and w == 10
    r.publish(ev(2, "a"))  # published mid-pass
    done, w = r.fan.sweep_step(0, 10)  # next 10 get events 1 and 2 in one write
    assert not done and w == 10
    assert all(seqs(c) == [1] for c in subs[:10])
    assert all(seqs(c) == [1, 2] and len(c.writes) == 1 for c in subs[10:20])
    done, _ = r.fan.sweep_step(0, 100)
    assert done
    assert all(seqs(c) == [1, 2] for c in subs[20:])
    assert r.fan.stats.caught_up == 1
    # The next sweep carries event 2 (for the first ten) and event 3 (for everyone).
    r.publish(ev(3, "a"))
    assert r.fan.flush(0) == 30
    assert all(seqs(c) == [1, 2, 3] for c in subs), [seqs(c) for c in subs]
    # Back on the fast path: every floor is gone after an event above it.
    assert all(c.floor is None for c in subs)


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
)
def test_any_interleaving_delivers_everything_once_in_order(plan, kinds) -> None:
    r = Rig()
    conns: list[FakeConn] = [r.conn(*k) for k in kinds]
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
            r.fan.sweep_step(0, quota)
        elif op == "pause":
            c.paused = True
        else:
            r.fan.resume(c, 0)
    for c in conns:
        r.fan.resume(c, 0)
    r.fan.flush(0)
    for c in conns:
        r.fan.resume(c, 0)
    for c, k in zip(conns, kinds, strict=True):
        got = seqs(c)
        want = sorted(s for t in k for s in published[t])
        assert got == want, (k, got, want)

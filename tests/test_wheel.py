"""Tests for ssegw.core.wheel: a fake integer clock, no sleeping.

Small wheels (bits=2, levels=3: 4 buckets a level, levels reach 4, 16 and 64 ticks) make
cascades and the beyond-horizon clamp happen within a few dozen ticks.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssegw.core.wheel import Timer, TimerWheel


def level_of(wheel: TimerWheel, timer: Timer) -> int | None:
    """Which level's bucket holds ``timer`` (white-box: proves a cascade path is taken)."""
    for level, row in enumerate(wheel._wheel):
        if any(t is timer for bucket in row for t in bucket):
            return level
    return None


def stored(wheel: TimerWheel) -> int:
    """How many Timer objects the wheel still references (live or cancelled)."""
    return len(wheel._due) + sum(len(b) for row in wheel._wheel for b in row)


def walk(wheel: TimerWheel, until_ms: int, step_ms: int) -> list[tuple[int, Timer]]:
    """Advance in ``step_ms`` steps; return (now_ms, timer) for every timer fired."""
    fired: list[tuple[int, Timer]] = []
    now = wheel.now_ms
    while now < until_ms:
        now = min(now + step_ms, until_ms)
        fired.extend((now, t) for t in wheel.advance(now))
    return fired


# -- firing time ---------------------------------------------------------------------


def test_fires_at_rounded_up_tick_never_early() -> None:
    wheel = TimerWheel(tick_ms=10, now_ms=0)
    t25 = wheel.schedule(25, 1, "a")  # tick 3 (30 ms): 25 rounds up
    t30 = wheel.schedule(30, 1, "b")  # tick 3 exactly
    t31 = wheel.schedule(31, 1, "c")  # tick 4
    assert wheel.advance(24) == []
    assert wheel.advance(29) == []  # deadline 25 passed, but its tick (30) has not
    assert wheel.advance(30) == [t25, t30]
    assert wheel.advance(39) == []
    assert wheel.advance(40) == [t31]
    assert all(t.deadline_ms <= 40 for t in (t25, t30, t31))


@pytest.mark.parametrize("start_tick", [0, 1, 3, 5, 13, 63])
@pytest.mark.parametrize("delta", [1, 2, 3, 4, 5, 15, 16, 17, 63, 64, 65, 100, 255, 256])
def test_every_delta_fires_exactly_on_its_tick(start_tick: int, delta: int) -> None:
    # Covers every level boundary (4, 16, 64 = horizon) from aligned and unaligned starts.
    wheel = TimerWheel(tick_ms=1, now_ms=start_tick, bits=2, levels=3)
    timer = wheel.schedule(start_tick + delta, 0, "x")
    fired = walk(wheel, start_tick + delta + 10, step_ms=1)
    assert fired == [(start_tick + delta, timer)]


@pytest.mark.parametrize("deadline", [4, 16, 64, 32, 48, 128, 192])
def test_deadline_on_level_boundary_from_zero(deadline: int) -> None:
    wheel = TimerWheel(tick_ms=1, now_ms=0, bits=2, levels=3)
    timer = wheel.schedule(deadline, 0, "x")
    assert wheel.advance(deadline - 1) == []
    assert wheel.advance(deadline) == [timer]


# -- cascading -----------------------------------------------------------------------


def test_cascade_level1_to_level0() -> None:
    wheel = TimerWheel(tick_ms=1, now_ms=0, bits=2, levels=3)
    timer = wheel.schedule(6, 0, "x")  # delta 6: level 1
    assert level_of(wheel, timer) == 1
    assert wheel.advance(3) == []
    assert level_of(wheel, timer) == 1
    assert wheel.advance(4) == []  # crossing 4 cascades level 1
    assert level_of(wheel, timer) == 0
    assert wheel.advance(5) == []
    assert wheel.advance(6) == [timer]


def test_cascade_level2_to_1_to_0() -> None:
    wheel = TimerWheel(tick_ms=1, now_ms=0, bits=2, levels=3)
    timer = wheel.schedule(41, 0, "x")  # delta 41 >= 16: level 2
    assert level_of(wheel, timer) == 2
    assert wheel.advance(31) == []
    assert level_of(wheel, timer) == 2
    assert wheel.advance(32) == []  # 32 is a multiple of 16: 41 - 32 = 9 -> level 1
    assert level_of(wheel, timer) == 1
    assert wheel.advance(39) == []
    assert wheel.advance(40) == []  # multiple of 4: 41 - 40 = 1 -> level 0
    assert level_of(wheel, timer) == 0
    assert wheel.advance(41) == [timer]


def level_history(wheel: TimerWheel, timer: Timer) -> list[tuple[int, int | None]]:
    """Walk one tick at a time until ``timer`` fires; (tick, level) at each level change."""
    history = [(wheel.now_ms, level_of(wheel, timer))]
    while not wheel.advance(wheel.now_ms + 1):
        level = level_of(wheel, timer)
        if level != history[-1][1]:
            history.append((wheel.now_ms, level))
    history.append((wheel.now_ms, None))
    return history


@pytest.mark.parametrize(
    ("deadline", "expected"),
    [
        # 230 - 192 = 38 -> level 2; at 224: 6 -> level 1; at 228: 2 -> level 0.
        (230, [(0, 3), (192, 2), (224, 1), (228, 0), (230, None)]),
        # 201 - 192 = 9 skips level 2; at 200: 1 -> level 0.
        (201, [(0, 3), (192, 1), (200, 0), (201, None)]),
        # 256 is a multiple of 64, 16 and 4: it drops from level 3 straight to firing.
        (256, [(0, 3), (256, None)]),
    ],
)
def test_cascade_through_four_levels(deadline: int, expected: list[tuple[int, int | None]]) -> None:
    wheel = TimerWheel(tick_ms=1, now_ms=0, bits=2, levels=4)
    assert level_history(wheel, wheel.schedule(deadline, 0, "x")) == expected


def test_clamp_beyond_horizon_walking() -> None:
    wheel = TimerWheel(tick_ms=1, now_ms=0, bits=2, levels=3)  # horizon 64 ticks
    far = wheel.schedule(1000, 0, "far")
    near = wheel.schedule(63, 0, "near")
    assert level_of(wheel, far) == 2
    fired = walk(wheel, 1100, step_ms=7)  # 7 < 64: tick-by-tick path
    assert fired == [(63, near), (1001, far)]  # 1001 is the first step >= 1000


def test_clamp_beyond_horizon_exact_tick() -> None:
    wheel = TimerWheel(tick_ms=1, now_ms=5, bits=2, levels=3)
    timers = [wheel.schedule(d, 0, d) for d in (69, 70, 131, 500, 4096, 4097)]
    fired = walk(wheel, 5000, step_ms=1)
    assert fired == [(t.deadline_ms, t) for t in timers]


# -- cancel and len ------------------------------------------------------------------


def test_cancel_before_fire() -> None:
    wheel = TimerWheel(tick_ms=10, now_ms=0)
    keep = wheel.schedule(50, 0, "keep")
    drop = wheel.schedule(50, 0, "drop")
    wheel.cancel(drop)
    assert not drop.active and drop.target is None
    assert keep.active
    assert len(wheel) == 1
    assert wheel.advance(100) == [keep]
    assert len(wheel) == 0


def test_cancel_after_cascade() -> None:
    wheel = TimerWheel(tick_ms=1, now_ms=0, bits=2, levels=3)
    timer = wheel.schedule(40, 0, "x")
    other = wheel.schedule(40, 0, "y")
    wheel.advance(33)
    assert level_of(wheel, timer) == 1  # cascaded from level 2 at 32
    wheel.cancel(timer)
    assert len(wheel) == 1
    assert wheel.advance(39) == []
    assert level_of(wheel, timer) == 1  # lazy: still in its bucket
    assert wheel.advance(40) == [other]
    assert level_of(wheel, timer) is None  # dropped when that bucket was processed
    assert len(wheel) == 0


def test_double_cancel_is_harmless() -> None:
    wheel = TimerWheel(tick_ms=1, now_ms=0)
    a = wheel.schedule(5, 0, "a")
    b = wheel.schedule(5, 0, "b")
    wheel.cancel(a)
    wheel.cancel(a)
    assert len(wheel) == 1
    assert wheel.advance(5) == [b]
    assert len(wheel) == 0


def test_cancel_after_fire_keeps_len() -> None:
    wheel = TimerWheel(tick_ms=1, now_ms=0)
    a = wheel.schedule(5, 0, "a")
    b = wheel.schedule(9, 0, "b")
    assert wheel.advance(5) == [a]
    assert len(wheel) == 1
    wheel.cancel(a)  # a callback cancelling its own, already fired timer
    assert len(wheel) == 1
    assert not a.active  # so a dispatcher checking .active skips it
    assert wheel.advance(9) == [b]
    assert len(wheel) == 0


def test_len_accounting() -> None:
    wheel = TimerWheel(tick_ms=10, now_ms=100)
    assert len(wheel) == 0
    timers = [wheel.schedule(100 + 10 * i, i, i) for i in range(6)]  # first one is due
    assert len(wheel) == 6
    wheel.cancel(timers[1])
    wheel.cancel(timers[4])
    assert len(wheel) == 4
    assert wheel.advance(120) == [timers[0], timers[2]]
    assert len(wheel) == 2
    wheel.schedule(50, 9, "past")
    assert len(wheel) == 3
    assert [t.kind for t in wheel.advance(10_000)] == [9, 3, 5]
    assert len(wheel) == 0


def test_cancelled_timers_are_dropped_from_memory() -> None:
    wheel = TimerWheel(tick_ms=1, now_ms=0, bits=2, levels=3)
    timers = [wheel.schedule(d, 0, d) for d in range(1, 300)]
    timers += [wheel.schedule(0, 0, "past") for _ in range(10)]
    for t in timers:
        wheel.cancel(t)
    assert len(wheel) == 0
    assert stored(wheel) == len(timers)  # lazy: nothing removed yet
    wheel.advance(300)
    assert stored(wheel) == 0


# -- time jumps ----------------------------------------------------------------------


def test_purge_drops_cancelled_timers_at_once_and_keeps_the_rest_in_order() -> None:
    wheel = TimerWheel(tick_ms=10, now_ms=0, bits=2, levels=3)
    timers = [wheel.schedule(10 * (1 + i % 40), i, i) for i in range(200)]
    for t in timers[::2]:
        wheel.cancel(t)
    assert stored(wheel) == 200  # lazy
    assert wheel.purge() == 100
    assert stored(wheel) == wheel.stored == len(wheel) == 100
    fired = [t.kind for _, t in walk(wheel, 1000, 10)]
    assert fired == sorted((i for i in range(1, 200, 2)), key=lambda i: (i % 40, i))


def test_rearm_reuses_a_fired_timer_and_fires_it_again_on_time() -> None:
    wheel = TimerWheel(tick_ms=10, now_ms=0, bits=2, levels=3)
    t = wheel.schedule(30, 7, "stream")
    assert wheel.advance(30) == [t]
    assert wheel.rearm(t, 250) is t
    assert len(wheel) == 1 and wheel.stored == stored(wheel) == 1
    fired = walk(wheel, 400, 10)
    assert fired == [(250, t)] and (t.kind, t.target, t.deadline_ms) == (7, "stream", 250)
    assert wheel.rearm(t, 100) is t  # a deadline already passed: the next advance
    assert wheel.advance(401) == [t]


def test_rearm_refuses_a_scheduled_or_cancelled_timer() -> None:
    wheel = TimerWheel(tick_ms=10, now_ms=0)
    t = wheel.schedule(30, 1, "x")
    with pytest.raises(ValueError):
        wheel.rearm(t, 60)  # still scheduled: it would be in two buckets
    assert wheel.advance(30) == [t]
    wheel.cancel(t)
    with pytest.raises(ValueError):
        wheel.rearm(t, 60)


def test_big_jump_does_not_walk_every_tick() -> None:
    # 10**12 ticks: a tick-by-tick loop would never finish (the global timeout fails it).
    wheel = TimerWheel(tick_ms=1, now_ms=0)
    timers = [wheel.schedule(d, d % 3, d) for d in (5, 70_000, 5, 3 * 10**7, 10**13)]
    fired = wheel.advance(10**12)
    assert fired == [timers[0], timers[2], timers[1], timers[3]]
    assert len(wheel) == 1
    assert wheel.advance(10**13 - 1) == []
    assert wheel.advance(10**13) == [timers[4]]


def test_big_jump_then_walk_stays_exact() -> None:
    wheel = TimerWheel(tick_ms=10, now_ms=0, bits=2, levels=3)
    wheel.schedule(5, 0, "early")
    hour = 3_600_000
    timers = [wheel.schedule(hour + d, 0, d) for d in (1, 40, 41, 650, 5000)]
    assert [t.target for t in wheel.advance(hour)] == ["early"]  # jump, then walk below
    fired = walk(wheel, hour + 6000, step_ms=10)
    assert fired == [
        (hour + 10, timers[0]),
        (hour + 40, timers[1]),
        (hour + 50, timers[2]),
        (hour + 650, timers[3]),
        (hour + 5000, timers[4]),
    ]


def test_advance_backwards_is_noop() -> None:
    wheel = TimerWheel(tick_ms=10, now_ms=1000)
    timer = wheel.schedule(1050, 0, "x")
    past = wheel.schedule(900, 0, "past")
    assert wheel.advance(1000) == [past]
    assert wheel.advance(500) == []
    assert wheel.now_ms == 1000
    assert wheel.advance(1049) == []
    assert wheel.advance(0) == []
    assert wheel.now_ms == 1049
    assert wheel.advance(1050) == [timer]


# -- past deadlines and ordering -----------------------------------------------------


def test_schedule_in_the_past_fires_on_next_advance() -> None:
    wheel = TimerWheel(tick_ms=10, now_ms=1000)
    old = wheel.schedule(10, 0, "old")
    now = wheel.schedule(1000, 0, "now")
    sub_tick = TimerWheel(tick_ms=10, now_ms=1005)
    inside = sub_tick.schedule(1003, 0, "inside")  # tick 101 > current tick 100
    assert wheel.advance(1000) == [old, now]  # same now_ms: still returned
    assert wheel.advance(1000) == []
    assert sub_tick.advance(1005) == [inside]
    assert sub_tick.advance(2000) == []


def test_past_timers_come_before_same_tick_wheel_timers() -> None:
    wheel = TimerWheel(tick_ms=10, now_ms=15)
    later = wheel.schedule(18, 0, "later")  # tick 2, in the wheel
    past = wheel.schedule(12, 0, "past")  # tick 2 too, but already passed
    past0 = wheel.schedule(7, 0, "past0")  # tick 1
    assert wheel.advance(20) == [past0, past, later]


def test_many_timers_in_one_tick_fifo() -> None:
    wheel = TimerWheel(tick_ms=10, now_ms=0, bits=2, levels=3)
    deadlines = [401 + (i * 7919) % 10 for i in range(500)]  # all in tick 41
    timers = [wheel.schedule(d, 0, i) for i, d in enumerate(deadlines)]
    assert wheel.advance(409) == []
    assert wheel.advance(410) == timers


@pytest.mark.parametrize("step", [1, 7, None])
def test_fifo_within_tick_across_levels_and_clamp(step: int | None) -> None:
    # The same tick scheduled from ever closer: clamped twice, level 2, level 1, level 0.
    wheel = TimerWheel(tick_ms=1, now_ms=0, bits=2, levels=3)
    expected = []
    for now in (0, 30, 70, 130, 150, 158, 160, 162, 163):
        fired = walk(wheel, now, step) if step else wheel.advance(now)
        assert fired == []
        expected.append(wheel.schedule(164, 0, now))
        expected.append(wheel.schedule(164, 0, -now))
    assert wheel.advance(164) == expected


def test_fifo_beyond_horizon_when_walking() -> None:
    # Regression: clamping the *expiry* (kernel style) made these two take different
    # revolutions down the wheel and come out in the wrong order.
    wheel = TimerWheel(tick_ms=1, now_ms=0, bits=2, levels=3)
    first = wheel.schedule(468, 0, "first")
    wheel.advance(5)
    second = wheel.schedule(468, 0, "second")
    fired = walk(wheel, 468, step_ms=1)
    assert fired == [(468, first), (468, second)]


@pytest.mark.parametrize(("last", "jump_to"), [(300, 499), (420, 499), (300, 10_000), (420, 10_000), (495, 10_000)])
def test_fifo_within_tick_survives_jump(last: int, jump_to: int) -> None:
    # Timers for tick 500 spread over every level and several top-level (clamped)
    # buckets, then a jump (> 64 ticks) that either expires them or re-places them.
    wheel = TimerWheel(tick_ms=1, now_ms=0, bits=2, levels=3)
    expected = []
    for now in range(0, last + 1, 5):
        assert wheel.advance(now) == []  # steps of 5: the tick-by-tick path
        expected.append(wheel.schedule(500, 0, now))
    assert {level_of(wheel, t) for t in expected} == ({1, 2} if last == 495 else {2})
    fired = wheel.advance(jump_to)
    if jump_to < 500:
        assert fired == []
        expected.append(wheel.schedule(500, 0, "late"))  # after the re-placed ones
        fired = wheel.advance(500)
    assert fired == expected


# -- property tests ------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    deadlines=st.lists(st.integers(0, 3000), min_size=1, max_size=60),
    steps=st.lists(st.integers(0, 400), min_size=1, max_size=60),
    bits=st.integers(1, 3),
    levels=st.integers(2, 4),
)
def test_property_fire_exactly_once_at_first_advance_past_deadline(
    deadlines: list[int], steps: list[int], bits: int, levels: int
) -> None:
    # tick_ms=1, so the tick is the deadline: each timer must come out of the first
    # advance whose now >= deadline, exactly once, in (deadline, schedule order).
    wheel = TimerWheel(tick_ms=1, now_ms=0, bits=bits, levels=levels)
    timers = [wheel.schedule(d, 0, i) for i, d in enumerate(deadlines)]
    now = 0
    seen: set[int] = set()
    for step in [*steps, 3001]:
        now += step
        fired = wheel.advance(now)
        expected = sorted(
            (i for i, d in enumerate(deadlines) if d <= now and i not in seen),
            key=lambda i: deadlines[i],
        )
        assert [t.target for t in fired] == expected
        seen.update(expected)
        assert all(t.deadline_ms <= now for t in fired)
        assert len(wheel) == len(timers) - len(seen)
    assert len(seen) == len(timers)


@dataclass
class Rec:
    timer: Timer
    seq: int
    tick: int
    past: bool  # deadline already passed when scheduled
    cancelled: bool = False
    fired: bool = False


ops = st.lists(
    st.one_of(
        st.tuples(st.just("schedule"), st.integers(-200, 3000)),
        # a few fixed absolute deadlines, so one tick collects timers scheduled from
        # many distances (different levels, beyond the horizon, already passed)
        st.tuples(st.just("at"), st.sampled_from([0, 1, 64, 300, 1001, 4097, 9000])),
        st.tuples(st.just("advance"), st.integers(-30, 300)),
        st.tuples(st.just("advance"), st.integers(300, 200_000)),
        st.tuples(st.just("cancel"), st.integers(0, 10_000)),
        st.tuples(st.just("purge"), st.just(0)),
    ),
    max_size=120,
)


@settings(max_examples=400, deadline=None)
@given(
    ops=ops,
    tick_ms=st.sampled_from([1, 3, 10]),
    start=st.integers(0, 5000),
    bits=st.integers(1, 3),
    levels=st.integers(2, 4),
)
def test_property_against_model(ops: list[tuple[str, int]], tick_ms: int, start: int, bits: int, levels: int) -> None:
    wheel = TimerWheel(tick_ms=tick_ms, now_ms=start, bits=bits, levels=levels)
    recs: list[Rec] = []
    now = start
    for op, arg in [*ops, ("advance", 10**9)]:
        if op in ("schedule", "at"):
            deadline = now + arg if op == "schedule" else start + arg * tick_ms
            timer = wheel.schedule(deadline, len(recs), len(recs))
            past = deadline <= now
            recs.append(Rec(timer, len(recs), max(-(-deadline // tick_ms), 0), past))
        elif op == "cancel" and recs:
            rec = recs[arg % len(recs)]
            wheel.cancel(rec.timer)
            rec.cancelled = True
        elif op == "purge":
            live = sum(not (r.cancelled or r.fired) for r in recs)
            wheel.purge()
            assert stored(wheel) == wheel.stored == live, "purge keeps exactly the live timers"
        elif op == "advance":
            fired = wheel.advance(now + arg)
            if arg < 0:
                assert fired == []
                assert wheel.now_ms == now
                continue
            now += arg
            cur = now // tick_ms
            due = [r for r in recs if not (r.cancelled or r.fired) and (r.past or r.tick <= cur)]
            due.sort(key=lambda r: (r.tick, not r.past, r.seq))
            assert [t.kind for t in fired] == [r.seq for r in due]
            for r in due:
                assert r.timer.deadline_ms <= now
                r.fired = True
        assert len(wheel) == sum(not (r.cancelled or r.fired) for r in recs)
        assert wheel.stored == stored(wheel)
    assert all(r.fired or r.cancelled for r in recs)
    assert stored(wheel) == 0


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        TimerWheel(tick_ms=0, now_ms=0)
    with pytest.raises(ValueError):
        TimerWheel(tick_ms=1, now_ms=0, levels=1)
    with pytest.raises(ValueError):
        TimerWheel(tick_ms=1, now_ms=0).schedule(5, 0, None)

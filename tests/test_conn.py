"""Tests for ssegw.core.conn: the lifecycle table, the derived route, the Backlog, and the
slow-consumer verdicts.

The table is walked whole (every row from a state reached through the table, every missing
pair refused), the route is checked for every combination of its inputs, and a stateful
Hypothesis machine drives one connection through random lifecycle events, pauses, holds,
takes and floors against a model that is written down here independently of the code.
"""

from __future__ import annotations

import itertools
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ssegw.core import conn as conn_mod
from ssegw.core.conn import (
    ACCEPT_STREAM,
    BODY,
    CLOSE,
    CLOSED,
    DRAINING,
    DROP_BUFFER,
    DROP_STALL,
    END,
    EVENT_NAMES,
    HEAD,
    HOLD,
    KEEP,
    KEEP_ALIVE,
    LIVE,
    OFF,
    REQUEST,
    REQUEST_DONE,
    RESPOND,
    START_FAILED,
    STARTING,
    STATE_NAMES,
    STREAM,
    STREAM_OPEN,
    TRANSITIONS,
    Backlog,
    Conn,
    LocalProtocolError,
    advance,
    next_check,
    owed,
    refresh,
    set_wpaused,
    verdict,
)
from ssegw.core.errors import ProtocolError
from ssegw.core.fanout import Fanout, set_floor
from ssegw.core.history import Event
from ssegw.core.table import Table

STATES = range(len(STATE_NAMES))
EVENTS = range(len(EVENT_NAMES))

#: The lifecycle, written out again (not imported): the code must agree with this copy.
MODEL: dict[tuple[int, int], int] = {
    (HEAD, REQUEST): BODY,
    (BODY, REQUEST_DONE): RESPOND,
    (RESPOND, KEEP_ALIVE): HEAD,
    (RESPOND, ACCEPT_STREAM): STARTING,
    (STARTING, STREAM_OPEN): STREAM,
    (STARTING, START_FAILED): RESPOND,
    (STREAM, END): DRAINING,
    (STARTING, END): DRAINING,
    **{(s, CLOSE): CLOSED for s in STATES},
}


def model_route(state: int, wpaused: bool, owes: bool, floor: bool) -> int:
    if state == STREAM:
        return HOLD if wpaused or owes or floor else LIVE
    return HOLD if state == STARTING else OFF


def new_conn() -> Conn:
    c = Conn()
    c.init_conn()
    return c


def path_to(state: int) -> list[int]:
    """Events that lead from HEAD to ``state`` (breadth-first over the model)."""
    paths: dict[int, list[int]] = {HEAD: []}
    frontier = [HEAD]
    while frontier:
        nxt = []
        for s in frontier:
            for (src, e), dst in MODEL.items():
                if src == s and dst not in paths:
                    paths[dst] = paths[s] + [e]
                    nxt.append(dst)
        frontier = nxt
    return paths[state]


def at(state: int) -> Conn:
    """A connection brought to ``state`` through the table."""
    c = new_conn()
    for e in path_to(state):
        advance(c, e)
    assert c.state == state
    return c


def ev(seq: int, topic: str = "t", key: str | None = None, size: int = 10) -> Event:
    return Event(topic, seq, 0, b"x" * size, key)


# -- the table --------------------------------------------------------------------------


def test_the_table_is_the_model() -> None:
    assert TRANSITIONS == MODEL


def test_the_docstring_rules_are_the_table() -> None:
    """The module opens with its rules; they must be the table the code runs."""
    doc = conn_mod.__doc__ or ""
    rows = re.findall(r"^ {4}([A-Z]+|any)\s+([A-Z_]+)\s+([A-Z]+)\s", doc, re.M)
    documented: dict[tuple[int, int], int] = {}
    for src, event, dst in rows:
        if src == "state":
            continue
        srcs = STATES if src == "any" else [STATE_NAMES.index(src)]
        for s in srcs:
            documented[(s, EVENT_NAMES.index(event))] = STATE_NAMES.index(dst)
    assert documented == TRANSITIONS


def test_every_state_is_reachable_from_head() -> None:
    for s in STATES:
        assert at(s).state == s


@pytest.mark.parametrize(("src", "event"), sorted(MODEL), ids=lambda v: str(v))
def test_every_row_works_from_a_state_reached_through_the_table(src: int, event: int) -> None:
    c = at(src)
    assert advance(c, event) == MODEL[(src, event)] == c.state
    assert c.route == model_route(c.state, False, False, False)


@pytest.mark.parametrize("state", STATES, ids=lambda s: STATE_NAMES[s])
def test_every_pair_not_in_the_table_is_refused(state: int) -> None:
    refused = [e for e in EVENTS if (state, e) not in MODEL]
    for e in refused:
        c = at(state)
        route = c.route
        with pytest.raises(LocalProtocolError) as info:
            advance(c, e)
        assert c.state == state and c.route == route, "a refused event changed nothing"
        assert STATE_NAMES[state] in str(info.value) and EVENT_NAMES[e] in str(info.value)
    assert len(refused) + sum(1 for s, _ in MODEL if s == state) == len(EVENTS)


def test_local_protocol_error_is_ours() -> None:
    assert issubclass(LocalProtocolError, ProtocolError)
    assert LocalProtocolError.status_hint == 500


@pytest.mark.parametrize("state", STATES, ids=lambda s: STATE_NAMES[s])
def test_close_from_anywhere_and_again(state: int) -> None:
    c = at(state)
    assert advance(c, CLOSE) == CLOSED and c.route == OFF
    assert advance(c, CLOSE) == CLOSED and c.route == OFF  # idempotent
    for e in EVENTS:
        if e != CLOSE:
            with pytest.raises(LocalProtocolError):
                advance(c, e)


@pytest.mark.parametrize("state", STATES, ids=lambda s: STATE_NAMES[s])
def test_route_for_every_combination(state: int) -> None:
    for wpaused, owes, floor in itertools.product((False, True), repeat=3):
        c = at(state)
        c.wpaused = wpaused
        if owes:
            c.backlog = Backlog()
            c.backlog.push(ev(1), False)
        c.floor = {"t": 1} if floor else None
        refresh(c)
        assert c.route == model_route(state, wpaused, owes, floor), (wpaused, owes, floor)
        # The same through the flow-control entry point, both ways.
        set_wpaused(c, not wpaused, 5)
        assert c.route == model_route(state, not wpaused, owes, floor)
        set_wpaused(c, wpaused, 6)
        assert c.route == model_route(state, wpaused, owes, floor)


def test_resuming_is_progress_and_pausing_is_not() -> None:
    c = at(STREAM)
    set_wpaused(c, True, 10)
    assert c.wpaused and c.progress_ms == 0 and c.route == HOLD
    set_wpaused(c, False, 25)
    assert not c.wpaused and c.progress_ms == 25 and c.route == LIVE


def test_owed_drops_an_emptied_backlog_and_runs_the_over_clock() -> None:
    c = at(STREAM)
    c.backlog = Backlog()
    refresh(c)
    owed(c, 5, 100)
    assert c.backlog is None and c.route == LIVE and c.over_ms == 0
    c.backlog = Backlog()
    c.backlog.push(ev(1, size=150), False)
    refresh(c)
    owed(c, 7, 100)
    assert c.over_ms == 7 and c.route == HOLD
    c.backlog.push(ev(2, size=10), False)
    owed(c, 9, 100)
    assert c.over_ms == 7, "the clock runs from when it first went over"
    c.backlog.take(1)
    owed(c, 11, 100)
    assert c.over_ms == 0 and c.backlog is not None
    c.backlog.push(ev(3, size=200), False)
    owed(c, 0, 100)
    assert c.over_ms == 1  # 0 means "not over": a clock at 0 counts from 1


# -- the stateful model ---------------------------------------------------------------------

MAX_BUFFER = 60
GRACE = 40
STALL = 100


class LifecycleMachine(RuleBasedStateMachine):
    """One connection; the model keeps state, wpaused, the owed events (in order, with
    conflation by (topic, key) for topic "c") and whether a floor is set."""

    def __init__(self) -> None:
        super().__init__()
        self.table = Table(conflate_for=lambda t: t == "c")
        self.fan = Fanout(self.table, MAX_BUFFER, GRACE)
        self.conn = new_conn()
        self.state = HEAD
        self.paused = False
        self.held: list[Event] = []
        self.floor = False
        self.now = 1
        self.seq = 0

    @rule(event=st.sampled_from(EVENTS))
    def fire(self, event: int) -> None:
        nxt = MODEL.get((self.state, event))
        if nxt is None:
            with pytest.raises(LocalProtocolError):
                advance(self.conn, event)
        else:
            assert advance(self.conn, event) == nxt
            self.state = nxt

    @rule(pick=st.integers(0, 7))
    def forward(self, pick: int) -> None:
        """An event the table allows (other than CLOSE): random events alone seldom get a
        connection as far as STREAM."""
        allowed = [e for (s, e) in MODEL if s == self.state and e != CLOSE]
        if allowed:
            self.fire(allowed[pick % len(allowed)])

    @precondition(lambda self: self.state == HEAD)
    @rule()
    def open_stream(self) -> None:
        for e in (REQUEST, REQUEST_DONE, ACCEPT_STREAM, STREAM_OPEN):
            self.fire(e)

    @precondition(lambda self: self.state == CLOSED)
    @rule()
    def next_connection(self) -> None:
        """A closed connection stays closed; the machine goes on with a fresh one."""
        self.conn = new_conn()
        self.state, self.paused, self.held, self.floor = HEAD, False, [], False

    @rule(paused=st.booleans(), dt=st.integers(0, 60))
    def flow(self, paused: bool, dt: int) -> None:
        self.now += dt
        set_wpaused(self.conn, paused, self.now)
        self.paused = paused

    @rule(
        items=st.lists(
            st.tuples(st.sampled_from("cd"), st.sampled_from("xyz"), st.integers(1, 30)), min_size=1, max_size=5
        )
    )
    def hold(self, items: list[tuple[str, str, int]]) -> None:
        evs = []
        for topic, key, size in items:
            self.seq += 1
            evs.append(ev(self.seq, topic, key, size))
        if not self.table.topics:  # the policy comes from the table's topic states
            self.table.topic("c")
            self.table.topic("d")
        dropped = self.fan.hold(self.conn, evs, self.now, False)
        for e in evs:
            if e.topic == "c":
                self.held = [h for h in self.held if (h.topic, h.key) != (e.topic, e.key)]
            self.held.append(e)
        over = sum(len(e.frame) for e in self.held) > MAX_BUFFER
        assert dropped == (over and self.now - self.conn.over_ms >= GRACE)

    @rule(limit=st.integers(1, 80))
    def take(self, limit: int) -> None:
        b = self.conn.backlog
        if b is None:
            assert not self.held
            return
        got = b.take(limit)
        owed(self.conn, self.now, MAX_BUFFER)
        want: list[Event] = []
        size = 0
        while self.held and (not want or size < limit):
            e = self.held.pop(0)
            want.append(e)
            size += len(e.frame)
        assert got == want

    @rule(topic=st.sampled_from("cd"), seq=st.integers(1, 50))
    def add_floor(self, topic: str, seq: int) -> None:
        set_floor(self.conn, topic, seq)
        self.floor = True

    @precondition(lambda self: self.floor)
    @rule()
    def clear_floor(self) -> None:
        # As the fan-out does once every topic's floor has been passed.
        self.conn.floor = None
        refresh(self.conn)
        self.floor = False

    @rule(dt=st.integers(0, 200))
    def tick(self, dt: int) -> None:
        self.now += dt

    @invariant()
    def route_is_the_models(self) -> None:
        c = self.conn
        assert c.state == self.state and c.wpaused == self.paused
        assert c.route == model_route(self.state, self.paused, bool(self.held), self.floor)
        if c.route == LIVE:
            assert c.state == STREAM and not c.wpaused and c.backlog is None and c.floor is None

    @invariant()
    def backlog_is_the_models(self) -> None:
        b = self.conn.backlog
        assert (b is None) == (not self.held)
        if b is not None:
            assert b.live == len(b) == len(self.held)
            assert b.nbytes == sum(len(e.frame) for e in self.held)

    @invariant()
    def next_check_is_in_the_future(self) -> None:
        assert next_check(self.conn, self.now, GRACE, STALL) > self.now
        if not self.conn.wpaused and not self.conn.over_ms:
            assert verdict(self.conn, self.now, GRACE, STALL, False) == KEEP


TestLifecycle = LifecycleMachine.TestCase
TestLifecycle.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


# -- Backlog ------------------------------------------------------------------------------


def test_take_returns_events_in_push_order() -> None:
    b = Backlog()
    evs = [ev(i, "t", str(i % 3)) for i in range(1, 8)]
    for e in evs:
        assert not b.push(e, False)
    assert len(b) == 7 and b.nbytes == 70
    assert b.take(25) == evs[:3]  # at least one, until ``limit`` bytes are reached
    assert b.take(1) == evs[3:4]
    assert b.take(1 << 30) == evs[4:]
    assert len(b) == 0 and b.nbytes == 0 and b.take(10) == []


def test_conflation_keeps_the_newest_per_key_at_the_position_of_the_newest_push() -> None:
    b = Backlog()
    a1, m1, a2, g1, m2 = ev(1, "p", "A"), ev(2, "p", "M"), ev(3, "p", "A"), ev(4, "p", "G"), ev(5, "p", "M")
    n1 = ev(6, "q", "A")  # another topic: another key
    results = [b.push(e, True) for e in (a1, m1, a2, g1, m2, n1)]
    assert results == [False, False, True, False, True, False]
    assert len(b) == 4 and b.nbytes == 40
    assert b.take(1 << 30) == [a2, g1, m2, n1]


def test_conflation_without_a_key_is_per_topic() -> None:
    b = Backlog()
    for e in (ev(1, "p"), ev(2, "q"), ev(3, "p")):
        b.push(e, True)
    assert [e.seq for e in b.take(1 << 30)] == [2, 3]


def test_an_unconflated_entry_survives_a_later_conflated_push_of_its_key() -> None:
    b = Backlog()
    replayed, live = ev(1, "px", "A"), ev(2, "px", "A")
    b.push(replayed, False)  # a replay: never conflated
    b.push(live, True)
    assert b.take(1 << 30) == [replayed, live]
    assert b.live == 0 and b.nbytes == 0


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(
                st.just("push"), st.sampled_from("xy"), st.sampled_from([None, "a", "b", "c"]), st.integers(1, 40)
            ),
            st.tuples(st.just("take"), st.integers(1, 120)),
        ),
        max_size=80,
    )
)
def test_backlog_matches_a_list_model(ops) -> None:
    """Topic "x" conflates, "y" does not (a topic's policy is fixed)."""
    b = Backlog()
    model: list[Event] = []
    seq = 0
    for op in ops:
        if op[0] == "push":
            _, topic, key, size = op
            seq += 1
            e = ev(seq, topic, key, size)
            conflate = topic == "x"
            before = len(model)
            if conflate:
                model = [m for m in model if (m.topic, m.key) != (topic, key)]
            model.append(e)
            assert b.push(e, conflate) == (len(model) == before)
        else:
            limit = op[1]
            want: list[Event] = []
            size = 0
            while model and (not want or size < limit):
                want.append(model.pop(0))
                size += len(want[-1].frame)
            assert b.take(limit) == want
        assert b.live == len(b) == len(model)
        assert b.nbytes == sum(len(m.frame) for m in model)
        assert len(b.q) <= 2 * b.live + 65


def test_compaction_bounds_an_endless_stream_of_conflated_updates() -> None:
    rng = random.Random(7)
    b = Backlog()
    keys = [f"k{i}" for i in range(10)]
    for i in range(100_000):
        b.push(Event("px", i + 1, 0, b"v", rng.choice(keys)), True)
        if i % 97 == 0:
            b.take(2)
        assert len(b.q) <= 2 * b.live + 65, i
    assert b.live <= 10
    last = b.take(1 << 30)
    assert b.live == 0 and b.nbytes == 0 and len(b.q) == 0
    assert len(last) == len({e.key for e in last})  # only the newest per key
    assert [e.seq for e in last] == sorted(e.seq for e in last)  # in push order


# -- verdicts and next checks --------------------------------------------------------------


def test_a_burst_over_max_buffer_is_kept_until_grace_then_dropped() -> None:
    fan = Fanout(Table(), max_buffer=100, grace_ms=500)
    c = at(STREAM)
    assert not fan.hold(c, [ev(i, size=50) for i in range(1, 11)], 1000, False)  # 5x max_buffer
    assert c.over_ms == 1000
    for now in (1000, 1200, 1499):
        assert verdict(c, now, 500, 10_000, False) == KEEP
        assert next_check(c, now, 500, 10_000) == 1500
    assert verdict(c, 1500, 500, 10_000, False) == DROP_BUFFER
    assert verdict(c, 1500, 500, 10_000, True) == DROP_BUFFER  # conflating does not save a burst
    assert fan.hold(c, [ev(11, size=1)], 1500, False)
    # Drained under max_buffer within the grace: the clock stops.
    c2 = at(STREAM)
    fan.hold(c2, [ev(i, size=50) for i in range(1, 11)], 1000, False)
    assert c2.backlog is not None
    c2.backlog.take(420)
    owed(c2, 1499, 100)
    assert c2.over_ms == 0 and verdict(c2, 5000, 500, 10_000, False) == KEEP


def test_a_paused_stream_without_progress_is_stalled_at_stall_ms() -> None:
    c = at(STREAM)
    set_wpaused(c, False, 2000)  # progress
    set_wpaused(c, True, 2100)
    assert verdict(c, 2000 + 2999, 1000, 3000, False) == KEEP
    assert next_check(c, 2000 + 2999, 1000, 3000) == 5000
    assert verdict(c, 5000, 1000, 3000, False) == DROP_STALL
    set_wpaused(c, False, 5000)
    assert verdict(c, 9000, 1000, 3000, False) == KEEP  # writable: not stalled


@given(progress=st.integers(0, 10_000), later=st.integers(0, 100_000))
def test_a_conflate_only_stream_is_never_stalled(progress: int, later: int) -> None:
    c = at(STREAM)
    set_wpaused(c, False, progress)
    set_wpaused(c, True, progress)
    assert verdict(c, progress + later, 1000, 3000, True) == KEEP


def test_a_stalled_conflate_only_stream_is_looked_at_once_per_stall_period() -> None:
    c = at(STREAM)
    set_wpaused(c, False, 100)
    set_wpaused(c, True, 100)
    assert next_check(c, 150, 1000, 3000) == 3100  # its stall deadline
    for now in (3100, 3110, 3120, 7000):  # past it: not every tick, a stall period on
        assert next_check(c, now, 1000, 3000) == now + 3000


@settings(max_examples=300)
@given(
    now=st.integers(1, 1 << 40),
    over_ago=st.one_of(st.none(), st.integers(0, 20_000)),
    progress_ago=st.integers(0, 20_000),
    wpaused=st.booleans(),
    grace=st.integers(1, 10_000),
    stall=st.integers(1, 10_000),
)
def test_next_check_is_never_now_or_past(now, over_ago, progress_ago, wpaused, grace, stall) -> None:
    c = at(STREAM)
    c.over_ms = 0 if over_ago is None else max(1, now - over_ago)
    c.progress_ms = now - progress_ago
    c.wpaused = wpaused
    due = next_check(c, now, grace, stall)
    assert due > now
    if c.over_ms and c.over_ms + grace > now:
        assert due <= c.over_ms + grace, "a grace deadline is never overslept"
    if wpaused and c.progress_ms + stall > now:
        assert due <= c.progress_ms + stall, "a stall deadline is never overslept"

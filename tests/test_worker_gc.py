"""The worker's use of the cyclic collector (ssegw/server/worker.py, ``FULL_GC_S``).

Every tick ``age_young`` collects generation 0 and freezes the survivors, so that an object
held for long (an event in history) is traversed once, not again by every generation-1
collection; ``full_collect`` (every ``FULL_GC_S`` and after a burst of closes) looks at every
object, frozen ones included.  What must hold: cyclic garbage is found either way -- while
young by the tick, later by the full collection -- and nothing stays unfrozen after either.
"""

from __future__ import annotations

import gc
import weakref

import pytest

from ssegw.server.worker import age_young, full_collect


class Node:
    """A cyclic pair's element (a plain class: weak-referenceable)."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture(autouse=True)
def _restore_gc():
    was = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.collect()
        if not was:
            gc.disable()


def test_a_cycle_that_dies_young_is_collected_by_the_tick():
    ref = cycle()
    assert ref() is not None  # cyclic: reference counting alone cannot free it
    age_young()
    assert ref() is None


def test_survivors_of_the_tick_are_out_of_the_young_collections_until_the_full_one():
    a, b = Node(), Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    age_young()  # alive: frozen
    assert gc.get_freeze_count() > 0
    del a, b  # now garbage, but frozen
    gc.collect(0)
    gc.collect(1)
    gc.collect(2)
    assert ref() is not None, "a frozen object was traversed by an ordinary collection"
    found = full_collect()
    assert ref() is None and found >= 2
    # The survivors of the full collection are frozen again, the young generations empty.
    assert gc.get_freeze_count() > 0
    assert gc.get_count()[0] < 50


def test_age_young_freezes_what_lives_and_leaves_nothing_young():
    keep = [Node() for _ in range(1000)]
    before = gc.get_freeze_count()
    age_young()
    assert gc.get_freeze_count() >= before + 1000
    assert gc.get_count()[0] < 50
    assert all(k.other is None for k in keep)


def _young_events() -> list:
    from ssegw.core.event import Event

    return [o for g in (0, 1, 2) for o in gc.get_objects(g) if type(o) is Event]


@pytest.mark.parametrize("n,young", [(100, 0), (3, 3)])
def test_a_published_batch_leaves_the_young_generations_at_once(n, young):
    """A batch's events stay in history: a publish of FREEZE_BATCH messages or more freezes
    them as it answers (not a tick later), so the collections its own allocations trigger do
    not walk every event published since the last tick; a smaller publish leaves that to the
    tick."""
    import h11
    import orjson

    from ssegw import cli, config
    from ssegw.server import handlers
    from ssegw.server.protocol import Request
    from ssegw.server.worker import Worker

    assert handlers.FREEZE_BATCH <= 100 and handlers.FREEZE_BATCH > 3
    cfg = config.load(cli.build_parser().parse_args(["serve", "--port", "0"]), environ={})
    w = Worker(cfg, cli.make_broker(cfg))
    body = orjson.dumps([{"topic": f"gc.{i}", "data": {"i": i}} for i in range(n)])
    req = Request(h11.Request(method="POST", target="/publish",
                              headers=[("Host", "h"), ("Content-Type", "application/json"),
                                       ("Content-Length", str(len(body)))]))
    answers = []

    class P:  # the protocol as the handler sees it
        admin = False
        ip = "127.0.0.1"

        def __init__(self) -> None:
            self.req = req

        def respond(self, status, data, **kw):  # noqa: ANN001, ANN003
            answers.append((status, orjson.loads(data)))

    gc.collect()
    gc.freeze()  # everything made so far: only what the publish makes is young
    handlers.publish(w, P(), req, body)  # type: ignore[arg-type]
    assert answers and answers[0][0] == 200 and len(answers[0][1]["ids"]) == n
    assert len(_young_events()) == young
    assert len(w.broker.history.topics) == n

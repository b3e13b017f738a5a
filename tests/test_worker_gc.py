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

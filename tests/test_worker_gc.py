"""The worker's use of the cyclic collector (ssegw/server/worker.py, ``FULL_GC_S``).

Every tick ``age_young`` collects generation 0 and freezes the survivors, so that an object
held for long (an event in history) is traversed once, not again by every generation-1
collection; ``full_collect`` (every ``FULL_GC_S``, further apart while it finds nothing)
looks at every object, frozen ones included.  What must hold: cyclic garbage is found either
way -- while young by the tick, later by the full collection -- and nothing stays unfrozen
after either.  Closed connections leave
no cyclic garbage, so handing memory back after a burst of closes needs no full collection
(which stops the loop for as long as it takes to traverse every object held).
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
    thresholds = gc.get_threshold()
    gc.enable()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.collect()
        gc.set_threshold(*thresholds)  # a Worker sets its own
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


def test_a_burst_of_closes_hands_memory_back_without_a_full_collection(monkeypatch):
    """Once RELEASE_AFTER_CLOSED connections have closed since the peak and head_timeout has
    passed, the worker purges the wheel and hands free pages back (allocator.release) -- and
    does not traverse the heap: a full collection there found nothing (see the next test)
    and stopped the loop for 30-150 ms while a flood's subscribers waited."""
    from types import SimpleNamespace

    from ssegw.server import worker as wmod

    released: list[int] = []
    purged: list[int] = []
    full: list[int] = []
    monkeypatch.setattr(wmod.allocator, "release", lambda: released.append(1))

    def watch(phase: str, info: dict) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(1)

    w = SimpleNamespace(connections_open=5000, conn_peak=0, release_at=0.0, next_full_gc=0.0,
                        cfg=SimpleNamespace(head_timeout=5.0), wheel=SimpleNamespace(purge=lambda: purged.append(1)))
    release = wmod.Worker._release_memory
    gc.callbacks.append(watch)
    try:
        release(w, 0.0)  # the peak
        w.connections_open = 5000 - wmod.RELEASE_AFTER_CLOSED
        release(w, 1.0)  # the drop, noted: due once head_timeout (+1 s) has passed
        release(w, 6.9)
        assert not released and not purged
        release(w, 7.0)
        release(w, 8.0)  # once per drop
    finally:
        gc.callbacks.remove(watch)
    assert released == [1] and purged == [1]
    assert not full, "the release after a burst ran a full collection"


async def _start_worker(*flags: str):  # noqa: ANN202
    """A real worker in this process (uvloop), serving on free ports."""
    from ssegw import cli, config
    from ssegw.server.worker import Worker

    cfg = config.load(cli.build_parser().parse_args(
        ["serve", "--port", "0", "--admin-port", "0", "--no-access-log", *flags]), environ={})
    w = Worker(cfg, cli.make_broker(cfg))
    await w.start()
    return w


async def _stop_worker(w) -> None:  # noqa: ANN001
    w.stop_accepting(admin=True)
    w._stop_now()
    await w.wait_stopped()


def _clients(port: int, n: int) -> dict[str, int]:
    """n connections of each kind against a gateway on ``port``, held open together past
    several ticks, then ended; blocking sockets in a thread (no client-side objects in the
    gateway's heap).  Returns the status answered per kind (0: none expected)."""
    import socket
    import struct
    import time

    def conn(i: int) -> socket.socket:
        s = socket.socket()
        s.settimeout(10)
        s.bind((f"127.0.{1 + i // 250}.{2 + i % 250}", 0))
        s.connect(("127.0.0.1", port))
        return s

    def head(s: socket.socket) -> bytes:
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = s.recv(4096)
            if not d:
                break
            buf += d
        return buf

    def to_eof(s: socket.socket) -> bytes:
        buf = b""
        while d := s.recv(4096):
            buf += d
        return buf

    body = b'{"topic":"gc.pub","data":{"x":1}}'
    kinds: dict[str, list[socket.socket]] = {k: [] for k in ("idle", "stream", "reset", "bad", "publish", "slow")}
    statuses: dict[str, set[bytes]] = {k: set() for k in kinds}
    for i in range(n):
        kinds["idle"].append(conn(i))
        for k in ("stream", "reset"):
            s = conn(i)
            s.sendall(b"GET /events?topic=gc.s HTTP/1.1\r\nHost: a\r\n\r\n")
            statuses[k].add(head(s)[9:12])
            kinds[k].append(s)
        s = conn(i)
        s.sendall(b"POST /publish HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        statuses["publish"].add(head(s)[9:12])
        kinds["publish"].append(s)
        s = conn(i)
        s.sendall(b"GET /events?topic=gc.s HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        kinds["bad"].append(s)
        s = conn(i)
        s.sendall(b"GET /events?topic=gc.s HTTP/1.1\r\nHost: a\r\n")
        kinds["slow"].append(s)
    time.sleep(0.3)  # six ticks: everything of these connections is frozen while they live
    for k in ("bad", "slow"):  # ended by the gateway: 400 at once, 408 at head_timeout
        for s in kinds[k]:
            statuses[k].add(to_eof(s)[9:12])
    for k, socks in kinds.items():
        for s in socks:
            if k == "reset":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
    # One status per kind (0: none answered), -1 if a kind got several.
    return {k: -1 if len(v) > 1 else int(v.pop() if v else 0) for k, v in statuses.items()}


def test_closed_connections_leave_no_cyclic_garbage():
    """Real connections of every kind a flood brings -- idle, streams ended by the client or
    reset, refused (400), a keep-alive publisher, a head that never ends (408) -- held open
    until the tick has frozen them, then closed: a full collection afterwards finds almost
    nothing, not one cycle per connection.  (The release after a burst relies on this.)"""
    import asyncio

    import uvloop

    n = 40

    async def main() -> tuple[int, list[dict[str, int]]]:
        w = await _start_worker("--head-timeout", "1s", "--max-conns-per-ip", "0", "--conn-rate", "0")
        port = w.bound_ports()[0]
        rounds = []

        async def burst() -> None:
            rounds.append(await asyncio.to_thread(_clients, port, n))
            for _ in range(200):
                if w.connections_open == 0:
                    break
                await asyncio.sleep(0.05)
            assert w.connections_open == 0
            await asyncio.sleep(0.2)  # the closes' last callbacks, a few ticks

        try:
            await burst()  # the first of each kind makes what is made once (caches, metrics' labels)
            full_collect()
            await burst()
            found = full_collect()
        finally:
            await _stop_worker(w)
        return found, rounds

    found, rounds = uvloop.run(main())
    expected = {"idle": 0, "stream": 200, "reset": 200, "bad": 400, "publish": 200, "slow": 408}
    assert rounds == [expected, expected]
    assert found < n, f"{found} unreachable objects after {6 * n} connections closed"


def test_the_full_collection_comes_less_often_while_it_finds_nothing():
    """Each full collection that finds no cyclic garbage puts the next twice as far off, up to
    FULL_GC_MAX_S; one that finds some brings it back to FULL_GC_S."""
    from ssegw.server.worker import FULL_GC_MAX_S, FULL_GC_S, next_full_gc_interval

    interval, seen = FULL_GC_S, []
    for _ in range(6):
        interval = next_full_gc_interval(interval, 0)
        seen.append(interval)
    assert seen == [600.0, 1200.0, 2400.0, 3600.0, 3600.0, 3600.0] and FULL_GC_MAX_S == 3600.0
    assert next_full_gc_interval(FULL_GC_MAX_S, 2) == FULL_GC_S == 300.0


def test_a_worker_spaces_its_full_collections_by_what_they_find():
    """A running worker's tick: a full collection that finds nothing, then one that finds a
    cycle that died after it was frozen (which only a full collection can find)."""
    import asyncio

    import uvloop

    async def due(w) -> tuple[float, float]:  # noqa: ANN001
        w.next_full_gc = 0.0  # due at the next housekeeping tick (every 20 ticks, ~1 s)
        for _ in range(60):
            await asyncio.sleep(0.05)
            if w.next_full_gc:
                break
        return w.full_gc_interval, w.next_full_gc - w.loop.time()

    async def main() -> tuple[tuple[float, float], tuple[float, float], weakref.ref[Node]]:
        w = await _start_worker()
        try:
            full_collect()
            for _ in range(3):  # again if something of this process's left a cycle meanwhile
                clean = await due(w)
                if clean[0] == 600.0:
                    break
            a, b = Node(), Node()
            a.other, b.other = b, a
            ref = weakref.ref(a)
            await asyncio.sleep(0.2)  # frozen by the ticks while alive
            del a, b
            dirty = await due(w)
        finally:
            await _stop_worker(w)
        return clean, dirty, ref

    clean, dirty, ref = uvloop.run(main())
    assert clean[0] == 600.0 and 590 < clean[1] <= 600, clean
    assert ref() is None and dirty[0] == 300.0 and 290 < dirty[1] <= 300, dirty

"""Keyed state through the Broker protocol, run unchanged against the embedded broker, the
Redis broker on a real ``redis-server`` and (last test) a real three-node Redis Cluster
(docs/api.md "Ids, history and resume": ``since=snapshot``, compacted resume, ``max_keys``).

Each test runs its own event loop; the brokers are used as the worker uses them (interest
before replay, ``tests/test_broker_shared.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_broker_shared import HOUR_MS, Rig, data_of, id_of, summary, topic

from ssegw.broker.base import Replay
from ssegw.broker.memory import MemoryBroker
from ssegw.core.history import Event
from ssegw.core.ids import parse_id
from ssegw.core.publish import parse_publish

Spec = tuple[str, str | None, str]  # (topic, key or None, data)


class Keyed:
    """How to build a broker of one kind with given history and keyed settings."""

    def __init__(self, kind: str, url: str | None) -> None:
        self.kind = kind
        self.url = url

    def __call__(self, size: int = 1000, ttl_ms: int = HOUR_MS, max_keys: int = 10_000,
                 conflate: bool = False) -> object:
        def settings(t: str) -> tuple[int, int]:
            return size, ttl_ms

        def keyed(t: str) -> tuple[int, bool]:
            return max_keys, conflate

        if self.kind == "memory":
            return MemoryBroker(settings, lambda: time.time_ns() // 1_000_000, keyed)
        from ssegw.broker.redis import RedisBroker

        assert self.url is not None
        return RedisBroker(self.url, settings, HOUR_MS, keyed=keyed)


@pytest.fixture(params=["memory", "redis"])
def make(request: pytest.FixtureRequest) -> Keyed:
    if request.param == "memory":
        return Keyed("memory", None)
    return Keyed("redis", request.getfixturevalue("redis_server").url)


def run(broker: object, body: Callable[[Rig], Awaitable[None]]) -> None:
    async def main() -> None:
        async with Rig(broker) as rig:
            await body(rig)

    asyncio.run(main())


async def pub(rig: Rig, *specs: Spec) -> list[str]:
    objs = [{"topic": t, "data": d} | ({"key": k} if k is not None else {}) for t, k, d in specs]
    return await rig.b.publish(parse_publish(objs, 10_000, orjson.dumps))


def keyed(evs: list[Event]) -> list[tuple[str, str | None, str]]:
    summary(evs)  # frame ids agree with seqs
    return [(e.topic, e.key, data_of(e)) for e in evs]


# -- since=snapshot -------------------------------------------------------------------------------


def test_snapshot_with_and_without_unkeyed_events(make: Keyed) -> None:
    p, q, empty = topic("p"), topic("q"), topic("empty")

    async def body(rig: Rig) -> None:
        await pub(rig, (p, "AAPL", "a1"), (p, "MSFT", "m1"), (q, None, "q1"))
        await pub(rig, (p, "AAPL", "a2"), (p, None, "plain"), (q, None, "q2"))
        r = await rig.replay((p, q, empty), since="snapshot")
        assert keyed(r.events) == [(p, "MSFT", "m1"), (p, "AAPL", "a2"), (p, None, "plain"), (q, None, "q2")]
        assert r.reset == [] and r.compacted == [] and set(r.floors) == {p, q, empty}

    run(make(), body)


def test_max_keys_evicts_least_recently_updated(make: Keyed) -> None:
    t = topic()

    async def body(rig: Rig) -> None:
        (first,) = await pub(rig, (t, "x", "x0"))
        ids = await pub(rig, (t, "a", "a0"), (t, "b", "b0"), (t, "a", "a1"), (t, "c", "c0"))  # x, then b evicted
        r = await rig.replay((t,), since="snapshot")
        assert keyed(r.events) == [(t, "a", "a1"), (t, "c", "c0")]
        # history (size 1) keeps c0: a resume from before b0 needs b, which was evicted.
        assert (await rig.replay((t,), first)).reset == [t]
        r = await rig.replay((t,), ids[1])  # after b0: a and c changed since, both kept
        assert r.compacted == [t] and keyed(r.events) == [(t, "a", "a1"), (t, "c", "c0")]

    run(make(size=1, max_keys=2), body)


def test_ttl_expiry_of_keyed_state(make: Keyed) -> None:
    t = topic()

    async def body(rig: Rig) -> None:
        first, _ = await pub(rig, (t, "x", "x0"), (t, "a", "a0"))
        await asyncio.sleep(0.6)
        await pub(rig, (t, "b", "b0"), (t, "c", "c0"))
        r = await rig.replay((t,), first)  # history keeps c0 only; keyed state covers
        assert r.compacted == [t] and keyed(r.events) == [(t, "a", "a0"), (t, "b", "b0"), (t, "c", "c0")]
        await asyncio.sleep(0.6)  # x0 and a0 are past the 1 s ttl
        r = await rig.replay((t,), since="snapshot")
        assert keyed(r.events) == [(t, "b", "b0"), (t, "c", "c0")]
        r = await rig.replay((t,), first)
        assert r.reset == [t] and r.events == [], "a changed after the id and expired"

    run(make(size=1, ttl_ms=1000), body)


# -- compacted resume -----------------------------------------------------------------------------


def test_compacted_resume_sends_exactly_the_changed_keys_newest_each(make: Keyed) -> None:
    t, other, gone = topic("t"), topic("o"), topic("g")

    async def body(rig: Rig) -> None:
        (first,) = await pub(rig, (t, "a", "a0"))
        await pub(rig, (t, "b", "b0"), (t, "c", "c0"), (gone, "x", "x0"), (gone, "y", "y0"), (gone, "z", "z0"))
        await pub(rig, (t, "b", "b1"), (other, "o", "o1"), (t, "c", "c1"), (t, "b", "b2"))
        r = await rig.replay((t, other, gone), first)
        assert r.compacted == [t] and r.reset == [gone], "gone: x evicted after the id (max_keys 2)"
        assert keyed(r.events) == [(other, "o", "o1"), (t, "c", "c1"), (t, "b", "b2")]
        assert set(r.floors) == {t, other}

    run(make(size=2, max_keys=2), body)


def test_conflate_topics_resume_compacted_when_shorter(make: Keyed) -> None:
    t = topic()

    async def body(rig: Rig) -> None:
        (first,) = await pub(rig, (t, "a", "a0"))
        ids = await pub(rig, *[(t, "ab"[i % 2], f"v{i}") for i in range(6)])
        r = await rig.replay((t,), first)  # history covers 6 events; 2 keys changed
        assert r.compacted == [t] and keyed(r.events) == [(t, "a", "v4"), (t, "b", "v5")]
        r = await rig.replay((t,), ids[3])  # 2 events, 2 keys: not shorter
        assert r.compacted == [] and [data_of(e) for e in r.events] == ["v4", "v5"]

    run(make(conflate=True), body)


# -- a model of both -----------------------------------------------------------------------------

MODEL_TOPICS = ("p", "q")


def expected(published: list[tuple[int, str, str | None]], t: str, s: int, size: int, max_keys: int,
             conflate: bool) -> tuple[str, list[tuple[int, str | None]]]:
    """What a resume after seq ``s`` must give for topic ``t``: ("full" | "compacted" |
    "reset", [(seq, key)]), from a model keeping every event, an LRU of keys and its floor."""
    lru: dict[str | None, int] = {}
    floor = 0
    for q, tt, k in published:
        if tt != t:
            continue
        lru.pop(k, None)
        lru[k] = q
        while len(lru) > max_keys:
            floor = max(floor, lru.pop(next(iter(lru))))
    want = [(q, k) for q, tt, k in published if tt == t and q > s]
    changed = sorted((q, k) for k, q in lru.items() if q > s)
    history, keyed = len(want) <= size, s >= floor
    if not history:
        return ("compacted", changed) if keyed else ("reset", [])
    if conflate and keyed and len(want) > 1 and len(changed) < len(want):
        return "compacted", changed
    return "full", want


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.tuples(st.sampled_from(MODEL_TOPICS), st.sampled_from(["a", "b", "c", None])),
                         min_size=1, max_size=4), min_size=1, max_size=6),
       st.integers(1, 3), st.integers(0, 3), st.booleans())
def test_every_resume_point_against_a_model(make: Keyed, batches: list[list[tuple[str, str | None]]], size: int,
                                            max_keys: int, conflate: bool) -> None:
    names = {t: topic(t) for t in MODEL_TOPICS}  # fresh topics per example (Redis keeps its data)

    async def body(rig: Rig) -> None:
        published: list[tuple[int, str, str | None]] = []
        for batch in batches:
            ids = await pub(rig, *[(names[t], k, "x") for t, k in batch])
            published += [(parse_id(i)[1][0], t, k) for i, (t, k) in zip(ids, batch, strict=True)]
        first = published[0][0]
        epoch = parse_id(ids[0])[0]
        for s in range(first - 1, published[-1][0] + 1):
            r = await rig.replay(tuple(names.values()), f"{epoch}-{s}")
            for t, name in names.items():
                kind, want = expected(published, t, s, size, max_keys, conflate)
                got = [(e.seq, e.key) for e in r.events if e.topic == name]
                verdict = "reset" if name in r.reset else "compacted" if name in r.compacted else "full"
                assert (verdict, got) == (kind, want), f"resume after {s}, topic {t}"

    run(make(size=size, max_keys=max_keys, conflate=conflate), body)


# -- the seam -------------------------------------------------------------------------------------


def test_no_duplicate_or_gap_at_the_snapshot_live_seam_under_load(make: Keyed) -> None:
    t = topic("load")

    async def body(rig: Rig) -> None:
        rig.b.interest(t, True)
        published: list[tuple[int, str]] = []

        async def publisher() -> None:
            for i in range(60):  # bounded: 60 batches of 5 ticks over 12 keys
                specs = [(t, f"k{(i * 5 + j) % 12}", str(i)) for j in range(5)]
                ids = await pub(rig, *specs)
                published.extend((parse_id(e)[1][0], k) for e, (_, k, _) in zip(ids, specs, strict=True))
                await asyncio.sleep(0.002)

        task = asyncio.ensure_future(publisher())
        snaps: list[Replay] = []
        for _ in range(5):
            await asyncio.sleep(0.03)
            snaps.append(await rig.replay((t,), since="snapshot"))
        await task
        last = published[-1][0]
        await rig.wait_delivered(lambda d: any(e.seq == last for e in d))
        live = [e for e in rig.delivered if e.topic == t]
        assert any(r.events for r in snaps) and any(q > r.floors[t] for r in snaps for q, _ in published), \
            "no snapshot was taken mid-publishing"
        for r in snaps:
            head = r.floors[t]
            newest: dict[str, int] = {}
            for q, k in published:
                if q <= head:
                    newest[k] = q
            assert [e.seq for e in r.events] == sorted(newest.values()), "snapshot = newest per key at its floor"
            got = [e.seq for e in r.events] + [e.seq for e in live if e.seq > head]
            assert got == sorted(newest.values()) + [q for q, _ in published if q > head], "dup or gap at the seam"

    run(make(), body)


# -- Redis Cluster --------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_keyed_state_on_a_redis_cluster(redis_cluster) -> None:  # noqa: ANN001
    from redis.crc import key_slot

    from ssegw.broker.redis import RedisBroker

    b = RedisBroker(redis_cluster.url, lambda t: (2, HOUR_MS), HOUR_MS, keyed=lambda t: (3, False))
    topics = [topic(f"c{i}") for i in range(6)]  # spread over the shards

    async def body(rig: Rig) -> None:
        assert len(rig.b.shards) == 3
        assert (await rig.replay(tuple(topics), since="snapshot")).events == []  # subscribed
        await pub(rig, *[(t, "a", f"{t}-a0") for t in topics])
        await rig.wait_delivered(lambda d: len(d) >= len(topics))
        # The newest frame's vector id: every shard at what this worker has received.
        cut = id_of(rig.delivered[-1])
        await pub(rig, *[(t, k, f"{t}-{k}1") for t in topics for k in ("b", "c")])
        await pub(rig, *[(t, "b", f"{t}-b2") for t in topics])
        # A cluster replay stops at this worker's watermark and the rest comes live ("Several
        # shards" in ssegw/broker/redis.py): let the watermark pass everything first.
        await rig.wait_delivered(lambda d: len(d) >= 4 * len(topics))
        r = await rig.replay(tuple(topics), since="snapshot")
        for t in topics:
            mine = [(e.key, data_of(e)) for e in r.events if e.topic == t]
            assert mine == [("a", f"{t}-a0"), ("c", f"{t}-c1"), ("b", f"{t}-b2")]
        # History keeps 2 of each topic's 4 events: the resume from the first batch's last id
        # is compacted on every shard (b and c changed after it; vector ids).
        r = await rig.replay(tuple(topics), cut)
        assert sorted(r.compacted) == sorted(topics) and r.reset == []
        for t in topics:
            assert [data_of(e) for e in r.events if e.topic == t] == [f"{t}-c1", f"{t}-b2"]
        # Keyed state lives in its stream's slot (same hash tag), so one FCALL updates both.
        for t in topics:
            s = rig.b.shard_of(t)
            stream = s.stream_key(t)
            for k in (stream.replace("}:h:", "}:kz:"), stream.replace("}:h:", "}:kv:")):
                assert key_slot(k.encode()) == key_slot(stream.encode())
                assert await s.client.exists(k) == 1, f"{k} is not on the node of {stream}"

    run(b, body)

"""End-to-end tests of keyed state (docs/api.md "Ids, history and resume": ``since=snapshot``,
``ssegw.compacted``, ``max_keys``) on a real gateway process over real sockets, read with the
independent SSE parser.  Embedded broker, and two gateways on one Redis (last test).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from urllib.parse import urlencode

import pytest
from harness import Gateway, Stream, wait_until
from sse_parser import Ev


def new_topic(tag: str = "t") -> str:
    return f"e2e.keyed.{tag}.{uuid.uuid4().hex[:10]}"


def path(*topics: str, **params: str) -> str:
    return "/events?" + urlencode([("topic", t) for t in topics] + list(params.items()))


def pub(g: Gateway, msgs: object) -> list[str]:
    r = g.publish(msgs)
    assert r.status == 200, r
    return r.json()["ids"]


def seq(eid: str) -> int:
    return int(eid.rsplit("-", 1)[1])


def quiet(s: Stream, n: int, wait: float = 0.2) -> None:
    """Nothing beyond the ``n`` events already seen arrives within ``wait`` seconds."""
    s.pump(wait)
    assert len(s.events) == n, [(e.event, e.data) for e in s.events[n:]]


def tick(topic: str, key: str | None, data: object) -> dict[str, object]:
    m: dict[str, object] = {"topic": topic, "data": data}
    if key is not None:
        m["key"] = key
    return m


def topic_keys(g: Gateway, t: str) -> int:
    r = g.request("GET", "/admin/topics/" + t, admin=True)
    assert r.status == 200, r
    return r.json()["keys"]


def topics_of(ev: Ev, name: str) -> list[str]:
    assert ev.event == name and not ev.has_id, ev
    return json.loads(ev.data)["topics"]


@pytest.fixture(scope="module")
def gw() -> Gateway:
    """History of 3 events per topic, at most 3 keys: small enough to trim and evict."""
    g = Gateway("--history-size", "3", "--max-keys", "3", "--heartbeat-interval", "5s", "--flush-interval", "10ms")
    g.start()
    yield g
    g.stop()


def test_snapshot_with_and_without_unkeyed_events_then_live(gw: Gateway) -> None:
    t, u = new_topic("t"), new_topic("u")
    ids = pub(gw, [tick(t, "AAPL", 1), tick(t, "MSFT", 2), tick(u, None, "u1"), tick(t, "AAPL", 3),
                   tick(t, None, "plain"), tick(u, None, "u2")])
    with gw.stream(path(t, u, since="snapshot")) as s:
        assert s.status == 200
        evs = s.wait_events(4)
        quiet(s, 4)
        assert [(e.id, e.data) for e in evs] == [(ids[1], "2"), (ids[3], "3"), (ids[4], "plain"), (ids[5], "u2")]
        live = pub(gw, [tick(t, "MSFT", 4)])
        assert [e.id for e in s.wait_events(5)[4:]] == live
    with gw.stream(path(new_topic("empty"), since="snapshot")) as s:
        assert s.status == 200
        quiet(s, 0)


def test_snapshot_keeps_max_keys_least_recently_updated_evicted(gw: Gateway) -> None:
    t = new_topic()
    before = gw.metrics().get('ssegw_keyed_evictions_total{reason="max_keys"}', 0)
    ids = pub(gw, [tick(t, k, i) for i, k in enumerate(["a", "b", "c", "a", "d"])])  # b is evicted
    with gw.stream(path(t, since="snapshot")) as s:
        evs = s.wait_events(3)
        quiet(s, 3)
        assert [e.id for e in evs] == [ids[2], ids[3], ids[4]]  # c, a, d
    assert gw.metrics()['ssegw_keyed_evictions_total{reason="max_keys"}'] == before + 1
    assert topic_keys(gw, t) == 3 and topic_keys(gw, new_topic("none")) == 0


def test_compacted_resume_after_history_trimmed_sends_exactly_the_changed_keys(gw: Gateway) -> None:
    t, other = new_topic("t"), new_topic("o")
    first = pub(gw, [tick(t, "a", "a0"), tick(t, "b", "b0"), tick(t, "c", "c0")])
    # History keeps the last 3 of these 6: the gap after first[0] is not covered by it.
    ids = pub(gw, [tick(t, "b", "b1"), tick(t, "c", "c1"), tick(t, "b", "b2"), tick(other, "x", "o1"),
                   tick(t, "c", "c2"), tick(t, "b", "b3")])
    with gw.stream(path(t, other), {"Last-Event-ID": first[0]}) as s:
        assert s.status == 200
        evs = s.wait_events(4)
        quiet(s, 4)
        assert topics_of(evs[0], "ssegw.compacted") == [t], "first on the stream, for the compacted topic only"
        # b and c changed after the resume id (newest value each), a did not; other replays in full.
        assert [(e.id, e.data) for e in evs[1:]] == [(ids[3], "o1"), (ids[4], "c2"), (ids[5], "b3")]
        live = pub(gw, tick(t, "a", "a-live"))
        assert [e.id for e in s.wait_events(5)[4:]] == live
    assert gw.metrics()["ssegw_compacted_sent_total"] >= 1


def test_reset_when_a_changed_key_was_evicted(gw: Gateway) -> None:
    t = new_topic()
    first = pub(gw, tick(t, "a", "a0"))
    pub(gw, [tick(t, "b", 1), tick(t, "c", 2), tick(t, "a", 3), tick(t, "d", 4), tick(t, "e", 5)])  # b, c evicted
    with gw.stream(path(t), {"Last-Event-ID": first[0]}) as s:
        evs = s.wait_events(1)
        quiet(s, 1)
        assert topics_of(evs[0], "ssegw.reset") == [t]


def test_ttl_expiry_of_keyed_state(gateway) -> None:  # noqa: ANN001
    g = gateway("--history-size", "1", "--history-ttl", "1s", "--heartbeat-interval", "5s", "--flush-interval", "10ms")
    t = new_topic()
    first, a1 = pub(g, [tick(t, "x", "x0"), tick(t, "a", "a1")])
    time.sleep(0.6)
    ids = pub(g, [tick(t, "b", "b0"), tick(t, "c", "c0")])
    with g.stream(path(t), {"Last-Event-ID": first}) as s:  # history keeps only c; keyed state covers
        evs = s.wait_events(4)
        quiet(s, 4)
        assert topics_of(evs[0], "ssegw.compacted") == [t] and [e.id for e in evs[1:]] == [a1, *ids]
    time.sleep(0.6)  # x and a are past the ttl, b and c are not
    with g.stream(path(t, since="snapshot")) as s:
        assert [e.id for e in s.wait_events(2)] == ids
        quiet(s, 2)
    with g.stream(path(t), {"Last-Event-ID": first}) as s:  # a changed after it, and expired
        evs = s.wait_events(1)
        quiet(s, 1)
        assert topics_of(evs[0], "ssegw.reset") == [t]
    assert g.metrics()['ssegw_keyed_evictions_total{reason="ttl"}'] >= 2


def test_no_duplicate_or_gap_at_the_snapshot_live_seam_under_load(gateway) -> None:  # noqa: ANN001
    g = gateway("--max-keys", "1000", "--heartbeat-interval", "5s", "--flush-interval", "5ms")
    t = new_topic("load")
    published: list[tuple[int, str]] = []
    done = threading.Event()

    def publisher() -> None:
        for i in range(150):  # bounded: 150 batches of 8 ticks over 40 keys
            batch = [tick(t, f"k{(i * 8 + j) % 40}", i) for j in range(8)]
            ids = pub(g, batch)
            published.extend((seq(e), str(m["key"])) for e, m in zip(ids, batch, strict=True))
            time.sleep(0.002)
        done.set()

    th = threading.Thread(target=publisher)
    th.start()
    streams: list[Stream] = []
    try:
        for _ in range(8):  # subscribers joining at different moments of the load
            time.sleep(0.04)
            s = g.stream(path(t, since="snapshot"))
            assert s.status == 200
            streams.append(s)
        th.join(30)
        assert done.is_set()
        (end,) = pub(g, tick(t, "end", "end"))
        published.append((seq(end), "end"))
        for s in streams:
            assert s.wait_for(lambda s=s: any(e.id == end for e in s.events), timeout=10)
            _check_seam([seq(e.id) for e in s.events], published)
    finally:
        for s in streams:
            s.close()
        th.join(30)


def _check_seam(got: list[int], published: list[tuple[int, str]]) -> None:
    """``got`` is the snapshot at some head H (the newest event of each key published up to H,
    in publish order) followed by every event published after H: no duplicate, no gap."""
    assert got == sorted(set(got)), "duplicates or out of order"
    for head in [got[0] - 1, *got]:
        newest: dict[str, int] = {}
        for q, k in published:
            if q <= head:
                newest[k] = q
        want = sorted(newest.values()) + [q for q, _ in published if q > head]
        if want == got:
            return
    raise AssertionError(f"no head H splits the stream into snapshot + live: {got[:20]}...")


def test_snapshot_and_compacted_resume_across_gateways_on_redis(gateway, redis_server) -> None:  # noqa: ANN001
    # a: two workers under a supervisor (its admin listener asks a worker), b: one process.
    a, b = (gateway("--redis", redis_server.url, "--history-size", "2", "--max-keys", "4", "--heartbeat-interval", "5s",
                    "--flush-interval", "10ms", "--workers", str(n)) for n in (2, 1))
    for g in (a, b):
        assert wait_until(lambda g=g: g.request("GET", "/readyz", admin=True).status == 200, 10, 0.05)
    t = new_topic("redis")
    first = pub(a, [tick(t, "a", "a0"), tick(t, "b", "b0")])
    ids = pub(a, [tick(t, "c", "c0"), tick(t, "b", "b1"), tick(t, None, "plain")])
    with b.stream(path(t, since="snapshot")) as s:  # published on a, the whole state on b
        assert s.status == 200
        evs = s.wait_events(4)
        quiet(s, 4)
        assert [(e.id, e.data) for e in evs] == [(first[0], "a0"), (ids[0], "c0"), (ids[1], "b1"), (ids[2], "plain")]
        live = pub(a, tick(t, "a", "a1"))
        assert [e.id for e in s.wait_events(5)[4:]] == live
    pub(a, tick(t, "d", "d0"))  # 5 keys: c (the least recently updated) is evicted
    assert topic_keys(a, t) == topic_keys(b, t) == 4
    # History keeps the last 2 (a1, d0).  Keyed state covers a resume from c0 on (b, the
    # unkeyed one, a and d changed since), not one from before c0 (c changed, then was evicted).
    with b.stream(path(t), {"Last-Event-ID": ids[0]}) as s:
        evs = s.wait_events(5)
        quiet(s, 5)
        assert topics_of(evs[0], "ssegw.compacted") == [t]
        assert [e.data for e in evs[1:]] == ["b1", "plain", "a1", "d0"]
    with b.stream(path(t), {"Last-Event-ID": first[1]}) as s:
        evs = s.wait_events(1)
        quiet(s, 1)
        assert topics_of(evs[0], "ssegw.reset") == [t]

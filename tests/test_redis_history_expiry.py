"""Resume after a topic's Redis history expired (docs/api.md "Ids, history and resume": where
history no longer covers the gap, the stream opens with ``event: ssegw.reset`` -- never a
silent gap).

When a topic's history stream is gone (it expires ``history_ttl`` + 60 s after its last
publish) or was created anew, ``redis_lib.lua`` decides coverage from the shard's clock:
"the highest sequence published at or before ``now - history_ttl``".  The clock keeps at
most one sample per second, so that answer must be an upper bound; it used to be the
last sample at or before the time, which misses whatever was published in the rest of that
sample's second (and everything before the oldest sample, once retention trimmed the
clock).  A client whose last id fell in such a second lost the events after it silently.

- ``test_resume_after_real_expiry_*``: the reported case end to end -- a gateway on a real
  ``redis-server``, two publishes 0.3 s apart, Redis really expiring the streams (about a
  minute: the 60 s margin is the library's), then resumes over real sockets.
- The fast tests call the library's functions directly on a real ``redis-server``.  They
  stand ``DEL`` in for the stream's expiry: the library cannot tell the two apart, and in
  both every event of the topic is older than the horizon the test asks about.  One checks
  the other side: a brand-new topic's stream must not count its own batch as lost.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from importlib import resources

import pytest
import redis
from harness import Gateway, Stream, wait_until

from ssegw.broker.redis import stream_key

SEQ, EPOCH, CLOCK = "{ssegw:0}:seq", "{ssegw:0}:epoch", "{ssegw:0}:clock"
#: What a gateway with a 1 h history_ttl passes as clock retention (longest ttl + 1 h).
RETENTION_MS = 7_200_000
#: The library keeps an expiring stream this long past its ttl (``PEXPIRE ttl + 60000``).
EXPIRY_MARGIN_S = 60.0


def new_topic(tag: str) -> str:
    return f"hx.{tag}.{uuid.uuid4().hex[:10]}"


def seq_of(eid: str) -> int:
    return int(eid.rsplit("-", 1)[1])


def compact(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


# -- the library, called directly ---------------------------------------------------------------


@pytest.fixture
def lib(redis_server):
    """A client of the test's redis-server with the ssegw library loaded (the checkout's own
    ``redis_lib.lua``, as a gateway would load it)."""
    r = redis.Redis(port=redis_server.port, socket_timeout=10)
    r.function_load(resources.files("ssegw.broker").joinpath("redis_lib.lua").read_text(), replace=True)
    yield r
    r.close()


def publish(r: redis.Redis, msgs: list[tuple[str, int]], retention_ms: int = RETENTION_MS) -> list[int]:
    """One ``FCALL ssegw_publish`` (the documented call) of ``(topic, ttl_ms)`` messages
    without key; returns their sequence numbers."""
    keys = [SEQ, EPOCH, CLOCK, f"{{ssegw:0}}:req:{uuid.uuid4().hex}", *(stream_key(t) for t, _ in msgs)]
    args: list[object] = [len(msgs), retention_ms]
    for t, ttl in msgs:
        args += [f"{{ssegw:0}}:c:{t}", "", "0", f"data: {t}\n", 1000, ttl]
    res = r.fcall("ssegw_publish", len(keys), *keys, *args)
    return [int(x) for x in res[1:]]


def covered(r: redis.Redis, topic: str, after: int, ttl_ms: int) -> bool:
    """``ssegw_replay`` in mode ``after``: does history cover everything of ``topic`` after
    ``after`` for a reader whose history_ttl is ``ttl_ms``?"""
    res = r.fcall_ro("ssegw_replay", 4, SEQ, EPOCH, CLOCK, stream_key(topic), "after", after, ttl_ms)
    return int(res[3][0]) == 1


def redis_ms(r: redis.Redis) -> int:
    sec, usec = r.time()
    return sec * 1000 + usec // 1000


def published_at(r: redis.Redis, topic: str) -> int:
    """The ``t`` (Redis ms) of the single entry of ``topic``'s stream."""
    ((_, fields),) = r.xrange(stream_key(topic))
    return int(fields[b"t"])


def test_clock_never_places_an_event_after_the_time_it_was_published(lib) -> None:
    """For every event, asked about any time at or after its publish, the clock answers at
    least its sequence: a resume from just before it is not covered once its stream is gone
    (replay side), nor once its stream is created anew (``MAXDELETEDID``, publish side).

    Publishes come 50-400 ms apart, single and in batches, so most share a clock second with
    an earlier sample -- the reported pattern.  One topic per event: the event is then all
    its stream held, and the stream is gone exactly when it would have expired."""
    rnd = random.Random(20240611)
    events: list[tuple[str, int]] = []  # (topic, seq)
    for i in range(12):
        batch = [new_topic(f"p{i}x{j}") for j in range(rnd.choice((1, 1, 2, 3)))]
        seqs = publish(lib, [(t, 3_600_000) for t in batch])
        events += zip(batch, seqs, strict=True)
        time.sleep(rnd.uniform(0.05, 0.4))
    at = {t: published_at(lib, t) for t, _ in events}
    head = events[-1][1]
    lib.delete(*(stream_key(t) for t, _ in events))  # what their expiry does, a minute sooner

    # Replay side: the stream is gone; horizon = now - ttl >= the event's publish time.
    gaps = []
    for t, seq in events:
        ttl = redis_ms(lib) - at[t]
        if ttl > 0 and covered(lib, t, seq - 1, ttl):
            gaps.append(seq)
        assert covered(lib, t, head, max(ttl, 1)), "a resume from the newest id lost nothing"
    assert gaps == [], f"resume from just before these seqs was called covered: silent gaps {gaps}"

    # Publish side: each topic's stream created anew by one batch whose per-topic ttl puts
    # (now - ttl) at or after the old event; its MAXDELETEDID must make the old one count
    # as trimmed.
    now = redis_ms(lib)
    again = [(t, now - at[t]) for t, _ in events if now - at[t] > 0]
    publish(lib, again)
    gaps = [seq for t, seq in events if now - at[t] > 0 and covered(lib, t, seq - 1, 3_600_000)]
    assert gaps == [], f"a stream created anew hid the expired events {gaps}: silent gaps"


def test_new_topics_are_covered_from_before_their_first_event(lib) -> None:
    """The other side of conservative: a stream created for a topic never published before
    must not count events of its own batch, or of the last second, as lost -- a subscriber
    (or a worker filling a gap) that saw everything before the batch loses nothing."""
    batch = [new_topic(f"new{j}") for j in range(3)]
    seqs = publish(lib, [(t, 3_600_000) for t in batch])  # the shard's first publish
    assert all(covered(lib, t, 0, 3_600_000) for t in batch), "a first batch reset its own topics"
    more = [new_topic(f"more{j}") for j in range(3)]
    publish(lib, [(t, 3_600_000) for t in more])  # within the same clock second
    assert all(covered(lib, t, seqs[-1], 3_600_000) for t in more), "a batch reset its own new topics"


def test_clock_trimmed_by_retention_still_places_old_events(lib) -> None:
    """Once retention trimmed every clock sample at or before the horizon, the clock used to
    answer 0 ("nothing published that early") and any resume counted as covered.

    Real retention is the longest history_ttl + 1 h, so this takes an hour of quiet on the
    shard; here a publish passes a 500 ms retention instead, which leaves the clock in the
    same state: samples of the topic's events trimmed, one newer sample left."""
    x = new_topic("retained")
    (s1,) = publish(lib, [(x, 3_600_000)])
    time.sleep(1.1)  # a second apart: both events get their own clock sample
    (s2,) = publish(lib, [(x, 3_600_000)])
    t2 = max(int(f[b"t"]) for _, f in lib.xrange(stream_key(x)))
    time.sleep(1.1)
    publish(lib, [(new_topic("other"), 3_600_000)], retention_ms=500)  # trims both samples
    lib.delete(stream_key(x))  # x expired (its last event is older than the horizon below)
    ttl = redis_ms(lib) - t2  # horizon = now - ttl >= t2, before the other topic's publish
    assert not covered(lib, x, s1, ttl), f"seq {s2} was published before the horizon; resume after {s1} is a gap"
    assert covered(lib, x, s2, ttl), "nothing of the topic after its last event"


# -- the reported case, end to end --------------------------------------------------------------


def first_events(s: Stream, wait: float = 3.0) -> list[tuple[str, str, str]]:
    """What the stream opened with: events within ``wait`` s, then 0.5 s of quiet."""
    s.wait_events(1, wait)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline and s.pump(deadline - time.monotonic()):
        pass
    return [(e.event, e.id, e.data) for e in s.events]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_resume_after_real_expiry_gets_reset(gateway, redis_server) -> None:
    """Two publishes 0.3 s apart on a topic, its history expires in Redis, the client resumes
    after the first one: the stream must open with ``ssegw.reset``.  Also through the other
    door: the topic is published again after expiry (its stream created anew), and the
    resume must not get the new event alone.  ~65 s: Redis drops the streams 3 s + 60 s
    after the last publish -- so behind ``-m slow``; the tests above hold the library's
    clock and coverage rules to the same cases without the wait."""
    g: Gateway = gateway("--redis", redis_server.url, "--history-ttl", "3s",
                         "--heartbeat-interval", "1s", "--flush-interval", "10ms")
    assert wait_until(lambda: g.request("GET", "/readyz", admin=True).status == 200, 10, 0.05), "".join(g.log[-20:])
    a, b = new_topic("a"), new_topic("b")

    def pub(topic: str, data: str) -> str:
        resp = g.publish({"topic": topic, "data": data})
        assert resp.status == 200, resp
        return resp.json()["ids"][0]

    a1, b1 = pub(a, "a1"), pub(b, "b1")
    time.sleep(0.3)
    a2, b2 = pub(a, "a2"), pub(b, "b2")
    assert [seq_of(i) for i in (a1, b1, a2, b2)] == [1, 2, 3, 4]

    r = redis.Redis(port=redis_server.port, socket_timeout=10)
    try:
        # EXISTS expires a key whose time is up, so this returns as soon as Redis drops them.
        gone = wait_until(lambda: r.exists(stream_key(a), stream_key(b)) == 0, 3 + EXPIRY_MARGIN_S + 20, 0.5)
        assert gone, f"streams still there, ttl {r.pttl(stream_key(a))} ms"
    finally:
        r.close()

    # Where nothing was lost there is no reset: a client that saw b2, the newest event
    # before both topics expired, gets nothing on a.
    with g.stream(f"/events?topic={a}", {"Last-Event-ID": b2}) as s:
        assert s.status == 200, s.error_body
        assert first_events(s, wait=1.0) == []

    # The stream is gone: resume after a1 lost a2.
    with g.stream(f"/events?topic={a}", {"Last-Event-ID": a1}) as s:
        assert s.status == 200, s.error_body
        evs = first_events(s)
        assert evs[:1] == [("ssegw.reset", "", compact({"topics": [a]}))], \
            f"a2 ({a2}) is gone, yet the stream opened with {evs}: a silent gap"
        assert len(evs) == 1, f"a reset topic continues live without replay: {evs}"

    # b3 creates b's stream anew.  (Both resumes run well within the 3 s ttl of b3, which
    # would otherwise count as trimmed itself.)  After b2 nothing was lost: b3 is replayed.
    b3 = pub(b, "b3")
    with g.stream(f"/events?topic={b}", {"Last-Event-ID": b2}) as s:
        assert s.status == 200, s.error_body
        assert first_events(s, wait=1.0) == [("message", b3, "b3")]
    # After b1, b2 is lost: a reset, not b3 alone.
    with g.stream(f"/events?topic={b}", {"Last-Event-ID": b1}) as s:
        assert s.status == 200, s.error_body
        evs = first_events(s, wait=1.0)
        assert evs[:1] == [("ssegw.reset", "", compact({"topics": [b]}))], \
            f"b2 ({b2}) is gone, yet the stream opened with {evs}: a silent gap"
        assert len(evs) == 1, f"a reset topic continues live without replay: {evs}"

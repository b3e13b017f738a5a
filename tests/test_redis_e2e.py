"""End-to-end tests of clustering over Redis: real gateway processes started with
``--redis URL`` on a real ``redis-server`` (docs/api.md "Ids, history and resume": resume
"on any worker and any host of the cluster"; "Admin": subscriber counts "across the
cluster"; "Publish": backends "may also publish straight into Redis").

Two gateway processes on one Redis stand for two hosts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from urllib.parse import urlencode

import pytest
from harness import Gateway, Stream, wait_until

#: What the gateway passes as clock retention: the longest history_ttl + 1 h margin.
RETENTION_MS = str(3_600_000 + 3_600_000)


def new_topic(tag: str = "t") -> str:
    return f"rd.{tag}.{uuid.uuid4().hex[:10]}"


def path(*topics: str, **params: str) -> str:
    return "/events?" + urlencode([("topic", t) for t in topics] + list(params.items()))


def wait_ready(g: Gateway, timeout: float = 10.0) -> None:
    ok = wait_until(lambda: g.request("GET", "/readyz", admin=True).status == 200, timeout, 0.05)
    assert ok, "gateway never became ready:\n" + "".join(g.log[-20:])


@pytest.fixture
def cluster(gateway, redis_server):
    """``cluster(n)`` -> n ready gateways on the test's Redis."""

    def make(n: int = 1, *extra: str) -> list[Gateway]:
        gws = [gateway("--redis", redis_server.url, "--heartbeat-interval", "1s", "--flush-interval", "10ms", *extra)
               for _ in range(n)]
        for g in gws:
            wait_ready(g)
        return gws

    return make


def pub(g: Gateway, msgs: object) -> list[str]:
    r = g.publish(msgs)
    assert r.status == 200, r
    ids = r.json()["ids"]
    assert isinstance(ids, list) and all(isinstance(i, str) for i in ids)
    return ids


def wait_n(s: Stream, n: int, timeout: float = 5.0) -> list:
    evs = s.wait_events(n, timeout)
    assert len(evs) >= n, f"got {len(evs)} of {n} events: {[(e.id, e.data) for e in evs]}"
    return evs


def settle(s: Stream, t: float = 0.3) -> None:
    """Read whatever else arrives within ``t`` (to catch duplicates)."""
    deadline = time.monotonic() + t
    while time.monotonic() < deadline and s.pump(deadline - time.monotonic()):
        pass


def seq_of(eid: str) -> int:
    return int(eid.rsplit("-", 1)[1])


# -- basics -------------------------------------------------------------------------------------


def test_publish_subscribe_and_readyz(cluster) -> None:
    (g,) = cluster(1)
    assert g.request("GET", "/readyz", admin=True).status == 200
    assert g.stats()["broker"]["kind"] == "redis"
    t = new_topic()
    with g.stream(path(t)) as s:
        assert s.status == 200
        ids = pub(g, {"topic": t, "data": "one"}) + pub(g, [{"topic": t, "data": {"n": 2}},
                                                            {"topic": t, "data": "three\nlines\r\nhere", "event": "x"}])
        wait_n(s, 3)
        settle(s)
        assert [(e.id, e.event, e.data) for e in s.events] == [
            (ids[0], "message", "one"), (ids[1], "message", '{"n":2}'), (ids[2], "x", "three\nlines\nhere")]
    assert [seq_of(i) for i in ids] == sorted({seq_of(i) for i in ids})
    assert len({i.rsplit("-", 1)[0] for i in ids}) == 1
    # History lives in Redis: since=earliest replays it, and a resume from the first id too.
    with g.stream(path(t, since="earliest")) as s:
        assert [e.id for e in wait_n(s, 3)] == ids
    with g.stream(path(t), {"Last-Event-ID": ids[0]}) as s:
        assert [e.id for e in wait_n(s, 2)] == ids[1:]
        settle(s)
        assert len(s.events) == 2


def test_two_gateways_fan_out_and_resume_on_the_other(cluster) -> None:
    a, b = cluster(2)
    t1, t2 = new_topic("t1"), new_topic("t2")
    with a.stream(path(t1, t2)) as sa, b.stream(path(t1, t2)) as sb, b.stream(path(t2)) as sb2:
        assert sa.status == sb.status == sb2.status == 200
        ids: list[tuple[str, str, str]] = []  # (topic, id, data)
        for i in range(6):
            t = (t1, t2)[i % 2]
            (eid,) = pub(a, {"topic": t, "data": f"e{i}"})
            ids.append((t, eid, f"e{i}"))
        wait_n(sa, 6)
        wait_n(sb, 6)
        wait_n(sb2, 3)
        settle(sb)
        want = [(eid, d) for _, eid, d in ids]
        assert [(e.id, e.data) for e in sa.events] == want
        assert [(e.id, e.data) for e in sb.events] == want, "subscribers on B get what is published on A"
        assert [(e.id, e.data) for e in sb2.events] == [(eid, d) for t, eid, d in ids if t == t2]
        last_seen = sa.events[3].id
        sa.close()  # the client of A drops after its 4th event ...
        # ... meanwhile more is published, on both hosts
        for i in range(6, 12):
            t = (t1, t2)[i % 2]
            (eid,) = pub(b if i % 3 else a, {"topic": t, "data": f"e{i}"})
            ids.append((t, eid, f"e{i}"))
        wait_n(sb, 12)
        # ... and reconnects to B with the last id it saw.
        with b.stream(path(t1, t2), {"Last-Event-ID": last_seen}) as again:
            assert again.status == 200
            missed = [(eid, d) for _, eid, d in ids[4:]]
            wait_n(again, len(missed))
            settle(again)
            assert [(e.id, e.data) for e in again.events] == missed, "exactly what it missed, once, in order"
            assert not any(e.event == "ssegw.reset" for e in again.events)
            (eid,) = pub(a, {"topic": t1, "data": "live"})
            wait_n(again, len(missed) + 1)
            settle(again)
            assert [(e.id, e.data) for e in again.events[len(missed):]] == [(eid, "live")]
    # The query form works across hosts too.
    with a.stream(path(t1, t2, last_event_id=ids[9][1])) as s:
        wait_n(s, 3)
        settle(s)
        assert [e.data for e in s.events] == ["e10", "e11", "live"]


def test_admin_topic_counts_subscribers_across_gateways(cluster) -> None:
    a, b = cluster(2)
    t, other = new_topic("count"), new_topic("other")

    def counts() -> tuple[int, int]:
        out = []
        for g in (a, b):
            r = g.request("GET", f"/admin/topics/{t}", admin=True)
            assert r.status == 200, r
            body = r.json()
            assert body["topic"] == t
            out.append(body["subscribers"])
        return out[0], out[1]

    streams = [a.stream(path(t)) for _ in range(2)] + [b.stream(path(t)) for _ in range(3)]
    streams.append(b.stream(path(other)))
    try:
        assert all(s.status == 200 for s in streams)
        assert wait_until(lambda: counts() == (5, 5), 8, 0.2), f"counts {counts()}, want 5 on both"
        for s in streams[2:4]:  # two of B's go away
            s.close()
        assert wait_until(lambda: counts() == (3, 3), 8, 0.2), f"counts {counts()}, want 3 on both"
        streams[0].close()
        assert wait_until(lambda: counts() == (2, 2), 8, 0.2), f"counts {counts()}, want 2 on both"
        r = a.request("GET", f"/admin/topics/{new_topic('nobody')}", admin=True)
        assert r.status == 200 and r.json()["subscribers"] == 0
    finally:
        for s in streams:
            s.close()
    assert wait_until(lambda: counts() == (0, 0), 8, 0.2), f"counts {counts()}, want 0 on both"


def test_readyz_and_stats_on_both_gateways(cluster) -> None:
    gws = cluster(2)
    for g in gws:
        r = g.request("GET", "/readyz", admin=True)
        assert r.status == 200, r
        br = g.stats()["broker"]
        assert br["kind"] == "redis" and br["up"] is True, br


# -- backends publishing straight into Redis ------------------------------------------------------


def fcall_args(topic: str, body: str, key: str | None = None, size: int = 1000, ttl_ms: int = 3_600_000) -> list[str]:
    """The documented FCALL for one message (see redis_lib.lua's header)."""
    return ["FCALL", "ssegw_publish", "5",
            "{ssegw:0}:seq", "{ssegw:0}:epoch", "{ssegw:0}:clock", f"{{ssegw:0}}:req:{uuid.uuid4().hex}",
            f"{{ssegw:0}}:h:{topic}",
            "1", RETENTION_MS,
            f"{{ssegw:0}}:c:{topic}", key or "", "1" if key is not None else "0", body, str(size), str(ttl_ms)]


def parse_fcall_reply(raw: bytes) -> str:
    """``*2 $len epoch :seq`` -> the event id ``epoch-seq``."""
    parts = raw.split(b"\r\n")
    assert parts[0] == b"*2", raw
    assert parts[1].startswith(b"$"), raw
    epoch = parts[2].decode()
    assert parts[3].startswith(b":"), raw
    return f"{epoch}-{int(parts[3][1:])}"


def test_backend_publishes_with_fcall(cluster, redis_server) -> None:
    a, b = cluster(2)
    t = new_topic("backend")
    with a.stream(path(t)) as sa, b.stream(path(t)) as sb:
        (g1,) = pub(a, {"topic": t, "data": "via gateway"})
        f1 = parse_fcall_reply(redis_server.command(*fcall_args(t, "data: from backend\n")))
        f2 = parse_fcall_reply(redis_server.command(
            *fcall_args(t, "event: price\ndata: {\"p\":42}\ndata: second line\n", key="AAPL")))
        (g2,) = pub(b, {"topic": t, "data": "via gateway again"})
        want = [(g1, "message", "via gateway"), (f1, "message", "from backend"),
                (f2, "price", '{"p":42}\nsecond line'), (g2, "message", "via gateway again")]
        for s in (sa, sb):
            wait_n(s, 4)
            settle(s)
            assert [(e.id, e.event, e.data) for e in s.events] == want
        assert f1.rsplit("-", 1)[0] == g1.rsplit("-", 1)[0], "one epoch for gateway and backend ids"
        assert seq_of(g1) < seq_of(f1) < seq_of(f2) < seq_of(g2)
    # The backend's events are in history like any other: resume from one of them.
    with b.stream(path(t), {"Last-Event-ID": f1}) as s:
        wait_n(s, 2)
        settle(s)
        assert [e.id for e in s.events] == [f2, g2]


def test_backend_publishes_with_redis_cli(cluster, redis_server) -> None:
    """The exact redis-cli command the README documents."""
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    (g,) = cluster(1)
    t = new_topic("cli")
    with g.stream(path(t)) as s:
        cmd = ["redis-cli", "-p", str(redis_server.port), *fcall_args(t, 'data: {"hello":"world"}\n')]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout.split()
        assert len(out) == 2, out
        eid = f"{out[0]}-{int(out[1])}"
        wait_n(s, 1)
        settle(s)
        assert [(e.id, e.data) for e in s.events] == [(eid, json.dumps({"hello": "world"}, separators=(",", ":")))]


# -- history bounds -----------------------------------------------------------------------------


def test_resume_beyond_trimmed_history_gets_reset(cluster) -> None:
    # max_keys 0: history coverage alone (keyed state would compact; tests/test_keyed_redis.py)
    a, b = cluster(2, "--history-size", "3", "--max-keys", "0")
    t, quiet = new_topic("trimmed"), new_topic("quiet")
    (start,) = pub(a, {"topic": quiet, "data": "start"})
    ids = [pub(a, {"topic": t, "data": f"e{i}"})[0] for i in range(10)]
    with b.stream(path(t, quiet), {"Last-Event-ID": start}) as s:
        assert s.status == 200
        s.wait_events(1)
        settle(s, 0.5)
        evs = [(e.event, e.data) for e in s.events]
        assert evs and evs[0] == ("ssegw.reset", json.dumps({"topics": [t]}, separators=(",", ":"))), \
            f"7 of 10 events after the client's id are gone, yet it got {evs} (a silent gap)"
        assert len(s.events) == 1, "a reset topic continues live, without replay"
    # Within what history still holds, resume works on either gateway.
    with a.stream(path(t), {"Last-Event-ID": ids[6]}) as s:
        wait_n(s, 3)
        settle(s)
        assert [e.id for e in s.events] == ids[7:]

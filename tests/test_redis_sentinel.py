"""Redis Sentinel: ``redis = "redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE"``.

CONTRACT.md "Redis failover (Cluster or Sentinel)": the gateway serves again within the
failover time + 5 s after the primary changes; acknowledged events are delivered exactly once,
in order, with no silent gap.  Each Redis test starts its own primary + replica + three
sentinels (quorum 2, ``down-after-milliseconds`` 1000, tests/redis_sentinel_harness.py).

1. Publish, subscribe and resume through a sentinel URL, on the primary the sentinels name.
2. ``kill -9`` of the primary under publishing load (a publisher re-sending 503s): the gateways
   ask the sentinels again, resubscribe on the promoted replica and fill the gap.
3. Malformed sentinel URLs are configuration errors naming ``redis`` (no Redis needed).
"""

from __future__ import annotations

import time

import pytest
import redis
from harness import Gateway, wait_until
from redis_sentinel_harness import SentinelSetup
from test_config import from_toml, write  # noqa: F401 - ``write`` is a fixture
from test_redis_cluster import Reader, path, per_topic, ready, run_id, stream_numbers
from test_redis_failover import Paced

from ssegw.config import ConfigError

#: The history stream key of ``topic`` (one shard: ``{ssegw:0}``).
HKEY = "{ssegw:0}:h:"


def start_gateway(url: str, *extra: str) -> Gateway:
    g = Gateway("--redis", url, "--heartbeat-interval", "1s", "--flush-interval", "10ms", "--retry", "200ms",
                *extra)
    g.start()
    assert wait_until(lambda: ready(g), 20, 0.05), "gateway never became ready:\n" + "".join(g.log)
    return g


def history(port: int, topic: str) -> list[int]:
    """The numbers in ``topic``'s history stream on the node at ``port``."""
    cl = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    try:
        return stream_numbers(cl, HKEY + topic)
    finally:
        cl.close()


def redis_log(gws: list[Gateway]) -> str:
    return "\n".join(f"gw{i}: {[ln.strip()[:300] for ln in list(g.log) if 'redis' in ln][-8:]}"
                     for i, g in enumerate(gws))


@pytest.mark.timeout(60)
def test_publish_subscribe_resume_through_sentinel(tmp_path):
    """Two gateways on the sentinel URL (sentinels listed in different orders): a publish on
    one reaches a subscriber on the other, lands in the history of the primary the sentinels
    name, and a client resuming from the first id gets the rest."""
    rs = SentinelSetup(tmp_path).start()
    gws: list[Gateway] = []
    try:
        primary = rs.primary_port()
        assert primary == rs.nodes[0].port
        rev = "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in reversed(rs.sentinels)) + "/ssegw-test"
        gws = [start_gateway(rs.url), start_gateway(rev)]
        t = f"sn.{run_id()}"
        with gws[1].stream(path(t)) as s:
            assert s.status == 200, s.error_body
            msgs = [{"topic": t, "data": f"{t}|{i}"} for i in range(3)]
            r = gws[0].publish(msgs)
            assert r.status == 200, r
            ids = r.json()["ids"]
            evs = s.wait_events(3, 5)
            assert [e.data for e in evs] == [m["data"] for m in msgs]
            assert [e.id for e in evs] == ids
        assert history(primary, t) == [0, 1, 2]
        with gws[1].stream(path(t), {"Last-Event-ID": ids[0]}) as s:
            assert s.status == 200, s.error_body
            evs = s.wait_events(2, 5)
            assert [(e.id, e.data) for e in evs] == [(ids[i], f"{t}|{i}") for i in (1, 2)]
        for g in gws:
            br = g.stats()["broker"]
            assert br["up"] and br["kind"] == "redis" and br["gap_lost"] == 0, br
    finally:
        for g in gws:
            g.kill()
        rs.stop()


@pytest.mark.timeout(60)
def test_primary_killed_sentinel_promotes_replica_gateway_follows(tmp_path):
    """``kill -9`` of the primary under load: two publishers at ~50 msg/s each, one per gateway
    with two topics each, re-sending a message answered 503 (nothing was published) until it
    gets a 200; a subscriber of all four topics on each gateway.  A publish in flight at the
    kill is resolved by its request token once the gateway reaches the new primary (its real
    answer, usually a 200); the other publisher meanwhile gets 503s.

    The gateways run with ``--redis-wait-replicas 0``: the promoted primary has no replica
    until the old node is restarted and Sentinel turns it into one (about 10 s), and with the
    default ``auto`` publishes would get 504 for up to about 10 s.  So a 200 here means "accepted by the
    primary"; the replica was in sync on loopback (Redis sends the replication stream in the
    same event-loop pass as the reply), so the kill loses nothing acknowledged, which the
    delivery check below verifies.

    Bound: the first 200 to a request sent after the kill comes at most 5 s after a majority of
    the sentinels name the promoted replica (CONTRACT.md: failover time + 5 s).  Every 200 is
    in the new primary's history once and in order, nothing answered 503 is, and each
    subscriber got exactly that history, with no reset and no stream closed."""
    rs = SentinelSetup(tmp_path).start()
    gws: list[Gateway] = []
    readers: list[Reader] = []
    pubs: list[Paced] = []
    try:
        old, new = rs.nodes
        gws = [start_gateway(rs.url, "--redis-wait-replicas", "0") for _ in range(2)]
        topics = [f"sk{i}.{run_id()}" for i in range(4)]
        for i, g in enumerate(gws):
            s = g.stream(path(*topics))
            assert s.status == 200, s.error_body
            readers.append(Reader(s, topics, f"all@gw{i}"))
        for r in readers:
            r.start()
        pubs = [Paced([gws[0]], topics[:2]), Paced([gws[1]], topics[2:])]
        for p in pubs:
            p.start()
            time.sleep(0.01)  # out of phase: at most one is in flight at the kill
        time.sleep(2.0)
        old.kill()
        t_kill = time.monotonic()
        assert wait_until(lambda: rs.primary_port() == new.port, 20, 0.02), "the sentinels did not promote"
        t_promoted = time.monotonic()
        assert rs.role(new) == "master"
        assert wait_until(lambda: all(ready(g) for g in gws), 10, 0.05), redis_log(gws)
        time.sleep(3.0)
        for p in pubs:
            p.stop()
        log = sorted(x for p in pubs for x in p.log)
        first = min(t1 for t0, t1, code, _ in log if code == 200 and t0 >= t_kill)
        run503, start = 0.0, None
        for t0, t1, code, _ in log:
            if code == 503:
                start = t0 if start is None else start
                run503 = max(run503, t1 - start)
            else:
                start = None
        print(f"\nsentinel kill -9: promoted {t_promoted - t_kill:.2f} s after the kill, first 200 "
              f"{first - t_kill:.2f} s after the kill ({first - t_promoted:+.2f} s after the promotion), "
              f"{sum(c == 503 for *_, c, _ in log)} 503s, longest 503 run {run503:.2f} s, longest request "
              f"{max(t1 - t0 for t0, t1, _, _ in log):.2f} s")
        assert first - t_promoted <= 5.0, (first - t_promoted, redis_log(gws))
        # Delivery: history on the new primary is what was acknowledged, and what each got.
        acked = {t: a for p in pubs for t, a in p.acked.items()}
        maybe = {t: set(m) for p in pubs for t, m in p.maybe.items()}
        for p in pubs:
            assert not p.unexpected, p.unexpected[:5]
        want = {t: history(new.port, t) for t in topics}
        for t in topics:
            h = want[t]
            assert all(a < b for a, b in zip(h, h[1:], strict=False)), (t, h[-20:])
            assert not set(acked[t]) - set(h), (t, sorted(set(acked[t]) - set(h))[:20])
            assert not set(h) - set(acked[t]) - maybe[t], (t, sorted(set(h) - set(acked[t]) - maybe[t])[:20])
        n = sum(map(len, want.values()))
        assert n > 200, n
        for r in readers:
            assert wait_until(lambda r=r: len(r.s.events) >= n, 15, 0.05), (r.label, len(r.s.events), n)
        time.sleep(0.5)
        for r in readers:
            evs = r.s.events
            assert not any(e.event == "ssegw.reset" for e in evs), f"{r.label} got a reset"
            assert not r.s.closed, f"{r.label}: stream closed"
            assert len({e.id for e in evs}) == len(evs), f"{r.label}: an id repeated"
            got = per_topic(evs)
            for t in topics:
                assert got.get(t, []) == want[t], (r.label, t, got.get(t, [])[-20:], want[t][-20:])
        for g in gws:
            br = g.stats()["broker"]
            assert br["up"] and br["gap_lost"] == 0, br
            logs = [ln for ln in list(g.log) if "redis shard ssegw:0 " in ln]
            assert any("unavailable (" in ln for ln in logs), logs
            assert any(f"available again on 127.0.0.1:{new.port}" in ln for ln in logs), logs
    finally:
        for p in pubs:
            p.stop()
        for r in readers:
            r.stop()
            r.s.close()
        for g in gws:
            g.kill()
        rs.stop()


@pytest.mark.timeout(60)
def test_planned_sentinel_failover_gateway_moves_within_the_bound(tmp_path):
    """``SENTINEL FAILOVER`` (planned) while a publisher runs at ~50 msg/s through a gateway
    with ``--redis-wait-replicas 0``.  Sentinel promotes the replica and demotes the old
    primary only about 10 s later, and the old primary takes writes until then: the gateway's
    periodic check asks the sentinels (``Layout.confirm``, every 3 s) and moves.  Measured:
    the first 200 whose message landed on the new primary, at most 5 s after a majority of the
    sentinels name it.  Publishes the old primary took after the switch are lost (Sentinel
    has no fencing; README "Redis Sentinel"), so exact delivery is not asserted here: what was
    answered 200 before the failover and after the move is in the new primary's history."""
    rs = SentinelSetup(tmp_path).start()
    gws: list[Gateway] = []
    pub: Paced | None = None
    try:
        old, new = rs.nodes
        gws = [start_gateway(rs.url, "--redis-wait-replicas", "0")]
        topic = f"sp.{run_id()}"
        pub = Paced(gws, [topic])
        pub.start()
        time.sleep(1.0)
        t_cmd = time.monotonic()
        assert rs.sentinels[0].command("SENTINEL", "FAILOVER", "ssegw-test").startswith(b"+OK")
        assert wait_until(lambda: rs.primary_port() == new.port, 20, 0.02), "the sentinels did not switch"
        t_switch = time.monotonic()
        assert wait_until(lambda: any(f"available again on 127.0.0.1:{new.port}" in ln for ln in list(gws[0].log)),
                          10, 0.02), redis_log(gws)
        t_moved = time.monotonic()
        time.sleep(1.0)
        pub.stop()
        landed = set(history(new.port, topic))
        acked = pub.acked[topic]
        attempts = [(t0, t1, c) for t0, t1, c, _ in pub.log]
        oks = [t1 for (t0, t1, c), n in zip((a for a in attempts if a[2] == 200), acked, strict=True)
               if t0 >= t_switch and n in landed]
        first = min(oks)
        print(f"\nsentinel planned failover: switch {t_switch - t_cmd:.2f} s after SENTINEL FAILOVER, gateway "
              f"moved {t_moved - t_switch:+.2f} s and first 200 on the new primary {first - t_switch:+.2f} s "
              f"after the switch; {sum(n not in landed for n in acked)} of {len(acked)} 200s lost to the old primary")
        assert first - t_switch <= 5.0, (first - t_switch, redis_log(gws))
        before = [n for (t0, t1, c), n in zip((a for a in attempts if a[2] == 200), acked, strict=True) if t1 < t_cmd]
        after = [n for (t0, t1, c), n in zip((a for a in attempts if a[2] == 200), acked, strict=True) if t0 >= first]
        assert before and after and not (set(before) | set(after)) - landed, (before[-5:], after[:5], sorted(landed)[-5:])
    finally:
        if pub is not None:
            pub.stop()
        for g in gws:
            g.kill()
        rs.stop()


@pytest.mark.parametrize("url", [
    "redis+sentinel://",
    "redis+sentinel://127.0.0.1:26379",
    "redis+sentinel://127.0.0.1:26379/",
    "redis+sentinel://127.0.0.1/mymaster",
    "redis+sentinel://127.0.0.1:0/mymaster",
    "redis+sentinel://127.0.0.1:70000/mymaster",
    "redis+sentinel://127.0.0.1:26379,/mymaster",
    "redis+sentinel://,127.0.0.1:26379/mymaster",
    "redis+sentinel://127.0.0.1:26379/my/master",
    "redis+sentinel://127.0.0.1:26379/mymaster?db=1",
    "redis+sentinel://user:secret@127.0.0.1:26379/mymaster",
    "redis+sentinels://127.0.0.1:26379/mymaster",
])
def test_malformed_sentinel_urls_are_errors_naming_redis(write, url):  # noqa: F811
    with pytest.raises(ConfigError) as exc:
        from_toml(write, f'redis = "{url}"\n')
    assert exc.value.key == "redis"
    assert str(exc.value).startswith("redis:")
    assert "secret" not in str(exc.value)


@pytest.mark.parametrize("url", [
    "redis+sentinel://127.0.0.1:26379/mymaster",
    "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380,[::1]:26381/my-master.1",
    "redis+sentinel://sentinel-a.example:5000,sentinel_b:5001/svc",
])
def test_sentinel_urls_are_accepted(write, url):  # noqa: F811
    assert from_toml(write, f'redis = "{url}"\n').redis == url

"""Epoch integrity on a real 3 primaries + 3 replicas Redis Cluster (CONTRACT.md "Redis failover":
a failover that lost writes never yields a reused id or a silent gap; the affected topics get
``ssegw.reset``).  ssegw/broker/redis_pubsub.py, "Epoch integrity".

1. The issue's forced loss, with ``--redis-wait-replicas 0``: replication cut on a primary
   (``ACL SETUSER default -psync -sync`` + ``CLIENT KILL TYPE replica``), B1..B5 answered 200,
   the primary ``kill -9``-ed and its replica promoted with ``CLUSTER FAILOVER TAKEOVER``, then
   C1..C5.  The shard gets a new epoch: open streams are closed, resuming from any id seen
   before gets ``ssegw.reset`` first, no id ever names two different events (streams, publish
   answers, ``since=earliest``), and the loss is counted and logged on both gateways.
2. A planned ``CLUSTER FAILOVER`` under load keeps the epoch: 0 resets.
3. ``kill -9`` of a primary whose replica is current (``redis_wait_replicas`` auto, 1) keeps it too.
4. The forced loss again, but the gateways that saw B (a subscriber's, a publisher's) are
   paused (SIGSTOP) through the failover while a third one that saw nothing publishes C first,
   so the new primary's sequence is back at the watermark: the newest event the subscriber's
   gateway received is in the new history as another event, so it still changes the epoch,
   and the third gateway follows (epoch channel): resumes from before get ``ssegw.reset``.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from harness import Gateway, wait_until
from redis.crc import key_slot
from redis_cluster_harness import RedisCluster
from test_redis_cluster import NSHARDS, data_of, parse_data, path, ready, run_id, topics_on
from test_redis_failover import Rig


def _gateway(url: str) -> Gateway:
    g = Gateway("--redis", url, "--redis-wait-replicas", "0", "--heartbeat-interval", "1s",
                "--flush-interval", "10ms", "--retry", "200ms")
    g.start()
    assert wait_until(lambda: ready(g), 20, 0.05), "gateway never became ready:\n" + "".join(g.log)
    return g


def _publish(g: Gateway, topic: str, data: str, timeout: float = 20.0) -> str:
    """Publish until a 200 (a 503 means nothing was published); the event's id."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = g.publish({"topic": topic, "data": data})
            if r.status == 200:
                return r.json()["ids"][0]
            assert r.status == 503, (r.status, r.body[:300])
        except OSError:
            pass
        assert time.monotonic() < deadline, f"no 200 for {data}"
        time.sleep(0.1)


def _seen(table: dict[str, str], eid: str, data: str, where: str) -> None:
    """Record that ``eid`` named ``data``: an id naming two different events is a reuse."""
    old = table.setdefault(eid, data)
    assert old == data, f"id {eid} named {old!r} and then {data!r} ({where})"


@pytest.mark.timeout(90)
def test_forced_loss_gives_new_epoch_and_resets_never_reused_ids(tmp_path):
    c = RedisCluster(tmp_path / "cluster", replicas=1)
    gws: list[Gateway] = []
    streams = []
    try:
        c.start()
        gws = [_gateway(c.nodes[0].url), _gateway(c.nodes[4].url)]
        victim = 1
        run = run_id()
        t = topics_on(victim, 1, f"fl{run}")[0]
        u = topics_on((victim + 1) % NSHARDS, 1, f"fl{run}")[0]
        owner = c.primary_of_slot(key_slot(b"{" + _tag(c, victim).encode() + b"}:seq"))
        replica = c.replica_of(owner)
        for g in gws:
            s = g.stream(path(t, u))
            assert s.status == 200, s.error_body
            streams.append(s)
        ids: dict[str, str] = {}
        for i in range(5):
            _seen(ids, _publish(gws[i % 2], t, data_of(t, i)), data_of(t, i), "publish A")
        _seen(ids, _publish(gws[0], u, data_of(u, 0)), data_of(u, 0), "publish u")
        assert wait_until(lambda: _offset(replica) >= _offset(owner), 10, 0.05), "replica not in sync"
        # The repro: cut replication, B answered 200 by the primary alone.
        assert b"+OK" in owner.command("ACL", "SETUSER", "default", "-psync", "-sync")
        owner.command("CLIENT", "KILL", "TYPE", "replica")
        for i in range(5, 10):
            _seen(ids, _publish(gws[i % 2], t, data_of(t, i)), data_of(t, i), "publish B")
        for s in streams:
            assert s.wait_for(lambda s: sum(1 for e in s.events if e.data == data_of(t, 9)) == 1, 5), s.events
        seen_b = {parse_data(e.data)[1]: e.id for e in streams[0].events if e.data.startswith(t)}
        for s in streams:
            for e in s.events:
                _seen(ids, e.id, e.data, "live before")
        owner.kill()
        assert replica.command("CLUSTER", "FAILOVER", "TAKEOVER").startswith(b"+OK")
        assert wait_until(lambda: c.role(replica) == "master", 10, 0.05), "not promoted"
        t0 = time.monotonic()
        assert wait_until(lambda: all(ready(g) for g in gws), 12, 0.05), _diag(gws)
        for i in range(10, 15):
            _seen(ids, _publish(gws[i % 2], t, data_of(t, i)), data_of(t, i), "publish C")
        # Open streams are closed so that their clients resume (never fed C under B's ids).
        for s in streams:
            assert s.wait_closed(8), ("stream not closed", s.events[-5:], _diag(gws))
            assert not any(e.event == "ssegw.reset" for e in s.events)
            for e in s.events:
                _seen(ids, e.id, e.data, "live after")
        took = time.monotonic() - t0
        # Resuming from ids seen before the loss, on either gateway: ssegw.reset first.
        for g in gws:
            for n in (9, 7, 4):  # B5, B3 (events the new primary never had), A5
                r = g.stream(path(t, u), {"Last-Event-ID": seen_b[n]})
                assert r.status == 200, r.error_body
                assert r.wait_for(lambda r: len(r.events) >= 1, 5), (n, r.events)
                first = r.events[0]
                assert first.event == "ssegw.reset", (n, seen_b[n], r.events[:5])
                assert set(json.loads(first.data)["topics"]) >= {t}, first.data
                _seen(ids, _publish(g, t, data_of(t, 200 + n)), data_of(t, 200 + n), "publish D")
                assert r.wait_for(lambda r, n=n: any(e.data == data_of(t, 200 + n) for e in r.events), 5), r.events
                for e in r.events[1:]:
                    _seen(ids, e.id, e.data, f"resume from {n}")
                r.close()
        # since=earliest: what history holds, every id once, none naming another event.
        for g in gws:
            r = g.stream(path(t, since="earliest"))
            assert r.wait_for(lambda r: any(e.data == data_of(t, 14) for e in r.events), 5), r.events
            r.close()
            evs = [e for e in r.events if e.event != "ssegw.reset"]
            assert len({e.id for e in evs}) == len(evs), [e.id for e in evs]
            got = [parse_data(e.data)[1] for e in evs]
            assert got[:10] == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14], got
            for e in evs:
                _seen(ids, e.id, e.data, "earliest")
        for g in gws:
            br = g.stats()["broker"]
            assert br["gap_lost"] >= 1, br
        logs = [ln for g in gws for ln in g.log if "may lack writes" in ln or "epoch changed" in ln]
        assert any("may lack writes" in ln for ln in logs), _diag(gws)
        print(f"\nforced loss: ready {took:.2f} s after promotion; {logs[0].strip()[:200]}")
    finally:
        for s in streams:
            s.close()
        for g in gws:
            g.stop(timeout=10)
        c.stop()


def _tag(c: RedisCluster, k: int) -> str:
    for n in c.nodes:
        try:
            raw = n.command("GET", "ssegw:shards")
        except OSError:
            continue
        if raw.startswith(b"$") and not raw.startswith(b"$-1"):
            return json.loads(raw.split(b"\r\n")[1])[k]
    for n in c.nodes:  # not on this node's slots: ask the owner
        owner = c.primary_of_slot(key_slot(b"ssegw:shards"), n)
        raw = owner.command("GET", "ssegw:shards")
        return json.loads(raw.split(b"\r\n")[1])[k]
    raise LookupError("ssegw:shards")


def _offset(n) -> int:  # noqa: ANN001
    info = n.command("INFO", "replication").decode()
    key = "master_repl_offset:" if "role:master" in info else "slave_repl_offset:"
    return int(info.split(key, 1)[1].split("\r\n", 1)[0])


def _diag(gws: list[Gateway]) -> str:
    return "\n".join(f"gw{i}: {[ln.strip()[:300] for ln in g.log if 'redis' in ln][-8:]}" for i, g in enumerate(gws))


def _epochs(rig: Rig) -> list[str]:
    return [g.stats()["broker"]["epoch"] for g in rig.gws]


@pytest.mark.timeout(90)
def test_planned_failover_keeps_the_epoch(tmp_path):
    rig = Rig(tmp_path, "ek")
    try:
        old = rig.shard_owner(1)
        new = rig.c.replica_of(old)
        before = _epochs(rig)
        rig.run_load()
        time.sleep(1.5)
        assert new.command("CLUSTER", "FAILOVER").startswith(b"+OK")
        assert wait_until(lambda: rig.c.role(new) == "master", 10, 0.02), "not promoted"
        assert wait_until(lambda: all(ready(g) for g in rig.gws), 8, 0.05), rig.diagnostics()
        time.sleep(2.0)
        assert rig.pub is not None
        rig.pub.stop()
        rig.check_delivery()  # 0 lost, 0 resets, no stream closed, gap_lost 0
        assert _epochs(rig) == before
    finally:
        rig.close()


@pytest.mark.timeout(90)
def test_kill_with_current_replica_keeps_the_epoch(tmp_path):
    rig = Rig(tmp_path, "ec")
    try:
        old = rig.shard_owner(2)
        new = rig.c.replica_of(old)
        before = _epochs(rig)
        rig.run_load()
        time.sleep(1.5)
        old.kill()
        assert wait_until(lambda: rig.c.role(new) == "master", 15, 0.05), "not promoted"
        assert wait_until(lambda: all(ready(g) for g in rig.gws), 10, 0.05), rig.diagnostics()
        time.sleep(2.0)
        assert rig.pub is not None
        rig.pub.stop()
        rig.check_delivery()
        assert _epochs(rig) == before
    finally:
        rig.close()


@pytest.mark.timeout(90)
def test_loss_found_after_another_gateway_published_over_it(tmp_path):
    c = RedisCluster(tmp_path / "cluster", replicas=1)
    gws: list[Gateway] = []
    s = None
    try:
        c.start()
        gws = [_gateway(c.nodes[0].url), _gateway(c.nodes[4].url), _gateway(c.nodes[2].url)]
        sub, pub, other = gws
        victim = 2
        t = topics_on(victim, 1, f"cf{run_id()}")[0]
        owner = c.primary_of_slot(key_slot(b"{" + _tag(c, victim).encode() + b"}:seq"))
        replica = c.replica_of(owner)
        s = sub.stream(path(t))
        assert s.status == 200, s.error_body
        ids: dict[str, str] = {}
        for i in range(5):
            _seen(ids, _publish(pub, t, data_of(t, i)), data_of(t, i), "publish A")
        assert wait_until(lambda: _offset(replica) >= _offset(owner), 10, 0.05), "replica not in sync"
        assert b"+OK" in owner.command("ACL", "SETUSER", "default", "-psync", "-sync")
        owner.command("CLIENT", "KILL", "TYPE", "replica")
        for i in range(5, 10):
            _seen(ids, _publish(pub, t, data_of(t, i)), data_of(t, i), "publish B")
        assert s.wait_for(lambda s: any(e.data == data_of(t, 9) for e in s.events), 5), s.events
        b5 = next(e.id for e in s.events if e.data == data_of(t, 9))
        for g in (sub, pub):
            assert g.proc is not None
            os.kill(g.proc.pid, signal.SIGSTOP)
        try:
            owner.kill()
            assert replica.command("CLUSTER", "FAILOVER", "TAKEOVER").startswith(b"+OK")
            assert wait_until(lambda: c.role(replica) == "master", 10, 0.05), "not promoted"
            assert wait_until(lambda: ready(other), 12, 0.05), _diag([other])
            # The gateway that saw nothing passes its check and reuses B's sequences (its own
            # publish answers are the documented limit); history now has C where B was.
            for i in range(10, 15):
                _publish(other, t, data_of(t, i))
        finally:
            for g in (sub, pub):
                assert g.proc is not None
                os.kill(g.proc.pid, signal.SIGCONT)
        assert s.wait_closed(10), ("stream not closed", s.events[-5:], _diag(gws))
        for e in s.events:
            _seen(ids, e.id, e.data, "live")
        assert wait_until(lambda: all(ready(g) for g in gws), 12, 0.05), _diag(gws)
        # Every gateway, the one that published C included, now places B5's id nowhere.
        for g in gws:
            assert wait_until(lambda g=g: g.stats()["broker"]["epoch"] == sub.stats()["broker"]["epoch"], 5, 0.05)
            r = g.stream(path(t), {"Last-Event-ID": b5})
            assert r.status == 200, r.error_body
            assert r.wait_for(lambda r: len(r.events) >= 1, 5), r.events
            assert r.events[0].event == "ssegw.reset", (r.events[:5], _diag(gws))
            r.close()
            e = g.stream(path(t, since="earliest"))
            assert e.wait_for(lambda e: any(x.data == data_of(t, 14) for x in e.events), 5), e.events
            e.close()
            for x in e.events:
                _seen(ids, x.id, x.data, "earliest")
        logs = [ln for g in (sub, pub) for ln in g.log if "may lack writes" in ln]
        assert logs, _diag(gws)
        print(f"\nloss found late: {logs[0].strip()[:220]}")
    finally:
        if s is not None:
            s.close()
        for g in gws:
            g.stop(timeout=10)
        c.stop()


@pytest.mark.timeout(90)
def test_forced_loss_with_a_required_replica_answers_504_not_200(tmp_path):
    """The same cut replication, with ``redis_wait_replicas = 1``: the B publishes are written
    on the primary but no replica acknowledges them, so none is answered 200 (504
    ``outcome_unknown``: a failover may lose them) -- a 200 means replicated."""
    c = RedisCluster(tmp_path / "cluster", replicas=1)
    g = None
    try:
        c.start()
        g = Gateway("--redis", c.nodes[0].url, "--redis-wait-replicas", "1", "--redis-wait-timeout", "500ms",
                    "--heartbeat-interval", "1s", "--flush-interval", "10ms")
        g.start()
        assert wait_until(lambda: ready(g), 20, 0.05), "gateway never became ready:\n" + "".join(g.log)
        victim = 1
        t = topics_on(victim, 1, f"rq{run_id()}")[0]
        owner = c.primary_of_slot(key_slot(b"{" + _tag(c, victim).encode() + b"}:seq"))
        replica = c.replica_of(owner)
        assert _publish(g, t, data_of(t, 0))  # replicated: 200
        assert wait_until(lambda: _offset(replica) >= _offset(owner), 10, 0.05), "replica not in sync"
        assert b"+OK" in owner.command("ACL", "SETUSER", "default", "-psync", "-sync")
        owner.command("CLIENT", "KILL", "TYPE", "replica")
        for i in range(1, 6):
            r = g.publish({"topic": t, "data": data_of(t, i)})
            assert r.status == 504, (i, r.status, r.body[:200])
            assert r.json()["error"] == "outcome_unknown"
    finally:
        if g is not None:
            g.stop(timeout=10)
        c.stop()

"""A 200 that means replicated (docs/api.md "Redis failover"): with
``redis_wait_replicas`` >= 1 (auto: 1 when the shard has a replica) a publish answers 200
only once that many replicas acknowledged it within ``redis_wait_timeout``, else 504
``outcome_unknown``; with 0, or no replica, it is the primary's word alone.

Real ``redis-server`` processes on loopback: a primary and a replica (``replicaof``), the
gateway pointed at the primary.  The replica is made unable to acknowledge in the two ways
production sees it: paused (``SIGSTOP``: connected, silent) and cut off (the issue's repro:
``ACL SETUSER default -psync -sync`` then ``CLIENT KILL TYPE replica`` on the primary).
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from faultproxy import FaultProxy
from harness import Gateway, Response, wait_until
from redis_harness import RedisServer, start_replica

from ssegw.broker.redis import stream_key

#: FCALL ssegw_publish as RESP puts it on the wire (see test_publish_outcome.py).
FCALL_PUBLISH = b"$13\r\nssegw_publish\r\n"

pytestmark = pytest.mark.timeout(60)


def new_topic(tag: str = "t") -> str:
    return f"rw.{tag}.{uuid.uuid4().hex[:10]}"


def ready(g: Gateway) -> bool:
    try:
        return g.request("GET", "/readyz", admin=True, timeout=5).status == 200
    except OSError:
        return False


def timed_publish(g: Gateway, msg: dict) -> tuple[Response, float]:
    t0 = time.monotonic()
    r = g.publish(msg)
    return r, time.monotonic() - t0


def history(port: int, topic: str) -> list[bytes]:
    c = redis.Redis(port=port, socket_timeout=5)
    try:
        return [f[b"b"] for _, f in c.xrange(stream_key(topic))]
    finally:
        c.close()


@pytest.fixture
def pair(tmp_path) -> Iterator[tuple[RedisServer, RedisServer]]:
    primary = RedisServer(tmp_path / "primary", persist=False).start()
    replica = None
    try:
        replica = start_replica(primary, tmp_path / "replica")
        yield primary, replica
    finally:
        if replica is not None:
            if replica.proc is not None and replica.proc.poll() is None:
                os.kill(replica.pid, signal.SIGCONT)  # a test may leave it stopped
            replica.stop()
        primary.stop()


def start(gateway, url: str, *flags: str) -> Gateway:
    g = gateway("--redis", url, "--heartbeat-interval", "500ms", "--flush-interval", "10ms", *flags)
    assert wait_until(lambda: ready(g), 10, 0.05), "gateway never became ready:\n" + "".join(g.log[-20:])
    return g


def assert_unreplicated_504(r: Response, elapsed: float, wait_s: float = 1.0) -> None:
    assert r.status == 504, r
    body = r.json()
    assert body["error"] == "outcome_unknown", body
    assert "acknowledged by 0 of 1 replicas" in body["detail"], body
    assert wait_s * 0.9 <= elapsed < wait_s + 1.5, f"answered after {elapsed:.2f}s"


def test_healthy_replica_auto_waits_and_answers_200(gateway, pair) -> None:
    primary, replica = pair
    g = start(gateway, primary.url)
    topic = new_topic("ok")
    for i in range(5):
        r, elapsed = timed_publish(g, [{"topic": topic, "data": f"a{i}"}, {"topic": topic, "data": f"b{i}"}])
        assert r.status == 200, r
        assert elapsed < 0.9, f"a WAIT on a healthy loopback replica took {elapsed:.2f}s"
    # A 200 came after WAIT: the replica holds every message already, no polling needed.
    assert history(replica.port, topic) == [f"data: {p}{i}\n".encode() for i in range(5) for p in "ab"]
    assert int(primary.info("commandstats").get("cmdstat_wait", "calls=0").split(",")[0][6:]) == 5
    br = g.stats()["broker"]
    assert br["publish_unreplicated"] == 0 and br["publish_errors"] == 0, br
    assert any("waits for 1 replicas" in line for line in g.log), "".join(g.log[-20:])


def test_paused_replica_gets_504_not_200(gateway, pair) -> None:
    primary, replica = pair
    g = start(gateway, primary.url, "--redis-wait-timeout", "1s")
    topic = new_topic("paused")
    assert g.publish({"topic": topic, "data": "before"}).status == 200  # auto resolved to 1
    os.kill(replica.pid, signal.SIGSTOP)
    try:
        r, elapsed = timed_publish(g, {"topic": topic, "data": "while-paused"})
        assert_unreplicated_504(r, elapsed)
    finally:
        os.kill(replica.pid, signal.SIGCONT)
    # 504, not 503: the write is on the primary (a failover now could lose it).
    assert history(primary.port, topic)[-1] == b"data: while-paused\n"
    assert wait_until(lambda: g.publish({"topic": topic, "data": "after"}).status == 200, 5, 0.1)
    assert g.stats()["broker"]["publish_unreplicated"] == 1


def test_cut_replication_gets_504_not_200(gateway, pair) -> None:
    """The issue's repro, step 2: B1..B5 published with replication cut must not get 200."""
    primary, _ = pair
    g = start(gateway, primary.url, "--redis-wait-timeout", "500ms")
    topic = new_topic("cut")
    # Replicated within 500 ms (a loaded machine may need a second try; A's count is not checked).
    assert wait_until(lambda: g.publish({"topic": topic, "data": "A"}).status == 200, 5, 0.1)
    assert b"+OK" in primary.command("ACL", "SETUSER", "default", "-psync", "-sync")
    primary.command("CLIENT", "KILL", "TYPE", "replica")
    assert wait_until(lambda: primary.info("replication").get("connected_slaves") == "0", 5)
    for i in range(1, 6):
        r, elapsed = timed_publish(g, {"topic": topic, "data": f"B{i}"})
        assert r.status == 504, r
        assert r.json()["error"] == "outcome_unknown"
        assert 0.45 <= elapsed < 2.0, f"B{i} answered after {elapsed:.2f}s"
    br = g.stats()["broker"]
    assert br["publish_unreplicated"] == 5, br


def test_wait_replicas_zero_answers_200_unreplicated(gateway, pair) -> None:
    """The documented trade-off: with 0 a 200 is the primary's word alone."""
    primary, replica = pair
    g = start(gateway, primary.url, "--redis-wait-replicas", "0")
    topic = new_topic("zero")
    os.kill(replica.pid, signal.SIGSTOP)
    try:
        for i in range(3):
            r, elapsed = timed_publish(g, {"topic": topic, "data": f"z{i}"})
            assert r.status == 200, r
            assert elapsed < 0.9, f"answered after {elapsed:.2f}s"
    finally:
        os.kill(replica.pid, signal.SIGCONT)
    assert "cmdstat_wait" not in primary.info("commandstats")


def test_standalone_primary_auto_resolves_to_zero(gateway, redis_server) -> None:
    g = start(gateway, redis_server.url)
    topic = new_topic("solo")
    for i in range(3):
        r, elapsed = timed_publish(g, {"topic": topic, "data": f"s{i}"})
        assert r.status == 200, r
        assert elapsed < 0.9, f"answered after {elapsed:.2f}s"
    stats = redis_server.info("commandstats")
    assert "cmdstat_wait" not in stats, stats  # no WAIT cost without a replica
    assert "cmdstat_role" in stats, stats  # auto was resolved by asking
    assert any("waits for 0 replicas" in line for line in g.log), "".join(g.log[-20:])


def test_explicit_wait_replicas_above_replica_count_gets_504(gateway, pair) -> None:
    primary, _ = pair
    g = start(gateway, primary.url, "--redis-wait-replicas", "2", "--redis-wait-timeout", "300ms")
    r, elapsed = timed_publish(g, {"topic": new_topic("two"), "data": "x"})
    assert r.status == 504, r
    # By 1 (the replica) -- or by 0 if its acknowledgement was late on a loaded machine.
    assert re.search(r"acknowledged by [01] of 2 replicas", r.json()["detail"]), r.json()
    assert 0.25 <= elapsed < 1.5, elapsed


def test_retry_resolved_by_token_is_waited_too(gateway, pair) -> None:
    """A publish whose reply was lost and that a retry resolves as "already applied" (the
    request token returns the first call's ids and writes nothing) is WAITed before its 200:
    with the replica paused it gets 504, never 200.

    WAIT counts replicas up to the connection's replication offset.  Redis 7.0 (installed
    here) sets it after every command, so a retry's WAIT covers the earlier write anyway;
    later Redis versions move it only after a command that propagated, and on the retry's
    fresh connection a token hit propagates nothing -- a paused replica would count as
    caught up.  The broker re-arms the token (a replicated PEXPIRE) before a retry's WAIT
    for those; this test cannot tell the difference on 7.0, it holds the WAIT itself."""
    primary, replica = pair
    with FaultProxy(primary.port) as proxy:
        # 2 s, not less: on a loaded CI machine the healthy replica's first acknowledgement
        # (the first publish, below) once took more than 500 ms.
        g = start(gateway, proxy.url, "--redis-wait-timeout", "2s")
        topic = new_topic("retry")
        assert g.publish({"topic": topic, "data": "first"}).status == 200
        os.kill(replica.pid, signal.SIGSTOP)
        try:
            proxy.lose_next_reply(FCALL_PUBLISH, 1.0)
            r, elapsed = timed_publish(g, {"topic": topic, "data": "lost-reply"})
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        assert proxy.faults == 1
        assert r.status == 504, r
        assert "acknowledged by 0 of 1 replicas" in r.json()["detail"], r.json()
        # Published once (the retry found the token), and not answered 200.
        assert history(primary.port, topic) == [b"data: first\n", b"data: lost-reply\n"]
        assert g.stats()["broker"]["publish_retries"] >= 1
        assert elapsed < 6, elapsed


def test_auto_follows_a_replica_that_leaves(gateway, pair) -> None:
    """``auto`` is asked again every 10 s, down as well as up: a replica that goes away (or a
    just-promoted primary whose replicas have not attached yet) costs 504s for at most about
    that long, then the primary's 200s with a warning in the log -- a failover must not turn
    into a shard that refuses every publish until an operator steps in."""
    primary, replica = pair
    g = start(gateway, primary.url)
    topic = new_topic("leave")
    assert g.publish({"topic": topic, "data": "with"}).status == 200
    replica.stop()
    t0 = time.monotonic()
    statuses: list[int] = []
    while time.monotonic() - t0 < 25:
        statuses.append(g.publish({"topic": topic, "data": f"p{len(statuses)}"}).status)
        if statuses[-1] == 200:
            break
        time.sleep(0.3)
    took = time.monotonic() - t0
    assert statuses[-1] == 200 and set(statuses[:-1]) <= {504}, statuses
    assert took < 16, f"primary-only 200s only after {took:.1f}s"
    assert wait_until(lambda: any("no replica attached" in line for line in g.log), 5), "".join(g.log[-10:])

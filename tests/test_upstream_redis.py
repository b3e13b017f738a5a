"""A shared upstream route on two gateways through a real redis-server: one upstream connection in
all, kept while a subscriber is left anywhere, taken over when its holder is killed (SIGKILL)."""

from __future__ import annotations

import time

import pytest
from harness import wait_until
from upstream_server import Upstream

pytestmark = pytest.mark.timeout(50)


def config(up: Upstream, redis_url: str) -> str:
    return f"""
redis = "{redis_url}"
heartbeat_interval = "5s"  # the upstream's stall allowance (11 s) outlasts every quiet spell here
flush_interval = "5ms"
[[routes]]
topics = "up.>"
upstream = "http://127.0.0.1:{up.port}/s/{{topic}}"
linger = "1s"
"""


@pytest.fixture
def upstream():
    u = Upstream().start()
    yield u
    u.stop()


def holding(g) -> float:  # noqa: ANN001
    return g.metrics().get("ssegw_upstream_streams", 0.0)


def test_one_upstream_for_the_cluster_taken_over_when_its_holder_dies(gateway, redis_server, upstream) -> None:
    g1 = gateway(config=config(upstream, redis_server.url))
    g2 = gateway(config=config(upstream, redis_server.url))
    for g in (g1, g2):
        assert wait_until(lambda g=g: g.request("GET", "/readyz", admin=True).status == 200, timeout=10)
    s1 = g1.stream("/events?topic=up.x")
    s2 = g2.stream("/events?topic=up.x")
    try:
        _cluster(g1, g2, s1, s2, upstream, redis_server)
    finally:
        s1.close()
        s2.close()


def _cluster(g1, g2, s1, s2, upstream: Upstream, redis_server) -> None:  # noqa: ANN001
    assert upstream.wait_open(1)
    time.sleep(2.5)  # both claims have asked for the lease at least twice by now
    assert len(upstream.requests) == 1 and len(upstream.open) == 1, "one upstream connection for the cluster"
    assert sorted([holding(g1), holding(g2)]) == [0.0, 1.0]
    holder, other = (g1, g2) if holding(g1) == 1.0 else (g2, g1)
    s_holder, s_other = (s1, s2) if holder is g1 else (s2, s1)

    upstream.event("e1", id="k1")
    upstream.event("e2", id="k2")
    for s in (s1, s2):
        assert s.wait_for(lambda x: [e.data for e in x.events] == ["e1", "e2"], timeout=5)

    # The holder's own subscriber leaves; one is left on the other gateway: the holder keeps
    # the stream (cluster presence), well past linger.
    s_holder.close()
    time.sleep(3.0)
    assert len(upstream.open) == 1 and len(upstream.requests) == 1
    assert holding(holder) == 1.0

    # The holder dies without a goodbye; its lease expires and the other gateway takes over,
    # resuming from the upstream id the holder noted.
    holder.kill()
    t0 = time.monotonic()
    assert upstream.wait_requests(2, timeout=10), "nobody took the upstream over"
    took = time.monotonic() - t0
    assert took < 8.0, f"taken over after {took:.1f}s (lease 5 s + 1 s renewal)"
    assert upstream.requests[1][1].get("last-event-id") == "k2"
    assert upstream.wait_open(1)
    assert wait_until(lambda: holding(other) == 1.0, timeout=3)
    upstream.event("e3", id="k3")
    assert s_other.wait_for(lambda x: [e.data for e in x.events] == ["e1", "e2", "e3"], timeout=5)

    # The last subscriber anywhere leaves: closed linger later, lease given up.
    s_other.close()
    assert upstream.wait_open(0, timeout=6)
    assert wait_until(lambda: holding(other) == 0.0, timeout=3)
    assert b"lease:upstream:up.x" not in redis_server.command("KEYS", "*lease:upstream:*")


def test_down_and_up_reach_subscribers_of_every_gateway(gateway, redis_server, upstream) -> None:
    """Only the holder talks to the upstream; the other gateway's subscribers learn its status
    from the lease's note (within a renewal)."""
    import json

    upstream.status = 503
    g1 = gateway(config=config(upstream, redis_server.url))
    g2 = gateway(config=config(upstream, redis_server.url))
    for g in (g1, g2):
        assert wait_until(lambda g=g: g.request("GET", "/readyz", admin=True).status == 200, timeout=10)
    s1 = g1.stream("/events?topic=up.st")
    s2 = g2.stream("/events?topic=up.st")
    try:
        def states(s) -> list[str]:  # noqa: ANN001
            return [json.loads(e.data)["status"] for e in s.events if e.event == "ssegw.upstream"]

        for s in (s1, s2):
            assert s.wait_for(lambda x: states(x) == ["down"], timeout=8), states(s)
        assert "503" in json.loads(s2.events[0].data)["detail"] or "503" in json.loads(s1.events[0].data)["detail"]
        upstream.status = 200
        for s in (s1, s2):
            assert s.wait_for(lambda x: states(x) == ["down", "up"], timeout=15), states(s)
        assert upstream.wait_open(1)
        assert sorted([holding(g1), holding(g2)]) == [0.0, 1.0]
    finally:
        s1.close()
        s2.close()

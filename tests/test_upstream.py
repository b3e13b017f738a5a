"""Shared upstream routes on the embedded broker, against a real upstream SSE server on loopback.

Each test starts its own gateway (heartbeat 1 s, so the upstream stall allowance is 3 s) and
its own upstream (tests/upstream_server.py), and asserts through real sockets: what the
upstream was asked, what subscribers got, the 409, the metrics and the log lines.
"""

from __future__ import annotations

import json
import time

import pytest
from harness import wait_until
from upstream_server import Upstream

pytestmark = pytest.mark.timeout(40)


def config(up: Upstream, *, linger: str = "1s", extra: str = "") -> str:
    return f"""
heartbeat_interval = "1s"
flush_interval = "5ms"
{extra}
[[routes]]
topics = "up.>"
upstream = "http://127.0.0.1:{up.port}/stream/{{topic}}?v=1"
headers = {{ X-Tenant = "t1", Authorization = "Bearer upstream-secret" }}
linger = "{linger}"
"""


@pytest.fixture
def upstream():
    u = Upstream().start()
    yield u
    u.stop()


def statuses(s) -> list[dict]:  # noqa: ANN001
    return [json.loads(e.data) for e in s.events if e.event == "ssegw.upstream"]


def data_events(s) -> list:  # noqa: ANN001
    return [e for e in s.events if e.event != "ssegw.upstream"]


def test_one_upstream_stream_for_many_subscribers(gateway, upstream) -> None:
    g = gateway(config=config(upstream))
    subs = [g.stream("/events?topic=up.a") for _ in range(3)]
    assert upstream.wait_open(1)
    time.sleep(0.3)
    assert len(upstream.requests) == 1, "one upstream request for three subscribers"
    path, headers = upstream.requests[0]
    assert path == "/stream/up.a?v=1"
    assert headers["x-tenant"] == "t1" and headers["authorization"] == "Bearer upstream-secret"
    assert headers["accept"] == "text/event-stream" and "last-event-id" not in headers
    upstream.event("hello", id="u1")
    upstream.event('{"p": 1}\nline2', id="u2", event="price")
    for s in subs:
        evs = s.wait_events(2)
        assert [e.data for e in evs] == ["hello", '{"p": 1}\nline2']
        assert [e.event for e in evs] == ["message", "price"]
        # the gateway's own ids, not the upstream's
        assert all(e.has_id and not e.id.startswith("u") for e in evs)
    # history and resume apply: a late subscriber gets both from history
    with g.stream("/events?topic=up.a&since=earliest") as late:
        assert [e.data for e in late.wait_events(2)] == ["hello", '{"p": 1}\nline2']
    first_id = subs[0].events[0].id
    with g.stream("/events?topic=up.a", headers={"Last-Event-ID": first_id}) as resumed:
        assert [e.data for e in resumed.wait_events(1)] == ['{"p": 1}\nline2']
    # still one upstream connection
    assert len(upstream.requests) == 1
    # publishing into a routed topic is refused; other topics are not
    r = g.publish({"topic": "up.a", "data": "x"})
    assert r.status == 409
    assert r.json()["error"] == "routed_topic" and "up.a" in r.json()["detail"]
    r = g.publish([{"topic": "other", "data": "x"}, {"topic": "up.zz", "data": "y"}])
    assert r.status == 409
    assert g.publish({"topic": "other", "data": "x"}).status == 200
    m = g.metrics()
    assert m["ssegw_upstream_streams"] == 1
    assert m["ssegw_upstream_events_total"] == 2
    assert m["ssegw_upstream_connects_total"] == 1
    for s in subs:
        s.close()
    assert "upstream-secret" not in "".join(g.log)


def test_closed_linger_after_the_last_subscriber(gateway, upstream) -> None:
    g = gateway(config=config(upstream, linger="1s"))
    s1 = g.stream("/events?topic=up.l")
    s2 = g.stream("/events?topic=up.l")
    assert upstream.wait_open(1)
    s1.close()
    time.sleep(1.5)
    assert len(upstream.open) == 1, "one subscriber left: the stream stays"
    s2.close()
    t0 = time.monotonic()
    time.sleep(0.5)
    assert len(upstream.open) == 1, "closed only linger after the last subscriber left"
    assert upstream.wait_open(0, timeout=5)
    assert 0.9 <= time.monotonic() - t0 <= 4.0
    assert g.metrics()["ssegw_upstream_streams"] == 0
    # a new subscriber opens it again
    with g.stream("/events?topic=up.l"):
        assert upstream.wait_open(1)
    assert len(upstream.requests) == 2


def test_reconnect_honours_retry_and_sends_the_upstream_last_id(gateway, upstream) -> None:
    upstream.prelude = b"retry: 1500\n\n"
    g = gateway(config=config(upstream))
    with g.stream("/events?topic=up.r") as s:
        assert upstream.wait_open(1)
        upstream.event("one", id="u-7")
        s.wait_events(1)
        upstream.drop()  # a clean end of the upstream's stream
        t0 = time.monotonic()
        assert upstream.wait_requests(2, timeout=6)
        waited = time.monotonic() - t0
        assert waited >= 1.4, f"reconnected after {waited:.2f}s, before the upstream's retry: 1500"
        assert waited < 3.5
        assert upstream.requests[1][1]["last-event-id"] == "u-7"
        assert upstream.wait_open(1)
        upstream.event("two", id="u-8")
        s.wait_for(lambda x: len(data_events(x)) == 2)
        assert [e.data for e in data_events(s)] == ["one", "two"]
        # a clean end then a good reconnect is not an outage
        assert statuses(s) == []


def test_500_then_recovery_is_down_then_up(gateway, upstream) -> None:
    upstream.status = 500
    g = gateway(config=config(upstream))
    with g.stream("/events?topic=up.e") as s:
        assert s.wait_for(lambda x: len(statuses(x)) >= 1, timeout=5)
        down = statuses(s)[0]
        assert down["topic"] == "up.e" and down["status"] == "down" and "500" in down["detail"]
        ev = [e for e in s.events if e.event == "ssegw.upstream"][0]
        assert not ev.has_id, "a status event carries no id"
        assert upstream.wait_requests(3, timeout=8), "retried with backoff"
        time.sleep(0.3)
        assert len(statuses(s)) == 1, "one down event, not one per retry"
        # a subscriber arriving while it is down is told at once
        with g.stream("/events?topic=up.e") as late:
            assert late.wait_for(lambda x: len(statuses(x)) == 1, timeout=3)
            assert statuses(late)[0]["status"] == "down"
        upstream.status = 200
        assert s.wait_for(lambda x: len(statuses(x)) == 2, timeout=12)
        assert statuses(s)[1]["status"] == "up"
        upstream.event("after")
        assert s.wait_for(lambda x: [e.data for e in data_events(x)] == ["after"], timeout=3)
    m = g.metrics()
    assert m['ssegw_upstream_failures_total{reason="status"}'] >= 3
    assert m["ssegw_upstream_transitions_total"] == 2
    # info lines are written once a tick (50 ms)
    assert wait_until(lambda: "up again" in "".join(g.log), timeout=2)
    log = "".join(g.log)
    lines = [ln for ln in g.log if "ssegw.upstream" in ln]
    assert log.count("upstream up.e down:") == 1, lines
    assert log.count("upstream up.e up again") == 1, lines


def test_upstream_dies_and_restarts(gateway, upstream) -> None:
    g = gateway(config=config(upstream))
    with g.stream("/events?topic=up.d") as s:
        assert upstream.wait_open(1)
        upstream.event("before", id="b1")
        assert s.wait_for(lambda x: len(data_events(x)) == 1)
        upstream.stop()
        assert s.wait_for(lambda x: len(statuses(x)) == 1, timeout=8)
        assert statuses(s)[0]["status"] == "down"
        upstream.start()  # the same port
        assert s.wait_for(lambda x: len(statuses(x)) == 2, timeout=15)
        assert statuses(s)[1]["status"] == "up"
        assert upstream.requests[-1][1]["last-event-id"] == "b1"
        upstream.event("after", id="b2")
        assert s.wait_for(lambda x: [e.data for e in data_events(x)] == ["before", "after"], timeout=3)
    assert g.metrics()['ssegw_upstream_failures_total{reason="connect"}'] >= 1, (statuses(s), g.metrics())


def test_stall_is_detected(gateway, upstream) -> None:
    g = gateway(config=config(upstream))
    with g.stream("/events?topic=up.s") as s:
        assert upstream.wait_open(1)
        t0 = time.monotonic()
        # the upstream answered and then says nothing, not even a comment
        assert s.wait_for(lambda x: len(statuses(x)) == 1, timeout=8)
        assert time.monotonic() - t0 >= 2.5, "allowance: 2 heartbeats + 1 s"
        assert "sent nothing" in statuses(s)[0]["detail"]
        # heartbeat comments from the upstream keep it alive
        upstream.send(b": keepalive\n\n")
    assert g.metrics()['ssegw_upstream_failures_total{reason="stall"}'] >= 1


def test_wrong_content_type_and_a_hanging_head(gateway, upstream) -> None:
    upstream.content_type = "application/json"
    g = gateway(config=config(upstream))
    with g.stream("/events?topic=up.c") as s:
        assert s.wait_for(lambda x: len(statuses(x)) == 1, timeout=5)
        assert "text/event-stream" in statuses(s)[0]["detail"]
    assert g.metrics()['ssegw_upstream_failures_total{reason="content_type"}'] >= 1


@pytest.mark.parametrize("raw, reason", [
    (b"data: " + b"x" * 20000 + b"\n\n", "too_large"),  # one line over max_body
    (b"data: " + b"y" * 3000 + b"\n" + b"data: " + b"y" * 3000 + b"\n\n", "too_large"),  # an event over it
    (b"data: \xff\xfe\n\n", "malformed"),  # not UTF-8
    (b"event: ssegw.reset\ndata: {}\n\n", "malformed"),  # a reserved event name
])
def test_malformed_or_huge_upstream_stream(gateway, upstream, raw: bytes, reason: str) -> None:
    g = gateway(config=config(upstream, extra='max_body = "4KiB"'))
    with g.stream("/events?topic=up.m") as s:
        assert upstream.wait_open(1)
        upstream.event("ok", id="m1")
        assert s.wait_for(lambda x: len(data_events(x)) == 1)
        # a huge line in small pieces: the parser must give up at max_body, not buffer it
        for i in range(0, len(raw), 1000):
            upstream.send(raw[i:i + 1000])
        assert s.wait_for(lambda x: len(statuses(x)) == 1, timeout=5)
        assert statuses(s)[0]["status"] == "down"
        assert [e.data for e in data_events(s)] == ["ok"], "nothing of the bad stream was published"
        # reconnected, resuming after the last good id
        assert upstream.wait_requests(2, timeout=5)
        assert upstream.requests[1][1]["last-event-id"] == "m1"
    assert g.metrics()[f'ssegw_upstream_failures_total{{reason="{reason}"}}'] >= 1


def test_check_config_refuses_bad_routes(tmp_path) -> None:
    import subprocess
    import sys

    from harness import ROOT

    cases = {
        'mode = "mirror"\nupstream = "http://a/{topic}"': "routes[0].mode",
        'topics = "a.*"': "routes[0].upstream: required key is missing",
        'topics = "a.*"\nupstream = "http://a/static"': "must contain {topic} exactly once",
        'topics = "a.*"\nupstream = "ws://a/{topic}"': "scheme 'ws' is not supported",
        'mode = "proxy"\npath = "/s/"\nupstream = "http://a/{topic}"': "must contain {path} exactly once",
        'topics = "a.*"\nupstream = "http://a/{topic}"\nheaders = { Host = "x" }': "set by the gateway itself",
        'topics = "a.>"\nupstream = "http://a/{topic}"\n[[routes]]\ntopics = "*.b"\nupstream = "http://b/{topic}"':
            "overlaps routes[0].topics",
        'mode = "proxy"\npath = "/s/"\nupstream = "http://a/{path}"\n[[routes]]\nmode = "proxy"\npath = "/s/x/"\n'
        'upstream = "http://a/{path}"': "overlaps routes[0].path",
    }
    for body, want in cases.items():
        f = tmp_path / "c.toml"
        f.write_text("[[routes]]\n" + body + "\n")
        r = subprocess.run([sys.executable, "-m", "ssegw", "check-config", str(f)], cwd=ROOT, capture_output=True,
                           text=True, timeout=20)
        assert r.returncode != 0 and want in r.stderr, (body, r.stderr)


def test_local_leases_one_holder_at_a_time() -> None:
    """The embedded broker's leases: two generations of workers in one process (a reload)
    never both run a topic's upstream."""
    import asyncio

    from ssegw.broker.base import LocalLeases

    async def go() -> None:
        leases = LocalLeases()
        assert await leases.lease("t", "old", 200, '{"last_id": "7"}') == (True, '{"last_id": "7"}')
        assert await leases.lease("t", "new", 200, None) == (False, '{"last_id": "7"}')
        assert (await leases.lease("t", "old", 200, None))[0], "the holder renews"
        await leases.release("t", "new")  # not the holder: nothing happens
        assert not (await leases.lease("t", "new", 200, None))[0]
        await leases.release("t", "old")
        assert await leases.lease("t", "new", 50, None) == (True, '{"last_id": "7"}'), "the note outlives its holder"
        await asyncio.sleep(0.08)
        assert (await leases.lease("t", "third", 50, None))[0], "a lapsed lease is free"

    asyncio.run(go())

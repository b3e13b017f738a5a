"""Proxy routes against a real upstream SSE server on loopback: one upstream request per client,
Authorization and Last-Event-ID forwarded, the gateway's auth and heartbeats applied, and closes
propagated both ways."""

from __future__ import annotations

import time

import jwt
import pytest
from harness import wait_until
from upstream_server import Upstream

pytestmark = pytest.mark.timeout(30)

SECRET = "proxy-test-secret-0123456789abcdef"


def config(up: Upstream, auth: bool = False) -> str:
    out = f"""
heartbeat_interval = "1s"
[[routes]]
mode = "proxy"
path = "/stream/"
upstream = "http://127.0.0.1:{up.port}/u/{{path}}"
headers = {{ X-From = "gw" }}
"""
    if auth:
        out += f'[auth]\njwt_secret = "{SECRET}"\n'
    return out


@pytest.fixture
def upstream():
    u = Upstream().start()
    yield u
    u.stop()


def test_each_client_its_own_upstream_stream_with_headers_forwarded(gateway, upstream) -> None:
    g = gateway(config=config(upstream))
    a = g.stream("/stream/user/42?x=1", headers={"Authorization": "Bearer user-token", "Last-Event-ID": "7"})
    b = g.stream("/stream/user/43")
    assert a.status == 200 and b.status == 200
    assert a.headers["content-type"].startswith("text/event-stream")
    assert upstream.wait_open(2)
    reqs = dict(upstream.requests)
    assert set(reqs) == {"/u/user/42?x=1", "/u/user/43"}
    h = reqs["/u/user/42?x=1"]
    assert h["authorization"] == "Bearer user-token" and h["last-event-id"] == "7" and h["x-from"] == "gw"
    assert "authorization" not in reqs["/u/user/43"] and "last-event-id" not in reqs["/u/user/43"]
    upstream.event("hello", id="8", event="greet")
    for s in (a, b):
        evs = s.wait_events(1)
        assert [(e.data, e.id, e.event) for e in evs] == [("hello", "8", "greet")], "the upstream's own ids"
    # the gateway's heartbeats on a quiet stream (heartbeat_interval 1 s)
    assert a.wait_for(lambda x: len(x.parser.comments) >= 2, timeout=4)
    # the client goes: its upstream request is closed, the other stays
    a.close()
    assert upstream.wait_open(1, timeout=3)
    m = g.metrics()
    assert m["ssegw_upstream_proxied_streams"] == 1 and m["ssegw_upstream_proxy_opened_total"] == 2
    # the upstream ends: so does the client's stream, with a retry hint
    upstream.drop()
    assert b.wait_closed(timeout=5)
    assert b.parser.retries, "a retry: before the close"
    b.close()
    assert wait_until(lambda: g.metrics()["ssegw_upstream_proxied_streams"] == 0, timeout=3)


def test_upstream_refusals_and_failures(gateway, upstream) -> None:
    g = gateway(config=config(upstream))
    upstream.status = 403
    with g.stream("/stream/secret") as s:
        assert s.status == 403
        assert b'"upstream_refused"' in s.error_body
    upstream.status = 500
    with g.stream("/stream/x") as s:
        assert s.status == 502 and b'"bad_gateway"' in s.error_body
    upstream.stop()
    with g.stream("/stream/x") as s:
        assert s.status == 502 and b"cannot connect" in s.error_body
    # no way out of the route's prefix on the upstream
    for bad in ("/stream/../admin", "/stream/a/%2e%2e/b"):
        with g.stream(bad) as s:
            assert s.status == 400 and b"bad_path" in s.error_body
    assert g.request("POST", "/stream/x", b"{}").status == 405
    assert g.metrics()["ssegw_upstream_proxy_refused_total"] == 3


def test_gateway_auth_applies_before_the_upstream_is_asked(gateway, upstream) -> None:
    g = gateway(config=config(upstream, auth=True))
    with g.stream("/stream/me") as s:
        assert s.status == 401
    time.sleep(0.2)
    assert upstream.requests == [], "a refused client never reaches the upstream"
    token = jwt.encode({"sub": "u1", "ssegw": {"subscribe": ["u1.>"]}}, SECRET, algorithm="HS256")
    with g.stream("/stream/me", headers={"Authorization": f"Bearer {token}"}) as s:
        assert s.status == 200
        assert upstream.wait_requests(1)
        assert upstream.requests[0][1]["authorization"] == f"Bearer {token}"


def test_a_client_that_does_not_read_is_dropped_and_its_upstream_closed(gateway, upstream) -> None:
    import socket

    g = gateway(config='max_buffer = "64KiB"\n' + config(upstream))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", g.port))
    try:
        sock.sendall(b"GET /stream/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        assert upstream.wait_open(1)
        line = "x" * 900
        for i in range(3000):  # ~3 MB the client never reads
            upstream.event(line, id=str(i))
        assert upstream.wait_open(0, timeout=10), "the slow client's upstream request was not closed"
        m = g.metrics()
        assert m['ssegw_slow_consumer_closed_total{reason="buffer"}'] >= 1
        assert m["ssegw_upstream_proxied_streams"] == 0
    finally:
        sock.close()

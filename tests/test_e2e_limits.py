"""Admission and abuse control against a real gateway process: IP allow/deny, per-IP
connection caps, per-IP connection rate, host capacity, trusted proxies and the loopback-only
publish rule without auth."""

from __future__ import annotations

import json
import socket
import time

from checks import assert_alive, assert_healthy, check_error, uniq
from harness import Gateway, Response, Stream, read_head, wait_until

# -- helpers ---------------------------------------------------------------------------------


def check_stream_error(s: Stream, expect: int, code: str | None = None) -> dict:
    assert s.headers.get("content-type", "").startswith("application/json"), s.headers
    return check_error(s.status, s.error_body, expect, code)


def check_resp(r: Response, expect: int, code: str | None = None) -> dict:
    return check_error(r.status, r.body, expect, code)


def retry_after(s: Stream | Response) -> int:
    value = s.headers.get("retry-after")
    assert value is not None, f"no Retry-After in {s.headers}"
    assert value.isdigit() and int(value) >= 1, value
    return int(value)




def xff(addr: str) -> dict[str, str]:
    return {"X-Forwarded-For": addr}


# -- IP allow / deny ---------------------------------------------------------------------------


def test_ip_deny_loopback_is_403(gateway):
    g = gateway("--ip-deny", "127.0.0.1/32", "--drain-timeout", "1s")
    with g.stream("/events?topic=a.b") as s:
        check_stream_error(s, 403)
    # publishing from a denied address is refused too
    check_resp(g.publish({"topic": "a.b", "data": 1}), 403)
    # the admin listener is not subject to the public ip filter
    assert g.request("GET", "/readyz", admin=True).status == 200
    assert_healthy(g)


def test_ip_deny_wins_over_allow_and_other_networks_pass(gateway):
    g = gateway("--ip-allow", "127.0.0.0/8", "--ip-deny", "127.0.0.1/32", "--drain-timeout", "1s")
    with g.stream("/events?topic=a.b") as s:
        check_stream_error(s, 403)
    assert_healthy(g)
    g2 = gateway("--ip-deny", "10.0.0.0/8,192.168.0.0/16", "--drain-timeout", "1s")
    assert_alive(g2)


def test_ip_allow_other_network_is_403_from_loopback(gateway):
    g = gateway("--ip-allow", "10.0.0.0/8", "--drain-timeout", "1s")
    with g.stream("/events?topic=a.b") as s:
        check_stream_error(s, 403)
    check_resp(g.publish({"topic": "a.b", "data": 1}), 403)
    assert_healthy(g)
    g2 = gateway("--ip-allow", "10.0.0.0/8,127.0.0.0/8", "--drain-timeout", "1s")
    assert_alive(g2)


# -- per-IP connection count ---------------------------------------------------------------------


def _publish_from(g, src: str, msg: dict) -> int:
    """POST /publish from source address ``src`` (another client than 127.0.0.1)."""
    body = json.dumps(msg).encode()
    with socket.create_connection(("127.0.0.1", g.port), timeout=5, source_address=(src, 0)) as s:
        s.sendall(b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        status, _, _ = read_head(s, bytearray(), 5)
        return status


def test_max_conns_per_ip(gateway):
    """Every open connection from an address counts (streams, idle, keep-alive, publishers):
    one over the cap is answered 429 with Retry-After at once and closed."""
    g = gateway("--max-conns-per-ip", "2", "--heartbeat-interval", "1s", "--drain-timeout", "1s")
    topic = uniq("perip")
    s1, s2 = g.stream(f"/events?topic={topic}"), g.stream(f"/events?topic={topic}")
    assert s1.status == 200 and s2.status == 200
    with g.stream(f"/events?topic={topic}") as s3:
        check_stream_error(s3, 429)
        retry_after(s3)
    # refusals do not consume a slot: still refused, and the two streams still work
    with g.stream(f"/events?topic={topic}") as s3:
        check_stream_error(s3, 429)
    # a publisher from this address is a connection too; from another address it is not
    r = g.publish({"topic": topic, "data": "full"})
    assert r.status == 429, r
    assert _publish_from(g, "127.0.0.2", {"topic": topic, "data": "both"}) == 200
    assert [e.data for e in s1.wait_events(1, 3)] == ["both"]
    assert [e.data for e in s2.wait_events(1, 3)] == ["both"]
    # closing one frees its place -- and an idle connection that sent nothing takes it
    s1.close()
    assert g.wait_slots(1) == 1
    idle = socket.create_connection(("127.0.0.1", g.port), timeout=5)
    try:
        assert wait_until(lambda: g.stats()["connections_open"] == 2, 3)
        with g.stream(f"/events?topic={topic}") as s4:
            check_stream_error(s4, 429)
    finally:
        idle.close()
    assert g.wait_slots(1) == 1
    with g.stream(f"/events?topic={topic}") as s4:
        assert s4.status == 200, s4.error_body
    s2.close()
    assert g.wait_slots(0) == 0
    assert_alive(g)


# -- per-IP connection rate ----------------------------------------------------------------------


def test_conn_rate_burst_then_429_then_ok(gateway):
    """conn_rate counts new connections, whatever they ask (streams, publishes)."""
    g = gateway("--conn-rate", "2", "--conn-burst", "2", "--heartbeat-interval", "1s", "--drain-timeout", "1s")
    topic = uniq("rate")
    for _ in range(2):
        with g.stream(f"/events?topic={topic}") as s:
            assert s.status == 200, s.error_body
    t_refused = time.monotonic()
    with g.stream(f"/events?topic={topic}") as s:
        check_stream_error(s, 429)
        wait = retry_after(s)
    assert wait <= 2
    # a closed stream gives no token back, and a publisher's connection needs one too
    assert g.publish({"topic": topic, "data": "x"}).status == 429
    # another address has its own bucket
    assert _publish_from(g, "127.0.0.3", {"topic": topic, "data": "y"}) == 200
    # after Retry-After the client is admitted again
    time.sleep(max(0.0, t_refused + wait - time.monotonic()) + 0.05)
    with g.stream(f"/events?topic={topic}") as s:
        assert s.status == 200, s.error_body
    time.sleep(1.1)  # refill for the liveness check's own connections
    assert_alive(g)


# -- host capacity -------------------------------------------------------------------------------------


def test_max_connections_is_503_with_retry_after(gateway):
    g = gateway("--max-connections", "3", "--heartbeat-interval", "1s", "--drain-timeout", "1s")
    topic = uniq("cap")
    streams = [g.stream(f"/events?topic={topic}") for _ in range(3)]
    assert all(s.status == 200 for s in streams)
    with g.stream(f"/events?topic={topic}") as s4:
        check_stream_error(s4, 503)
        retry_after(s4)
    # Every open connection counts (CONTRACT "Admission"): a publisher's connection over the
    # limit is answered 503 at once too; the admin listener is not counted.
    r = g.publish({"topic": topic, "data": "full"})
    assert r.status == 503 and r.json()["error"] == "unavailable"
    assert g.request("GET", "/healthz", admin=True).status == 200
    streams[0].close()
    assert g.wait_slots(2) == 2
    r = g.publish({"topic": topic, "data": "room"})
    assert r.status == 200
    for s in streams[1:]:
        assert [e.data for e in s.wait_events(1, 3)] == ["room"]
    with g.stream(f"/events?topic={topic}") as s5:
        assert s5.status == 200, s5.error_body
    for s in streams:
        s.close()
    assert_alive(g)


# -- trusted proxies ---------------------------------------------------------------------------------


def test_trusted_proxy_xff_is_used_for_ip_deny(gateway):
    g = gateway("--trusted-proxies", "127.0.0.1/32", "--ip-deny", "10.1.2.3/32", "--drain-timeout", "1s")
    with g.stream("/events?topic=a.b", xff("10.1.2.3")) as s:
        check_stream_error(s, 403)
    # the rightmost untrusted address is the client: a spoofed left entry does not help...
    with g.stream("/events?topic=a.b", xff("10.9.9.9, 10.1.2.3")) as s:
        check_stream_error(s, 403)
    # ...nor hurt
    with g.stream("/events?topic=a.b", xff("10.1.2.3, 10.9.9.9")) as s:
        assert s.status == 200, s.error_body
    with g.stream("/events?topic=a.b", xff("10.9.9.9")) as s:
        assert s.status == 200, s.error_body
    check_resp(g.publish({"topic": "a.b", "data": 1}, xff("10.1.2.3")), 403)
    assert_alive(g)  # no XFF: the loopback peer itself


def test_xff_ignored_without_trusted_proxies(gateway):
    g = gateway("--ip-deny", "10.1.2.3/32", "--drain-timeout", "1s")
    with g.stream("/events?topic=a.b", xff("10.1.2.3")) as s:
        assert s.status == 200, s.error_body
    # and an untrusted peer's XFF cannot dodge a deny either
    g2 = gateway("--trusted-proxies", "10.0.0.0/8", "--ip-deny", "127.0.0.1/32", "--drain-timeout", "1s")
    with g2.stream("/events?topic=a.b", xff("10.9.9.9")) as s:
        check_stream_error(s, 403)
    assert_alive(g, xff("10.1.2.3"))
    assert_healthy(g2)


def test_per_ip_limit_uses_forwarded_client(gateway):
    g = gateway("--trusted-proxies", "127.0.0.1/32", "--max-conns-per-ip", "1", "--heartbeat-interval", "1s",
                "--drain-timeout", "1s")
    topic = uniq("xffcap")
    a = g.stream(f"/events?topic={topic}", xff("10.0.0.1"))
    b = g.stream(f"/events?topic={topic}", xff("10.0.0.2"))
    assert a.status == 200 and b.status == 200
    with g.stream(f"/events?topic={topic}", xff("10.0.0.1")) as c:
        check_stream_error(c, 429)
        retry_after(c)
    a.close()
    b.close()
    assert g.wait_slots(0) == 0
    with g.stream(f"/events?topic={topic}", xff("10.0.0.1")) as c:
        assert c.status == 200, c.error_body
    assert_alive(g)


# -- publish without auth ------------------------------------------------------------------------------


def test_publish_from_loopback_without_auth_is_allowed(gw: Gateway):
    topic = uniq("loop")
    with gw.stream(f"/events?topic={topic}") as s:
        r = gw.publish([{"topic": topic, "data": "a"}, {"topic": topic, "data": {"b": 1}}])
        assert r.status == 200, r
        assert list(r.json()) == ["ids"] and len(r.json()["ids"]) == 2
        assert [e.data for e in s.wait_events(2, 3)] == ["a", '{"b":1}']
    assert_alive(gw)


def test_publish_via_trusted_proxy_for_remote_client_is_refused(gateway):
    """Without auth, /publish is for loopback only; behind a trusted local proxy the client is
    the forwarded address, so a remote client must not be able to publish through it.
    (Found as a bug -- the TCP peer was checked -- fixed in b03ea37.)"""
    g = gateway("--trusted-proxies", "127.0.0.1/32", "--drain-timeout", "1s")
    r = g.publish({"topic": "a.b", "data": 1}, xff("127.0.0.1"))
    assert r.status == 200, r  # a local client through the local proxy
    r = g.publish({"topic": "a.b", "data": 1}, xff("203.0.113.7"))
    try:
        check_resp(r, 403)
    finally:
        assert_alive(g)

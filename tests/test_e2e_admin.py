"""End-to-end tests of the admin listener (docs/api.md "Listeners" and "Admin")."""

from __future__ import annotations

import socket
import time
import uuid
from urllib.parse import quote, urlencode

import pytest
from checks import assert_error
from harness import Gateway, Response, read_head, request, wait_until

REQUIRED = {
    "ssegw_connections_open": "gauge",
    "ssegw_connections_accepted_total": "counter",
    "ssegw_events_published_total": "counter",
    "ssegw_events_delivered_total": "counter",
}


def new_topic(tag: str = "t") -> str:
    return f"e2e.adm.{tag}.{uuid.uuid4().hex[:10]}"


def path(*topics: str) -> str:
    return "/events?" + urlencode([("topic", t) for t in topics])


def admin(gw: Gateway, p: str, method: str = "GET", body: bytes | None = None) -> Response:
    return gw.request(method, p, body, admin=True)


def topic_subs(gw: Gateway, t: str) -> int:
    r = admin(gw, "/admin/topics/" + quote(t, safe=""))
    assert r.status == 200, r
    assert r.headers["content-type"].split(";")[0] == "application/json"
    obj = r.json()
    assert obj == {"topic": t, "subscribers": obj["subscribers"], "keys": obj["keys"]}
    assert isinstance(obj["subscribers"], int)
    return obj["subscribers"]


def metric(gw: Gateway, name: str) -> float:
    return gw.metrics()[name]


# -- health -------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", ["/healthz", "/readyz"])
def test_health_endpoints(gw: Gateway, p: str) -> None:
    r = admin(gw, p)
    assert r.status == 200, r
    assert r.headers["content-type"].split(";")[0] == "application/json"
    assert isinstance(r.json(), dict)
    h = admin(gw, p, "HEAD")
    assert h.status == 200 and h.body == b""
    assert gw.wait_slots(0) == 0


# -- metrics ------------------------------------------------------------------------------------


def test_metrics_is_prometheus_text(gw: Gateway) -> None:
    r = admin(gw, "/metrics")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.body.decode()
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
    for name, kind in REQUIRED.items():
        # the TYPE line names the family either with or without the _total suffix
        declared = types.get(name) or types.get(name.removesuffix("_total"))
        assert declared == kind, (name, declared)
    values = gw.metrics()
    for name in REQUIRED:
        assert name in values
        assert values[name] >= 0
    for line in text.splitlines():  # every sample line is "name[{labels}] number"
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            assert name.startswith(("ssegw_", "process_")), line
            float(value)
    assert gw.wait_slots(0) == 0


def test_metrics_values_move(gw: Gateway) -> None:
    assert gw.wait_slots(0) == 0
    assert wait_until(lambda: metric(gw, "ssegw_connections_open") == 0)
    m0 = gw.metrics()
    t, other = new_topic(), new_topic("other")
    n, k = 4, 5
    streams = [gw.stream(path(t)) for _ in range(n)]
    try:
        assert all(s.status == 200 for s in streams)
        m1 = gw.metrics()
        assert m1["ssegw_connections_open"] == n
        assert m1["ssegw_connections_accepted_total"] - m0["ssegw_connections_accepted_total"] == n
        r = gw.publish([{"topic": t, "data": i} for i in range(k)] + [{"topic": other, "data": "x"}])
        assert r.status == 200
        for s in streams:
            assert len(s.wait_events(k)) == k
        m2 = gw.metrics()
        assert m2["ssegw_events_published_total"] - m1["ssegw_events_published_total"] == k + 1
        assert m2["ssegw_events_delivered_total"] - m1["ssegw_events_delivered_total"] == k * n
        assert m2["ssegw_connections_accepted_total"] - m1["ssegw_connections_accepted_total"] == 1  # the publisher
    finally:
        for s in streams:
            s.close()
    assert gw.wait_slots(0) == 0
    assert wait_until(lambda: metric(gw, "ssegw_connections_open") == 0)
    m3 = gw.metrics()
    # counters never go down
    for name in REQUIRED:
        if name.endswith("_total"):
            assert m3[name] >= m2[name]


def test_multi_topic_delivery_counts_each_event_once(gw: Gateway) -> None:
    a, b = new_topic("a"), new_topic("b")
    with gw.stream(path(a, b)) as s, gw.stream(path(a)) as sa:
        assert s.status == 200 and sa.status == 200
        d0 = metric(gw, "ssegw_events_delivered_total")
        assert gw.publish([{"topic": a, "data": 1}, {"topic": b, "data": 2}, {"topic": a, "data": 3}]).status == 200
        assert len(s.wait_events(3)) == 3 and len(sa.wait_events(2)) == 2
        assert metric(gw, "ssegw_events_delivered_total") - d0 == 5
    assert gw.wait_slots(0) == 0


# -- topics and stats -----------------------------------------------------------------------------


def test_admin_topic_subscribers(gw: Gateway) -> None:
    t, u = new_topic(), "e2e/adm:x@y-" + uuid.uuid4().hex[:6]  # '/' in a topic name
    assert topic_subs(gw, t) == 0
    s1 = gw.stream(path(t))
    s2 = gw.stream(path(t, u))
    s3 = gw.stream(path(u))
    try:
        assert [s.status for s in (s1, s2, s3)] == [200, 200, 200]
        assert topic_subs(gw, t) == 2
        assert topic_subs(gw, u) == 2
        r = admin(gw, "/admin/topics/" + u)  # unescaped '/' and ':' work too
        assert r.status == 200 and r.json() == {"topic": u, "subscribers": 2, "keys": 0}
    finally:
        s1.close()
        s2.close()
    assert wait_until(lambda: topic_subs(gw, t) == 0)
    assert topic_subs(gw, u) == 1
    s3.close()
    assert wait_until(lambda: topic_subs(gw, u) == 0)
    assert gw.wait_slots(0) == 0


@pytest.mark.parametrize("name", ["bad%20name", "", "a*b", "x" * 129, "%23", "t%C3%A9"])
def test_admin_topic_bad_name_400(gw: Gateway, name: str) -> None:
    assert_error(admin(gw, "/admin/topics/" + name), 400)
    assert gw.wait_slots(0) == 0


@pytest.mark.parametrize("name", ["%FF", "%C3"])
def test_admin_topic_bad_escape_400(gw: Gateway, name: str) -> None:
    assert_error(admin(gw, "/admin/topics/" + name), 400)


def test_admin_stats(gw: Gateway) -> None:
    t = new_topic()
    with gw.stream(path(t)) as s:
        assert s.status == 200
        r = admin(gw, "/admin/stats")
        assert r.status == 200
        assert r.headers["content-type"].split(";")[0] == "application/json"
        obj = r.json()
        assert isinstance(obj, dict)
        workers = obj["workers"]
        assert isinstance(workers, list) and len(workers) == 1
        assert all(isinstance(w, dict) and w for w in workers)
    assert gw.wait_slots(0) == 0
    # stats still answer after error responses were counted
    assert gw.request("GET", "/nope").status == 404
    assert admin(gw, "/admin/stats").status == 200


# -- separation of listeners and methods ------------------------------------------------------------


@pytest.mark.parametrize("p", ["/metrics", "/healthz", "/readyz", "/admin/stats", "/admin/topics/x"])
def test_admin_paths_not_on_public_port(gw: Gateway, p: str) -> None:
    assert_error(gw.request("GET", p), 404, "not_found")
    assert gw.wait_slots(0) == 0


@pytest.mark.parametrize("p", ["/events?topic=x", "/publish", "/", "/nope", "/admin", "/admin/topics"])
def test_public_paths_not_on_admin_port(gw: Gateway, p: str) -> None:
    r = admin(gw, p)
    assert_error(r, 404, "not_found")
    assert b"text/event-stream" not in r.raw_head
    assert gw.wait_slots(0) == 0


def test_publish_on_admin_port_is_404(gw: Gateway) -> None:
    r = gw.request("POST", "/publish", b'{"topic":"x","data":1}', {"Content-Type": "application/json"}, admin=True)
    assert_error(r, 404)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
@pytest.mark.parametrize("p", ["/metrics", "/healthz", "/readyz", "/admin/stats", "/admin/topics/x"])
def test_405_on_admin_paths(gw: Gateway, p: str, method: str) -> None:
    r = admin(gw, p, method, b"")
    assert_error(r, 405, "method_not_allowed")
    allow = [m.strip() for m in r.headers["allow"].split(",")]
    assert "GET" in allow and method not in allow
    assert gw.wait_slots(0) == 0


def test_admin_keep_alive(gw: Gateway) -> None:
    """A scraper reusing one connection gets every answer (and a 404 does not end it)."""
    with socket.create_connection(("127.0.0.1", gw.admin_port), timeout=5) as sock:
        buf = bytearray()
        for p in ("/healthz", "/nope", "/metrics", "/admin/stats", "/readyz"):
            sock.sendall(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, headers, _ = read_head(sock, buf, 5)
            n = int(headers["content-length"])
            deadline = time.monotonic() + 5
            while len(buf) < n and time.monotonic() < deadline:
                buf += sock.recv(65536)
            body = bytes(buf[:n])
            del buf[:n]
            assert status == (404 if p == "/nope" else 200), (p, body)
    assert gw.wait_slots(0) == 0


def test_admin_listener_is_separate_port(gw: Gateway) -> None:
    assert gw.port != gw.admin_port
    assert request(gw.admin_port, "GET", "/healthz").status == 200
    assert request(gw.port, "GET", "/healthz").status == 404

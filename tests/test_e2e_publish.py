"""End-to-end tests of ``POST /publish`` (docs/api.md "Publish" and the CORS part of
"Admission and abuse control"), over real sockets against real gateway processes."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest
from checks import assert_error
from harness import Gateway, Response, Stream, read_head, request

# -- helpers --------------------------------------------------------------------------------


def new_topic(tag: str = "t") -> str:
    return f"e2e.pub.{tag}.{uuid.uuid4().hex[:10]}"


def path(*topics: str, **params: str) -> str:
    return "/events?" + urlencode([("topic", t) for t in topics] + list(params.items()))


def assert_ids(r: Response, n: int) -> list[str]:
    assert r.status == 200, r
    assert r.headers["content-type"].split(";")[0] == "application/json"
    obj = json.loads(r.body)
    assert set(obj) == {"ids"}, obj
    ids = obj["ids"]
    assert isinstance(ids, list) and len(ids) == n
    assert all(isinstance(i, str) and i and not any(c in i for c in "\r\n\0") for i in ids)
    assert len(set(ids)) == n
    return ids


def post(port: int, body: bytes, headers: dict[str, str] | None = None) -> Response:
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    return request(port, "POST", "/publish", body, h)


SENTINEL = "__sentinel__"


def history(gw: Gateway, *topics: str) -> list:
    """Every retained event of ``topics``, read with ``since=earliest`` up to a sentinel event
    published on each topic first (per-topic order puts every earlier event before it), so
    no fixed wait is needed.  Sentinels are left out of the result."""
    marks = set(gw_publish_ids(gw, [{"topic": t, "data": SENTINEL} for t in topics]))
    with gw.stream(path(*topics, since="earliest")) as s:
        assert s.status == 200
        assert s.wait_for(lambda x: marks <= {e.id for e in x.events}), "sentinels not replayed"
        return [e for e in s.events if not e.data.startswith(SENTINEL)]


def gw_publish_ids(gw: Gateway, msgs: object) -> list[str]:
    r = gw.publish(msgs)
    assert r.status == 200, r
    return r.json()["ids"]


def nothing_delivered(gw: Gateway, s: Stream, t: str) -> None:
    """``s`` (subscribed to ``t``) got no event of ``t``: a sentinel published now is its
    first event."""
    n = len(s.events)
    mark = gw_publish_ids(gw, {"topic": t, "data": SENTINEL})
    evs = s.wait_events(n + 1)
    assert evs[n].id == mark[0], [(e.id, e.data) for e in evs[n:]]


def quiet(s: Stream, n: int, wait: float = 0.1) -> None:
    evs = s.wait_events(n + 1, timeout=wait)
    assert len(evs) == n, [(e.id, e.data) for e in evs[n:]]


def http(method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    h = {"Host": "127.0.0.1"}
    if method == "POST":
        h["Content-Type"] = "application/json"
        h["Content-Length"] = str(len(body))
    h.update(headers or {})
    return f"{method} {target} HTTP/1.1\r\n".encode() + b"".join(
        f"{k}: {v}\r\n".encode() for k, v in h.items()) + b"\r\n" + body


def read_response(sock: socket.socket, buf: bytearray, timeout: float = 5.0) -> Response:
    status, headers, raw = read_head(sock, buf, timeout)
    n = int(headers.get("content-length", "0"))
    deadline = time.monotonic() + timeout
    while len(buf) < n:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        buf += chunk
    body = bytes(buf[:n])
    del buf[:n]
    return Response(status, headers, body, raw)


def at_eof(sock: socket.socket, buf: bytearray, timeout: float = 2.0) -> bool:
    if buf:
        return False
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.fixture(scope="module")
def gw_small() -> Iterator[Gateway]:
    g = Gateway("--max-body", "256", "--max-batch", "3", "--flush-interval", "10ms")
    g.start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def gw_cors() -> Iterator[Gateway]:
    g = Gateway("--cors-origins", "https://a.example", "--flush-interval", "10ms")
    g.start()
    yield g
    g.stop()


# -- success ------------------------------------------------------------------------------------


def test_single_publish(gw: Gateway) -> None:
    t = new_topic()
    with gw.stream(path(t)) as s:
        assert s.status == 200
        ids = assert_ids(gw.publish({"topic": t, "data": "one"}), 1)
        evs = s.wait_events(1)
        quiet(s, 1)
        assert (evs[0].id, evs[0].data, evs[0].event) == (ids[0], "one", "message")
    assert gw.wait_slots(0) == 0


def test_batch_publish_ids_in_order(gw: Gateway) -> None:
    a, b = new_topic("a"), new_topic("b")
    msgs = [{"topic": (a, b)[i % 2], "data": f"m{i}"} for i in range(7)]
    with gw.stream(path(a, b)) as s, gw.stream(path(b)) as sb:
        assert s.status == 200 and sb.status == 200
        ids = assert_ids(gw.publish(msgs), 7)
        evs = s.wait_events(7)
        quiet(s, 7)
        by_id = {e.id: e.data for e in evs}
        assert by_id == {i: m["data"] for i, m in zip(ids, msgs, strict=True)}
        for t in (a, b):  # per-topic publish order
            assert [e.data for e in evs if e.id in {i for i, m in zip(ids, msgs, strict=True) if m["topic"] == t}] \
                == [m["data"] for m in msgs if m["topic"] == t]
        evb = sb.wait_events(3)
        quiet(sb, 3)
        assert [(e.id, e.data) for e in evb] == [(ids[k], f"m{k}") for k in (1, 3, 5)]
    # a batch of one is a list of one id
    assert_ids(gw.publish([{"topic": a, "data": 1}]), 1)
    assert gw.wait_slots(0) == 0


def test_named_events_and_data_lines(gw: Gateway) -> None:
    t = new_topic()
    msgs = [
        {"topic": t, "data": "a\r\nb\rc\nd", "event": "price"},
        {"topic": t, "data": "x", "event": "h\u00e9llo \u2713"},
        {"topic": t, "data": {"n": [1, 2]}, "event": "json"},
        {"topic": t, "data": "keyed", "key": "k1"},
        {"topic": t, "data": "", "event": "empty"},
    ]
    with gw.stream(path(t)) as s:
        assert s.status == 200
        ids = assert_ids(gw.publish(msgs), 5)
        evs = s.wait_events(5)
        quiet(s, 5)
        assert [(e.id, e.event, e.data) for e in evs] == [
            (ids[0], "price", "a\nb\nc\nd"),
            (ids[1], "h\u00e9llo \u2713", "x"),
            (ids[2], "json", '{"n":[1,2]}'),
            (ids[3], "message", "keyed"),
            (ids[4], "empty", ""),
        ]
        raw = s.body.decode()
        assert f"id: {ids[0]}\nevent: price\ndata: a\ndata: b\ndata: c\ndata: d\n\n" in raw
        assert f"id: {ids[3]}\ndata: keyed\n\n" in raw  # the key is not sent to clients
        assert "\r" not in raw
    assert gw.wait_slots(0) == 0


def test_content_type_variants_accepted(gw: Gateway) -> None:
    t = new_topic()
    for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        assert_ids(post(gw.port, json.dumps({"topic": t, "data": ctype}).encode(), {"Content-Type": ctype}), 1)
    assert [e.data for e in history(gw, t)] == ["application/json", "application/json; charset=utf-8",
                                                "Application/JSON"]
    assert gw.wait_slots(0) == 0


# -- refusals -------------------------------------------------------------------------------------

T_BAD = "e2e.pub.bad"
BAD_BODIES = {
    "invalid-json": (b'{"topic": "e2e.pub.bad", "data": ', "bad_json"),
    "trailing-garbage": (b'{"topic": "e2e.pub.bad", "data": 1} x', "bad_json"),
    "empty-body": (b"", "bad_json"),
    "not-utf8": (b'{"topic": "e2e.pub.bad", "data": "\xff"}', "bad_json"),
    "number": (b"42", None),
    "string": (b'"hello"', None),
    "null": (b"null", None),
    "array-of-non-objects": (b"[1, 2]", None),
    "empty-array": (b"[]", None),
    "missing-topic": (b'{"data": "x"}', None),
    "missing-data": (json.dumps({"topic": T_BAD}).encode(), None),
    "topic-not-string": (b'{"topic": 5, "data": "x"}', "bad_topic"),
    "topic-empty": (b'{"topic": "", "data": "x"}', "bad_topic"),
    "topic-space": (b'{"topic": "a b", "data": "x"}', "bad_topic"),
    "topic-star": (b'{"topic": "a.*", "data": "x"}', "bad_topic"),
    "topic-unicode": ('{"topic": "t\u00e9", "data": "x"}'.encode(), "bad_topic"),
    "topic-129": (json.dumps({"topic": "x" * 129, "data": "x"}).encode(), "bad_topic"),
    "event-lf": (json.dumps({"topic": T_BAD, "data": "x", "event": "a\nb"}).encode(), "bad_event"),
    "event-cr": (json.dumps({"topic": T_BAD, "data": "x", "event": "a\rb"}).encode(), "bad_event"),
    "event-crlf": (json.dumps({"topic": T_BAD, "data": "x", "event": "a\r\nid: 1"}).encode(), "bad_event"),
    "event-nul": (json.dumps({"topic": T_BAD, "data": "x", "event": "a\u0000b"}).encode(), "bad_event"),
    "event-not-string": (json.dumps({"topic": T_BAD, "data": "x", "event": 3}).encode(), "bad_event"),
    "event-reserved": (json.dumps({"topic": T_BAD, "data": "x", "event": "ssegw.reset"}).encode(), "bad_event"),
    "event-reserved-prefix": (json.dumps({"topic": T_BAD, "data": "x", "event": "ssegw.mine"}).encode(),
                              "bad_event"),
    "unknown-field": (json.dumps({"topic": T_BAD, "data": "x", "id": "1"}).encode(), None),
    "unknown-field-retry": (json.dumps({"topic": T_BAD, "data": "x", "retry": 5}).encode(), None),
    "key-not-string": (json.dumps({"topic": T_BAD, "data": "x", "key": 1}).encode(), None),
    "lone-surrogate": (b'{"topic": "e2e.pub.bad", "data": "\\ud800"}', None),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_400_invalid_message(gw: Gateway, case: str) -> None:
    t = new_topic(case)
    body, code = BAD_BODIES[case]
    body = body.replace(T_BAD.encode(), t.encode())
    with gw.stream(path(t)) as s:
        assert s.status == 200
        assert_error(post(gw.port, body), 400, code)
        nothing_delivered(gw, s, t)
    assert history(gw, t) == []
    assert gw.wait_slots(0) == 0


@pytest.mark.parametrize("bad_at", [0, 2, 4])
def test_batch_is_all_or_nothing(gw: Gateway, bad_at: int) -> None:
    a, b = new_topic("a"), new_topic("b")
    msgs: list[dict] = [{"topic": (a, b)[i % 2], "data": f"m{i}"} for i in range(5)]
    msgs[bad_at] = [
        {"topic": a, "data": "x", "event": "two\nlines"},
        {"topic": "no spaces allowed", "data": "x"},
        {"topic": b, "data": "x", "extra": True},
    ][bad_at // 2]
    with gw.stream(path(a, b)) as s:
        assert s.status == 200
        assert_error(gw.publish(msgs), 400)
        # a valid publish on each topic is the first thing the stream sees
        ids = assert_ids(gw.publish([{"topic": b, "data": "ok"}, {"topic": a, "data": "ok-a"}]), 2)
        evs = s.wait_events(2)
        quiet(s, 2)
        assert sorted(e.id for e in evs) == sorted(ids)
    assert sorted(e.id for e in history(gw, a, b)) == sorted(ids)
    assert gw.wait_slots(0) == 0


def test_413_body_over_max_body(gw_small: Gateway) -> None:
    g = gw_small
    t = new_topic()
    base = json.dumps({"topic": t, "data": "x"}).encode()
    exact = base[:-1] + b" " * (256 - len(base)) + b"}"
    assert len(exact) == 256
    assert_ids(post(g.port, exact), 1)  # exactly max_body is fine
    over = base[:-1] + b" " * (257 - len(base)) + b"}"
    assert_error(post(g.port, over), 413)
    # a chunked body (no Content-Length) over max_body is refused too
    big = json.dumps({"topic": t, "data": "y" * 400}).encode()
    with socket.create_connection(("127.0.0.1", g.port), timeout=5) as sock:
        sock.sendall(b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big))
        buf = bytearray()
        assert_error(read_response(sock, buf), 413)
        assert at_eof(sock, buf)
    assert [e.data for e in history(g, t)] == ["x"]
    assert g.wait_slots(0) == 0


def test_413_with_expect_continue_answers_before_the_body(gw_small: Gateway) -> None:
    g = gw_small
    with socket.create_connection(("127.0.0.1", g.port), timeout=5) as sock:
        sock.sendall(b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\nExpect: 100-continue\r\n\r\n")
        buf = bytearray()
        r = read_response(sock, buf)
        assert r.status == 413  # final answer at once, no 100 Continue first
        assert_error(r, 413)
        assert at_eof(sock, buf)
    assert g.wait_slots(0) == 0


def test_413_batch_over_max_batch(gw_small: Gateway) -> None:
    g = gw_small
    t = new_topic()
    assert_error(g.publish([{"topic": t, "data": i} for i in range(4)]), 413)
    assert history(g, t) == []
    assert_ids(g.publish([{"topic": t, "data": i} for i in range(3)]), 3)
    assert [e.data for e in history(g, t)] == ["0", "1", "2"]
    assert g.wait_slots(0) == 0


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded", "text/json",
                                   "multipart/form-data; boundary=x", ""])
def test_415_not_json(gw: Gateway, ctype: str | None) -> None:
    t = new_topic()
    body = json.dumps({"topic": t, "data": "x"}).encode()
    h = {"Host": f"127.0.0.1:{gw.port}", "Connection": "close", "Content-Length": str(len(body))}
    if ctype is not None:
        h["Content-Type"] = ctype
    req = b"POST /publish HTTP/1.1\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in h.items()) + b"\r\n" + body
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(req)
        assert_error(read_response(sock, bytearray()), 415)
    assert history(gw, t) == []
    assert gw.wait_slots(0) == 0


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_405_wrong_method_on_publish(gw: Gateway, method: str) -> None:
    r = gw.request(method, "/publish", b"" if method != "GET" else None)
    assert_error(r, 405, "method_not_allowed")
    allow = [m.strip() for m in r.headers["allow"].split(",")]
    assert "POST" in allow and method not in allow
    assert gw.wait_slots(0) == 0


# -- HTTP mechanics -------------------------------------------------------------------------------


def test_expect_100_continue(gw: Gateway) -> None:
    t = new_topic()
    body = json.dumps({"topic": t, "data": "after continue"}).encode()
    with gw.stream(path(t)) as s, socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        assert s.status == 200
        sock.sendall(b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body))
        buf = bytearray()
        status, _, _ = read_head(sock, buf, 5)
        assert status == 100
        assert buf == b""
        sock.sendall(body)
        ids = assert_ids(read_response(sock, buf), 1)
        assert [(e.id, e.data) for e in s.wait_events(1)] == [(ids[0], "after continue")]
    assert gw.wait_slots(0) == 0


def test_keep_alive_sequential_publishes(gw: Gateway) -> None:
    t = new_topic()
    with gw.stream(path(t)) as s, socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        assert s.status == 200
        buf = bytearray()
        ids: list[str] = []
        for i in range(5):
            sock.sendall(http("POST", "/publish", json.dumps({"topic": t, "data": f"k{i}"}).encode()))
            r = read_response(sock, buf)
            ids += assert_ids(r, 1)
            assert r.headers.get("connection", "").lower() != "close"
        # an error does not end the connection either
        sock.sendall(http("POST", "/publish", b"{not json"))
        assert_error(read_response(sock, buf), 400, "bad_json")
        sock.sendall(http("POST", "/publish", json.dumps({"topic": t, "data": "last"}).encode(),
                          {"Connection": "close"}))
        ids += assert_ids(read_response(sock, buf), 1)
        assert at_eof(sock, buf)
        evs = s.wait_events(6)
        quiet(s, 6)
        assert [(e.id, e.data) for e in evs] == list(zip(ids, [f"k{i}" for i in range(5)] + ["last"], strict=True))
    assert gw.wait_slots(0) == 0


def test_keep_alive_pipelined_publishes(gw: Gateway) -> None:
    t = new_topic()
    with gw.stream(path(t)) as s, socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        assert s.status == 200
        reqs = [http("POST", "/publish", json.dumps({"topic": t, "data": f"p{i}"}).encode()) for i in range(4)]
        reqs.insert(2, http("POST", "/publish", b"[]"))  # a refused one in the middle
        reqs.append(http("GET", "/nowhere"))
        reqs.append(http("POST", "/publish", json.dumps({"topic": t, "data": "p4"}).encode(), {"Connection": "close"}))
        sock.sendall(b"".join(reqs))  # all in one write
        buf = bytearray()
        ids: list[str] = []
        for k in range(7):
            r = read_response(sock, buf)
            if k == 2:
                assert_error(r, 400)
            elif k == 5:
                assert_error(r, 404)
            else:
                ids += assert_ids(r, 1)
        assert at_eof(sock, buf)
        evs = s.wait_events(5)
        quiet(s, 5)
        assert [(e.id, e.data) for e in evs] == list(zip(ids, ["p0", "p1", "p2", "p3", "p4"], strict=True))
    assert gw.wait_slots(0) == 0


def test_chunked_request_body_and_http10_publisher(gw: Gateway) -> None:
    t = new_topic()
    body = json.dumps([{"topic": t, "data": "chunked"}]).encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        parts = [body[:7], body[7:]]
        sock.sendall(b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                     + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in parts) + b"0\r\n\r\n")
        buf = bytearray()
        ids = assert_ids(read_response(sock, buf), 1)
        assert at_eof(sock, buf)
    body10 = json.dumps({"topic": t, "data": "http/1.0"}).encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(b"POST /publish HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body10), body10))
        buf = bytearray()
        ids += assert_ids(read_response(sock, buf), 1)
        assert at_eof(sock, buf)  # HTTP/1.0 without keep-alive: closed after the answer
    assert [(e.id, e.data) for e in history(gw, t)] == list(zip(ids, ["chunked", "http/1.0"], strict=True))
    assert gw.wait_slots(0) == 0


# -- CORS -------------------------------------------------------------------------------------------


def test_cors_preflight_allowed_origin(gw_cors: Gateway) -> None:
    g = gw_cors
    r = g.request("OPTIONS", "/publish", headers={
        "Origin": "https://a.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization",
    })
    assert r.status == 204, r
    assert r.body == b""
    assert r.headers["access-control-allow-origin"] == "https://a.example"
    methods = [m.strip() for m in r.headers["access-control-allow-methods"].split(",")]
    assert "POST" in methods
    asked = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"content-type", "authorization"} <= asked
    assert "origin" in r.headers.get("vary", "").lower()
    assert int(r.headers["access-control-max-age"]) > 0
    assert "access-control-allow-credentials" not in r.headers  # cors_credentials is off
    # the subscribe endpoint answers a preflight too (e.g. for a Last-Event-ID header)
    r = g.request("OPTIONS", "/events?topic=x", headers={
        "Origin": "https://a.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "last-event-id"})
    assert r.status == 204, r
    assert r.headers["access-control-allow-origin"] == "https://a.example"
    assert "GET" in [m.strip() for m in r.headers["access-control-allow-methods"].split(",")]
    assert "last-event-id" in r.headers["access-control-allow-headers"].lower()
    assert g.wait_slots(0) == 0


@pytest.mark.parametrize("origin", ["https://b.example", "http://a.example", "https://a.example:8443",
                                    "https://a.example.evil", "null", None])
def test_cors_preflight_other_origin_gets_nothing(gw_cors: Gateway, origin: str | None) -> None:
    g = gw_cors
    h = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    if origin is not None:
        h["Origin"] = origin
    r = g.request("OPTIONS", "/publish", headers=h)
    assert not [k for k in r.headers if k.startswith("access-control-")], r.headers
    assert g.wait_slots(0) == 0


def test_cors_headers_on_publish_and_events(gw_cors: Gateway) -> None:
    g = gw_cors
    t = new_topic()
    with g.stream(path(t), {"Origin": "https://a.example"}) as s, g.stream(path(t), {"Origin": "https://b.example"}) as s2:
        assert s.status == 200 and s2.status == 200
        assert s.headers["access-control-allow-origin"] == "https://a.example"
        assert "origin" in s.headers.get("vary", "").lower()
        assert s.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert not [k for k in s2.headers if k.startswith("access-control-")]
        r = g.publish({"topic": t, "data": "x"}, headers={"Origin": "https://a.example"})
        ids = assert_ids(r, 1)
        assert r.headers["access-control-allow-origin"] == "https://a.example"
        assert [e.id for e in s.wait_events(1)] == ids
        assert [e.id for e in s2.wait_events(1)] == ids
        # errors carry it too, so a browser page can read them
        bad = g.publish({"topic": "bad topic", "data": "x"}, headers={"Origin": "https://a.example"})
        assert_error(bad, 400)
        assert bad.headers["access-control-allow-origin"] == "https://a.example"
        other = g.publish({"topic": t, "data": "y"}, headers={"Origin": "https://b.example"})
        assert_ids(other, 1)
        assert "access-control-allow-origin" not in other.headers
    s3 = Stream(g.port, path("bad topic"), {"Origin": "https://a.example"}, 5)
    s3.close()
    assert s3.status == 400
    assert s3.headers["access-control-allow-origin"] == "https://a.example"
    assert g.wait_slots(0) == 0


def test_no_cors_headers_when_not_configured(gw: Gateway) -> None:
    r = gw.request("OPTIONS", "/publish", headers={"Origin": "https://a.example",
                                                    "Access-Control-Request-Method": "POST"})
    assert not [k for k in r.headers if k.startswith("access-control-")], r.headers
    r = gw.publish({"topic": new_topic(), "data": 1}, headers={"Origin": "https://a.example"})
    assert_ids(r, 1)
    assert not [k for k in r.headers if k.startswith("access-control-")], r.headers
    assert gw.wait_slots(0) == 0

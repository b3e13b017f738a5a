"""Hostile clients against a real gateway process over real sockets.

Malformed and oversized request heads, stalled heads, random bytes, TLS / HTTP/2 on the
plain HTTP/1.1 port, abrupt disconnects (RST) at every stage, mass disconnects, garbage sent
on an open stream and pipelining.  After every test the gateway must still serve a normal
publish + subscribe and hold no connection slot besides the admin connection asking.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import threading
import time

import pytest
from checks import assert_alive, uniq
from harness import Gateway, Stream, raw_exchange, recv_all
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HEAD_TIMEOUT = 1.0
MAX_HEAD = 2048

# -- helpers ---------------------------------------------------------------------------------


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of the first HTTP response in ``raw``."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {raw[:300]!r}"
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), lines[0]
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", len(rest)))
    return status, headers, rest[:n]


def check_error(status: int, body: bytes, expect: int, code: str | None = None) -> dict:
    """The contract's error shape: exactly ``{"error": CODE, "detail": TEXT}``."""
    assert status == expect, (status, body)
    obj = json.loads(body)
    assert isinstance(obj, dict) and set(obj) == {"error", "detail"}, obj
    assert isinstance(obj["error"], str) and obj["error"], obj
    assert isinstance(obj["detail"], str), obj
    if code is not None:
        assert obj["error"] == code, obj
    return obj


def check_raw_error(raw: bytes, expect: int, code: str | None = None) -> dict:
    status, headers, body = parse_response(raw)
    assert headers.get("content-type", "").startswith("application/json"), headers
    return check_error(status, body, expect, code)


def rst_close(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER on, timeout 0)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def connect(g: Gateway, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", g.port), timeout=timeout)


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything received until EOF/RST (or ``timeout``), and when the read ended."""
    t0 = time.monotonic()
    data = recv_all(sock, bytearray(), None, timeout)
    return data, time.monotonic() - t0


def client_hello() -> bytes:
    """A genuine TLS ClientHello, as a browser pointed at https:// would send."""
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = out.read()
    assert hello[:1] == b"\x16", hello[:8]
    return hello


# -- fixture ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hg():
    g = Gateway("--heartbeat-interval", "1s", "--flush-interval", "10ms", "--head-timeout", "1s",
                "--max-head-size", "2KiB", "--drain-timeout", "1s")
    g.start()
    yield g
    g.stop()


# -- malformed and oversized heads -----------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"GARBAGE\r\n\r\n",
    b"GET /events?topic=a\r\n\r\n",  # HTTP/0.9 style, no version
    b"GET  /events?topic=a HTTP/1.1\r\nHost: x\r\n\r\n",  # double space
    b"GET /events?topic=a HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    b"GET /events?topic=a HTTX/1.1\r\nHost: x\r\n\r\n",
    b"\x00\x01\x02 / HTTP/1.1\r\n\r\n",
    b"G\xffT /events?topic=a HTTP/1.1\r\n\r\n",
    b"GET /events?topic=a HTTP/1.1\r\nno colon here\r\n\r\n",
    b"\r\n\r\n\r\n",
])
def test_malformed_request_is_400_json(hg: Gateway, data: bytes):
    t0 = time.monotonic()
    raw = raw_exchange(hg.port, data, timeout=3)
    check_raw_error(raw, 400, "bad_request")
    # answered at once and closed, not after head_timeout
    assert time.monotonic() - t0 < HEAD_TIMEOUT * 0.8
    assert_alive(hg)


def test_request_line_over_8k_is_414(gw: Gateway):
    # default max_head_size (16 KiB): the request-line limit is the 8 KiB one
    ok = raw_exchange(gw.port, b"GET /nope?x=" + b"a" * 7900 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=3)
    check_raw_error(ok, 404, "not_found")
    raw = raw_exchange(gw.port, b"GET /events?topic=a&x=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", timeout=3)
    check_raw_error(raw, 414)
    # the same without a line end yet: refused as soon as the line is too long, not at head_timeout
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"GET /events?topic=a&x=" + b"a" * 4000)
        s.sendall(b"a" * 5000)
        data, took = read_until_closed(s, 3)
    check_raw_error(data, 414)
    assert took < 2
    assert_alive(gw)


def test_request_line_limited_by_smaller_max_head_size(hg: Gateway):
    raw = raw_exchange(hg.port, b"GET /events?topic=a&x=" + b"a" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", timeout=3)
    check_raw_error(raw, 414)
    assert_alive(hg)


def test_incomplete_header_block_over_max_head_size_is_431(hg: Gateway):
    with connect(hg) as s:
        s.sendall(b"GET /events?topic=a HTTP/1.1\r\nHost: x\r\n")
        for _ in range(6):  # 6 x 500 B of headers, never finished
            s.sendall(b"X-Junk: " + b"j" * 490 + b"\r\n")
            time.sleep(0.01)
        data, took = read_until_closed(s, 3)
    check_raw_error(data, 431)
    assert took < HEAD_TIMEOUT * 0.8
    assert_alive(hg)


def test_complete_header_block_over_max_head_size_is_431(hg: Gateway):
    # (found as a bug -- h11 only bounds *incomplete* heads -- fixed in 29f8187)
    raw = raw_exchange(hg.port, b"GET /events?topic=hostile.big HTTP/1.1\r\nHost: x\r\nX-Big: "
                       + b"b" * 3000 + b"\r\n\r\n", timeout=1.5)
    check_raw_error(raw, 431)
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(40))  # 40 small headers, ~4.5 KB
    raw = raw_exchange(hg.port, b"POST /publish HTTP/1.1\r\nHost: x\r\n" + many
                       + b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", timeout=1.5)
    check_raw_error(raw, 431)
    # just under the limit is fine
    raw = raw_exchange(hg.port, b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: "
                       + b"b" * 1900 + b"\r\n\r\n", timeout=1.5)
    check_raw_error(raw, 404)
    assert_alive(hg)


# -- slow and silent clients ----------------------------------------------------------------


def _assert_head_timeout(data: bytes, took: float) -> None:
    assert HEAD_TIMEOUT * 0.9 <= took <= HEAD_TIMEOUT + 1.5, took
    if data:  # a 408 first is allowed
        check_raw_error(data, 408)


def test_stalled_head_is_disconnected_after_head_timeout(hg: Gateway):
    with connect(hg) as s:
        s.sendall(b"GET /events?topic=hostile.stall HTTP/1.1\r\nHost: x")
        data, took = read_until_closed(s, HEAD_TIMEOUT + 3)
    assert data, "expected a 408 before the close"
    _assert_head_timeout(data, took)
    assert_alive(hg)


def test_silent_client_is_disconnected(hg: Gateway):
    before = hg.stats()["head_timeouts"]
    with connect(hg) as s:
        data, took = read_until_closed(s, HEAD_TIMEOUT + 3)
    _assert_head_timeout(data, took)
    # Counted like any head timeout (ssegw_head_timeouts_total): slowloris starts silent.
    assert hg.stats()["head_timeouts"] == before + 1
    assert_alive(hg)


def test_trickled_head_does_not_extend_head_timeout(hg: Gateway):
    """Slowloris: a byte every 200 ms must not keep the head timer from firing."""
    req = b"GET /events?topic=hostile.trickle HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 40
    t0 = time.monotonic()
    closed_at = None
    data = bytearray()
    with connect(hg) as s:
        s.settimeout(0.2)
        for b in req:
            try:
                s.sendall(bytes([b]))
                chunk = s.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                closed_at = time.monotonic() - t0
                break
            if not chunk:
                closed_at = time.monotonic() - t0
                break
            data += chunk
            if time.monotonic() - t0 > HEAD_TIMEOUT + 3:
                break
    assert closed_at is not None, "a trickling client was never disconnected"
    _assert_head_timeout(bytes(data), closed_at)
    assert_alive(hg)


def test_open_stream_is_not_cut_by_head_timeout(hg: Gateway):
    topic = uniq("hostile.long")
    with hg.stream(f"/events?topic={topic}") as s:
        assert s.status == 200
        time.sleep(HEAD_TIMEOUT + 0.5)
        r = hg.publish({"topic": topic, "data": "late"})
        assert r.status == 200
        assert [e.data for e in s.wait_events(1, 3)] == ["late"]
        assert not s.closed
    assert_alive(hg)


# -- random bytes, TLS and HTTP/2 on the plain port -----------------------------------------

_PREFIXES = [b"", b"GET ", b"GET /events?topic=", b"POST /publish HTTP/1.1\r\n",
             b"GET /events?topic=a HTTP/1.1\r\n", b"POST /publish HTTP/1.1\r\nContent-Length: 5\r\n\r\n"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(
    st.binary(max_size=4096),
    st.builds(lambda p, b: p + b, st.sampled_from(_PREFIXES), st.binary(max_size=1024)),
))
def test_random_bytes_never_crash(hg: Gateway, payload: bytes):
    raw = raw_exchange(hg.port, payload, timeout=3, close_write=True)
    if raw:
        status, _, body = parse_response(raw)
        if status >= 400:
            check_error(status, body, status)
    assert hg.proc is not None and hg.proc.poll() is None


def test_random_bytes_leave_no_slot(hg: Gateway):
    # runs after the property test in this module: whatever it sent, nothing is held
    assert hg.wait_slots(0) == 0
    assert_alive(hg)


def test_tls_client_hello_on_plain_port(hg: Gateway):
    raw = raw_exchange(hg.port, client_hello(), timeout=HEAD_TIMEOUT + 2)
    assert raw, "expected a 400 (or 408) answer, got a silent close"
    status, _, body = parse_response(raw)
    assert status in (400, 408), raw[:200]
    check_error(status, body, status)
    assert_alive(hg)


def test_http2_preface_on_plain_port(hg: Gateway):
    raw = raw_exchange(hg.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", timeout=HEAD_TIMEOUT + 2)
    status, _, body = parse_response(raw)
    assert 400 <= status < 600, raw[:200]
    check_error(status, body, status)
    assert_alive(hg)


def test_http2_prior_knowledge_frames(hg: Gateway):
    # preface plus an empty SETTINGS frame, as h2c prior-knowledge clients send
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    raw = raw_exchange(hg.port, preface, timeout=HEAD_TIMEOUT + 2)
    if raw:
        status, _, body = parse_response(raw)
        check_error(status, body, status)
    assert_alive(hg)


# -- abrupt disconnects -----------------------------------------------------------------------


def test_rst_mid_head_frees_the_slot_at_once(hg: Gateway):
    socks = []
    for _ in range(10):
        s = connect(hg)
        s.sendall(b"GET /events?topic=hostile.rst HTTP/1.1\r\nHost: x\r\nAccept: text/ev")
        socks.append(s)
    time.sleep(0.1)
    assert hg.stats()["slots_in_use"] - 1 == 10
    t0 = time.monotonic()
    for s in socks:
        rst_close(s)
    assert hg.wait_slots(0, timeout=HEAD_TIMEOUT * 0.7) == 0
    assert time.monotonic() - t0 < HEAD_TIMEOUT * 0.7  # freed by the RST, not by the head timer
    assert_alive(hg)


def test_rst_mid_publish_body_publishes_nothing(hg: Gateway):
    topic = uniq("hostile.body")
    body = json.dumps({"topic": topic, "data": "x" * 2000}).encode()
    for cut in (1, len(body) // 2, len(body) - 1):
        s = connect(hg)
        s.sendall(b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body[:cut])
        time.sleep(0.05)
        rst_close(s)
    assert hg.wait_slots(0) == 0
    # history shows nothing of the truncated bodies: the first retained event is the good one
    r = hg.publish({"topic": topic, "data": "complete"})
    assert r.status == 200
    with hg.stream(f"/events?topic={topic}&since=earliest") as s:
        assert s.status == 200
        s.wait_events(1, 3)
        s.wait_for(lambda st_: len(st_.events) > 1, timeout=0.3)
        assert [(e.id, e.data) for e in s.events] == [(r.json()["ids"][0], "complete")]
    assert_alive(hg)


def test_rst_on_open_streams_while_publishing(hg: Gateway):
    topic = uniq("hostile.pubrst")
    n = 150
    observer = hg.stream(f"/events?topic={topic}")
    victims = [hg.stream(f"/events?topic={topic}") for _ in range(30)]
    assert observer.status == 200 and all(v.status == 200 for v in victims)
    ids: list[str] = []
    errors: list[BaseException] = []
    started = threading.Event()

    def publisher() -> None:
        try:
            for i in range(n):
                r = hg.publish({"topic": topic, "data": str(i)})
                assert r.status == 200, r
                ids.extend(r.json()["ids"])
                if i == 20:
                    started.set()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            started.set()

    th = threading.Thread(target=publisher)
    th.start()
    assert started.wait(10)
    for v in victims:  # never read a byte, just vanish
        rst_close(v.sock)
        v.closed = True
    th.join(30)
    assert not th.is_alive() and not errors, errors
    evs = observer.wait_events(n, 10)
    assert [e.data for e in evs] == [str(i) for i in range(n)]
    assert [e.id for e in evs] == ids
    observer.close()
    assert hg.wait_slots(0) == 0
    assert_alive(hg)


def test_200_streams_killed_at_once(hg: Gateway):
    topic = uniq("hostile.mass")
    streams = [Stream(hg.port, f"/events?topic={topic}", None, 10) for _ in range(200)]
    assert all(s.status == 200 for s in streams)
    assert hg.stats()["slots_in_use"] - 1 == 200
    m = hg.metrics()
    assert m["ssegw_streams_open"] == 200
    for s in streams:
        rst_close(s.sock)
        s.closed = True
    assert hg.wait_slots(0) == 0
    m = hg.metrics()
    assert m["ssegw_streams_open"] == 0 and m["ssegw_connections_open"] == 0
    # the topic is usable again with none of the dead subscribers left behind
    r = hg.request("GET", f"/admin/topics/{topic}", admin=True)
    assert r.status == 200 and r.json() == {"topic": topic, "subscribers": 0, "keys": 0}, r
    assert_alive(hg)


def test_200_streams_closed_with_fin_at_once(hg: Gateway):
    topic = uniq("hostile.massfin")
    streams = [Stream(hg.port, f"/events?topic={topic}", None, 10) for _ in range(200)]
    assert all(s.status == 200 for s in streams)
    for s in streams:
        s.close()
    assert hg.wait_slots(0) == 0
    assert_alive(hg)


# -- garbage on an open stream, pipelining ------------------------------------------------------


def test_stream_garbage_tolerated_up_to_a_bound(hg: Gateway):
    topic = uniq("hostile.garbage")
    with hg.stream(f"/events?topic={topic}") as s:
        assert s.status == 200
        # a stray pipelined request and some junk: discarded, the stream goes on
        s.sock.sendall(b"GET /events?topic=other HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00junk\r\n" * 400)
        r = hg.publish({"topic": topic, "data": "still here"})
        assert r.status == 200
        assert [e.data for e in s.wait_events(1, 3)] == ["still here"]
        assert not s.closed
        assert b"HTTP/1.1" not in bytes(s.raw), "an answer to the stray request was mixed into the stream"
        # far more than any client should send: closed
        t0 = time.monotonic()
        try:
            for _ in range(40):
                s.sock.sendall(b"z" * 4096)
        except OSError:
            pass
        assert s.wait_closed(3), "a stream client flooding us was not closed"
        assert time.monotonic() - t0 < 3
    assert hg.wait_slots(0) == 0
    assert_alive(hg)


def test_pipelined_get_events_after_publish(hg: Gateway):
    topic = uniq("hostile.pipe")
    body = json.dumps({"topic": topic, "data": "piped"}).encode()
    req = (b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
           % len(body) + body
           + f"GET /events?topic={topic}&since=last HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
    with connect(hg) as s:
        s.sendall(req)
        buf = bytearray()
        deadline = time.monotonic() + 3
        while b"data: piped" not in buf and time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            buf += chunk
    raw = bytes(buf)
    status, headers, pbody = parse_response(raw)
    assert status == 200, raw[:300]
    ids = json.loads(pbody)["ids"]
    assert len(ids) == 1
    second = raw[raw.index(pbody) + len(pbody):]
    status2, headers2, _ = parse_response(second)
    assert status2 == 200, second[:300]
    assert headers2["content-type"] == "text/event-stream; charset=utf-8"
    assert f"id: {ids[0]}\ndata: piped\n".encode() in second
    assert hg.wait_slots(0) == 0
    assert_alive(hg)


def test_pipelined_requests_after_error_are_not_answered(hg: Gateway):
    # a 400 closes the connection: whatever was pipelined behind it is dropped
    raw = raw_exchange(hg.port, b"GARBAGE\r\n\r\nGET /events?topic=a HTTP/1.1\r\nHost: x\r\n\r\n", timeout=3)
    check_raw_error(raw, 400)
    assert raw.count(b"HTTP/1.1 ") == 1
    assert_alive(hg)


# -- admin endpoints keep working after errors -------------------------------------------------


def test_admin_stats_survives_error_responses(hg: Gateway):
    # (found as a bug -- 500 from orjson on the int keys of responses{} -- fixed in d026a35)
    check_raw_error(raw_exchange(hg.port, b"GARBAGE\r\n\r\n", timeout=3), 400)
    r = hg.request("GET", "/admin/stats", admin=True)
    assert r.status == 200, r
    assert r.json()["workers"][0]["responses"]["400"] >= 1
    m = hg.metrics()
    assert m['ssegw_http_responses_total{status="400"}'] >= 1
    assert_alive(hg)

"""HTTP framing at the edge: only HTTP/1.0 and 1.1, and no ambiguous request bodies.

A request with both ``Content-Length`` and ``Transfer-Encoding`` (whatever their spelling:
folded, cased) is the classic request-smuggling shape: it is answered 400 and the connection
closed, so nothing pipelined behind it is executed.  Versions other than 1.0 and 1.1 get 505.
Real gateway, raw bytes on a socket.
"""

from __future__ import annotations

import socket

import pytest
from harness import raw_exchange, recv_all

NEXT = b"OPTIONS /events HTTP/1.1\r\nHost: x\r\n\r\n"  # would be answered 204 if it were executed


def statuses(raw: bytes) -> list[int]:
    return [int(line.split()[1]) for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.")]


@pytest.mark.parametrize(
    "te",
    [b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding:\r\n chunked\r\n", b"transfer-encoding: CHUNKED\r\n"],
    ids=["plain", "folded", "cased"],
)
def test_content_length_with_transfer_encoding_is_refused_and_closed(gw, te: bytes) -> None:
    body = b'{"topic":"smuggle.t","data":"x"}'
    req = (b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n" % (len(body) + 5) + te + b"\r\n"
           + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    out = raw_exchange(gw.port, req + NEXT)
    assert statuses(out) == [400], out[:300]
    # The folded line is refused as obs-fold before its framing is looked at.
    assert (b"bad_request" if te.startswith(b"Transfer-Encoding:\r\n") else b"bad_framing") in out
    assert b"connection: close" in out.lower()


@pytest.mark.parametrize("version", [b"HTTP/9.9", b"HTTP/2.0", b"HTTP/1.2"])
def test_other_http_versions_get_505(gw, version: bytes) -> None:
    out = raw_exchange(gw.port, b"GET /events?topic=v.t " + version + b"\r\nHost: x\r\n\r\n" + NEXT)
    assert statuses(out) == [505], out[:300]
    assert b"http_version_not_supported" in out


def test_http10_and_http11_are_served(gw) -> None:
    for v in (b"HTTP/1.0", b"HTTP/1.1"):
        out = raw_exchange(gw.port, b"OPTIONS /events " + v + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert statuses(out) == [204], out[:300]


# -- line endings: bare LF and obs-fold are refused ----------------------------------------

@pytest.mark.parametrize(
    "head",
    [
        b"OPTIONS /events HTTP/1.1\nHost: x\r\n\r\n",  # request line ended by a bare LF
        b"OPTIONS /events HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n",  # a field line ended by a bare LF
        b"OPTIONS /events HTTP/1.1\r\nHost: x\n\n",  # the blank line as bare LFs
        b"OPTIONS /events HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n",  # obs-fold (space)
        b"OPTIONS /events HTTP/1.1\r\nHost: x\r\nX-A: b\r\n\tc\r\n\r\n",  # obs-fold (tab)
    ],
    ids=["request-line-lf", "field-lf", "blank-lf", "fold-sp", "fold-tab"],
)
def test_loose_line_endings_are_refused_and_closed(gw, head: bytes) -> None:
    out = raw_exchange(gw.port, head + NEXT)
    assert statuses(out) == [400], out[:300]
    assert b"connection: close" in out.lower()


def test_loose_head_pipelined_behind_a_good_request_is_refused(gw) -> None:
    good = b"OPTIONS /events HTTP/1.1\r\nHost: x\r\n\r\n"
    out = raw_exchange(gw.port, good + b"OPTIONS /events HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n" + NEXT)
    assert statuses(out) == [204, 400], out[:600]


def test_head_sent_a_byte_at_a_time_is_parsed(gw) -> None:
    good = b"OPTIONS /events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in good:
            s.sendall(bytes([b]))
        out = recv_all(s, bytearray(), None, 5.0)
    assert statuses(out) == [204], out[:300]


# -- publish: refused from the head, before its body ----------------------------------------

PUB_KEY = "k-" + "p" * 30


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    from harness import Gateway

    cfg = tmp_path_factory.mktemp("keyed") / "ssegw.toml"
    cfg.write_text(f'[auth]\npublish_keys = ["{PUB_KEY}"]\n')
    g = Gateway("--config", str(cfg), "--head-timeout", "5s")
    g.start()
    yield g
    g.stop()


def _head_only(port: int, head: bytes, timeout: float = 3.0) -> bytes:
    """Send a request head announcing a 1 MiB body, send no body, read what comes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        return recv_all(s, bytearray(), None, timeout)


@pytest.mark.parametrize("expect", [b"", b"Expect: 100-continue\r\n"], ids=["plain", "expect-100"])
def test_unauthenticated_publish_is_refused_before_its_body(keyed, expect: bytes) -> None:
    """Auth is decided from the request head: a publisher without a valid key gets 401 at
    once (never ``100 Continue``), with the body unread -- a stranger cannot make the gateway
    buffer max_body per connection.  The old code read the whole body first (and answered
    ``100 Continue`` to anyone)."""
    head = (b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1048575\r\n" + expect + b"\r\n")
    out = _head_only(keyed.port, head)
    assert b"100 Continue" not in out, out[:200]
    assert statuses(out) == [401], out[:300]
    assert b"connection: close" in out.lower()


def test_authenticated_publish_gets_100_continue(keyed) -> None:
    head = (b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + PUB_KEY.encode() + b"\r\n"
            b"Content-Length: 1048575\r\nExpect: 100-continue\r\n\r\n")
    out = _head_only(keyed.port, head, timeout=1.5)
    assert out.startswith(b"HTTP/1.1 100 "), out[:200]

"""A request-smuggling corpus against a real gateway: CL.TE, TE.CL, TE.TE and their spellings.

Every case writes one hostile ``POST /publish`` and, pipelined behind it on the same
connection, an innocuous second publish to a topic of its own (``smug.<case>``).  Where a
body can hide a request (a chunk a Content-Length reader would not consume, bytes after the
last chunk) it hides a third one, also to ``smug.<case>``.  The invariant is one of:

- ``refused``: exactly one answer, a 4xx/5xx among the statuses the case names (400, 413,
  501, 505, ...), with ``connection: close``; then the server closes; nothing of the hostile
  request nor of what followed it is published.
- ``served``: the head has one reading only (said in a comment at the case); both requests
  are answered 200 and exactly their two messages are published -- nothing hidden.

What was published is read back from each topic's history (``since=earliest``) up to a
sentinel published last over a clean connection, so an empty answer is a real "nothing",
not a stream that had not caught up.  Expected server behaviour (RFC 9112 6.1, 6.3, 5.2,
2.2): both Content-Length and Transfer-Encoding -> 400 ``bad_framing`` and close; bare LF
line endings or obs-fold anywhere in a request head -> 400 and close; versions other than
1.0/1.1 -> 505; transfer-codings other than a single ``chunked`` -> 501 (h11).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from checks import assert_healthy
from harness import Gateway

pytestmark = pytest.mark.timeout(60)

SENTINEL = "sentinel"
#: Read an answer for this long at most: a refusal closes at once, a served pair ends with
#: ``Connection: close``; only a request the server is still waiting on runs into it (and
#: the gateway's head timeout, 1 s here, answers 408 before that).
READ_TIMEOUT = 4.0


@pytest.fixture(scope="module")
def gw():
    g = Gateway("--head-timeout", "1s", "--flush-interval", "10ms")
    g.start()
    yield g
    g.stop()


# -- building requests -------------------------------------------------------------------------


def pub(topic: str, data: str = "x") -> bytes:
    return json.dumps([{"topic": topic, "data": data}], separators=(",", ":")).encode()


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def publish_req(topic: str, data: str, close: bool = False) -> bytes:
    body = pub(topic, data)
    return (b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (len(body), b"Connection: close\r\n" if close else b"", body))


@dataclass(frozen=True)
class T:
    """The two topics of a case."""

    first: str
    smug: str

    def body(self) -> bytes:
        return pub(self.first)

    def hidden(self) -> bytes:
        """A complete request that a reader with the other framing would execute."""
        return publish_req(self.smug, "hidden")


def head(*fields: bytes, line: bytes = b"POST /publish HTTP/1.1", eol: bytes = b"\r\n") -> bytes:
    """A request head: ``line``, Host, Content-Type, then ``fields`` (each written with its
    own line ending), then the blank line written with ``eol``."""
    return line + b"\r\nHost: x\r\nContent-Type: application/json\r\n" + b"".join(fields) + eol


# CL.TE and TE.CL bodies: each hides a request that only the *other* reading executes.


def cl_te(te: bytes, cl_first: bool = True) -> Callable[[T], bytes]:
    """Content-Length counts the whole chunked body *and* a hidden request after the last
    chunk: a chunked reader leaves the hidden request on the connection (CL.TE)."""

    def build(t: T) -> bytes:
        body = chunked(t.body()) + t.hidden()
        cl = b"Content-Length: %d\r\n" % len(body)
        return head(*((cl, te) if cl_first else (te, cl))) + body

    return build


def te_cl(te: bytes, cl: bytes | None = None) -> Callable[[T], bytes]:
    """Content-Length counts only the chunk-size line; the chunk is a hidden request: a
    Content-Length reader answers the size line as a (bad) body, then executes the chunk
    (TE.CL)."""

    def build(t: T) -> bytes:
        hidden = t.hidden()
        size = b"%x\r\n" % len(hidden)
        body = size + hidden + b"\r\n0\r\n\r\n"
        return head(cl if cl is not None else b"Content-Length: %d\r\n" % len(size), te) + body

    return build


def te_only(te: bytes, line: bytes = b"POST /publish HTTP/1.1") -> Callable[[T], bytes]:
    """Transfer-Encoding alone, the publish chunked."""
    return lambda t: head(te, line=line) + chunked(t.body())


def cl_only(*cl: bytes) -> Callable[[T], bytes]:
    """The given Content-Length line(s) (``%d`` is the body's length), the publish as body."""

    def build(t: T) -> bytes:
        body = t.body()
        return head(*(c.replace(b"%d", b"%d" % len(body)) for c in cl)) + body

    return build


def with_cl(*fields: bytes, eol: bytes = b"\r\n", line: bytes = b"POST /publish HTTP/1.1") -> Callable[[T], bytes]:
    """``fields`` and a correct Content-Length: any oddity is in the fields or line endings."""

    def build(t: T) -> bytes:
        body = t.body()
        return head(*fields, b"Content-Length: %d\r\n" % len(body), line=line, eol=eol) + body

    return build


def chunk_body(body: Callable[[T], bytes]) -> Callable[[T], bytes]:
    """A valid chunked head; ``body`` writes the (broken) chunked body."""
    return lambda t: head(b"Transfer-Encoding: chunked\r\n") + body(t)


def lf_everywhere(t: T) -> bytes:
    body = t.body()
    return (b"POST /publish HTTP/1.1\nHost: x\nContent-Type: application/json\nContent-Length: %d\n\n" % len(body)
            + body)


def lf_request_line(t: T) -> bytes:
    body = t.body()
    return (b"POST /publish HTTP/1.1\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % len(body) + body)


def huge_extension(t: T) -> tuple[bytes, ...]:
    # Two writes 0.2 s apart, so the server holds an incomplete chunk-size line of 256 KiB:
    # it must refuse it (h11's max_incomplete_event_size: 431), not buffer it.
    ext = b";e=" + b"a" * (256 * 1024)
    body = t.body()
    first = head(b"Transfer-Encoding: chunked\r\n") + b"%x" % len(body) + ext[: len(ext) // 2]
    return first, ext[len(ext) // 2:] + b"\r\n" + body + b"\r\n0\r\n\r\n"


# -- the corpus --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[T], bytes | tuple[bytes, ...]]
    refused: tuple[int, ...] = ()  # allowed refusal statuses; empty: served
    code: str | None = None  # the refusal's error code, where the case pins it
    http10: bool = False  # HTTP/1.0: answered at most once, then closed (RFC 9112 9.3)


TE = b"Transfer-Encoding: chunked\r\n"
BAD_FRAMING = (400,)
REFUSE_CODING = (400, 501)  # h11 refuses unknown/duplicated codings with 501 before our check

CASES = [
    # --- both Content-Length and Transfer-Encoding: refused whatever the spelling ------------
    Case("cl.te", cl_te(TE), BAD_FRAMING, "bad_framing"),
    Case("cl.te-te-first", cl_te(TE, cl_first=False), BAD_FRAMING, "bad_framing"),
    Case("te.cl", te_cl(TE), BAD_FRAMING, "bad_framing"),
    Case("te.cl-cl-zero", te_cl(TE, b"Content-Length: 0\r\n"), BAD_FRAMING, "bad_framing"),
    Case("te.cl-cased-Chunked", te_cl(b"Transfer-Encoding: Chunked\r\n"), BAD_FRAMING, "bad_framing"),
    Case("te.cl-cased-CHUNKED", te_cl(b"transfer-encoding: CHUNKED\r\n"), BAD_FRAMING, "bad_framing"),
    Case("te.cl-tab", te_cl(b"Transfer-Encoding:\tchunked\r\n"), BAD_FRAMING, "bad_framing"),
    Case("te.cl-trailing-space", te_cl(b"Transfer-Encoding: chunked   \r\n"), BAD_FRAMING, "bad_framing"),
    Case("te.cl-no-space", te_cl(b"Transfer-Encoding:chunked\r\n"), BAD_FRAMING, "bad_framing"),
    Case("cl.te-cased-CHUNKED", cl_te(b"Transfer-Encoding: CHUNKED\r\n"), BAD_FRAMING, "bad_framing"),
    # A space before the colon is not a field name at all (RFC 9112 5.1: MUST 400).
    Case("te.cl-space-before-colon", te_cl(b"Transfer-Encoding : chunked\r\n"), (400,)),
    Case("te.cl-folded", te_cl(b"Transfer-Encoding:\r\n chunked\r\n"), (400,)),
    Case("cl.te-folded", cl_te(b"Transfer-Encoding:\r\n chunked\r\n"), (400,)),
    Case("te.cl-duplicated-te", te_cl(TE + TE), REFUSE_CODING),
    Case("te.cl-duplicated-te-obfuscated", te_cl(TE + b"Transfer-Encoding: x\r\n"), REFUSE_CODING),
    Case("te.cl-chunked-identity", te_cl(b"Transfer-Encoding: chunked, identity\r\n"), REFUSE_CODING),
    Case("te.cl-identity-chunked", te_cl(b"Transfer-Encoding: identity, chunked\r\n"), REFUSE_CODING),
    Case("te.cl-gzip-chunked", te_cl(b"Transfer-Encoding: gzip, chunked\r\n"), REFUSE_CODING),
    Case("te.cl-chunked-chunked", te_cl(b"Transfer-Encoding: chunked, chunked\r\n"), REFUSE_CODING),
    Case("te.cl-xchunked", te_cl(b"Transfer-Encoding: xchunked\r\n"), REFUSE_CODING),
    # A reader that ends lines at a bare LF (or CR) sees two framing fields; one that does
    # not sees one field with an odd value.  Either way: refused.
    Case("te.cl-bare-lf-between", te_cl(b"Transfer-Encoding: chunked\n"), (400,)),
    Case("te.cl-bare-cr-between", te_cl(b"Transfer-Encoding: chunked\r"), (400,)),
    Case("te.cl-nul-in-te", te_cl(b"Transfer-Encoding: chunked\x00\r\n"), (400,)),
    # Transfer-Encoding hidden in the continuation line of another field: a reader that
    # unfolds sees one field "X-Note", one that does not sees Transfer-Encoding.
    Case("te.cl-te-in-obs-fold", te_cl(b"X-Note: a\r\n Transfer-Encoding: chunked\r\n"), (400,)),
    Case("te.cl-http10", (lambda t: te_cl(TE)(t).replace(b"HTTP/1.1", b"HTTP/1.0", 1)), BAD_FRAMING,
         "bad_framing"),
    # --- Transfer-Encoding alone ---------------------------------------------------------------
    # served: one reading -- chunked (RFC 9112 7: coding names are case-insensitive; 5.1:
    # OWS around a field value is not part of it).
    Case("te-chunked", te_only(TE)),
    Case("te-cased-Chunked", te_only(b"Transfer-Encoding: Chunked\r\n")),
    Case("te-cased-CHUNKED", te_only(b"TRANSFER-ENCODING: CHUNKED\r\n")),
    Case("te-tab", te_only(b"Transfer-Encoding:\tchunked\t\r\n")),
    Case("te-trailing-spaces", te_only(b"Transfer-Encoding: chunked  \r\n")),
    Case("te-space-before-colon", te_only(b"Transfer-Encoding : chunked\r\n"), (400,)),
    Case("te-folded", te_only(b"Transfer-Encoding:\r\n chunked\r\n"), (400,)),
    Case("te-duplicated", te_only(TE + TE), REFUSE_CODING),
    Case("te-duplicated-obfuscated", te_only(TE + b"Transfer-Encoding: cow\r\n"), REFUSE_CODING),
    Case("te-chunked-identity", te_only(b"Transfer-Encoding: chunked, identity\r\n"), REFUSE_CODING),
    Case("te-identity-chunked", te_only(b"Transfer-Encoding: identity, chunked\r\n"), REFUSE_CODING),
    Case("te-gzip-chunked", te_only(b"Transfer-Encoding: gzip, chunked\r\n"), REFUSE_CODING),
    Case("te-chunked-chunked", te_only(b"Transfer-Encoding: chunked, chunked\r\n"), REFUSE_CODING),
    Case("te-xchunked", te_only(b"Transfer-Encoding: xchunked\r\n"), REFUSE_CODING),
    Case("te-quoted", te_only(b'Transfer-Encoding: "chunked"\r\n'), REFUSE_CODING),
    Case("te-empty", te_only(b"Transfer-Encoding: \r\n"), REFUSE_CODING),
    Case("te-vertical-tab", te_only(b"Transfer-Encoding:\x0bchunked\r\n"), (400,)),
    # HTTP/1.0 with Transfer-Encoding: RFC 9112 6.1 -- the framing is faulty and the
    # connection closes after this message; what was pipelined behind it is never executed.
    Case("te-http10", te_only(TE, line=b"POST /publish HTTP/1.0"), (400, 501), http10=True),
    # --- Content-Length alone -----------------------------------------------------------------
    # served: identical values are one value (RFC 9110 8.6; h11 merges them).
    Case("cl-duplicated-identical", cl_only(b"Content-Length: %d\r\n", b"Content-Length: %d\r\n")),
    Case("cl-list-identical", cl_only(b"Content-Length: %d, %d\r\n")),
    Case("cl-tab", cl_only(b"Content-Length:\t%d\t\r\n")),
    Case("cl-duplicated-different", cl_only(b"Content-Length: %d\r\n", b"Content-Length: 4\r\n"), (400,)),
    Case("cl-list-different", cl_only(b"Content-Length: %d, 4\r\n"), (400,)),
    Case("cl-5-6", cl_only(b"Content-Length: 5, 6\r\n"), (400,)),
    Case("cl-plus", cl_only(b"Content-Length: +%d\r\n"), (400,)),
    Case("cl-minus-one", cl_only(b"Content-Length: -1\r\n"), (400,)),
    Case("cl-hex", cl_only(b"Content-Length: 0x%d\r\n"), (400,)),
    Case("cl-empty", cl_only(b"Content-Length: \r\n"), (400,)),
    Case("cl-space-inside", cl_only(b"Content-Length: 1 0\r\n"), (400,)),
    Case("cl-over-max-body", cl_only(b"Content-Length: 1048577\r\n"), (413,), "payload_too_large"),
    Case("cl-20-digits", cl_only(b"Content-Length: 99999999999999999999\r\n"), (413,), "payload_too_large"),
    Case("cl-30-digits", cl_only(b"Content-Length: " + b"9" * 30 + b"\r\n"), (400, 413)),
    Case("cl-space-before-colon", cl_only(b"Content-Length : %d\r\n"), (400,)),
    Case("cl-nul", cl_only(b"Content-Length: %d\x00\r\n"), (400,)),
    Case("cl-bare-cr", cl_only(b"Content-Length: %d\r4\r\n"), (400,)),
    # --- line endings and folding anywhere in the head: refused (RFC 9112 2.2, 5.2) ----------
    Case("bare-lf-everywhere", lf_everywhere, (400,)),
    Case("bare-lf-request-line", lf_request_line, (400,)),
    Case("bare-lf-one-field", with_cl(b"X-Note: a\n"), (400,)),
    Case("bare-lf-end-of-head", with_cl(eol=b"\n"), (400,)),
    Case("bare-cr-one-field", with_cl(b"X-Note: a\rX-Other: b\r\n"), (400,)),
    Case("obs-fold-space", with_cl(b"X-Note: a\r\n b\r\n"), (400,)),
    Case("obs-fold-tab", with_cl(b"X-Note: a\r\n\tb\r\n"), (400,)),
    Case("obs-fold-content-length", (lambda t: head(b"Content-Length:\r\n %d\r\n" % len(t.body())) + t.body()),
         (400,)),
    Case("obs-fold-content-type", (lambda t: b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type:\r\n application/json"
                                   b"\r\nContent-Length: %d\r\n\r\n%s" % (len(t.body()), t.body())), (400,)),
    # A continuation line before any field (h11 refuses it itself).
    Case("continuation-first-field",
         (lambda t: b"POST /publish HTTP/1.1\r\n Host: y" + with_cl()(t)[len(b"POST /publish HTTP/1.1"):]), (400,)),
    Case("nul-in-field", with_cl(b"X-Note: a\x00b\r\n"), (400,)),
    Case("space-in-field-name", with_cl(b"X Note: a\r\n"), (400,)),
    Case("nul-in-target", with_cl(line=b"POST /publish\x00 HTTP/1.1"), (400,)),
    # --- broken chunked bodies under a valid head ---------------------------------------------
    Case("chunk-size-negative", chunk_body(lambda t: b"-1\r\n" + t.body() + b"\r\n0\r\n\r\n"), (400,)),
    Case("chunk-size-0x", chunk_body(lambda t: b"0x%x\r\n" % len(t.body()) + t.body() + b"\r\n0\r\n\r\n"), (400,)),
    Case("chunk-size-plus", chunk_body(lambda t: b"+%x\r\n" % len(t.body()) + t.body() + b"\r\n0\r\n\r\n"), (400,)),
    # A chunk that announces more than max_body: never served; answered before the request
    # pipelined behind it is read as chunk data, or at the latest at the head/body timeout.
    Case("chunk-size-huge", chunk_body(lambda t: b"f" * 20 + b"\r\n" + t.body()), (400, 408, 413)),
    Case("chunk-ext-huge", huge_extension, (400, 431)),
    Case("chunk-missing-crlf", chunk_body(lambda t: b"%x\r\n" % len(t.body()) + t.body() + b"XX0\r\n\r\n"), (400,)),
    Case("chunk-bare-lf", chunk_body(lambda t: b"%x\n" % len(t.body()) + t.body() + b"\n0\n\n"), (400,)),
    Case("chunk-too-long", chunk_body(lambda t: b"%x\r\n" % (len(t.body()) - 2) + t.body() + b"\r\n0\r\n\r\n"),
         (400,)),
    Case("chunk-no-last-chunk", chunk_body(lambda t: b"%x\r\n" % len(t.body()) + t.body() + b"\r\n"), (400, 408)),
    # --- HTTP versions ---------------------------------------------------------------------------
    Case("version-1.2-chunked", te_only(TE, line=b"POST /publish HTTP/1.2"), (505,), "http_version_not_supported"),
    Case("version-2.0", with_cl(line=b"POST /publish HTTP/2.0"), (505,), "http_version_not_supported"),
    Case("version-0.9", with_cl(line=b"POST /publish HTTP/0.9"), (505,), "http_version_not_supported"),
    Case("version-lowercase", with_cl(line=b"POST /publish http/1.1"), (400,)),
]


# -- reading what happened -----------------------------------------------------------------------


def exchange(port: int, data: bytes | tuple[bytes, ...]) -> tuple[bytes, bool]:
    """Send ``data`` (segments 0.2 s apart), then read until the server closes.  Returns
    (everything read, whether the server closed within READ_TIMEOUT)."""
    segments = (data,) if isinstance(data, bytes) else data
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as s:
        for i, seg in enumerate(segments):
            if i:
                time.sleep(0.2)
            try:
                s.sendall(seg)
            except (BrokenPipeError, ConnectionResetError):  # refused before we were done
                break
        buf = bytearray()
        deadline = time.monotonic() + READ_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:  # closed with our bytes unread: a close all the same
                return bytes(buf), True
            except TimeoutError:
                break
            if not chunk:
                return bytes(buf), True
            buf += chunk
        return bytes(buf), False


def responses(raw_out: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Parse back-to-back HTTP/1.1 responses (Content-Length bodies); anything that is not
    one fails the test."""
    out = []
    rest = raw_out
    while rest:
        head_, sep, tail = rest.partition(b"\r\n\r\n")
        assert sep, f"trailing bytes that are not a response: {rest[:300]!r}"
        lines = head_.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 "), lines[0]
        headers = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0"))
        assert len(tail) >= n, f"truncated body: {rest[:300]!r}"
        out.append((int(lines[0].split(" ")[1]), headers, tail[:n]))
        rest = tail[n:]
    return out


def published(g: Gateway, topic: str) -> list[str]:
    """The data of every message retained on ``topic``, oldest first.  A sentinel is
    published last over a clean connection and the history read up to it."""
    r = g.publish([{"topic": topic, "data": SENTINEL}])
    assert r.status == 200, r
    with g.stream(f"/events?topic={topic}&since=earliest") as s:
        assert s.status == 200, s.error_body
        assert s.wait_for(lambda st: any(e.data == SENTINEL for e in st.events), timeout=5), s.events
        data = [e.data for e in s.events]
    return data[: data.index(SENTINEL)]


def test_corpus_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_smuggling(gw: Gateway, case: Case) -> None:
    nonce = time.monotonic_ns() % 10**9
    t = T(first=f"first.{case.id}.{nonce}", smug=f"smug.{case.id}.{nonce}")
    out, closed = exchange(gw.port, _then(case.build(t), publish_req(t.smug, "next", close=True)))
    answers = responses(out)
    statuses = [a[0] for a in answers]
    if case.http10:
        # At most this one request is answered, then the connection is closed.
        assert len(answers) == 1, out[:600]
        assert closed, f"connection left open: {out[:600]!r}"
        assert statuses[0] == 200 or statuses[0] in case.refused, out[:600]
        assert published(gw, t.smug) == []
        assert published(gw, t.first) == (["x"] if statuses[0] == 200 else [])
    elif case.refused:
        assert len(answers) == 1 and statuses[0] in case.refused, f"{statuses}: {out[:600]!r}"
        status, headers, body = answers[0]
        assert headers.get("connection", "").lower() == "close", headers
        err = json.loads(body)
        if case.code is not None:
            assert err["error"] == case.code, err
        assert closed, f"connection left open after {status}: {out[:600]!r}"
        assert published(gw, t.smug) == [], "a request behind the refused one was executed"
        assert published(gw, t.first) == [], "the refused request was published"
    else:
        assert statuses == [200, 200], out[:600]
        assert closed, f"connection left open after Connection: close: {out[:600]!r}"
        assert published(gw, t.first) == ["x"]
        assert published(gw, t.smug) == ["next"]


def _then(first: bytes | tuple[bytes, ...], nxt: bytes) -> bytes | tuple[bytes, ...]:
    if isinstance(first, bytes):
        return first + nxt
    return (*first[:-1], first[-1] + nxt)


def test_gateway_survived_the_corpus(gw: Gateway) -> None:
    assert_healthy(gw)

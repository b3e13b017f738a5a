"""Seeded fuzzing of the public edge against one real gateway, as an invariant.

Three generators write raw bytes to the public port, one connection per case, half-closed
after the request (so the gateway closes it at once and no case waits on a timeout):

- whole request heads: method, target, version, field names and values with control bytes,
  huge and odd values, mixed line endings (CRLF, bare LF, bare CR, obs-fold), a body;
- ``POST /publish`` bodies under a valid, authorized head: JSON-ish values, message-shaped
  objects and batches, arbitrary bytes;
- ``GET /events`` query strings: topic, since, last_event_id and token parameters with junk,
  percent-encoded bytes, a valid token or a marked junk one.

After every case: the gateway closed the case's connection; whatever it sent back is
HTTP/1.1 with a status other than 500, and every error is the contract's JSON ``{error,
detail}``; the process is alive; a new admin connection gets ``/healthz`` 200 and a new
public connection publishes (200 with one id); ``/admin/stats`` comes back to no public
connection, no stream and only the asking admin slot.  At the end of each test, all of
``max_conns_per_ip`` connections are admitted at once (a leaked per-IP slot would refuse the
last one) and the one after is refused (so the limit is live), and no token the fuzz sent
(``tok-SECRET-<n>`` in Authorization, Cookie and ``?token=``, the valid JWT, the publish
key) appears anywhere in the gateway's log, captured at debug level.

Limits are set so that the fuzz cannot trip them by volume: no connection rate limit,
``max_conns_per_ip`` far above the one-at-a-time use, a short history per topic.

CI runs a few thousand cases in all (derandomized: the same cases every run, no example
database).  ``-m slow`` runs the same properties with ``SSEGW_FUZZ_EXAMPLES`` cases each
(default 40,000, 120,000 in all) from the explicit seed ``SSEGW_FUZZ_SEED`` (other cases
than CI's; change the seed to explore further, keep it to reproduce).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from urllib.parse import quote_from_bytes

import jwt
import pytest
from harness import Gateway, read_head, request, wait_until
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(180)

PUBLISH_KEY = "k-fuzz-publish-" + "q" * 24
JWT_SECRET = "fuzz-jwt-secret-" + "s" * 48
VALID_JWT = jwt.encode({"sub": "fuzzer", "ssegw": {"subscribe": ["fz.>"]}}, JWT_SECRET, algorithm="HS256")
MARKER = "tok-SECRET-"
MAX_CONNS_PER_IP = 16
#: A case's connection must be closed by the gateway within this after our FIN.
CLOSE_TIMEOUT = 3.0

CI_EXAMPLES = {"heads": 2000, "bodies": 1000, "queries": 1000}
SLOW_EXAMPLES = int(os.environ.get("SSEGW_FUZZ_EXAMPLES", "40000"))
SLOW_SEED = int(os.environ.get("SSEGW_FUZZ_SEED", "20260101"))


def fuzz(strategy: st.SearchStrategy, n: int, seed_: int | None):  # noqa: ANN201
    """``@given(strategy)`` with ``n`` examples: derandomized, or from ``seed_``."""

    def wrap(fn):  # noqa: ANN001, ANN202
        fn = fuzz_settings(n, seed_ is None)(given(strategy)(fn))
        return fn if seed_ is None else seed(seed_)(fn)

    return wrap


def fuzz_settings(n: int, derandomize: bool) -> settings:
    return settings(
        max_examples=n,
        derandomize=derandomize,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )


# -- the gateway and its checks --------------------------------------------------------------


class Fuzzed:
    """One gateway and the invariant checked around each case."""

    def __init__(self, g: Gateway) -> None:
        self.g = g

    def fire(self, data: bytes) -> bytes:
        """One case: send ``data`` on a new connection, half-close, read until the gateway
        closes.  Returns what it sent back."""
        with socket.create_connection(("127.0.0.1", self.g.port), timeout=CLOSE_TIMEOUT) as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):  # refused before we were done
                pass
            buf = bytearray()
            deadline = time.monotonic() + CLOSE_TIMEOUT
            while True:
                left = deadline - time.monotonic()
                assert left > 0, f"connection still open {CLOSE_TIMEOUT}s after our FIN: {data[:300]!r}"
                s.settimeout(left)
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                except TimeoutError:
                    continue  # the assertion above reports it
                if not chunk:
                    break
                buf += chunk
        return bytes(buf)

    def after(self, data: bytes, out: bytes) -> None:
        """The invariant after a case that sent ``data`` and got ``out``."""
        check_answer(data, out)
        g = self.g
        assert g.proc is not None and g.proc.poll() is None, f"gateway died after {data[:300]!r}"
        r = request(g.admin_port, "GET", "/healthz", timeout=5)
        assert r.status == 200 and r.json() == {"status": "ok"}, r
        r = publish(g.port, b'{"topic":"fz.alive","data":"ping"}')
        assert r.status == 200 and len(r.json()["ids"]) == 1, r
        self.settled()

    def settled(self) -> None:
        """No public connection, stream or slot is left once every case's socket is closed
        (the one slot in use is the admin connection asking)."""
        last: dict = {}

        def quiet() -> bool:
            last.update(self.g.stats())
            return last["connections_open"] == 0 and last["streams_open"] == 0 and last["slots_in_use"] == 1

        assert wait_until(quiet, timeout=5, interval=0.01), {
            k: last.get(k) for k in ("connections_open", "streams_open", "slots_in_use")}

    def per_ip_slots_free(self) -> None:
        """All ``max_conns_per_ip`` connections are admitted at once, and one more is not."""
        self.settled()
        socks = []
        try:
            for _ in range(MAX_CONNS_PER_IP):
                s = socket.create_connection(("127.0.0.1", self.g.port), timeout=5)
                socks.append(s)
                s.sendall(b"OPTIONS /events HTTP/1.1\r\nHost: x\r\n\r\n")
                status, headers, _ = read_head(s, bytearray(), 5)
                assert status == 204, (len(socks), status, headers)
            with socket.create_connection(("127.0.0.1", self.g.port), timeout=5) as s:
                status, _, _ = read_head(s, bytearray(), 5)
                assert status == 429, status
        finally:
            for s in socks:
                s.close()
        self.settled()

    def no_token_in_log(self) -> None:
        """No token the fuzz sent is in the log.  First a malformed request carrying a
        marker is sent and its debug line awaited, so the log is known to be captured and
        current up to here."""
        g = self.g
        seen = len(g.log)
        out = self.fire(b"GET /events?topic=fz.t&token=" + MARKER.encode() + b"control HTTP/1.1\r\nHost: x\r\n"
                        b"Authorization: Bearer " + MARKER.encode() + b"control\r\nX-Bad: a\x00b\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400 "), out[:300]
        assert wait_until(lambda: any("malformed request" in ln for ln in g.log[seen:]), timeout=5), g.log[-5:]
        log = "".join(g.log)
        for secret in (MARKER, MARKER.lower(), MARKER.upper(), VALID_JWT, PUBLISH_KEY, JWT_SECRET):
            i = log.find(secret)
            assert i < 0, f"{secret[:20]!r} in the gateway log: {log[max(0, i - 200):i + 100]!r}"

    def finish(self) -> None:
        self.settled()
        self.per_ip_slots_free()
        self.no_token_in_log()


@pytest.fixture(scope="module")
def fz(tmp_path_factory) -> Fuzzed:
    cfg = tmp_path_factory.mktemp("fuzz") / "ssegw.toml"
    cfg.write_text(
        f"max_conns_per_ip = {MAX_CONNS_PER_IP}\nconn_rate = 0\nhistory_size = 20\n"
        f'log_level = "debug"\nhead_timeout = "2s"\n'
        f'[auth]\njwt_secret = "{JWT_SECRET}"\npublish_keys = ["{PUBLISH_KEY}"]\n'
    )
    g = Gateway("--config", str(cfg), "--flush-interval", "10ms")
    g.start()
    yield Fuzzed(g)
    g.stop()


def publish(port: int, body: bytes, ctype: str = "application/json"):  # noqa: ANN201
    return request(port, "POST", "/publish", body,
                   {"Content-Type": ctype, "Authorization": f"Bearer {PUBLISH_KEY}"}, timeout=5)


_STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")


def check_answer(data: bytes, out: bytes, allowed: frozenset[int] | None = None) -> int | None:
    """What a case got back: nothing, or HTTP/1.1 responses; never a 500; an error is
    ``{"error", "detail"}`` JSON.  Returns the final status of the first response."""
    if not out:
        return None
    rest = out
    status = 100
    while 100 <= status < 200:  # 100 Continue, then the final answer
        m = _STATUS.match(rest)
        assert m, f"not an HTTP/1.1 answer: {out[:300]!r} to {data[:300]!r}"
        status = int(m.group(1))
        head, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep, f"incomplete answer head: {out[:300]!r} to {data[:300]!r}"
        if status < 200 and not rest:
            return None  # 100 Continue, then the client went away mid-body: closed unanswered
    assert status != 500, f"500 to {data[:300]!r}: {out[:500]!r}"
    if allowed is not None:
        assert status in allowed, f"{status} to {data[:300]!r}: {out[:500]!r}"
    if status >= 400 and not data.startswith(b"HEAD "):  # an answer to HEAD has no body
        headers = dict(ln.split(b":", 1) for ln in head.split(b"\r\n")[1:])
        headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
        assert headers.get(b"content-type", b"").startswith(b"application/json"), head
        body = rest[: int(headers[b"content-length"])]
        err = json.loads(body)
        assert set(err) == {"error", "detail"} and err["error"], err
    return status


# -- strategies ---------------------------------------------------------------------------------
#
# Mostly-valid requests with a few mutations each, rather than noise: noise is refused at the
# request line and never reaches fields, bodies, queries or tokens.

CTL = st.sampled_from([bytes([c]) for c in [*range(0x20), 0x7F, 0x80, 0xFF]])
junk = st.one_of(st.binary(max_size=40), st.lists(st.one_of(CTL, st.binary(min_size=1, max_size=4)), max_size=8)
                 .map(b"".join))
marker = st.integers(0, 10**6).map(lambda n: f"{MARKER}{n}".encode())
huge = st.integers(2000, 40000).map(lambda n: b"v" * n)
SEG = "abcdefghijklmnopqrstuvwxyz0123456789_-:@/"
fz_topic = st.text(SEG, min_size=1, max_size=12).map(lambda s: "fz." + s)

METHODS = [b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"PATCH", b"CONNECT", b"TRACE", b"PRI",
           b"get", b"G\x00T", b"", b"GET GET"]
TARGETS = [b"/events", b"/events?topic=fz.h&since=earliest", b"/publish", b"/", b"*", b"http://x/events?topic=fz.h",
           b"/healthz", b"/admin/stats", b"/%00", b"/../publish", b"//publish", b"/publish?x=1", b"/events#frag",
           b"/events?topic=fz.h?topic=fz.i", b"", b"events"]
VERSIONS = [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"http/1.1", b"HTTP/1.1 ", b"HTTP/1", b"HTTP/1.10",
            b"HTTP/", b"", b"HTTP/1.1\x00", b"HTTP/9.9"]
NAMES = [b"Host", b"Content-Length", b"Transfer-Encoding", b"Content-Type", b"Connection", b"Expect", b"Accept",
         b"Last-Event-ID", b"X-Forwarded-For", b"Origin", b"Cookie", b"Authorization", b"Upgrade",
         b"Transfer-Encoding ", b" Host", b"X\x00Y", b"", b"Content-Length\t", b"content-length", b"TE"]
VALUES = [b"chunked", b"Chunked, identity", b"gzip", b"0", b"5", b"-1", b"5, 6", b"99999999999999999999",
          b"100-continue", b"close", b"keep-alive", b"upgrade", b"h2c", b"text/event-stream", b"application/json",
          b"x", b"", b" ", b"1.2.3.4", b"null", b"https://a.example", b"\x80\xff", b"a\x00b", b"a\rb", b"a\nb",
          b"Bearer", b"Bearer ", b"Basic dG9rOnNlY3JldA=="]
EOLS = [b"\n", b"\r", b"\r\n ", b"\r\n\t", b"\n\r", b"\r\r\n", b""]
SEPS = [b":", b" : ", b":\t", b":\r\n ", b"::", b" ", b""]


def token_field(tok: bytes, kind: int) -> list[bytes]:
    if kind == 0:
        return [b"Authorization", b": ", b"Bearer " + tok]
    if kind == 1:
        return [b"Cookie", b": ", b"ssegw_token=" + tok + b"; other=1"]
    return [b"Authorization", b": ", b"bearer   " + tok + b"  "]


@st.composite
def base_request(draw) -> dict:  # noqa: ANN001
    """A well-formed request of one of the kinds the edge serves (answered 2xx/4xx)."""
    kind = draw(st.integers(0, 4))
    tok = draw(st.one_of(marker, st.just(VALID_JWT.encode())))
    fields = [[b"Host", b": ", b"x"]]
    body = b""
    method, target = b"GET", b"/events?topic=" + draw(fz_topic).encode()
    if kind == 0:  # a subscription, token in the query or a field
        fields.append([b"Accept", b": ", b"text/event-stream"])
        if draw(st.booleans()):
            target += b"&token=" + tok
        else:
            fields.append(token_field(tok, draw(st.integers(0, 2))))
    elif kind in (1, 2):  # a publish, by Content-Length or chunked
        method, target = b"POST", b"/publish"
        body = json.dumps({"topic": draw(fz_topic), "data": "h"}).encode()
        fields.append([b"Content-Type", b": ", b"application/json"])
        key = draw(st.sampled_from([PUBLISH_KEY.encode(), tok]))
        fields.append([b"Authorization", b": ", b"Bearer " + key])
        if kind == 1:
            fields.append([b"Content-Length", b": ", b"%d" % len(body)])
        else:
            fields.append([b"Transfer-Encoding", b": ", b"chunked"])
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    elif kind == 3:
        method, target = b"OPTIONS", draw(st.sampled_from([b"/events", b"/publish"]))
        fields.append([b"Origin", b": ", b"https://a.example"])
        fields.append(token_field(tok, 0))
    else:
        target = draw(st.sampled_from([b"/nothing", b"/", b"/healthz"]))
        fields.append(token_field(tok, draw(st.integers(0, 2))))
    return {"line": [method, b" ", target, b" ", b"HTTP/1.1"], "fields": fields, "eols": [b"\r\n"] * (len(fields) + 1),
            "end": b"\r\n", "body": body}


def _render(r: dict) -> bytes:
    lines = [b"".join(r["line"])] + [b"".join(f) for f in r["fields"]]
    return b"".join(ln + eol for ln, eol in zip(lines, r["eols"], strict=True)) + r["end"] + r["body"]


@st.composite
def heads(draw) -> bytes:  # noqa: ANN001
    """A well-formed request, then 0..4 mutations: any part of the head or body made odd."""
    r = draw(base_request())
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3, 4]))):
        # After a raw-level mutation (12, 13) the request is one flat string.
        what = draw(st.integers(12, 13) if len(r["line"]) == 1 else st.integers(0, 13))
        fields = r["fields"]
        i = draw(st.integers(0, len(fields) - 1)) if fields else 0
        if what == 0:
            r["line"][0] = draw(st.one_of(st.sampled_from(METHODS), st.binary(min_size=1, max_size=10)))
        elif what == 1:
            r["line"][2] = draw(st.one_of(st.sampled_from(TARGETS), junk, st.integers(8000, 9000)
                                          .map(lambda n: b"/" + b"a" * n),
                                          marker.map(lambda m: b"/events?topic=fz.h&token=" + m)))
        elif what == 2:
            r["line"][4] = draw(st.one_of(st.sampled_from(VERSIONS), st.binary(max_size=10)))
        elif what == 3:
            r["line"][draw(st.sampled_from([1, 3]))] = draw(st.sampled_from([b"", b"  ", b"\t", b"\x00", b" \r "]))
        elif what == 4:  # another field
            name = draw(st.one_of(st.sampled_from(NAMES), st.binary(max_size=20)))
            value = draw(st.one_of(st.sampled_from(VALUES), junk, huge, marker.map(lambda m: b"Bearer " + m)))
            fields.insert(i, [name, b": ", value])
            r["eols"].insert(i + 1, b"\r\n")
        elif what == 5 and fields:
            fields[i][2] = draw(st.one_of(st.sampled_from(VALUES), junk, huge))
        elif what == 6 and fields:
            fields[i][0] = draw(st.one_of(st.sampled_from(NAMES), st.binary(max_size=20)))
        elif what == 7 and fields:
            fields[i][1] = draw(st.sampled_from(SEPS))
        elif what == 8:
            r["eols"][draw(st.integers(0, len(r["eols"]) - 1))] = draw(st.sampled_from(EOLS))
        elif what == 9:
            r["end"] = draw(st.sampled_from([b"\n", b"", b"\r\n\r\n", b"\r", b" \r\n", b"\r\n\n"]))
        elif what == 10 and fields:
            fields.insert(i, list(fields[i]))  # a duplicated field
            r["eols"].insert(i + 1, b"\r\n")
        elif what == 11:
            r["body"] = draw(st.one_of(st.binary(max_size=200), st.just(b"0\r\n\r\n"), st.just(r["body"] * 2),
                                       st.just(r["body"][: len(r["body"]) // 2])))
        elif what == 12:  # a byte inserted anywhere (head or body)
            raw = _render(r)
            at = draw(st.integers(0, len(raw)))
            r = {"line": [raw[:at] + draw(CTL) + raw[at:]], "fields": [], "eols": [b""], "end": b"", "body": b""}
        elif what == 13:  # cut short anywhere
            raw = _render(r)
            r = {"line": [raw[: draw(st.integers(0, len(raw)))]], "fields": [], "eols": [b""], "end": b"", "body": b""}
    return _render(r)


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(2**80), 2**80),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30))
jsonish = st.recursive(json_scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), c, max_size=4)),
                       max_leaves=12)
topics = st.one_of(fz_topic, fz_topic, fz_topic, st.text(max_size=20), st.just("fz." + "a" * 130), jsonish)
valid_message = st.fixed_dictionaries(
    {"topic": fz_topic, "data": jsonish},
    optional={"event": st.text(SEG, min_size=1, max_size=20), "key": st.text(max_size=20)},
)
odd_message = st.fixed_dictionaries(
    {"topic": topics, "data": jsonish},
    optional={"event": st.one_of(st.text(max_size=20), jsonish), "key": st.one_of(st.text(max_size=20), jsonish),
              "extra": jsonish},
)
message = st.one_of(valid_message, valid_message, odd_message)


@st.composite
def bodies(draw) -> tuple[bytes, str]:  # noqa: ANN001
    """A publish body and its Content-Type."""
    kind = draw(st.integers(0, 6))
    if kind == 0:
        body = draw(st.binary(max_size=400))
    elif kind == 1:
        body = json.dumps(draw(jsonish)).encode()
    elif kind in (2, 3):
        body = json.dumps(draw(message)).encode()
    elif kind == 4:
        body = json.dumps(draw(st.lists(message, max_size=5))).encode()
    elif kind == 5:  # valid JSON text mangled: truncated, a byte inserted, nested deep
        text = json.dumps(draw(st.lists(message, min_size=1, max_size=3))).encode()
        cut = draw(st.integers(0, len(text)))
        body = draw(st.sampled_from([text[:cut], text[:cut] + b"\xff" + text[cut:], b"[" * 5000 + text,
                                     text[:cut] + b"\x00" + text[cut:]]))
    else:
        body = json.dumps(draw(message), ensure_ascii=False).encode("utf-8", "surrogatepass")
    ctype = draw(st.sampled_from(["application/json"] * 12 + ["application/vnd.x+json; charset=utf-8",
                                                              "text/plain", "application/json\t", ""]))
    return body, ctype


QUERY_KEYS = ["since", "token", "last_event_id", "Topic", "topic[]", "", "token", "topic"]


@st.composite
def qvalue(draw) -> bytes:  # noqa: ANN001
    kind = draw(st.integers(0, 6))
    if kind == 0:
        return draw(fz_topic).encode()
    if kind == 1:
        return draw(st.sampled_from([b"last", b"earliest", b"snapshot", b"", b"LAST"]))
    if kind == 2:
        return draw(marker)
    if kind == 3:
        return VALID_JWT.encode() + draw(st.sampled_from([b"", b"x", b"%00"]))
    if kind == 4:
        return quote_from_bytes(draw(st.binary(max_size=30))).encode()
    if kind == 5:
        return draw(st.sampled_from([b"%", b"%zz", b"%ff%fe", b"+", b";", b"=", b"a=b", b"%2", b"..", b"%26token%3D"]))
    return draw(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="&#"),
                        max_size=20)).encode()


@st.composite
def queries(draw) -> tuple[bytes, bool]:  # noqa: ANN001
    """A ``GET /events`` request: valid topics and a token (valid, marked junk or none)
    mixed with junk parameters.  Returns the request and whether its head is well-formed
    (then it must be answered with one of the statuses a query can get)."""
    params = [(b"topic", t.encode(), True) for t in draw(st.lists(fz_topic, min_size=1, max_size=3))]
    params += draw(st.lists(st.tuples(st.sampled_from(QUERY_KEYS).map(str.encode), qvalue(), st.booleans()),
                            max_size=draw(st.sampled_from([0, 0, 1, 3]))))
    fields = [b"Host: x", b"Accept: text/event-stream"]
    auth = draw(st.sampled_from(["query", "query-marker", "jwt", "jwt", "marker", "cookie", None]))
    if auth == "query":
        params.append((b"token", VALID_JWT.encode(), True))
    elif auth == "query-marker":
        params.append((b"token", draw(marker), True))
    elif auth == "jwt":
        fields.append(b"Authorization: Bearer " + VALID_JWT.encode())
    elif auth == "marker":
        fields.append(b"Authorization: Bearer " + draw(marker))
    elif auth == "cookie":
        fields.append(b"Cookie: ssegw_token=" + draw(marker))
    params = draw(st.permutations(params))
    query = b"&".join(k + (b"=" + v if eq else v) for k, v, eq in params)
    sep = draw(st.sampled_from([b"&"] * 12 + [b";", b"&&", b"?"]))
    query = query.replace(b"&", sep) if sep != b"&" else query
    if draw(st.integers(0, 3)) == 0:
        fields.append(b"Last-Event-ID: " + draw(st.sampled_from([b"", b"0", b"abc-1", b"x" * 300, b"-1-1", b"1-",
                                                               b"zzzz-99999999999999999999"])))
    raw_bytes = draw(st.sampled_from([b""] * 8 + [b"\x00", b"\x7f", b" ", b"\xff"]))
    return b"GET /events?" + query + raw_bytes + b" HTTP/1.1\r\n" + b"\r\n".join(fields) + b"\r\n\r\n", not raw_bytes


# -- the properties ---------------------------------------------------------------------------------

#: What a well-formed ``GET /events`` can be answered: a stream, or 400 (query), 401 (token),
#: 403 (a topic the token does not grant).
QUERY_STATUSES = frozenset({200, 400, 401, 403})
#: What a well-formed, authorized publish can be answered.
BODY_STATUSES = frozenset({200, 400, 413, 415})


def run_heads(fz: Fuzzed, n: int, seed_: int | None = None) -> None:
    @fuzz(heads(), n, seed_)
    def case(data: bytes) -> None:
        fz.after(data, fz.fire(data))

    case()
    fz.finish()


def run_bodies(fz: Fuzzed, n: int, seed_: int | None = None) -> None:
    @fuzz(bodies(), n, seed_)
    def case(case_: tuple[bytes, str]) -> None:
        body, ctype = case_
        data = (b"POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: %s\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (PUBLISH_KEY.encode(), ctype.encode(), len(body), body))
        out = fz.fire(data)
        status = check_answer(data, out, BODY_STATUSES)
        assert status is not None, f"no answer to a well-formed publish: {data[:300]!r}"
        if status == 200:
            sent = json.loads(body)
            n_msgs = len(sent) if isinstance(sent, list) else 1
            got = json.loads(out.partition(b"\r\n\r\n")[2])
            assert isinstance(got, dict) and len(got["ids"]) == n_msgs, (body[:300], got)
        fz.after(data, out)

    case()
    fz.finish()


def run_queries(fz: Fuzzed, n: int, seed_: int | None = None) -> None:
    @fuzz(queries(), n, seed_)
    def case(case_: tuple[bytes, bool]) -> None:
        data, well_formed = case_
        out = fz.fire(data)
        if well_formed:
            status = check_answer(data, out, QUERY_STATUSES)
            assert status is not None, f"no answer to a well-formed request: {data[:300]!r}"
        fz.after(data, out)

    case()
    fz.finish()


def test_fuzz_request_heads(fz: Fuzzed) -> None:
    run_heads(fz, CI_EXAMPLES["heads"])


def test_fuzz_publish_bodies(fz: Fuzzed) -> None:
    run_bodies(fz, CI_EXAMPLES["bodies"])


def test_fuzz_events_queries(fz: Fuzzed) -> None:
    run_queries(fz, CI_EXAMPLES["queries"])


@pytest.mark.slow
@pytest.mark.timeout(0)
def test_fuzz_request_heads_slow(fz: Fuzzed) -> None:
    run_heads(fz, SLOW_EXAMPLES, SLOW_SEED)


@pytest.mark.slow
@pytest.mark.timeout(0)
def test_fuzz_publish_bodies_slow(fz: Fuzzed) -> None:
    run_bodies(fz, SLOW_EXAMPLES, SLOW_SEED)


@pytest.mark.slow
@pytest.mark.timeout(0)
def test_fuzz_events_queries_slow(fz: Fuzzed) -> None:
    run_queries(fz, SLOW_EXAMPLES, SLOW_SEED)

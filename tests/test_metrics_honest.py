"""Metrics that never lie: each histogram observes exactly what it says, each refusal and auth
failure lands under the right reason, labels stay bounded.

Through real gateways (``python -m ssegw serve``, real sockets), plus unit tests of the
pieces that decide a reason (``Histogram``, the collector, the admission and auth reason
maps).  Nothing here measures time against a threshold: durations are only checked to be
observed and positive.
"""

from __future__ import annotations

import ast
import re
import socket
import time
from collections import Counter
from pathlib import Path

import jwt
import pytest
from checks import uniq
from harness import ROOT, Gateway, parse_metrics, read_head, wait_until

from ssegw.core.errors import Forbidden, ProtocolError, TooManyRequests, Unavailable
from ssegw.metrics import (
    AUTH_REASONS,
    BROKER_ERROR_KINDS,
    HISTOGRAMS,
    LABELLED,
    METRICS,
    REFUSED_REASONS,
    Histogram,
    make_registry,
    render,
)
from ssegw.policy.limits import Admission, ConnCounter, IPFilter, TokenBuckets
from ssegw.server.context import ADMISSION_REASONS

SECRET = "metrics-hs256-secret-that-is-long-enough-0123"
FLUSH_HISTS = ("ssegw_flush_batch_writes", "ssegw_flush_batch_events", "ssegw_flush_duration_seconds",
               "ssegw_flush_delay_seconds", "ssegw_delivery_lag_seconds")
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')


# -- helpers ------------------------------------------------------------------------------------


def scrape(g: Gateway) -> str:
    r = g.request("GET", "/metrics", admin=True)
    assert r.status == 200, r
    return r.body.decode()


samples = parse_metrics  # ``name{labels}`` (as exposed) -> value


def hist(m: dict[str, float], name: str) -> tuple[float, float]:
    """(_count, _sum) of a histogram, checking its buckets are cumulative and end at _count."""
    count, total = m[name + "_count"], m[name + "_sum"]
    buckets = [(k, v) for k, v in m.items() if k.startswith(name + "_bucket{")]
    assert buckets and buckets[-1][0].endswith('le="+Inf"}'), buckets
    values = [v for _, v in buckets]
    assert values == sorted(values), (name, buckets)
    assert values[-1] == count, (name, buckets, count)
    return count, total


def by_label(m: dict[str, float], family: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for k, v in m.items():
        if k.startswith(family + "{"):
            out[k[len(family) + 1:-1].split('"')[1]] = int(v)
    return out


def delta(after: Counter[str], before: Counter[str]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def connect_from(g: Gateway, src: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    s.bind((src, 0))
    s.connect(("127.0.0.1", g.port))
    return s


def ask(g: Gateway, src: str, data: bytes) -> int:
    """Send ``data`` from address ``src`` and return the answer's status."""
    s = connect_from(g, src)
    try:
        if data:
            s.sendall(data)
        status, _, _ = read_head(s, bytearray(), 5)
        return status
    finally:
        s.close()


def get_events(topic: str, token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET /events?topic={topic} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode()


def post_publish(body: bytes, token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


# -- the flush, delivery and publish histograms through one gateway -----------------------------


def test_histograms_observe_only_what_happened(gateway):
    g = gateway("--heartbeat-interval", "1s", "--flush-interval", "10ms", "--drain-timeout", "1s")
    # The worker ticks from the start: loop lag is observed with no traffic at all.
    assert wait_until(lambda: hist(samples(scrape(g)), "ssegw_event_loop_lag_seconds")[0] >= 3, 3)
    m = samples(scrape(g))
    for name in (*FLUSH_HISTS, "ssegw_publish_duration_seconds"):
        assert hist(m, name) == (0, 0.0), name

    # A publish nobody here follows: answered (observed), but nothing was flushed.
    r = g.publish({"topic": uniq("nobody"), "data": "x"})
    assert r.status == 200, r
    time.sleep(0.1)
    m = samples(scrape(g))
    for name in FLUSH_HISTS:
        assert hist(m, name) == (0, 0.0), name
    assert hist(m, "ssegw_publish_duration_seconds")[0] == 1

    # Refused publishes are answered too, and observed.
    assert g.request("POST", "/publish", b"{}", {"Content-Type": "text/plain"}).status == 415
    assert g.request("POST", "/publish", b"{not json", {"Content-Type": "application/json"}).status == 400

    topic, n = uniq("honest"), 5
    with g.stream(f"/events?topic={topic}") as s:
        assert s.status == 200
        for i in range(n):
            assert g.publish({"topic": topic, "data": str(i)}).status == 200
            s.wait_events(i + 1)  # one event per flush
        m = samples(scrape(g))
    assert hist(m, "ssegw_publish_duration_seconds")[0] == 1 + 2 + n
    assert hist(m, "ssegw_publish_duration_seconds")[1] > 0.0
    flushes = m["ssegw_flushes_total"]
    assert flushes == n
    count, total = hist(m, "ssegw_flush_duration_seconds")
    assert count == flushes and total > 0.0
    # One write (one subscriber) and one event per flush, exactly.
    assert hist(m, "ssegw_flush_batch_writes") == (n, n)
    assert hist(m, "ssegw_flush_batch_events") == (n, n)
    # One delivery-lag and one delay sample per flush; event timestamps are whole ms, so a
    # fast flush may show 0 (never negative).
    for name in ("ssegw_flush_delay_seconds", "ssegw_delivery_lag_seconds"):
        c, t = hist(m, name)
        assert c == n and t >= 0.0, name
    lag = hist(m, "ssegw_event_loop_lag_seconds")
    assert lag[0] >= 3 and lag[1] > 0.0

    # After real flushes, a publish nobody here follows still flushes nothing: no histogram
    # may count it again (the old flush re-observed the previous sweep's numbers).
    assert g.publish({"topic": uniq("nobody"), "data": "y"}).status == 200
    time.sleep(0.1)
    m2 = samples(scrape(g))
    for name in FLUSH_HISTS:
        assert hist(m2, name) == hist(m, name), name
    assert m2["ssegw_flushes_total"] == flushes


def test_publish_duration_through_the_broker_wait_is_one_observation(gateway):
    """Several messages in one publish are one request: one observation, not one per message."""
    g = gateway("--heartbeat-interval", "1s", "--drain-timeout", "1s")
    before = hist(samples(scrape(g)), "ssegw_publish_duration_seconds")[0]
    topic = uniq("batch")
    assert g.publish([{"topic": topic, "data": str(i)} for i in range(10)]).status == 200
    assert hist(samples(scrape(g)), "ssegw_publish_duration_seconds")[0] == before + 1


# -- auth failures ------------------------------------------------------------------------------


def _tok(claims: dict, key: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=alg)


def test_auth_failures_by_reason(gateway):
    g = gateway("--auth-jwt-secret", SECRET, "--heartbeat-interval", "1s", "--drain-timeout", "1s")
    now = int(time.time())
    sub_a = {"ssegw": {"subscribe": ["a.*"], "publish": ["a.*"]}}
    before = by_label(samples(scrape(g)), "ssegw_auth_failures_total")
    pub0 = hist(samples(scrape(g)), "ssegw_publish_duration_seconds")[0]
    cases = [
        (get_events("a.x"), 401, "missing"),
        (get_events("a.x", _tok(sub_a, key="another-secret-of-sufficient-length!!")), 401, "bad_signature"),
        (get_events("a.x", _tok({**sub_a, "exp": now - 600})), 401, "expired"),
        (get_events("a.x", _tok({**sub_a, "nbf": now + 600})), 401, "not_yet_valid"),
        (get_events("a.x", "not-a-jwt"), 401, "malformed"),
        (get_events("a.x", _tok(sub_a, key="k" * 64, alg="HS512")), 401, "algorithm"),
        (get_events("a.x", _tok({"ssegw": "nope"})), 401, "bad_claims"),
        (get_events("b.x", _tok(sub_a)), 403, "topic_denied"),
        (post_publish(b'{"topic": "a.x", "data": 1}'), 401, "missing"),
        (post_publish(b'{"topic": "b.x", "data": 1}', _tok(sub_a)), 403, "publish_denied"),
    ]
    for data, status, _ in cases:
        assert ask(g, "127.0.0.1", data) == status, data
    after = by_label(samples(scrape(g)), "ssegw_auth_failures_total")
    assert set(after) == set(AUTH_REASONS)
    assert delta(after, before) == Counter(reason for _, _, reason in cases)
    # Both refused publishes were answered, so both were observed.
    assert hist(samples(scrape(g)), "ssegw_publish_duration_seconds")[0] == pub0 + 2


# -- refusals -----------------------------------------------------------------------------------


def test_refusals_by_reason(gateway):
    g = gateway("--max-conns-per-ip", "1", "--head-timeout", "500ms", "--max-body", "1024",
                "--ip-deny", "127.0.0.9/32", "--heartbeat-interval", "1s", "--drain-timeout", "1s")
    before = by_label(samples(scrape(g)), "ssegw_refused_total")
    topic = uniq("refuse")

    # per_ip: a second connection from an address that holds its one is answered as it
    # is accepted (nothing sent: nothing unread for the gateway to reset the answer with).
    held = connect_from(g, "127.0.0.3")
    try:
        held.sendall(get_events(topic))
        assert read_head(held, bytearray(), 5)[0] == 200
        assert ask(g, "127.0.0.3", b"") == 429
    finally:
        held.close()
    # ip_denied (a stream and a publish), bad_request, too_large.
    assert ask(g, "127.0.0.9", get_events(topic)) == 403
    assert ask(g, "127.0.0.9", post_publish(b'{"topic": "a", "data": 1}')) == 403
    assert ask(g, "127.0.0.5", b"GARBAGE\r\n\r\n") == 400
    assert ask(g, "127.0.0.6", post_publish(b"x" * 2048)) == 413
    # head_timeout: connected, never asked.
    idle = connect_from(g, "127.0.0.4")
    try:
        assert idle.recv(1) == b""  # closed by the gateway after head_timeout
    finally:
        idle.close()
    after = by_label(samples(scrape(g)), "ssegw_refused_total")
    assert set(after) == set(REFUSED_REASONS)
    assert delta(after, before) == {"per_ip": 1, "ip_denied": 2, "bad_request": 1, "too_large": 1,
                                    "head_timeout": 1}


# -- bounded labels, and the README table -------------------------------------------------------


def test_labels_bounded_and_every_family_documented(gateway):
    g = gateway("--heartbeat-interval", "1s", "--drain-timeout", "1s")
    topic = uniq("labels")
    g.publish({"topic": topic, "data": 1})
    g.request("GET", "/nope/" + topic)
    text = scrape(g)
    fixed = {name + "_total": (label, set(values)) for name, _, label, _, values in LABELLED if values}
    families = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            families.add(line.split(" ")[2].removesuffix("_total"))
            continue
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, line
        name, labels = m.group(1), m.group(2) or ""
        assert topic not in line and "127.0.0.1" not in line and "/nope" not in line, line
        for pair in filter(None, labels.split(",")):
            key, _, value = pair.partition("=")
            assert key in ("status", "reason", "kind", "le", "version", "python"), line
            if name in fixed:
                assert key == fixed[name][0] and value.strip('"') in fixed[name][1], line
            if key == "status":
                assert re.fullmatch(r'"[1-5]\d\d"', value), line
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Metrics\n"):readme.index("## Admin listener")]
    documented = set(re.findall(r"`((?:ssegw|process)_[a-z_]+)", section))
    ours = {f for f in families if f.startswith("ssegw_")}
    assert ours == {m[0] for m in METRICS} | {m[0] for m in LABELLED} | {h[0] for h in HISTOGRAMS} | {
        "ssegw_build_info"}
    for f in ours:
        # Counters are documented with their sample name (``_total``).
        assert f in documented or f + "_total" in documented, f
    assert "process_cpu_seconds_total" in samples(text) and "process_resident_memory_bytes" in samples(text)
    assert any(k.startswith("ssegw_build_info{") for k in samples(text))
    # /admin/stats carries this worker's own memory and CPU (process_* are the answering process').
    st = g.stats()
    assert st["rss_bytes"] > 0 and st["cpu_seconds"] >= 0
    assert not any(k.startswith("hist_") for k in st)


# -- units: Histogram, the collector, the reason maps -------------------------------------------


def test_histogram_buckets_are_le_and_sum_is_exact():
    h = Histogram((0.001, 0.01, 1.0))
    for v in (0.0, 0.0005, 0.001, 0.0011, 0.01, 0.5, 2.0):
        h.observe(v)
    assert h.counts == [3, 2, 1, 1]
    assert h.sum == pytest.approx(2.5126)


def test_collector_sums_workers_and_keeps_labels_bounded():
    bounds = next(h[3] for h in HISTOGRAMS if h[0] == "ssegw_flush_duration_seconds")
    h1, h2 = Histogram(bounds), Histogram(bounds)
    h1.observe(0.0003)
    h2.observe(0.02)
    snaps = [
        {"events_published": 2, "hist_flush_s": h1.snapshot(), "refused": {"per_ip": 1},
         "auth_failures": {"expired": 2}, "broker_errors": {"replay": 1}},
        {"events_published": 3, "hist_flush_s": h2.snapshot(), "refused": {"per_ip": 2, "weird": 1},
         "auth_failures": {"/etc/passwd": 1}},
        {"hist_flush_s": {"counts": [1, 2], "sum": 9.0}},  # another version's buckets: skipped
        {"worker_restarts": 4, "watchdog_misses": 2},  # the supervisor's own
    ]
    m = samples(render(make_registry(lambda: snaps)).decode())
    assert m["ssegw_events_published_total"] == 5
    assert m["ssegw_worker_restarts_total"] == 4 and m["ssegw_watchdog_misses_total"] == 2
    assert hist(m, "ssegw_flush_duration_seconds") == (2, pytest.approx(0.0203))
    assert m['ssegw_flush_duration_seconds_bucket{le="0.0005"}'] == 1
    refused = by_label(m, "ssegw_refused_total")
    assert set(refused) == set(REFUSED_REASONS) and refused["per_ip"] == 3 and refused["other"] == 1
    auth = by_label(m, "ssegw_auth_failures_total")
    assert set(auth) == set(AUTH_REASONS) and auth["expired"] == 2 and auth["other"] == 1
    assert set(by_label(m, "ssegw_broker_errors_total")) == set(BROKER_ERROR_KINDS)


def _admission_refusal(ip: str = "192.0.2.1", open_streams: int = 0, draining: bool = False,
                       twice: bool = False) -> ProtocolError:
    a = Admission(ip_filter=IPFilter(deny=("10.0.0.0/8",)), per_ip=ConnCounter(1),
                  rate=TokenBuckets(1, 1), max_connections=1)
    if twice:
        a.admit(ip, 0, 0, False)
    with pytest.raises(ProtocolError) as e:
        a.admit(ip, open_streams, 1, draining)
    return e.value


def test_every_admission_refusal_has_a_reason():
    """policy/limits.py raises without a reason: its fixed details name one (context.py's map)."""
    got = {
        "ip_denied": _admission_refusal(ip="10.1.2.3"),
        "draining": _admission_refusal(draining=True),
        "capacity": _admission_refusal(open_streams=1),
        "rate": _admission_refusal(twice=True),
    }
    per_ip = Admission(ip_filter=IPFilter(), per_ip=ConnCounter(1), rate=None, max_connections=0)
    per_ip.admit_connection("192.0.2.1", 0)
    with pytest.raises(TooManyRequests) as e:
        per_ip.admit_connection("192.0.2.1", 0)
    got["per_ip"] = e.value
    assert isinstance(got["ip_denied"], Forbidden) and isinstance(got["draining"], Unavailable)
    for reason, err in got.items():
        assert ADMISSION_REASONS.get(err.detail) == reason, (reason, err.detail)
    assert set(ADMISSION_REASONS.values()) <= set(REFUSED_REASONS)


def test_every_auth_raise_names_a_known_reason():
    """Every ``raise Unauthorized/Forbidden(...)`` in policy/auth.py passes reason=<a known one>."""
    tree = ast.parse(Path(ROOT, "ssegw/policy/auth.py").read_text())
    found = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            fn = node.exc.func
            if isinstance(fn, ast.Name) and fn.id in ("Unauthorized", "Forbidden"):
                found += 1
                kw = {k.arg: k.value for k in node.exc.keywords}
                assert "reason" in kw, ast.unparse(node)
                value = kw["reason"]
                assert isinstance(value, ast.Constant) and value.value in AUTH_REASONS, ast.unparse(node)
    assert found >= 15

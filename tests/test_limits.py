"""Tests for ssegw.policy.limits: IP filter, client address, token buckets, admission order."""

from __future__ import annotations

from ipaddress import ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssegw.core.errors import Forbidden, ProtocolError, TooManyRequests, Unavailable
from ssegw.policy.limits import (
    Admission,
    ConnCounter,
    IPFilter,
    TokenBuckets,
    client_ip,
    parse_ip,
)


def nets(*cidrs: str) -> tuple:
    return tuple(ip_network(c) for c in cidrs)


# --- IPFilter -----------------------------------------------------------------------------


def test_ipfilter_empty_allows_all_valid() -> None:
    f = IPFilter((), ())
    assert f.allowed("1.2.3.4") and f.allowed("2001:db8::1") and f.allowed("::1")


def test_ipfilter_deny_wins() -> None:
    f = IPFilter(nets("10.0.0.0/8"), nets("10.1.0.0/16"))
    assert f.allowed("10.2.3.4")
    assert not f.allowed("10.1.2.3")
    assert not f.allowed("192.168.1.1")  # not in the allow list
    g = IPFilter(nets("10.1.2.3/32"), nets("10.0.0.0/8"))
    assert not g.allowed("10.1.2.3")


def test_ipfilter_deny_only() -> None:
    f = IPFilter((), nets("203.0.113.0/24", "2001:db8:bad::/48"))
    assert not f.allowed("203.0.113.9")
    assert f.allowed("203.0.114.9")
    assert not f.allowed("2001:db8:bad::1")
    assert f.allowed("2001:db8:900d::1")


def test_ipfilter_ipv6_and_mixed_lists() -> None:
    f = IPFilter(nets("2001:db8::/32", "192.0.2.0/24"), ())
    assert f.allowed("2001:db8:1::1")
    assert f.allowed("192.0.2.7")
    assert not f.allowed("2001:db9::1")
    assert not f.allowed("198.51.100.1")


def test_ipfilter_mapped_ipv4() -> None:
    f = IPFilter(nets("10.0.0.0/8"), nets("10.1.0.0/16"))
    assert f.allowed("::ffff:10.2.0.1")
    assert not f.allowed("::ffff:10.1.0.1")
    assert not f.allowed("::ffff:192.168.0.1")
    assert not IPFilter((), nets("127.0.0.0/8")).allowed("::ffff:127.0.0.1")


def test_ipfilter_accepts_cidr_strings() -> None:
    f = IPFilter(("10.0.0.0/8",), ("10.9.0.0/16",))
    assert f.allowed("10.0.0.1") and not f.allowed("10.9.0.1")


@pytest.mark.parametrize("ip", ["", "garbage", "1.2.3.256", "1.2.3", "::ffff:zz", "1.2.3.4/32", " ", "1.2.3.4:x"])
def test_ipfilter_unparsable_is_refused(ip: str) -> None:
    assert not IPFilter((), ()).allowed(ip)


# --- client_ip ----------------------------------------------------------------------------

TRUSTED = nets("10.0.0.0/8", "fd00::/8")


def test_client_ip_untrusted_peer_ignores_xff() -> None:
    assert client_ip("198.51.100.7", "1.2.3.4", TRUSTED) == "198.51.100.7"
    assert client_ip("198.51.100.7", "1.2.3.4", ()) == "198.51.100.7"
    assert client_ip("10.0.0.1", None, TRUSTED) == "10.0.0.1"
    assert client_ip("10.0.0.1", "", TRUSTED) == "10.0.0.1"
    assert client_ip("10.0.0.1", "1.2.3.4", ()) == "10.0.0.1"


def test_client_ip_single_proxy() -> None:
    assert client_ip("10.0.0.1", "1.2.3.4", TRUSTED) == "1.2.3.4"
    assert client_ip("fd00::1", "2001:db8::7", TRUSTED) == "2001:db8::7"


def test_client_ip_spoofed_leftmost_ignored() -> None:
    # The client sent "X-Forwarded-For: 6.6.6.6, 10.9.9.9"; two proxies appended.
    xff = "6.6.6.6, 10.9.9.9, 1.2.3.4, 10.0.0.2"
    assert client_ip("10.0.0.1", xff, TRUSTED) == "1.2.3.4"


def test_client_ip_all_trusted_gives_leftmost() -> None:
    assert client_ip("10.0.0.1", "10.0.0.5, 10.0.0.2", TRUSTED) == "10.0.0.5"


def test_client_ip_garbage_stops_walk() -> None:
    assert client_ip("10.0.0.1", "1.2.3.4, garbage, 10.0.0.2", TRUSTED) == "10.0.0.2"
    assert client_ip("10.0.0.1", "1.2.3.4, garbage", TRUSTED) == "10.0.0.1"
    assert client_ip("10.0.0.1", "1.2.3.4,,10.0.0.3", TRUSTED) == "10.0.0.3"
    assert client_ip("10.0.0.1", "unknown", TRUSTED) == "10.0.0.1"


def test_client_ip_ports_brackets_and_mapped() -> None:
    assert client_ip("10.0.0.1", "1.2.3.4:5678", TRUSTED) == "1.2.3.4"
    assert client_ip("10.0.0.1", "[2001:db8::1]:443", TRUSTED) == "2001:db8::1"
    assert client_ip("10.0.0.1", "[2001:db8::1]", TRUSTED) == "2001:db8::1"
    assert client_ip("10.0.0.1", "::ffff:1.2.3.4", TRUSTED) == "1.2.3.4"
    # a mapped peer address still counts as the trusted IPv4 proxy
    assert client_ip("::ffff:10.0.0.1", "1.2.3.4", TRUSTED) == "1.2.3.4"
    assert client_ip("10.0.0.1", "[2001:db8::1]x", TRUSTED) == "10.0.0.1"
    assert client_ip("10.0.0.1", "1.2.3.4:99999999", TRUSTED) == "10.0.0.1"


def test_parse_ip() -> None:
    assert str(parse_ip(" 1.2.3.4 ")) == "1.2.3.4"
    assert parse_ip("[::1") is None
    assert parse_ip("") is None


# --- TokenBuckets -------------------------------------------------------------------------


def test_bucket_burst_then_refill() -> None:
    b = TokenBuckets(rate=1, burst=3)
    assert [b.take("k", 0) for _ in range(3)] == [0, 0, 0]
    assert b.take("k", 0) == 1
    assert b.take("k", 999) == 1  # 1 ms to go still rounds up to a whole second
    assert b.take("k", 1000) == 0
    assert b.take("k", 1000) == 1
    # idle for long: refills to burst, not beyond
    assert [b.take("k", 60_000) for _ in range(4)] == [0, 0, 0, 1]


def test_bucket_retry_after_is_whole_seconds() -> None:
    b = TokenBuckets(rate=0.1, burst=1)
    assert b.take("k", 0) == 0
    assert b.take("k", 0) == 10
    assert b.take("k", 5000) == 5
    assert b.take("k", 5001) == 5
    assert b.take("k", 9999) == 1
    assert b.take("k", 10_000) == 0


def test_bucket_fractional_rate_is_exact() -> None:
    b = TokenBuckets(rate=3, burst=3)
    for second in range(50):
        now = second * 1000
        assert [b.take("k", now) for _ in range(3)] == [0, 0, 0], second
        assert b.take("k", now) == 1
    c = TokenBuckets(rate=2, burst=1)
    assert c.take("k", 0) == 0
    assert c.take("k", 499) == 1
    assert c.take("k", 500) == 0


def test_bucket_keys_are_independent() -> None:
    b = TokenBuckets(rate=1, burst=1)
    assert b.take("a", 0) == 0
    assert b.take("a", 0) == 1
    assert b.take("b", 0) == 0
    assert len(b) == 2


def test_bucket_prune() -> None:
    b = TokenBuckets(rate=1, burst=2)
    b.take("a", 0)  # one token used: full again at 1000
    b.take("b", 0)
    b.take("b", 0)  # two used: full again at 2000
    assert b.prune(999) == 0
    assert b.prune(1000) == 1
    assert len(b) == 1
    assert b.prune(2000) == 1
    assert len(b) == 0
    assert b.prune(5000) == 0


def test_bucket_max_keys_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    b = TokenBuckets(rate=1, burst=1, max_keys=2)
    assert b.take("a", 0) == 0
    assert b.take("b", 500) == 0
    assert b.take("c", 0) == 1  # table full, nothing prunable: refused, not grown
    assert len(b) == 2
    assert b.take("a", 0) == 1  # known keys keep their own state
    calls = []
    real = TokenBuckets.prune

    def spy(self: TokenBuckets, now_ms: int) -> int:
        calls.append(now_ms)
        return real(self, now_ms)

    monkeypatch.setattr(TokenBuckets, "prune", spy)
    for i in range(100):  # a flood of new keys does not prune on every call
        assert b.take(f"new{i}", 10) == 1
    assert len(calls) <= 1
    assert b.take("c", 1000) == 0  # "a" is full again at 1000 and gets pruned
    assert len(b) == 2
    assert b.take("d", 1000) == 1
    assert b.take("d", 1500) == 0  # "b" full at 1500


def test_bucket_rejects_bad_parameters() -> None:
    for rate, burst in ((0, 1), (-1, 1), (float("nan"), 1), (float("inf"), 1), (1, 0)):
        with pytest.raises(ValueError):
            TokenBuckets(rate, burst)
    with pytest.raises(ValueError):
        TokenBuckets(1, 1, max_keys=0)


@settings(max_examples=200)
@given(
    st.floats(min_value=0.01, max_value=1000),
    st.integers(min_value=1, max_value=20),
    st.lists(st.integers(min_value=0, max_value=5000), max_size=60),
)
def test_bucket_never_exceeds_rate(rate: float, burst: int, gaps: list[int]) -> None:
    """Over any window, granted <= burst + rate * window; refusals name a wait >= 1s that is
    never longer than needed."""
    b = TokenBuckets(rate, burst)
    now = 0
    granted: list[int] = []
    for gap in gaps:
        now += gap
        wait = b.take("k", now)
        if wait == 0:
            granted.append(now)
        else:
            assert wait >= 1
            assert b.take("k", now + wait * 1000) == 0
            granted.append(now + wait * 1000)
            now += wait * 1000
    for i, start in enumerate(granted):
        for j in range(i, len(granted)):
            window_s = (granted[j] - start) / 1000
            assert j - i + 1 <= burst + rate * window_s + 1e-6


# --- ConnCounter --------------------------------------------------------------------------


def test_conn_counter_limit_and_cleanup() -> None:
    c = ConnCounter(2)
    assert c.acquire("a") and c.acquire("a")
    assert not c.acquire("a")
    assert c.acquire("b")
    assert c.count("a") == 2 and len(c) == 2
    c.release("a")
    assert c.count("a") == 1
    assert c.acquire("a")
    c.release("a")
    c.release("a")
    assert c.count("a") == 0 and len(c) == 1
    c.release("a")  # never negative
    assert c.count("a") == 0
    assert c.acquire("a")
    assert c.count("a") == 1


def test_conn_counter_unlimited() -> None:
    c = ConnCounter(0)
    assert all(c.acquire("a") for _ in range(1000))
    assert c.count("a") == 1000
    with pytest.raises(ValueError):
        ConnCounter(-1)


# --- Admission ----------------------------------------------------------------------------


def make(*, per_ip: int = 2, rate: TokenBuckets | None = None, max_conn: int = 10) -> Admission:
    return Admission(
        ip_filter=IPFilter((), nets("203.0.113.0/24")),
        per_ip=ConnCounter(per_ip),
        rate=rate,
        max_connections=max_conn,
    )


def retry_after(exc: ProtocolError) -> int:
    ((name, value),) = exc.headers
    assert name == "Retry-After" and value.isdigit()
    return int(value)


def test_admission_success_takes_one_slot() -> None:
    adm = make(rate=TokenBuckets(10, 10))
    adm.admit("1.2.3.4", open_streams=0, now_ms=0, draining=False)
    assert adm.per_ip.count("1.2.3.4") == 1
    adm.per_ip.release("1.2.3.4")
    assert len(adm.per_ip) == 0


def test_admission_order() -> None:
    bucket = TokenBuckets(1, 1)
    adm = make(rate=bucket, max_conn=1)
    # denied address beats draining and capacity
    with pytest.raises(Forbidden) as ei:
        adm.admit("203.0.113.5", open_streams=5, now_ms=0, draining=True)
    assert ei.value.detail == "client address denied"
    with pytest.raises(Forbidden):
        adm.admit("bogus", open_streams=0, now_ms=0, draining=False)
    # draining beats capacity
    with pytest.raises(Unavailable) as ei:
        adm.admit("1.2.3.4", open_streams=5, now_ms=0, draining=True)
    assert ei.value.detail == "draining" and retry_after(ei.value) >= 1
    with pytest.raises(Unavailable) as ei:
        adm.admit("1.2.3.4", open_streams=1, now_ms=0, draining=False)
    assert ei.value.detail == "at capacity" and retry_after(ei.value) >= 1
    # none of the refusals above consumed a rate token or a slot
    assert len(bucket) == 0 and len(adm.per_ip) == 0
    adm.admit("1.2.3.4", open_streams=0, now_ms=0, draining=False)
    with pytest.raises(TooManyRequests) as ei:
        adm.admit("1.2.3.4", open_streams=0, now_ms=0, draining=False)
    assert ei.value.detail == "connection rate exceeded"
    assert ei.value.status_hint == 429 and retry_after(ei.value) == 1
    assert adm.per_ip.count("1.2.3.4") == 1


def test_admission_per_ip_cap_does_not_leak() -> None:
    bucket = TokenBuckets(100, 100)
    adm = make(per_ip=1, rate=bucket, max_conn=0)  # max_connections 0 = unlimited
    adm.admit("1.2.3.4", open_streams=10**6, now_ms=0, draining=False)
    for _ in range(5):
        with pytest.raises(TooManyRequests) as ei:
            adm.admit("1.2.3.4", open_streams=0, now_ms=0, draining=False)
        assert ei.value.detail == "too many connections from this address"
        assert retry_after(ei.value) >= 1
    assert adm.per_ip.count("1.2.3.4") == 1
    adm.per_ip.release("1.2.3.4")
    assert len(adm.per_ip) == 0
    adm.admit("1.2.3.4", open_streams=0, now_ms=0, draining=False)


def test_admission_rate_refusal_does_not_take_slot() -> None:
    adm = make(per_ip=5, rate=TokenBuckets(1, 1))
    adm.admit("1.2.3.4", open_streams=0, now_ms=0, draining=False)
    with pytest.raises(TooManyRequests):
        adm.admit("1.2.3.4", open_streams=0, now_ms=500, draining=False)
    assert adm.per_ip.count("1.2.3.4") == 1


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["admit", "release"]),
            st.sampled_from(["1.2.3.4", "5.6.7.8", "203.0.113.1", "x"]),
            st.integers(0, 3),
            st.booleans(),
        ),
        max_size=80,
    )
)
def test_admission_slots_match_successes(ops: list) -> None:
    adm = make(per_ip=2, rate=TokenBuckets(2, 3), max_conn=4)
    held: dict[str, int] = {}
    now = 0
    for op, ip, open_streams, draining in ops:
        now += 100
        if op == "release":
            if held.get(ip):
                adm.per_ip.release(ip)
                held[ip] -= 1
            continue
        try:
            adm.admit(ip, open_streams, now, draining)
        except ProtocolError as exc:
            assert exc.status_hint in (403, 429, 503)
        else:
            held[ip] = held.get(ip, 0) + 1
        for key, n in held.items():
            assert adm.per_ip.count(key) == n

"""Unit and property tests for ssegw.core.proxyproto (the PROXY protocol header, v1 and v2)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssegw.core.proxyproto import MAX_V2, V2_SIGNATURE, ProxyHeaderError, parse


def v2(src: str, dst: str = "10.0.0.1", sport: int = 40000, dport: int = 443, cmd: int = 1,
       tlvs: bytes = b"", transport: int = 1) -> bytes:
    a = ipaddress.ip_address(src)
    b = ipaddress.ip_address(dst)
    if a.version == 4:
        fam, body = 0x10 | transport, a.packed + b.packed + struct.pack("!HH", sport, dport)
    else:
        fam, body = 0x20 | transport, a.packed + b.packed + struct.pack("!HH", sport, dport)
    body += tlvs
    return V2_SIGNATURE + bytes([0x20 | cmd, fam]) + struct.pack("!H", len(body)) + body


GOOD = [
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 443\r\n", "192.0.2.7"),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n", "2001:db8::7"),
    (b"PROXY TCP6 ::ffff:192.0.2.9 ::ffff:10.0.0.1 1 65535\r\n", "192.0.2.9"),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),
    (v2("192.0.2.7"), "192.0.2.7"),
    (v2("2001:db8::7", "2001:db8::1"), "2001:db8::7"),
    (v2("::ffff:192.0.2.9", "::1"), "192.0.2.9"),
    (v2("192.0.2.7", cmd=0), None),  # LOCAL: the balancer's own health check
    (v2("192.0.2.7", tlvs=b"\x04\x00\x03abc"), "192.0.2.7"),  # TLVs are skipped
    (v2("192.0.2.7", transport=2), "192.0.2.7"),  # UDP: still an address
    (V2_SIGNATURE + b"\x21\x00\x00\x00", None),  # AF_UNSPEC
]


@pytest.mark.parametrize("raw,addr", GOOD)
def test_good_headers_whole_and_cut_anywhere(raw: bytes, addr: str | None) -> None:
    assert parse(raw + b"GET / HTTP/1.1\r\n") == (len(raw), addr)
    for cut in range(len(raw)):
        assert parse(raw[:cut]) is None, cut  # incomplete: never a verdict, never an error


BAD = [
    b"GET / HTTP/1.1\r\n",
    b"\x16\x03\x01\x02\x00",  # a TLS ClientHello without the header
    b"PROXY TCP4 192.0.2.7 10.0.0.1 40000\r\n",
    b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 443 9\r\n",
    b"PROXY TCP4 2001:db8::7 10.0.0.1 40000 443\r\n",
    b"PROXY TCP6 192.0.2.7 10.0.0.1 40000 443\r\n",
    b"PROXY TCP4 192.0.2.256 10.0.0.1 40000 443\r\n",
    b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 443\r\n",
    b"PROXY TCP4 192.0.2.7 10.0.0.1 0443 443\r\n",
    b"PROXY TCP4 192.0.2.7 10.0.0.1 -1 443\r\n",
    b"PROXY TCP4  192.0.2.7 10.0.0.1 1 443\r\n",
    b"PROXY UDP4 192.0.2.7 10.0.0.1 1 443\r\n",
    b"PROXY TCP4 192.0.2.7 10.0.0.1 1 443\n",  # bare LF
    b"proxy TCP4 192.0.2.7 10.0.0.1 1 443\r\n",
    b"PROXY " + b"x" * 120 + b"\r\n",
    V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12,  # version 1 in a v2 signature
    V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12,  # command 2
    V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4,  # too short for IPv4
    V2_SIGNATURE + b"\x21\x21\x00\x0c" + b"\x00" * 12,  # too short for IPv6
    V2_SIGNATURE + b"\x21\x41\x00\x00",  # family 4
    V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_V2),  # longer than we take
    b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x00",
]


@pytest.mark.parametrize("raw", BAD)
def test_bad_headers_are_refused(raw: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(raw)


@settings(max_examples=2000, deadline=None)
@given(raw=st.binary(max_size=300) | st.builds(lambda a, b: a + b, st.sampled_from([g for g, _ in GOOD] + BAD),
                                                 st.binary(max_size=40)))
def test_any_bytes_give_a_verdict_within_bounds(raw: bytes) -> None:
    """Any input: None (need more), a header length within the input, or the error -- and a
    prefix of input that got a verdict never asks for more than the whole did."""
    try:
        r = parse(raw)
    except ProxyHeaderError:
        return
    if r is None:
        assert len(raw) < MAX_V2
        return
    n, addr = r
    assert 0 < n <= len(raw) and n <= MAX_V2
    assert addr is None or ipaddress.ip_address(addr)
    assert parse(raw[:n]) == r  # the header alone says the same

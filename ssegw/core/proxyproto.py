"""The PROXY protocol header (HAProxy's spec, versions 1 and 2), sans I/O.

A load balancer that speaks it (HAProxy ``send-proxy``/``send-proxy-v2``, AWS NLB, Google's
TCP proxy, Envoy, Traefik) opens each connection to us with one header naming the client it
carries; everything after the header is the client's own bytes (TLS or HTTP).  The gateway
reads it only from ``trusted_proxies`` peers (``proxy_protocol = true``); the address becomes
the client for admission, ``ip_allow``/``ip_deny`` and the logs.

:func:`parse` takes the bytes received so far and returns None while the header is
incomplete, else ``(length, address)``: how many bytes the header took, and the client's
address, or None when the header carries none (v1 ``UNKNOWN``, v2 ``LOCAL`` -- the balancer's
own health check -- or an address family other than TCP/UDP over IPv4/IPv6).  Anything else
raises :class:`ProxyHeaderError`; the caller closes the connection.  Bounded: a v1 line is at
most 107 bytes, a v2 header at most :data:`MAX_V2` (its TLVs are skipped, not kept).
"""

from __future__ import annotations

import ipaddress

#: The v2 signature, then version/command, family/transport and a 2-byte length.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16
#: Longest v2 header we take (addresses plus TLVs such as AWS's VPC endpoint id or
#: HAProxy's SSL and unique-id TLVs); the spec allows 65,535 bytes of them, nobody sends that.
MAX_V2 = 4096
#: Longest v1 line, CRLF included (the spec's own bound).
MAX_V1 = 107
_V1_PREFIX = b"PROXY "
#: What one read can have to hold before a decision can be made.
MAX_HEADER = MAX_V2


class ProxyHeaderError(ValueError):
    """Not a PROXY protocol header this gateway takes (the connection is closed)."""


def parse(buf: bytes | bytearray) -> tuple[int, str | None] | None:
    """Parse the PROXY header at the start of ``buf``.

    Returns:
        None if more bytes are needed; else (header length, client address or None).

    Raises:
        ProxyHeaderError: malformed, or neither version's signature.
    """
    n = len(buf)
    if n == 0:
        return None
    if buf[0] == 0x0D:  # v2 starts with \r\n\r\n
        head = bytes(buf[: min(n, 12)])
        if not V2_SIGNATURE.startswith(head):
            raise ProxyHeaderError("not a PROXY protocol header")
        if n < _V2_FIXED:
            return None
        return _parse_v2(buf)
    if buf[0] == 0x50:  # "P"
        head = bytes(buf[: min(n, 6)])
        if not _V1_PREFIX.startswith(head):
            raise ProxyHeaderError("not a PROXY protocol header")
        end = bytes(buf[:MAX_V1]).find(b"\r\n")
        if end < 0:
            if n >= MAX_V1:
                raise ProxyHeaderError("PROXY v1 line is longer than 107 bytes")
            if b"\n" in buf[:MAX_V1]:
                raise ProxyHeaderError("PROXY v1 line is not ended by CRLF")
            return None
        return end + 2, _parse_v1(bytes(buf[6:end]))
    raise ProxyHeaderError("not a PROXY protocol header")


def _parse_v1(line: bytes) -> str | None:
    parts = line.split(b" ")
    if not parts or parts[0] == b"UNKNOWN":
        return None  # the rest of an UNKNOWN line is to be ignored
    if len(parts) != 5:
        raise ProxyHeaderError("PROXY v1 line needs 5 fields")
    proto, src, dst, sport, dport = parts
    if proto == b"TCP4":
        version = 4
    elif proto == b"TCP6":
        version = 6
    else:
        raise ProxyHeaderError("PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN")
    addr = _address(src, version)
    _address(dst, version)
    for port in (sport, dport):
        # 0..65535 in decimal, no sign, no leading zero (the spec's form).
        if not port.isdigit() or len(port) > 5 or (len(port) > 1 and port[:1] == b"0") or int(port) > 65535:
            raise ProxyHeaderError("PROXY v1 port is malformed")
    return addr


def _address(text: bytes, version: int) -> str:
    try:
        s = text.decode("ascii")
        ip = ipaddress.IPv4Address(s) if version == 4 else ipaddress.IPv6Address(s)
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError("PROXY v1 address is malformed") from None
    return _text(ip)


def _text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An IPv4-mapped IPv6 address as the IPv4 address it means (as the rules read it)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _parse_v2(buf: bytes | bytearray) -> tuple[int, str | None] | None:
    ver_cmd = buf[12]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError("PROXY v2 version is not 2")
    cmd = ver_cmd & 0x0F
    if cmd > 1:
        raise ProxyHeaderError("PROXY v2 command is neither LOCAL nor PROXY")
    fam = buf[13]
    length = int.from_bytes(buf[14:16], "big")
    total = _V2_FIXED + length
    if total > MAX_V2:
        raise ProxyHeaderError(f"PROXY v2 header is longer than {MAX_V2} bytes")
    if len(buf) < total:
        return None
    if cmd == 0:  # LOCAL: the balancer itself (health check); the addresses are to be ignored
        return total, None
    family, transport = fam >> 4, fam & 0x0F
    if family == 0 or transport not in (1, 2):  # AF_UNSPEC, or not STREAM/DGRAM
        if family > 3 or transport > 2:
            raise ProxyHeaderError("PROXY v2 address family or transport is unknown")
        return total, None
    if family == 1:  # AF_INET: src 4, dst 4, ports 2+2
        if length < 12:
            raise ProxyHeaderError("PROXY v2 header is too short for IPv4 addresses")
        return total, _text(ipaddress.IPv4Address(bytes(buf[16:20])))
    if family == 2:  # AF_INET6: src 16, dst 16, ports 2+2
        if length < 36:
            raise ProxyHeaderError("PROXY v2 header is too short for IPv6 addresses")
        return total, _text(ipaddress.IPv6Address(bytes(buf[16:32])))
    if family == 3:  # AF_UNIX: no client address to speak of
        return total, None
    raise ProxyHeaderError("PROXY v2 address family is unknown")


__all__ = ["MAX_HEADER", "MAX_V1", "MAX_V2", "V2_SIGNATURE", "ProxyHeaderError", "parse"]

"""Admission and abuse control: IP filters, client address, connection rate and count caps.

Strategy (docs/api.md "Admission and abuse control"):
- Addresses are parsed with :mod:`ipaddress`; an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``,
  what a dual-stack socket reports for IPv4 peers) is the IPv4 address, and a mapped network in
  a CIDR list is the IPv4 network (:func:`unmap_network`).  Anything unparsable is refused,
  never guessed at.
- ``X-Forwarded-For`` is believed only when the TCP peer is a trusted proxy, and then only as far
  as the chain of trusted proxies goes: walking from the right, the first untrusted address is
  the client.  The leftmost entries are whatever the client sent and are ignored (spoofing).
- The per-key connection rate is a token bucket kept as GCRA (the ATM "generic cell rate
  algorithm", ITU-T I.371): one float per key, the theoretical arrival time ``tat``; a key whose ``tat`` is in the past has a full
  bucket and can be forgotten.  ``rate`` tokens per second, ``burst`` tokens of capacity.
- Every table is bounded: :class:`TokenBuckets` holds at most ``max_keys`` keys and refuses new
  keys (rate limited) rather than grow; :class:`ConnCounter` deletes keys at zero, so it never
  holds more keys than there are open connections.
- Time is an integer ``now_ms`` from the caller (monotonic clock); nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)

from ssegw.core.errors import Forbidden, TooManyRequests, Unavailable

__all__ = ["Admission", "ConnCounter", "IPFilter", "TokenBuckets", "client_ip", "unmap_network"]

IPAddress = IPv4Address | IPv6Address
# Containment across versions (IPv4Address in IPv6Network) is simply False, so lists may mix.
Network = IPv4Network | IPv6Network

# Float slack for the GCRA comparison: with rate=3 the interval is 333.33... ms and three
# intervals must still equal 1000 ms, not 1000.0000000001.
_EPSILON_MS = 1e-6


def parse_ip(text: str) -> IPAddress | None:
    """Parse an address as found in a socket peer or an X-Forwarded-For entry.

    Accepts ``a.b.c.d``, ``a.b.c.d:port``, an IPv6 address, ``[v6]`` and ``[v6]:port``
    (some proxies append the port).  IPv4-mapped IPv6 becomes IPv4.  None when unparsable.
    """
    text = text.strip()
    port = ""
    if text.startswith("["):
        text, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else "0"
    elif text.count(":") == 1:  # IPv4 with a port; bare IPv6 has at least two colons
        text, _, port = text.partition(":")
    if port and not (port.isascii() and port.isdigit() and len(port) <= 5):
        return None
    try:
        addr = ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def unmap_network(net: Network) -> Network:
    """An IPv4-mapped IPv6 network (``::ffff:a.b.c.d/N``, N >= 96) as the IPv4 network it means.

    Client addresses are unmapped (:func:`parse_ip`), so a list entry left in mapped form would
    never match anything: a deny rule that silently denies nothing.  A wider IPv6 network that
    merely contains the mapped range (``::/0``) stays IPv6 and matches IPv6 clients only.
    """
    if isinstance(net, IPv6Network) and net.prefixlen >= 96:
        v4 = net.network_address.ipv4_mapped
        if v4 is not None:
            return IPv4Network((v4, net.prefixlen - 96))
    return net


def _networks(nets: Iterable[Network | str]) -> tuple[Network, ...]:
    # Accept ready ip_network objects or CIDR strings (handy in tests and config).
    return tuple(unmap_network(ip_network(n, strict=False) if isinstance(n, str) else n) for n in nets)


def _in_any(addr: IPAddress, nets: tuple[Network, ...]) -> bool:
    for net in nets:
        if addr in net:
            return True
    return False


class IPFilter:
    """Allow/deny by CIDR: deny wins; an empty allow list allows everything not denied."""

    __slots__ = ("allow", "deny", "_seen")

    #: Verdicts remembered, by address text.  Parsing an address with ``ipaddress`` costs
    #: ~10 us, a sixth of a whole small publish; clients are a bounded set that repeats, and
    #: the cache is emptied when it is full (not an LRU: rebuilding it is cheap).
    CACHE = 4096

    def __init__(
        self,
        allow: tuple[Network | str, ...] = (),
        deny: tuple[Network | str, ...] = (),
    ) -> None:
        self.allow = _networks(allow)
        self.deny = _networks(deny)
        self._seen: dict[str, bool] = {}

    def allowed(self, ip: str) -> bool:
        ok = self._seen.get(ip)
        if ok is None:
            addr = parse_ip(ip)
            ok = addr is not None and not _in_any(addr, self.deny) and (not self.allow or _in_any(addr, self.allow))
            if len(self._seen) >= self.CACHE:
                self._seen.clear()
            self._seen[ip] = ok
        return ok


def in_networks(ip: str, nets: tuple[Network | str, ...]) -> bool:
    """True if ``ip`` (text, IPv4-mapped forms unmapped) is in one of ``nets``."""
    addr = parse_ip(ip)
    return addr is not None and _in_any(addr, _networks(nets))


def client_ip(peer_ip: str, forwarded_for: str | None, trusted: tuple[Network | str, ...]) -> str:
    """The client address for limits and filters.

    Args:
        peer_ip: the TCP peer address.
        forwarded_for: the X-Forwarded-For value, or None.  With several field lines, all of
            them joined with ``,`` in order (RFC 9110 section 5.3): reading only one would let a
            client hide its own entry behind a line it wrote itself.
        trusted: networks of proxies whose X-Forwarded-For is believed.

    Returns:
        ``peer_ip`` unless the peer is a trusted proxy and X-Forwarded-For is present; then the
        rightmost address that is not a trusted proxy (canonical text, mapped IPv4 unmapped).
        If every entry is trusted, the leftmost one.  A garbage entry stops the walk and the
        last good address seen (possibly the peer itself) is used: nothing left of garbage
        can be attributed to a proxy we trust.
    """
    if not forwarded_for or not trusted:
        return peer_ip
    nets = _networks(trusted)
    peer = parse_ip(peer_ip)
    if peer is None or not _in_any(peer, nets):
        return peer_ip
    last_good = peer_ip
    for entry in reversed(forwarded_for.split(",")):
        addr = parse_ip(entry)
        if addr is None:
            break
        last_good = str(addr)
        if not _in_any(addr, nets):
            return last_good
    return last_good


class TokenBuckets:
    """Per-key token buckets (GCRA), ``rate`` tokens/s with capacity ``burst``.

    Raises:
        ValueError: ``rate`` not a finite positive number, ``burst`` < 1 or ``max_keys`` < 1.
    """

    __slots__ = ("_interval", "_prune_after", "_tat", "burst", "max_keys", "rate")

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise ValueError("rate must be a finite number > 0")
        if burst < 1:
            raise ValueError("burst must be >= 1")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.rate = float(rate)
        self.burst = int(burst)
        self.max_keys = int(max_keys)
        self._interval = 1000.0 / self.rate  # ms per token
        self._tat: dict[str, float] = {}  # key -> theoretical arrival time (ms)
        # Earliest now_ms at which a prune can drop anything: pruning is O(keys), so a flood of
        # new keys against a full table must not trigger it on every call.
        self._prune_after = -math.inf

    def __len__(self) -> int:
        return len(self._tat)

    def take(self, key: str, now_ms: int) -> int:
        """Take one token for ``key``.

        Returns:
            0 if a token was taken, else whole seconds (>= 1) until one is available, for
            ``Retry-After``.  A new key that does not fit in a full table gets 1.
        """
        tat = self._tat.get(key)
        if tat is None:
            if len(self._tat) >= self.max_keys:
                if now_ms >= self._prune_after:
                    self.prune(now_ms)
                if len(self._tat) >= self.max_keys:
                    return 1
            tat = now_ms
            self._prune_after = min(self._prune_after, now_ms + self._interval)
        new_tat = max(tat, now_ms) + self._interval
        wait_ms = new_tat - self.burst * self._interval - now_ms
        if wait_ms > _EPSILON_MS:
            return max(1, math.ceil(wait_ms / 1000.0))
        self._tat[key] = new_tat
        return 0

    def prune(self, now_ms: int) -> int:
        """Forget keys whose bucket is full again; returns how many were dropped."""
        drop = [k for k, tat in self._tat.items() if tat <= now_ms]
        for k in drop:
            del self._tat[k]
        self._prune_after = min(self._tat.values(), default=-math.inf)
        return len(drop)


class ConnCounter:
    """Open connections per key with a cap (0 = unlimited); keys at zero are deleted."""

    __slots__ = ("_counts", "limit")

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit = limit
        self._counts: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        n = self._counts.get(key, 0)
        if self.limit and n >= self.limit:
            return False
        self._counts[key] = n + 1
        return True

    def release(self, key: str) -> None:
        """Give back one slot; releasing a key with no slots is a no-op, never negative."""
        n = self._counts.get(key, 0)
        if n <= 1:
            self._counts.pop(key, None)
        else:
            self._counts[key] = n - 1

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        return len(self._counts)


class Admission:
    """The order of checks for a new stream request.

    Cheapest and least stateful first: the static IP filter, then host-wide state
    (draining/capacity), then per-IP state.  The rate token is taken before the per-IP slot, so
    a refused attempt still counts against the rate (retry storms slow themselves down), and
    the per-IP slot is the last check, so no later failure can leak it.

    Args:
        retry_after: seconds sent in ``Retry-After`` for 503s and the per-IP connection cap.
    """

    __slots__ = ("ip_filter", "max_connections", "per_ip", "rate", "retry_after")

    def __init__(
        self,
        *,
        ip_filter: IPFilter,
        per_ip: ConnCounter,
        rate: TokenBuckets | None,
        max_connections: int,
        retry_after: int = 5,
    ) -> None:
        self.ip_filter = ip_filter
        self.per_ip = per_ip
        self.rate = rate
        self.max_connections = max_connections
        self.retry_after = max(1, int(retry_after))

    def admit(self, ip: str, open_streams: int, now_ms: int, draining: bool, counted: bool = False) -> None:
        """Admit a stream from ``ip``.  Unless its connection was ``counted`` when it was
        accepted (see :meth:`admit_connection`), it is counted here (a connection from a
        trusted proxy is counted per forwarded client, known only from the request), and on
        success the caller owns one ``per_ip`` slot and must release it when the stream ends.

        Raises:
            Forbidden: the address is denied.
            Unavailable: draining or at capacity (with Retry-After).
            TooManyRequests: per-IP rate or connection cap exceeded (with Retry-After).
        """
        if not self.ip_filter.allowed(ip):
            raise Forbidden("client address denied")
        retry = (("Retry-After", str(self.retry_after)),)
        if draining:
            raise Unavailable("draining", headers=retry)
        if self.max_connections > 0 and open_streams >= self.max_connections:
            raise Unavailable("at capacity", headers=retry)
        if not counted:
            self.admit_connection(ip, now_ms)

    def admit_connection(self, ip: str, now_ms: int) -> None:
        """Count one new connection from ``ip`` against ``conn_rate`` and ``max_conns_per_ip``;
        on success the caller owns one ``per_ip`` slot and must release it when the connection
        closes.

        Raises:
            TooManyRequests: per-IP rate or connection cap exceeded (with Retry-After).
        """
        if self.rate is not None:
            wait = self.rate.take(ip, now_ms)
            if wait:
                raise TooManyRequests("connection rate exceeded", headers=(("Retry-After", str(wait)),))
        if not self.per_ip.acquire(ip):
            raise TooManyRequests("too many connections from this address",
                                  headers=(("Retry-After", str(self.retry_after)),))

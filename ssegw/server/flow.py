"""Flow control at the edge: carry out the fan-out's write plans, pump backlogs, watch liveness.

The core decides (core/fanout.py plans, core/conn.py routes and verdicts); this module does
the I/O, and nothing else does stream writes:
- :meth:`Flow.carry_out` writes a plan.  Every write is isolated: a connection whose write
  raises is closed and the pass goes on (one bad socket never wedges a flush).  Segments of
  a shared write stop at the first pause of a connection's transport; the rest becomes
  backlog, so user-space output per connection stays within the transport's high-water
  mark plus one segment.
- :meth:`Flow.pump` writes what a connection owes (a replay, events held while it was
  paused) while its transport takes it, segment by segment, joined per connection (these
  are the clients that fell behind; the fast path never comes here).
- Socket options: a send buffer the kernel autotunes (a far client keeps its throughput),
  with ``TCP_NOTSENT_LOWAT`` bounding what a stalled client can park in the kernel; and
  dead-peer detection that tells a dead peer (nothing acknowledged) from a stalled one (zero
  window, probes acknowledged) -- see :meth:`Flow.peer_dead`.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable
from typing import cast

from ..core.conn import STREAM, owed
from ..core.fanout import SEGMENT_BYTES, Fanout, Plan, Segment, segments
from ..core.history import Event
from .protocol import HTTPProtocol

# The connections handled here are the server's protocol objects: core Conn records with an
# asyncio transport and ``abort()``.  (The fan-out's tests drive this executor with fakes
# that have the same surface: a Conn subclass with ``transport.write`` and ``abort()``.)

log = logging.getLogger("ssegw.flow")

#: Unsent bytes the kernel may hold per socket (``TCP_NOTSENT_LOWAT``): the socket stops
#: taking writes past this much *unsent* data, while what is in flight (the congestion
#: window, which autotuning sizes for the path's bandwidth x RTT) is not capped.  So a
#: stalled client costs the kernel about this much, and a far one is not throttled to
#: SNDBUF/RTT as a fixed SO_SNDBUF would (see tuning.md "Send buffer").
NOTSENT_LOWAT = 128 * 1024
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
#: A peer is dead when it has acknowledged nothing for the stall timeout while this many
#: retransmissions or zero-window probes in a row went unanswered (a stalled but live
#: client answers every probe, which resets the kernel's count).
DEAD_UNANSWERED = 3
# struct tcp_info (linux/tcp.h): u8 state, ca_state, retransmits, probes, backoff, ...;
# u32 last_ack_recv at byte 56.
_TCPI = struct.Struct("=BBBBB")
_TCPI_LAST_ACK_RECV = 56


class Flow:
    """Args:
        fanout: the worker's fan-out (its ``hold`` and stats).
        drop: closes a connection with a slow-consumer reason (the worker counts it).
        stall_ms: how long a client may take nothing before it is stalled (and the kernel's
            TCP_USER_TIMEOUT for unacknowledged data).
    """

    def __init__(self, fanout: Fanout, drop: Callable[[HTTPProtocol, str], None], stall_ms: int) -> None:
        self.fan = fanout
        self.stats = fanout.stats
        self.drop = drop
        self.stall_ms = stall_ms

    # -- plans ------------------------------------------------------------------------

    def carry_out(self, plan: Plan, now_ms: int) -> None:
        stats = self.stats
        writes = delivered = nbytes = 0
        # The core's plan holds table records as Conn; every record of a worker's table is
        # one of its HTTPProtocol objects (Context.on_connect adds them).
        shared = cast("list[tuple[list[HTTPProtocol], list[Segment]]]", plan.shared)
        single = cast("list[tuple[HTTPProtocol, list[Event]]]", plan.single)
        drops = cast("list[tuple[HTTPProtocol, str]]", plan.drops)
        for conns, segs in shared:
            if len(segs) == 1:
                # The hot loop: one write per connection, nothing else that can be counted
                # after the loop is counted inside it.
                seg = segs[0]
                framed, raw = seg.framed, seg.raw
                nev = len(seg.events)
                missed = unframed = 0
                for c in conns:
                    if c.wpaused or c.state != STREAM:  # paused by a write earlier in this plan
                        self._rest(c, segs, 0, now_ms)
                        missed += 1
                        continue
                    try:
                        if c.chunked:
                            c.transport.write(framed)
                        else:
                            c.transport.write(raw)
                            unframed += 1
                    except Exception:  # a bug or a broken transport: close this one, go on
                        self._failed(c)
                        missed += 1
                        continue
                    c.last_write_ms = now_ms
                    c.served += nev  # a stream's events written (its access line)
                ok = len(conns) - missed
                writes += ok
                delivered += ok * nev
                nbytes += (ok - unframed) * len(framed) + unframed * len(raw)
            else:
                for c in conns:
                    w, d, b = self._write_segs(c, segs, now_ms)
                    writes += w
                    delivered += d
                    nbytes += b
        for c, evs in single:
            w, d, b = self._write_segs(c, segments(evs), now_ms)
            writes += w
            delivered += d
            nbytes += b
        stats.writes += writes
        stats.events_delivered += delivered
        stats.bytes_written += nbytes
        for c, reason in drops:
            self.drop(c, reason)

    def _write_segs(self, c: HTTPProtocol, segs: list[Segment], now_ms: int) -> tuple[int, int, int]:
        writes = delivered = nbytes = 0
        for i, seg in enumerate(segs):
            if c.wpaused or c.state != STREAM:
                self._rest(c, segs, i, now_ms)
                break
            data = seg.framed if c.chunked else seg.raw
            try:
                c.transport.write(data)
            except Exception:  # a bug or a broken transport: close this one, go on
                self._failed(c)
                break
            c.last_write_ms = now_ms
            c.served += len(seg.events)
            writes += 1
            delivered += len(seg.events)
            nbytes += len(data)
        return writes, delivered, nbytes

    def _rest(self, c: HTTPProtocol, segs: list[Segment], start: int, now_ms: int) -> None:
        """Segments a connection could not take now become its backlog."""
        if c.state != STREAM:
            return
        evs: list[Event] = [e for seg in segs[start:] for e in seg.events]
        if self.fan.hold(c, evs, now_ms, False):
            self.drop(c, "buffer")

    def _failed(self, c: HTTPProtocol) -> None:
        self.stats.write_errors += 1
        log.exception("write to %s failed; closing it", c.ip)
        c.abort()

    # -- backlogs ---------------------------------------------------------------------

    def pump(self, c: HTTPProtocol, now_ms: int) -> None:
        """Write what ``c`` owes while its transport takes it; then note what is left."""
        b = c.backlog
        if b is None or c.state != STREAM:
            return
        stats = self.stats
        while b.live and not c.wpaused:
            evs = b.take(SEGMENT_BYTES)
            if not evs:
                break
            seg = Segment(evs)
            data = seg.framed if c.chunked else seg.raw
            try:
                c.transport.write(data)
            except Exception:  # a bug or a broken transport: close this one
                self._failed(c)
                return
            c.last_write_ms = now_ms
            c.served += len(evs)
            stats.writes += 1
            stats.events_delivered += len(evs)
            stats.bytes_written += len(data)
            if c.state != STREAM:
                return
        owed(c, now_ms, self.fan.max_buffer)

    # -- sockets ----------------------------------------------------------------------

    def socket_options(self, sock: socket.socket, hb_ms: int) -> None:
        """Send-side limits and dead-peer detection, set on a public *listening* socket:
        Linux copies them to every socket it accepts (checked in tests/test_flow_sockets.py),
        so an accepted connection needs no setsockopt -- and no per-connection socket object
        (uvloop caches one, ~90 B, once ``get_extra_info("socket")`` is asked for).

        Heartbeats keep data in flight on every stream at least every heartbeat_interval;
        TCP_USER_TIMEOUT aborts the connection when data stays unacknowledged for the stall
        timeout, so a black-holed client is gone within heartbeat_interval + that.
        Keepalive probes cover connections with nothing in flight (a request being read).
        """
        idle = max(1, hb_ms // 1000)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 3))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, self.stall_ms)
        except (OSError, AttributeError):  # not TCP (a unix socket) or not Linux
            pass

    def user_timeout(self, p: HTTPProtocol, on: bool) -> None:
        """Switch the kernel's TCP_USER_TIMEOUT for ``p``.  Linux counts zero-window
        probing against it, so a stalled client we mean to keep (every topic conflates)
        would be reset while it waits; for those it is off while the transport is paused,
        and :meth:`peer_dead` decides instead."""
        sock = p.transport.get_extra_info("socket")
        if sock is None:
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, self.stall_ms if on else 0)
        except (OSError, AttributeError):  # closed meanwhile, or not TCP
            pass

    def peer_dead(self, p: HTTPProtocol) -> bool:
        """True when the peer has acknowledged nothing for the stall timeout while
        retransmissions or zero-window probes kept going unanswered (TCP_INFO)."""
        sock = p.transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        except (OSError, AttributeError):
            return False
        if len(info) < _TCPI_LAST_ACK_RECV + 4:
            return False
        _, _, retransmits, probes, _ = _TCPI.unpack_from(info)
        (last_ack,) = struct.unpack_from("=I", info, _TCPI_LAST_ACK_RECV)
        return max(retransmits, probes) >= DEAD_UNANSWERED and last_ack >= self.stall_ms

"""A fan-out rig for the unit tests: the real core (Table, Fanout) and the real executor
(``ssegw.server.flow.Flow``) driving fake connections -- no sockets, no event loop.

- :class:`FakeConn` is a ``core.conn.Conn`` (as the server's protocol class is), put in
  state STREAM through the lifecycle table, with an ``abort()`` that closes it and frees its
  slot the way the protocol and worker do.
- :class:`FakeTransport` records every ``write``.  It can pause like asyncio's high-water
  mark (``set_wpaused(conn, True, now)`` from inside ``write`` once more than ``budget``
  bytes are buffered) and can be broken (every ``write`` raises ``RuntimeError``).
- What a client saw is de-chunked with h11's client reader and parsed with the independent
  SSE parser, so the assertions are about what a client receives.
"""

from __future__ import annotations

import h11
from sse_parser import parse

from ssegw.core.conn import (
    ACCEPT_STREAM,
    CLOSE,
    CLOSED,
    REQUEST,
    REQUEST_DONE,
    STREAM,
    STREAM_OPEN,
    Conn,
    advance,
    set_wpaused,
)
from ssegw.core.fanout import Fanout, Plan
from ssegw.core.history import Event
from ssegw.core.ids import format_id
from ssegw.core.sse import data_lines, encode_body, encode_frame
from ssegw.core.table import Table
from ssegw.server.flow import Flow


class FakeTransport:
    """A transport that records writes.

    Args:
        rig: for the clock (``rig.now``) when the transport pauses.
        conn: the connection whose ``wpaused`` flag a pause flips.
        budget: bytes it buffers before it pauses (None: it never pauses).
    """

    def __init__(self, rig: Rig, conn: FakeConn, budget: int | None) -> None:
        self.rig = rig
        self.conn = conn
        self.budget = budget
        self.writes: list[bytes] = []
        self.buffered = 0  # written since the client last drained (``Rig.resume``)
        self.broken = False
        self.paused_writes = 0  # writes handed over while paused (the executor must not)

    def write(self, data: bytes) -> None:
        assert data, "zero-length write"
        if self.broken:
            raise RuntimeError("broken transport")
        if self.conn.wpaused:
            self.paused_writes += 1
        self.writes.append(data)
        self.buffered += len(data)
        if self.budget is not None and not self.conn.wpaused and self.buffered > self.budget:
            set_wpaused(self.conn, True, self.rig.now)  # asyncio: pause_writing()


class FakeConn(Conn):
    """A stream record, as the protocol class would be (it subclasses Conn)."""

    def __init__(self, rig: Rig, chunked: bool = True, budget: int | None = None) -> None:
        self.init_conn()
        self.rig = rig
        self.transport = FakeTransport(rig, self, budget)
        self.chunked = chunked
        self.aborts = 0
        self.served = 0  # events written (flow.py counts them, as on HTTPProtocol)

    @property
    def writes(self) -> list[bytes]:
        return self.transport.writes  # type: ignore[attr-defined]

    def abort(self) -> None:
        # As HTTPProtocol.abort + Worker.on_close: CLOSED at once, slot and topics freed.
        self.aborts += 1
        advance(self, CLOSE)
        self.rig.table.remove(self)


def dechunk(data: bytes) -> bytes:
    c = h11.Connection(h11.CLIENT)
    c.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    c.send(h11.EndOfMessage())
    c.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + data)
    out = b""
    while True:
        ev = c.next_event()
        if ev is h11.NEED_DATA:
            return out
        assert not isinstance(ev, h11.EndOfMessage), "a zero-length chunk ended the body"
        if isinstance(ev, h11.Data):
            out += ev.data


def seen(c: FakeConn) -> list[tuple[str, str]]:
    """(id, data) of every event the client of ``c`` has received."""
    raw = b"".join(c.writes)
    if c.chunked:
        raw = dechunk(raw)
    return [(e.id, e.data) for e in parse(raw.decode()).events]


def seqs(c: FakeConn) -> list[int]:
    return [int(eid.split("-")[1]) for eid, _ in seen(c)]


def ev(seq: int, topic: str, data: str | None = None, key: str | None = None, pad: int = 0) -> Event:
    """An encoded event; ``pad`` adds that many bytes of data (for large frames)."""
    text = data if data is not None else f"{topic}#{seq}"
    body = encode_body(None, data_lines(text + "x" * pad))
    return Event(topic, seq, 0, encode_frame(format_id("e", seq), body), key)


class Rig:
    """Table + Fanout + the real Flow executor over fake connections."""

    def __init__(
        self, max_buffer: int = 1 << 20, conflate: tuple[str, ...] = (), grace_ms: int = 0, stall_ms: int = 60_000
    ) -> None:
        self.table = Table(conflate_for=lambda t: t in conflate)
        self.fan = Fanout(self.table, max_buffer, grace_ms)
        self.flow = Flow(self.fan, self.on_drop, stall_ms)
        self.drops: list[tuple[Conn, str]] = []
        self.now = 1

    def on_drop(self, c: Conn, reason: str) -> None:
        # As Worker.drop: a closed connection is not counted twice; abort at once.
        if c.state == CLOSED:
            return
        self.drops.append((c, reason))
        c.abort()  # type: ignore[attr-defined]

    def conn(self, *topics: str, chunked: bool = True, budget: int | None = None) -> FakeConn:
        """A stream on ``topics``, brought to STREAM through the lifecycle table."""
        c = FakeConn(self, chunked, budget)
        self.table.add(c)
        advance(c, REQUEST)
        advance(c, REQUEST_DONE)
        advance(c, ACCEPT_STREAM)
        self.table.subscribe(c, topics)
        advance(c, STREAM_OPEN)
        c.last_write_ms = c.progress_ms = self.now
        return c

    def publish(self, *events: Event) -> int:
        q = 0
        for e in events:
            q = self.fan.publish(e)
        return q

    def step(self, now_ms: int, quota: int) -> tuple[bool, Plan]:
        """One slice of a sweep, carried out."""
        self.now = now_ms
        done, plan = self.fan.sweep_step(now_ms, quota)
        self.flow.carry_out(plan, now_ms)
        return done, plan

    def flush(self, now_ms: int | None = None, quota: int = 1 << 30) -> int:
        """Run a whole sweep in slices of ``quota``; returns the transport writes made."""
        now = self.now if now_ms is None else now_ms
        before = self.fan.stats.writes
        for _ in range(100_000):
            done, _plan = self.step(now, quota)
            if done:
                return self.fan.stats.writes - before
        raise AssertionError("the sweep never finished")

    def pause(self, c: FakeConn, now_ms: int | None = None) -> None:
        set_wpaused(c, True, self.now if now_ms is None else now_ms)

    def resume(self, c: FakeConn, now_ms: int | None = None) -> None:
        """The client read everything the transport held: resume_writing, then pump (as
        Worker.on_resume does)."""
        now = self.now if now_ms is None else now_ms
        self.now = now
        c.transport.buffered = 0  # type: ignore[attr-defined]
        set_wpaused(c, False, now)
        if c.state == STREAM:
            self.flow.pump(c, now)

    def drain(self, c: FakeConn, now_ms: int | None = None) -> int:
        """Resume until nothing is owed; returns how many resumes it took."""
        n = 0
        while True:
            self.resume(c, now_ms)
            n += 1
            if c.backlog is None or c.state != STREAM:
                return n
            assert n < 100_000, "the backlog never drained"

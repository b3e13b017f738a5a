"""The client side of an upstream SSE stream: one GET, its response head checked, its body read.

Strategy.  asyncio streams on the worker's (uvloop) loop and h11 in client mode: h11 frames the
response (chunked, Content-Length or read-to-close) and bounds the head
(``max_incomplete_event_size``); the body bytes go to the bounded SSE parser in
``core/sseparse.py``.  No HTTP client library: an upstream stream is one long GET, and this
keeps every bound (head size, line and event size, stall time) ours and named.  tuning.md
("Upstream client") has the cost of this client per stream next to aiohttp's.

Every way a stream can fail is an :class:`UpstreamFailure` whose ``reason`` is one of
:data:`FAILURE_REASONS` (a metric label) and whose ``detail`` is a sentence for the
``ssegw.upstream`` event and the log line.  A clean end of the body is reason ``closed``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from urllib.parse import quote

import h11

from ..config import RouteRule
from ..config_keys import parse_upstream_url
from ..core.sseparse import SSEParser, StreamError, UpEvent

#: Why an upstream stream failed (``ssegw_upstream_failures_total{reason}``).
FAILURE_REASONS = ("connect", "status", "content_type", "stall", "malformed", "too_large", "closed")
#: Bytes asked for per read.
READ_SIZE = 65536
#: Seconds allowed to connect (TCP and TLS).
CONNECT_TIMEOUT = 5.0


class UpstreamFailure(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Target:
    """A route's upstream URL, parsed once: where to connect and the request-target template."""

    __slots__ = ("scheme", "host", "port", "template", "placeholder", "host_header", "headers")

    def __init__(self, route: RouteRule) -> None:
        self.placeholder = "{topic}" if route.mode == "shared" else "{path}"
        self.scheme, self.host, self.port, self.template = parse_upstream_url(route.upstream, self.placeholder)
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if self.port == default else f"{host}:{self.port}"
        self.headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in route.headers]

    def target(self, value: str, query: str = "") -> str:
        """The request target with ``value`` substituted (a topic is percent-encoded; a proxied
        path arrives percent-encoded already) and the client's ``query`` appended."""
        if self.placeholder == "{topic}":
            value = quote(value, safe="/:@")
        out = self.template.replace(self.placeholder, value)
        if query:
            out += ("&" if "?" in out else "?") + query
        return out


class UpstreamStream:
    """One GET to an upstream: :meth:`open` sends it and checks the head; :meth:`events`
    yields parsed events until the stream ends or fails."""

    __slots__ = ("reader", "writer", "conn", "parser", "stall_s", "status", "eof")

    def __init__(self, parser: SSEParser, stall_s: float, max_head: int) -> None:
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head)
        self.parser = parser
        self.stall_s = stall_s
        self.status = 0
        self.eof = False

    async def open(self, t: Target, target: str, extra: list[tuple[bytes, bytes]], last_id: str | None) -> None:
        """Connect, send the GET and read the response head.

        Raises:
            UpstreamFailure: connect (refused, unreachable, timeout), status (not 200),
                content_type (not text/event-stream), stall (no head in time), malformed.
        """
        ctx = ssl.create_default_context() if t.scheme == "https" else None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(t.host, t.port, ssl=ctx, limit=READ_SIZE), CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ssl.SSLError) as e:
            raise UpstreamFailure("connect", f"cannot connect to {t.host_header}: {e or type(e).__name__}") from None
        self.reader, self.writer = reader, writer
        headers = [(b"host", t.host_header.encode("latin-1")), (b"accept", b"text/event-stream"),
                   (b"cache-control", b"no-cache"), (b"user-agent", b"ssegw"), *t.headers, *extra]
        if last_id:
            headers.append((b"last-event-id", last_id.encode("utf-8")))
        try:
            out = self.conn.send(h11.Request(method=b"GET", target=target.encode("latin-1"), headers=headers))
            out = (out or b"") + (self.conn.send(h11.EndOfMessage()) or b"")
        except (h11.LocalProtocolError, UnicodeEncodeError) as e:
            raise UpstreamFailure("malformed", f"cannot send the request: {e}") from None
        writer.write(out)
        ev = await self._next()
        while isinstance(ev, h11.InformationalResponse):
            ev = await self._next()
        if not isinstance(ev, h11.Response):
            raise UpstreamFailure("malformed", "upstream closed before a response head")
        self.status = ev.status_code
        if ev.status_code != 200:
            raise UpstreamFailure("status", f"upstream answered {ev.status_code} {ev.reason.decode('latin-1')[:60]}")
        ctype = b""
        for k, v in ev.headers:
            if k == b"content-type":
                ctype = v
        if ctype.split(b";", 1)[0].strip().lower() != b"text/event-stream":
            raise UpstreamFailure("content_type", f"upstream answered Content-Type {ctype.decode('latin-1')[:60]!r}, "
                                                  "not text/event-stream")

    async def body(self, sink: Callable[[bytes], None]) -> None:
        """Hand body bytes to ``sink`` until the body ends (raises ``closed``) or fails."""
        while True:
            ev = await self._next()
            if isinstance(ev, h11.Data):
                sink(ev.data)  # type: ignore[arg-type]
            elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                raise UpstreamFailure("closed", "upstream ended the stream")

    async def events(self, sink: Callable[[list[UpEvent]], object]) -> None:
        """Parse the body; ``sink`` gets each read's events (awaited if it returns an awaitable)."""
        parser = self.parser
        while True:
            ev = await self._next()
            if isinstance(ev, h11.Data):
                try:
                    evs = parser.feed(ev.data)  # type: ignore[arg-type]
                except StreamError as e:
                    raise UpstreamFailure(e.reason, e.detail) from None
                if evs:
                    r = sink(evs)
                    if asyncio.iscoroutine(r):
                        await r
            elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                raise UpstreamFailure("closed", "upstream ended the stream")

    async def _next(self) -> object:
        conn = self.conn
        reader = self.reader
        assert reader is not None
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                if self.eof and self.status == 200:
                    # The connection ended inside the body (a reset, a killed upstream): an
                    # event stream may end anywhere; the next attempt tells whether it is down.
                    raise UpstreamFailure("closed", "upstream connection lost mid-stream") from None
                raise UpstreamFailure("malformed", f"upstream broke HTTP/1.1 framing: {e}") from None
            if ev is not h11.NEED_DATA:
                return ev
            try:
                data = await asyncio.wait_for(reader.read(READ_SIZE), self.stall_s)
            except TimeoutError:
                raise UpstreamFailure("stall", f"upstream sent nothing for {self.stall_s:g}s") from None
            except OSError as e:
                raise UpstreamFailure("closed", f"upstream connection lost: {e}") from None
            self.eof = not data
            try:
                conn.receive_data(data)
            except h11.RemoteProtocolError as e:
                raise UpstreamFailure("malformed", f"upstream broke HTTP/1.1 framing: {e}") from None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

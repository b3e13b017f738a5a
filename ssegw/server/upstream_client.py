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
import inspect
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


class UpstreamStream(asyncio.Protocol):
    """One GET to an upstream: :meth:`open` sends it and checks the head; :meth:`events`
    hands parsed events to a sink until the stream ends or fails.

    A protocol, not a stream reader: bytes are framed, parsed and handed to the sink in
    ``data_received`` itself, so an upstream event reaches the broker in the same loop turn
    as its bytes (a reader task would add a loop iteration per hop, and under a fan-out that
    keeps the loop busy each iteration is a flush slice: measured +60 ms p50, tuning.md).  A
    sink that returns an awaitable (a Redis publish) pauses reading until it is done, so the
    order of events is kept and nothing piles up here.  One timer per stream checks for a
    stall (nothing received, not even a comment, for ``stall_s``), re-armed lazily."""

    __slots__ = ("transport", "conn", "parser", "stall_s", "status", "eof", "waiter", "sink", "pending",
                 "error", "last_rx", "watch", "loop", "head_done")

    def __init__(self, parser: SSEParser, stall_s: float, max_head: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head)
        self.parser = parser
        self.stall_s = stall_s
        self.status = 0
        self.eof = False
        self.waiter: asyncio.Future[None] | None = None
        self.sink: Callable[[list[UpEvent]], object] | None = None
        self.pending: asyncio.Future[object] | None = None
        self.error: BaseException | None = None
        self.last_rx = 0.0
        self.watch: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.head_done = False

    async def open(self, t: Target, target: str, extra: list[tuple[bytes, bytes]], last_id: str | None) -> None:
        """Connect, send the GET and read the response head.

        Raises:
            UpstreamFailure: connect (refused, unreachable, timeout), status (not 200),
                content_type (not text/event-stream), stall (no head in time), malformed.
        """
        loop = self.loop = asyncio.get_running_loop()
        ctx = ssl.create_default_context() if t.scheme == "https" else None
        try:
            await asyncio.wait_for(loop.create_connection(lambda: self, t.host, t.port, ssl=ctx), CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ssl.SSLError) as e:
            raise UpstreamFailure("connect", f"cannot connect to {t.host_header}: {e or type(e).__name__}") from None
        headers = [(b"host", t.host_header.encode("latin-1")), (b"accept", b"text/event-stream"),
                   (b"cache-control", b"no-cache"), (b"user-agent", b"ssegw"), *t.headers, *extra]
        if last_id:
            headers.append((b"last-event-id", last_id.encode("utf-8")))
        try:
            out = self.conn.send(h11.Request(method=b"GET", target=target.encode("latin-1"), headers=headers))
            out = (out or b"") + (self.conn.send(h11.EndOfMessage()) or b"")
        except (h11.LocalProtocolError, UnicodeEncodeError) as e:
            raise UpstreamFailure("malformed", f"cannot send the request: {e}") from None
        assert self.transport is not None
        self.transport.write(out)
        self.last_rx = loop.time()
        self.watch = loop.call_at(self.last_rx + self.stall_s, self._check_stall)
        try:
            await self._wait()
        except UpstreamFailure as e:
            if e.reason == "closed":  # no answer at all: the upstream is not serving
                raise UpstreamFailure("connect", f"upstream closed the connection before answering ({e.detail})") \
                    from None
            raise

    async def events(self, sink: Callable[[list[UpEvent]], object]) -> None:
        """Hand each read's events to ``sink`` (awaiting what it returns, if anything) until
        the stream ends (:class:`UpstreamFailure` ``closed``) or fails."""
        self.sink = sink
        self._drive()  # what came with the head
        await self._wait()

    async def _wait(self) -> None:
        if self.error is None:
            assert self.loop is not None
            self.waiter = self.loop.create_future()
            await self.waiter
            self.waiter = None
        err, self.error = self.error, None
        if err is not None:
            raise err

    def _done(self, err: BaseException | None) -> None:
        """Wake whoever waits: with ``err`` (a failure), or without (the head is in)."""
        if err is not None:
            if self.error is None:
                self.error = err
            self._stop()
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, reason: str, detail: str) -> None:
        self._done(UpstreamFailure(reason, detail))

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.loop is not None
        self.last_rx = self.loop.time()
        try:
            self.conn.receive_data(data)
        except h11.RemoteProtocolError as e:  # data after the connection was closed
            self._fail("malformed", f"upstream broke HTTP/1.1 framing: {e}")
            return
        self._drive()

    def eof_received(self) -> bool:
        self.eof = True
        try:
            self.conn.receive_data(b"")
        except h11.RemoteProtocolError:
            pass  # already told
        self._drive()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            if exc is not None:
                self._fail("closed", f"upstream connection lost: {exc}")
            else:
                self._fail("closed", "upstream ended the stream")
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None

    # -- the work ------------------------------------------------------------------------

    def _drive(self) -> None:
        """Act on every complete h11 event buffered so far, unless a sink's awaitable runs."""
        conn = self.conn
        while self.pending is None and self.error is None:
            if self.head_done and self.sink is None:
                return  # the body waits in h11's buffer until events() gives a sink
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                if self.eof and self.status == 200:
                    # The connection ended inside the body (a reset, a killed upstream): an
                    # event stream may end anywhere; the next attempt tells whether it is down.
                    self._fail("closed", "upstream connection lost mid-stream")
                else:
                    self._fail("malformed", f"upstream broke HTTP/1.1 framing: {e}")
                return
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return
            if isinstance(ev, h11.Data):
                self._body(ev.data)  # type: ignore[arg-type]
            elif isinstance(ev, h11.Response):
                self._head(ev)
            elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                self._fail("closed", "upstream ended the stream")
                return

    def _head(self, ev: h11.Response) -> None:
        self.status = ev.status_code
        if ev.status_code != 200:
            self._fail("status", f"upstream answered {ev.status_code} {ev.reason.decode('latin-1')[:60]}")
            return
        ctype = b""
        for k, v in ev.headers:
            if k == b"content-type":
                ctype = v
        if ctype.split(b";", 1)[0].strip().lower() != b"text/event-stream":
            self._fail("content_type", f"upstream answered Content-Type {ctype.decode('latin-1')[:60]!r}, "
                                       "not text/event-stream")
            return
        self.head_done = True
        self._done(None)

    def _body(self, data: bytes) -> None:
        try:
            evs = self.parser.feed(data)
        except StreamError as e:
            self._fail(e.reason, e.detail)
            return
        if not evs:
            return
        assert self.sink is not None
        try:
            r = self.sink(evs)
        except UpstreamFailure as e:
            self._done(e)
            return
        except Exception as e:  # a bug of ours: to the waiter, which logs it
            self._done(e)
            return
        if r is not None and inspect.isawaitable(r):
            assert self.transport is not None
            self.transport.pause_reading()
            fut = self.pending = asyncio.ensure_future(r)
            fut.add_done_callback(self._sunk)

    def _sunk(self, fut: asyncio.Future[object]) -> None:
        self.pending = None
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self._done(exc)
            return
        assert self.loop is not None
        self.last_rx = self.loop.time()  # the wait was ours, not the upstream's
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self._drive()

    def _check_stall(self) -> None:
        self.watch = None
        if self.error is not None or self.transport is None:
            return
        assert self.loop is not None
        now = self.loop.time()
        due = self.last_rx + self.stall_s
        if self.pending is None and now >= due:
            self._fail("stall", f"upstream sent nothing for {self.stall_s:g}s")
            return
        self.watch = self.loop.call_at(max(due, now + 0.05), self._check_stall)

    def _stop(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.error is None:
            self.error = UpstreamFailure("closed", "closed by the gateway")
        self._stop()

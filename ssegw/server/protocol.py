"""The asyncio.Protocol: bytes in and out, h11 for request heads, raw bytes for streams.

Strategy (after uvicorn's ``h11_impl`` loop and aiohttp's ``base_protocol`` flow control):
- One ``HTTPProtocol`` object per socket, and it *is* the connection-table record (it
  subclasses :class:`~ssegw.core.table.Conn`).  No Task, Future or TimerHandle is created
  per connection: head/idle timeouts and heartbeats are entries in the worker's wheel.
- While a request is being read, an ``h11.Connection`` parses it, with its head bounded by
  ``max_head_size`` (h11's ``max_incomplete_event_size``: 431) and our own request-line
  limit (414).  Plain requests (``/publish``, admin) get keep-alive.
- When a stream starts, h11 writes the response head and is then dropped: it would cost
  ~1.5 KB per idle subscriber and has nothing left to do.  From then on event bytes,
  already chunk-framed once per flush, go straight to ``transport.write``.  On a server
  close we write the last chunk (``0\\r\\n\\r\\n``) ourselves.

Body framing of streams: chunked for HTTP/1.1 clients, close-delimited for HTTP/1.0 (h11
decides, per RFC 9112).  Chunked lets a proxy tell a deliberate end of stream (last chunk)
from a truncation, and keeps the connection reusable by intermediaries; its cost is a few
bytes of framing computed once per topic per flush, shared by all subscribers.

Errors: every refusal is a :class:`~ssegw.core.errors.ProtocolError` raised below and
translated here, once, into its status and ``{"error", "detail"}`` body.  Garbage from the
network is counted and logged at debug level; a bug of ours is logged with its traceback
and answered 500 -- neither takes the worker down.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from typing import Protocol, cast

import h11
import orjson

from ..core.conn import (
    BODY,
    CLOSE,
    CLOSED,
    END,
    HEAD,
    KEEP_ALIVE,
    REQUEST,
    REQUEST_DONE,
    RESPOND,
    STREAM,
    STREAM_OPEN,
    Conn,
    advance,
)
from ..core.errors import ProtocolError
from ..core.sse import LAST_CHUNK
from ..core.sse import chunk as _chunk

log = logging.getLogger("ssegw.http")

#: Longest request line we read (RFC 9112 3 recommends supporting at least 8000 octets;
#: nginx's default large-header buffer is 8 KiB).  Longer is 414.
MAX_REQUEST_LINE = 8192
#: The end of a request head as h11 finds it (``\n\r?\n``), and what makes a head loose: a
#: line ended by a bare LF, or an obs-fold continuation line (RFC 9112 2.2 and 5.2 let a
#: server accept both; h11 does).  We refuse both (400 and close): an intermediary in front
#: of us may split or join such lines differently and so see other header fields than we do
#: -- a folded ``Transfer-Encoding`` is the classic request-smuggling shape.
_HEAD_END = re.compile(rb"\n\r?\n")
_LOOSE_HEAD = re.compile(rb"(?<!\r)\n|\n[ \t]")
#: What a stream client may send us after its request (nothing is expected; a stray
#: pipelined request or keepalive probe is tolerated and discarded up to this much).
MAX_STREAM_INBOUND = 64 * 1024

# Timer kinds in the worker's wheel.
T_HEAD, T_HEARTBEAT, T_DEADLINE = 1, 2, 3

_REASONS = {
    200: b"OK", 204: b"No Content", 400: b"Bad Request", 401: b"Unauthorized",
    403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
    413: b"Content Too Large", 414: b"URI Too Long", 415: b"Unsupported Media Type",
    429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 503: b"Service Unavailable",
    505: b"HTTP Version Not Supported",
}
_SERVER = (b"server", b"ssegw")


def error_body(code: str, detail: str) -> bytes:
    return orjson.dumps({"error": code, "detail": detail})


class Limits(Protocol):
    """The settings an :class:`HTTPProtocol` reads (``Config`` has them)."""

    @property
    def max_head_size(self) -> int: ...

    @property
    def max_body(self) -> int: ...


class Owner(Protocol):
    """What an :class:`HTTPProtocol` calls on its owner: the worker's context
    (``server/context.py``), or a test's fake.  Declared here rather than imported, so that
    this module imports nothing of the server's (``context.py`` imports it)."""

    @property
    def cfg(self) -> Limits: ...

    @property
    def draining(self) -> bool: ...

    def on_connect(self, p: HTTPProtocol) -> None: ...

    def on_closing(self, p: HTTPProtocol) -> None: ...

    def on_close(self, p: HTTPProtocol) -> None: ...

    def on_pause(self, p: HTTPProtocol) -> None: ...

    def on_resume(self, p: HTTPProtocol) -> None: ...

    def handle(self, p: HTTPProtocol, req: h11.Request, body: bytes) -> None: ...

    def check_head(self, p: HTTPProtocol, req: h11.Request) -> None: ...

    def arm_idle(self, p: HTTPProtocol) -> None: ...

    def count_protocol_error(self) -> None: ...

    def count_response(self, status: int) -> None: ...

    def cors_headers(self, p: HTTPProtocol) -> list[tuple[bytes, bytes]]: ...


class HTTPProtocol(Conn, asyncio.Protocol):
    __slots__ = ("w", "h11", "admin", "req", "body", "line", "inbound", "held_ip", "driving", "served")

    # Narrows core's ``Conn.transport`` (the core does no I/O and may not import asyncio):
    # from connection_made on, a socket's transport.
    transport: asyncio.Transport

    def __init__(self, worker: Owner, admin: bool) -> None:
        self.init_conn()
        self.w = worker
        self.admin = admin
        self.h11: h11.Connection | None = None
        self.req: h11.Request | None = None
        self.body: list[bytes] | None = None
        self.line = 0  # bytes of the current request line seen; -1 once it is complete
        self.inbound = 0  # bytes received (body, or discarded bytes on a stream)
        self.held_ip = False  # holds a per-IP stream slot that must be released
        self.driving = False  # inside drive(): an answer must not re-enter it
        self.served = 0  # requests answered on this connection (keep-alive reuse)

    # -- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # create_server / create_unix_server hand a stream protocol a full Transport.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        # One string per client address, not one per connection (~60 B each; many streams
        # share an address behind NAT or a proxy).  Addresses are a bounded set.
        self.ip = sys.intern(peer[0]) if peer else ""
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.w.cfg.max_head_size)
        self.w.on_connect(self)

    def connection_lost(self, exc: Exception | None) -> None:
        advance(self, CLOSE)
        self.h11 = None
        self.req = None
        self.body = None
        self.w.on_close(self)

    def eof_received(self) -> bool:
        # A half-closed client will not read our answer either; close now (False) rather
        # than keep a half-open socket around.
        return False

    def pause_writing(self) -> None:
        self.w.on_pause(self)

    def resume_writing(self) -> None:
        self.w.on_resume(self)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state > RESPOND or state == RESPOND and self.h11 is None:
            self.inbound += len(data)
            if self.inbound > MAX_STREAM_INBOUND:
                self.w.count_protocol_error()
                self.abort()
            return
        if state == CLOSED or self.h11 is None:
            return
        if state == HEAD and self.line >= 0 and not self._check_line(data):
            return
        try:
            self.h11.receive_data(data)
        except RuntimeError:  # data after the client closed its side: nothing to parse
            return
        self.drive()

    def _check_line(self, data: bytes) -> bool:
        """Refuse an over-long request line as soon as it is seen (414); False if refused.

        Only a line still incomplete needs this (h11 would wait for up to max_head_size);
        complete heads, pipelined ones included, are measured in :meth:`_on_request`.
        """
        limit = min(MAX_REQUEST_LINE, self.w.cfg.max_head_size)
        i = data.find(b"\n")
        if (self.line + len(data) if i < 0 else self.line + i) > limit:
            self.refuse(414, "uri_too_long", f"request line is longer than {limit} bytes")
            return False
        self.line = self.line + len(data) if i < 0 else -1
        return True

    # -- request cycle ----------------------------------------------------------------

    def drive(self) -> None:
        """Pull h11 events until it needs more data or a handler takes over."""
        if self.driving:
            return
        self.driving = True
        try:
            self._drive()
        finally:
            self.driving = False

    def _drive(self) -> None:
        # A head is not parsed while the transport is paused: the client is not reading
        # our answers, so the next one would only pile up (see next_request).
        while self.state == HEAD and not self.wpaused or self.state == BODY:
            conn = self.h11
            if conn is None:
                return
            if self.state == HEAD and not self._strict_head(conn):
                return
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                status = e.error_status_hint or 400
                self.w.count_protocol_error()
                # h11's messages may quote the offending line (a token, a cookie): keep only
                # the part before the quote, in the log and in the answer.
                what = str(e).split(":", 1)[0] or "malformed request"
                log.debug("malformed request from %s: %s", self.ip, what)
                code = "header_too_large" if status == 431 else "bad_request"
                self.refuse(status, code, what)
                return
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return
            # Dispatch on the exact type, once (uvicorn's h11_impl); mypy does not narrow
            # ``ev`` through ``t``, hence the casts.
            t = type(ev)
            if t is h11.Request:
                self._on_request(cast(h11.Request, ev))
            elif t is h11.Data:
                data = cast(h11.Data, ev).data
                self.inbound += len(data)
                if self.inbound > self.w.cfg.max_body:
                    self.refuse(413, "payload_too_large", f"body is over max_body ({self.w.cfg.max_body} bytes)")
                    return
                assert self.body is not None
                self.body.append(data)
            elif t is h11.EndOfMessage:
                self._dispatch()
            elif t is h11.ConnectionClosed:
                self.close()
                return

    def _strict_head(self, conn: h11.Connection) -> bool:
        """Look at the head h11 is about to parse, once it is complete: False (refused) if
        it has a bare-LF line ending or an obs-fold line.

        h11 keeps received bytes in its receive buffer and has no public read-only view of
        it (``trailing_data`` copies the whole buffer, pipelined requests included); we read
        the bytearray in place, and only up to the end of the head.  While the head is
        incomplete, ``inbound`` (otherwise unused in HEAD) remembers how far we searched, so
        a head sent a byte at a time is searched once, not once per byte.
        """
        buf = conn._receive_buffer._data  # noqa: SLF001 -- see above; pinned in pyproject
        n = len(buf)
        if n <= self.inbound:
            return True
        end = _HEAD_END.search(buf, max(0, self.inbound - 2))
        if end is None:
            self.inbound = n
            return True
        self.inbound = 0
        if _LOOSE_HEAD.search(buf, 0, end.end()) is None:
            return True
        self.w.count_protocol_error()
        self.refuse(400, "bad_request", "request head has a bare LF line ending or an obs-fold line")
        return False

    def _on_request(self, req: h11.Request) -> None:
        self.req = req
        self.body = []
        self.inbound = 0
        advance(self, REQUEST)
        self.line = -1
        cfg = self.w.cfg
        # h11 bounds only *incomplete* heads (max_incomplete_event_size); a complete head
        # that arrived in one segment, or pipelined behind another request, is measured
        # here from what h11 parsed (the raw head differs by a few bytes of whitespace).
        line_len = len(req.method) + len(req.target) + 10
        if line_len > min(MAX_REQUEST_LINE, cfg.max_head_size):
            self.refuse(414, "uri_too_long", f"request line is longer than {min(MAX_REQUEST_LINE, cfg.max_head_size)} bytes")
            return
        head = line_len + sum(len(k) + len(v) + 4 for k, v in req.headers) + 2
        if head > cfg.max_head_size:
            self.w.count_protocol_error()
            self.refuse(431, "header_too_large", f"request head is larger than max_head_size ({cfg.max_head_size} bytes)")
            return
        if req.http_version not in (b"1.1", b"1.0"):
            # h11 parses any HTTP/x.y; we speak 1.0 and 1.1 only (RFC 9110 15.6.6).
            self.w.count_protocol_error()
            self.refuse(505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served")
            return
        framing = 0
        for name, value in req.headers:
            if name == b"content-length":
                framing |= 1
                try:
                    n = int(value)
                except ValueError:
                    n = 0  # h11 has already validated it
                if n > cfg.max_body:
                    self.refuse(413, "payload_too_large", f"body is over max_body ({cfg.max_body} bytes)")
                    return
            elif name == b"transfer-encoding":
                framing |= 2
        if framing == 3:
            # Both framings: the classic request-smuggling shape.  h11 would let
            # Transfer-Encoding win (RFC 9112 6.3 allows that), but an intermediary may have
            # read it the other way; refuse and close, so nothing behind it on this
            # connection is ever executed (RFC 9112 6.1: "ought to be handled as an error").
            # h11 itself refuses duplicated Transfer-Encoding and contradictory
            # Content-Length lines; identical Content-Length lines it reads as one.
            self.w.count_protocol_error()
            self.refuse(400, "bad_framing", "request has both Content-Length and Transfer-Encoding")
            return
        try:
            # Refusals decided from the head come before the body is read and before any
            # 100 Continue (auth, denied addresses): the body is never buffered for them.
            self.w.check_head(self, req)
        except ProtocolError as e:
            self.respond_error(e, close=True)
            return
        if self.h11 is not None and self.h11.they_are_waiting_for_100_continue:
            self.transport.write(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])))

    def _dispatch(self) -> None:
        req = self.req
        body = b"".join(self.body or ())
        self.body = None
        advance(self, REQUEST_DONE)
        # Nothing more is read until this request is answered: pipelined requests wait in
        # the kernel, not in our memory.
        self.transport.pause_reading()
        assert req is not None
        try:
            self.w.handle(self, req, body)
        except ProtocolError as e:
            self.respond_error(e)
        except Exception:  # a bug of ours: log it with its traceback, answer 500, keep serving
            # The path only: a query string can carry a token (?token=...).
            path = req.target.partition(b"?")[0][:200].decode("latin-1")
            log.exception("handler failed for %s %s", req.method.decode("latin-1"), path)
            self.respond_internal("internal server error")

    # -- answers ----------------------------------------------------------------------

    def respond(
        self,
        status: int,
        body: bytes,
        content_type: bytes = b"application/json",
        headers: list[tuple[bytes, bytes]] | tuple = (),
        close: bool = False,
    ) -> None:
        """Send a complete response; keep the connection for the next request if we can."""
        conn = self.h11
        if conn is None or self.state == CLOSED:
            return
        hdrs = [_SERVER, (b"content-type", content_type), (b"content-length", b"%d" % len(body))]
        hdrs.extend(headers)
        close = close or self.w.draining or conn.their_state is not h11.DONE
        if close:
            hdrs.append((b"connection", b"close"))
        try:
            out = conn.send(h11.Response(status_code=status, headers=hdrs, reason=_REASONS.get(status, b"")))
            if body and self.req is not None and self.req.method != b"HEAD":
                out += conn.send(h11.Data(data=body))
            out += conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError as e:
            log.debug("cannot answer %s: %s", self.ip, e)
            self.abort()
            return
        self.transport.write(out)
        self.served += 1
        if close or conn.our_state is h11.MUST_CLOSE:
            self.close()
            return
        # Keep-alive: start the next request cycle.
        conn.start_next_cycle()
        self.req = None
        advance(self, KEEP_ALIVE)
        self.line = 0
        self.inbound = 0
        self.w.arm_idle(self)
        self.next_request()

    def next_request(self) -> None:
        """Read and serve the next request -- unless the client is not reading our answers:
        while the transport is paused, pipelined requests wait in the kernel (not in our
        memory, not as answers piling up in the transport); ``resume_writing`` calls this
        again."""
        if self.state != HEAD or self.wpaused:
            return
        self.transport.resume_reading()
        # An answer given later (a broker round trip) must also serve requests that were
        # pipelined behind it and already sit in h11's buffer.
        if not self.driving:
            self.drive()

    def respond_json(self, status: int, obj: object, headers: list[tuple[bytes, bytes]] | tuple = ()) -> None:
        self.respond(status, orjson.dumps(obj), headers=headers)

    def respond_internal(self, detail: str) -> None:
        """A bug of ours (already logged by the caller): 500 and close."""
        self.respond(500, error_body("internal", detail), close=True)

    def respond_error(self, e: ProtocolError, close: bool = False) -> None:
        status = e.status_hint
        self.w.count_response(status)
        hdrs = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in e.headers]
        hdrs.extend(self.w.cors_headers(self))
        close = close or status >= 500 and status != 503
        self.respond(status, error_body(e.code, e.detail), headers=hdrs, close=close)

    def refuse(self, status: int, code: str, detail: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer a request we could not parse or read, or a connection refused as it was
        accepted (before any request), and close the connection."""
        self.w.count_response(status)
        conn = self.h11
        if conn is not None and conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = error_body(code, detail)
            extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
            hdrs = [_SERVER, (b"content-type", b"application/json"), *extra, (b"content-length", b"%d" % len(body)),
                    (b"connection", b"close")]
            try:
                out = conn.send(h11.Response(status_code=status, headers=hdrs, reason=_REASONS.get(status, b"")))
                out += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
                self.transport.write(out)
            except h11.LocalProtocolError:
                # h11 will not answer a peer it considers broken (e.g. a bad request line
                # means it never learned the HTTP version), nor one that has not asked yet
                # (refused at accept); write a minimal 1.1 answer.
                self.transport.write(
                    b"HTTP/1.1 %d %s\r\n%s\r\n\r\n%s"
                    % (status, _REASONS.get(status, b""), b"\r\n".join(b"%s: %s" % kv for kv in hdrs), body)
                )
        self.close()

    # -- streams ----------------------------------------------------------------------

    def start_stream(self, headers: list[tuple[bytes, bytes]], first: bytes) -> None:
        """Write the 200 head plus ``first`` (retry, reset, replay) and leave h11 behind."""
        conn = self.h11
        assert conn is not None
        head = conn.send(h11.Response(status_code=200, headers=[_SERVER, *headers], reason=b"OK"))
        self.chunked = conn.their_http_version != b"1.0"
        self.h11 = None
        self.req = None
        self.body = None
        self.inbound = 0
        advance(self, STREAM_OPEN)
        # Read again, only to notice the client closing (bytes are discarded, bounded).
        self.transport.resume_reading()
        self.transport.write(head + (_chunk(first) if self.chunked else first))

    def send_stream(self, payload: bytes) -> None:
        """Write SSE bytes (heartbeat, retry) to an open stream, framed as needed."""
        self.transport.write(_chunk(payload) if self.chunked else payload)

    def end_stream(self, last: bytes = b"") -> None:
        """Close a stream from our side: ``last`` (e.g. a retry hint), the last chunk, FIN."""
        if self.state != STREAM:
            if self.state != CLOSED:
                self.abort()  # not started (or already ending): nothing to say
            return
        advance(self, END)
        if self.chunked:
            self.transport.write(_chunk(last) + LAST_CHUNK)
        elif last:
            self.transport.write(last)
        self.close()

    def close(self) -> None:
        if self.state != CLOSED:
            advance(self, CLOSE)
            self.w.on_closing(self)
        self.transport.close()

    def abort(self) -> None:
        if self.state != CLOSED:
            advance(self, CLOSE)
            self.w.on_closing(self)
        self.transport.abort()


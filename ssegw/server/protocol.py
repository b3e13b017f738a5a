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
import time
from typing import Protocol, cast

import h11
import orjson

from ..core.conn import (
    BODY,
    CLOSE,
    CLOSED,
    DRAINING,
    END,
    HEAD,
    KEEP_ALIVE,
    REQUEST,
    REQUEST_DONE,
    RESPOND,
    STARTING,
    STREAM,
    STREAM_OPEN,
    Conn,
    advance,
)
from ..core.errors import ProtocolError
from ..core.sse import LAST_CHUNK
from ..core.sse import chunk as _chunk
from . import access

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


class Request:
    """A parsed request head: h11's Request, with its fields as a plain tuple and what the
    protocol needs of them read once.  Iterating h11's ``Headers`` (a ``Sequence`` read item
    by item) costs ~2 us a pass, and serving a publish looks at the fields several times
    (framing, auth, content type, keep-alive).  Immutable once built: one object may serve
    every request that sent the same head bytes (see ``_HEADS``)."""

    __slots__ = ("method", "target", "path", "query", "http_version", "headers", "framing", "length", "expect",
                 "keep_alive", "authorization", "content_type", "line_len")

    def __init__(self, req: h11.Request) -> None:
        self.method: bytes = req.method
        self.target: bytes = req.target
        path, _, query = req.target.partition(b"?")
        self.path: bytes = path
        self.query: bytes = query
        self.http_version: bytes = req.http_version
        #: (lower-cased name, value), in order
        self.headers: tuple[tuple[bytes, bytes], ...] = tuple(req.headers)
        framing = 0
        length = 0
        expect = False
        #: the first line of each, as handlers._header reads a field (every publish reads both)
        self.authorization: str | None = None
        self.content_type: str | None = None
        for name, value in self.headers:
            if name == b"content-length":
                framing |= 1
                length = int(value)  # h11 has validated it (digits, one value)
            elif name == b"transfer-encoding":
                framing |= 2
            elif name == b"expect":
                expect = value.lower() == b"100-continue"
            elif name == b"authorization":
                if self.authorization is None:
                    self.authorization = value.decode("latin-1")
            elif name == b"content-type":
                if self.content_type is None:
                    self.content_type = value.decode("latin-1")
        #: where the request line ends in the head (its LF), for the line limit; set by the
        #: protocol for heads it keeps (_HEADS)
        self.line_len = 0
        #: 0 no body, 1 Content-Length, 2 chunked, 3 both (refused)
        self.framing = framing
        self.length = length
        self.expect = expect
        self.keep_alive = _keep_alive(self)

    def field_list(self, name: bytes) -> str | None:
        """Every field line called ``name`` (lower case), joined with ``", "`` in order (RFC
        9110 5.3: a list-valued field may be split over several lines); None when there is
        none."""
        values = [v for k, v in self.headers if k == name]
        if not values:
            return None
        return b", ".join(values).decode("latin-1")


#: Heads already parsed, by their exact bytes: a publisher on a keep-alive connection sends
#: the same head again and again (only Content-Length varies, over a few values), and h11's
#: parse is ~30 us of the ~65 us a single publish may cost for 15,000 a second.  h11 stays
#: the parser: it parses every head the first time its bytes are seen, and a parse is a
#: function of the bytes alone (the checks made before it, size and line endings, too;
#: the limits that depend on the configuration are checked on every request).  Only heads
#: that parsed, are at most HEAD_CACHE_BYTES and are not chunked are kept; at
#: HEAD_CACHE_SIZE the cache is emptied (no LRU bookkeeping on the hot path): at most
#: ~1 MB a process, and a stream of distinct heads costs one dict insert each.
HEAD_CACHE_SIZE = 512
HEAD_CACHE_BYTES = 1024
_HEADS: dict[bytes, Request] = {}


#: The error code of a head h11 refuses, by the status it hints (400 otherwise).
_H11_CODES = {431: "header_too_large", 501: "not_implemented"}


def _keep_alive(req: Request) -> bool:
    """Whether the client lets the connection be reused after this request (what h11 would
    decide: HTTP/1.1 without ``Connection: close``; h11 does not do HTTP/1.0 keep-alive)."""
    if req.http_version != b"1.1":
        return False
    for name, value in req.headers:
        if name == b"connection" and b"close" in [t.strip() for t in value.lower().split(b",")]:
            return False
    return True


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

    def handle(self, p: HTTPProtocol, req: Request, body: bytes) -> None: ...

    def check_head(self, p: HTTPProtocol, req: Request) -> None: ...

    def arm_idle(self, p: HTTPProtocol) -> None: ...

    def count_protocol_error(self) -> None: ...

    def count_response(self, status: int) -> None: ...

    def cors_headers(self, p: HTTPProtocol) -> list[tuple[bytes, bytes]]: ...


class HTTPProtocol(Conn, asyncio.Protocol):
    __slots__ = ("w", "h11", "admin", "req", "body", "rx", "mark", "inbound", "held_ip", "driving", "served", "t0")

    # Narrows core's ``Conn.transport`` (the core does no I/O and may not import asyncio):
    # from connection_made on, a socket's transport.
    transport: asyncio.Transport

    def __init__(self, worker: Owner, admin: bool) -> None:
        self.init_conn()
        self.w = worker
        self.admin = admin
        # Only while a chunked request body is read: h11 decodes it.  Heads are parsed by a
        # throw-away h11.Connection each (see _read_head).
        self.h11: h11.Connection | None = None
        self.req: Request | None = None
        self.body: list[bytes] | None = None  # a chunked body's pieces
        self.rx: bytearray | None = None  # received, not yet parsed (head, body, pipelined)
        # A position in rx: in HEAD, how far it was searched for the end of the head; in
        # BODY (Content-Length framing), where the body ends.
        self.mark = 0
        self.inbound = 0  # bytes received (chunked body, or discarded bytes on a stream)
        self.held_ip = False  # holds a per-IP stream slot that must be released
        self.driving = False  # inside drive(): an answer must not re-enter it
        # Requests answered on this connection (keep-alive reuse); once it is a stream, the
        # events written to it (flow.py counts them; the stream's access line reports them).
        self.served = 0
        # time.monotonic() when the request being served began (its head was complete), or
        # the stream started; for the access line's duration.  8 B of slot + a 24 B float.
        self.t0 = 0.0

    # -- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # create_server / create_unix_server hand a stream protocol a full Transport.
        self.transport = cast(asyncio.Transport, transport)
        if not self.ip:  # else the client a PROXY protocol header named (acceptor.py)
            peer = transport.get_extra_info("peername")
            # One string per client address, not one per connection (~60 B each; many streams
            # share an address behind NAT or a proxy).  Addresses are a bounded set.
            self.ip = sys.intern(peer[0]) if peer else ""
        self.t0 = time.monotonic()
        self.w.on_connect(self)

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        advance(self, CLOSE)
        if was == STREAM or was == DRAINING:
            # Not closed by us (that logged already): the client went away.  A socket timeout
            # is TCP_USER_TIMEOUT or keepalive giving up on a silent peer.
            self._access_stream("client_closed" if exc is None else
                                "dead_peer" if isinstance(exc, TimeoutError) else "client_reset", False)
        self.h11 = None
        self.req = None
        self.body = None
        self.rx = None
        self.w.on_close(self)

    def eof_received(self) -> bool:
        # A half-closed client will not read our answer either; close now (False) rather
        # than keep a half-open socket around.  A stream closes here, while its socket is
        # still open, so that its access line can read what the client acknowledged.
        if self.state == STREAM:
            self.close("client_closed")
        return False

    def pause_writing(self) -> None:
        self.w.on_pause(self)

    def resume_writing(self) -> None:
        self.w.on_resume(self)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state > STARTING:
            # A stream: nothing is expected from the client; a stray pipelined request or
            # keepalive probe is tolerated and discarded, bounded.
            self.inbound += len(data)
            if self.inbound > MAX_STREAM_INBOUND:
                self.w.count_protocol_error()
                self.abort("protocol_error")
            return
        if state == HEAD and self.rx is None and not self.driving and not self.wpaused:
            # A keep-alive publisher's common case: one whole request in one read, with a
            # head seen before (_HEADS) and its Content-Length body exactly behind it.  The
            # same steps as drive() takes, without copying the bytes to ``rx`` and back.  A
            # kept head has no bare LF, so its first CRLFCRLF is where _HEAD_END ends it.
            end = data.find(b"\r\n\r\n", 0, HEAD_CACHE_BYTES) + 4
            if end > 3:  # (a kept head is at most HEAD_CACHE_BYTES: no longer one is looked up)
                req = _HEADS.get(data[:end])
                if req is not None and len(data) - end == req.length:
                    self.driving = True
                    try:
                        if self._fits(req, end) and self._on_request(req, None, req.length):
                            self.mark = 0
                            self._dispatch(data[end:] if req.length else b"")
                    finally:
                        self.driving = False
                    return
        conn = self.h11
        if conn is not None:  # a chunked body: h11 decodes it
            try:
                conn.receive_data(data)
            except RuntimeError:  # data after the client closed its side: nothing to parse
                return
        elif self.rx is None:
            self.rx = bytearray(data)
        else:
            self.rx += data
        self.drive()

    # -- request cycle ----------------------------------------------------------------
    #
    # Why heads are cut out here and only they go to h11: h11 is the parser of request
    # heads (and of chunked bodies), but a full h11 request/response cycle costs ~100 us a
    # request on this class of machine, against ~30 us for the head alone (measured with
    # tuning.md's publish-ingest benchmark).  So the connection keeps the received bytes
    # itself (``rx``): it finds the end of the head, checks its size and line endings, gives
    # exactly those bytes to a fresh h11.Connection (~2 us) and takes the Request; a
    # Content-Length body is then sliced from ``rx``, answers are written as bytes, and
    # whatever follows in ``rx`` is the next, pipelined request.  h11 never holds a body or
    # a pipelined request, and an idle keep-alive connection holds no parser (~1.5 KB).

    def drive(self) -> None:
        """Parse and serve requests from ``rx`` until more data is needed or a handler
        takes over."""
        if self.driving:
            return
        self.driving = True
        try:
            while True:
                state = self.state
                if state == HEAD:
                    if self.wpaused:
                        # The client is not reading our answers: parse nothing more (the next
                        # answer would only pile up) and read nothing more (pipelined
                        # requests wait in the kernel); next_request resumes both.
                        if self.rx and self.transport.is_reading():
                            self.transport.pause_reading()
                        return
                    if not self._read_head():
                        return
                elif state != BODY or not self._read_body():
                    return
        finally:
            self.driving = False

    def _read_head(self) -> bool:
        """Parse the head at the start of ``rx`` if it is complete; False if more data is
        needed or the request was refused."""
        rx = self.rx
        if not rx:
            return False
        cfg = self.w.cfg
        line_limit = min(MAX_REQUEST_LINE, cfg.max_head_size)
        end_m = _HEAD_END.search(rx, max(0, self.mark - 2))
        if end_m is None:
            # Incomplete: refuse as soon as a limit is passed, not once the head is whole.
            n = len(rx)
            if rx.find(b"\n", 0, line_limit + 1) < 0 and n > line_limit:
                self.refuse(414, "uri_too_long", f"request line is longer than {line_limit} bytes")
            elif n > cfg.max_head_size:
                self.w.count_protocol_error()
                self.refuse(431, "header_too_large", f"request head is larger than max_head_size ({cfg.max_head_size} bytes)")
            else:
                self.mark = n
            return False
        end = end_m.end()
        self.mark = 0
        nl = rx.find(b"\n", 0, end)
        if not self._line_fits(nl, end, line_limit):
            return False
        head = bytes(rx[:end])
        del rx[:end]  # O(1): a bytearray drops its front without moving the rest
        if not rx:
            self.rx = None  # an idle keep-alive connection holds no buffer
        known = _HEADS.get(head)
        if known is not None:
            return self._on_request(known, None)
        if _LOOSE_HEAD.search(head) is not None:
            self.w.count_protocol_error()
            self.refuse(400, "bad_request", "request head has a bare LF line ending or an obs-fold line")
            return False
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=cfg.max_head_size + 2)
        conn.receive_data(head)
        try:
            ev = conn.next_event()
        except h11.RemoteProtocolError as e:
            status = e.error_status_hint or 400
            self.w.count_protocol_error()
            # h11's messages may quote the offending line (a token, a cookie): keep only the
            # part before the quote, in the log and in the answer.
            what = str(e).split(":", 1)[0] or "malformed request"
            log.debug("malformed request from %s: %s", self.ip, what)
            self.refuse(status, _H11_CODES.get(status, "bad_request"), what)
            return False
        if type(ev) is not h11.Request:  # cannot be: the head given was complete
            self.w.count_protocol_error()
            self.refuse(400, "bad_request", "malformed request")
            return False
        req = Request(cast(h11.Request, ev))
        req.line_len = nl
        if req.framing < 2 and end <= HEAD_CACHE_BYTES:
            if len(_HEADS) >= HEAD_CACHE_SIZE:
                _HEADS.clear()
            _HEADS[head] = req
        return self._on_request(req, conn)

    def _line_fits(self, nl: int, end: int, line_limit: int) -> bool:
        """The request line (its LF at ``nl``) and the head (``end`` bytes) are within the
        limits; refuses (414, 431) and returns False otherwise."""
        if nl > line_limit:  # the line up to and including its CR
            self.refuse(414, "uri_too_long", f"request line is longer than {line_limit} bytes")
            return False
        max_head = self.w.cfg.max_head_size
        if end > max_head + 2:
            self.w.count_protocol_error()
            self.refuse(431, "header_too_large", f"request head is larger than max_head_size ({max_head} bytes)")
            return False
        return True

    def _fits(self, req: Request, end: int) -> bool:
        """A kept head within this worker's limits (checked on every request: the limits
        may differ from those it was kept under); refuses it otherwise."""
        cfg = self.w.cfg
        return self._line_fits(req.line_len, end, min(MAX_REQUEST_LINE, cfg.max_head_size))

    def _on_request(self, req: Request, conn: h11.Connection | None, ready: int = -1) -> bool:
        """Take a parsed head (``conn``: the h11 connection that parsed it, None for a head
        served from ``_HEADS``; only a chunked request needs it, and those are never kept;
        ``ready``: bytes of the body already received, -1: those in ``rx``)."""
        self.req = req
        self.t0 = time.monotonic()
        self.inbound = 0
        advance(self, REQUEST)
        cfg = self.w.cfg
        if req.http_version not in (b"1.1", b"1.0"):
            # h11 parses any HTTP/x.y; we speak 1.0 and 1.1 only (RFC 9110 15.6.6).
            self.w.count_protocol_error()
            self.refuse(505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served")
            return False
        framing = req.framing
        length = req.length
        if length > cfg.max_body:
            self.refuse(413, "payload_too_large", f"body is over max_body ({cfg.max_body} bytes)")
            return False
        if framing == 3:
            # Both framings: the classic request-smuggling shape.  h11 would let
            # Transfer-Encoding win (RFC 9112 6.3 allows that), but an intermediary may have
            # read it the other way; refuse and close, so nothing behind it on this
            # connection is ever executed (RFC 9112 6.1: "ought to be handled as an error").
            # h11 itself refuses duplicated Transfer-Encoding, codings other than chunked
            # (501) and contradictory Content-Length lines; identical Content-Length lines
            # it reads as one.
            self.w.count_protocol_error()
            self.refuse(400, "bad_framing", "request has both Content-Length and Transfer-Encoding")
            return False
        try:
            # Refusals decided from the head come before the body is read and before any
            # 100 Continue (auth, denied addresses): the body is never buffered for them.
            self.w.check_head(self, req)
        except ProtocolError as e:
            self.respond_error(e, close=True)
            return False
        rx = self.rx
        if framing == 2:
            # Chunked: h11, which has seen the head, decodes the body from here on.
            assert conn is not None  # chunked heads are never served from _HEADS
            self.h11 = conn
            self.body = []
            if rx:
                conn.receive_data(bytes(rx))
            self.rx = None
        else:
            self.mark = length
        if ready < 0:
            ready = len(rx or b"")
        if req.expect and req.http_version == b"1.1" and (framing == 2 or ready < length):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def _read_body(self) -> bool:
        """Take the request's body once it is all here and dispatch it; False if more data is
        needed, the request was refused, or its answer is pending."""
        conn = self.h11
        if conn is None:
            n = self.mark
            rx = self.rx
            if not n:
                body = b""
            elif rx is None or len(rx) < n:
                return False
            else:
                self.mark = 0  # from here on a position in the next head
                body = bytes(rx[:n])
                del rx[:n]
                if not rx:
                    self.rx = None
            return self._dispatch(body)
        while True:  # chunked
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                self.w.count_protocol_error()
                self.refuse(e.error_status_hint or 400, "bad_request", str(e).split(":", 1)[0] or "malformed body")
                return False
            t = type(ev)
            if t is h11.Data:
                data = cast(h11.Data, ev).data
                self.inbound += len(data)
                if self.inbound > self.w.cfg.max_body:
                    self.refuse(413, "payload_too_large", f"body is over max_body ({self.w.cfg.max_body} bytes)")
                    return False
                assert self.body is not None
                self.body.append(data)
            elif t is h11.EndOfMessage:
                rest = conn.trailing_data[0]  # the next, pipelined request (a copy; rare)
                self.h11 = None
                self.rx = bytearray(rest) if rest else None
                body = b"".join(self.body or ())
                self.body = None
                return self._dispatch(body)
            elif t is h11.ConnectionClosed:
                self.close()
                return False
            else:  # NEED_DATA
                return False

    def _dispatch(self, body: bytes) -> bool:
        """Serve the request; True if it was answered and the next one may be read."""
        req = self.req
        advance(self, REQUEST_DONE)
        assert req is not None
        try:
            self.w.handle(self, req, body)
        except ProtocolError as e:
            self.respond_error(e)
        except Exception:  # a bug of ours: log it with its traceback, answer 500, keep serving
            log.exception("handler failed for %s %s", req.method.decode("latin-1"), access.path_of(req.target))
            self.respond_internal("internal server error")
        if self.state in (RESPOND, STARTING):
            # Answered later (a broker round trip, a replay): nothing more is read until
            # then, so pipelined requests wait in the kernel, not in our memory (at most
            # what one read brought sits in ``rx``); next_request or start_stream reads again.
            self.transport.pause_reading()
            return False
        return self.state == HEAD

    # -- answers ----------------------------------------------------------------------

    def respond(
        self,
        status: int,
        body: bytes,
        content_type: bytes = b"application/json",
        headers: list[tuple[bytes, bytes]] | tuple = (),
        close: bool = False,
        error: str = "",
    ) -> None:
        """Send a complete response; keep the connection for the next request if we can.

        Args:
            error: the error code of an error answer, for the access line.
        """
        req = self.req
        if req is None or self.state == CLOSED:
            return
        # Close when asked, when draining, when the request's body was not read (an answer
        # decided from the head), and when the client does not keep connections alive.
        close = close or self.w.draining or self.state != RESPOND or not req.keep_alive
        extra = b"".join([b"%s: %s\r\n" % (k, v) for k, v in headers]) if headers else b""
        data = b"HTTP/1.1 %d %s\r\nserver: ssegw\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s%s%s" % (
            status, _REASONS.get(status, b""), content_type, len(body), extra,
            b"connection: close\r\n\r\n" if close else b"\r\n", body if req.method != b"HEAD" else b"")
        self.transport.write(data)
        self.served += 1
        if access.STATE.on:
            self._access(status, len(data), error)
        if close:
            self.close()
            return
        # Keep-alive: start the next request cycle.
        self.req = None
        advance(self, KEEP_ALIVE)
        self.w.arm_idle(self)
        self.next_request()

    def next_request(self) -> None:
        """Read and serve the next request -- unless the client is not reading our answers:
        while the transport is paused, pipelined requests wait in the kernel (not in our
        memory, not as answers piling up in the transport); ``resume_writing`` calls this
        again."""
        if self.state != HEAD or self.wpaused:
            return
        if not self.transport.is_reading():
            self.transport.resume_reading()
        # An answer given later (a broker round trip) must also serve requests that were
        # pipelined behind it and already sit in ``rx``.
        if not self.driving:
            self.drive()

    def respond_json(self, status: int, obj: object, headers: list[tuple[bytes, bytes]] | tuple = ()) -> None:
        self.respond(status, orjson.dumps(obj), headers=headers)

    def respond_internal(self, detail: str) -> None:
        """A bug of ours (already logged by the caller): 500 and close."""
        self.respond(500, error_body("internal", detail), close=True, error="internal")

    def respond_error(self, e: ProtocolError, close: bool = False) -> None:
        status = e.status_hint
        self.w.count_response(status)
        hdrs = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in e.headers]
        hdrs.extend(self.w.cors_headers(self))
        close = close or status >= 500 and status != 503
        self.respond(status, error_body(e.code, e.detail), headers=hdrs, close=close, error=e.code)

    def refuse(self, status: int, code: str, detail: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer a request we could not parse or read, or a connection refused as it was
        accepted (before any request), and close the connection."""
        self.w.count_response(status)
        if self.state <= RESPOND:  # no answer, or stream head, written for this request yet
            body = error_body(code, detail)
            extra = b"".join(b"%s: %s\r\n" % (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers)
            data = (
                b"HTTP/1.1 %d %s\r\nserver: ssegw\r\ncontent-type: application/json\r\n%scontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, _REASONS.get(status, b""), extra, len(body), body)
            )
            self.transport.write(data)
            if access.STATE.on:
                self._access(status, len(data), code)
        self.close()

    def _access(self, status: int, nbytes: int, error: str) -> None:
        """The access line of an answered request (or of a connection refused before any)."""
        now = time.monotonic()
        if not (status < 400 and self.admin):
            req = self.req
            access.request_line(req.method if req is not None else None, req.target if req is not None else None,
                                status, now - self.t0, nbytes, self.ip, error, self.admin)
        # Keep-alive: a next request's duration counts from its own head; a refusal without
        # a request, from here (the end of the last answer) or the connection's start.
        self.t0 = now

    def _access_stream(self, reason: str, sock_open: bool = True) -> None:
        """The access line of a stream that ended (``reason``: who or what ended it;
        ``sock_open``: its socket can still be asked what the client acknowledged)."""
        access.stream_line(time.monotonic() - self.t0, self.topics, reason, self.ip, self.served,
                           self.transport if sock_open else None)

    # -- streams ----------------------------------------------------------------------

    def start_stream(self, headers: list[tuple[bytes, bytes]], first: bytes) -> None:
        """Write the 200 head plus ``first`` (retry, reset, replay); the rest of the
        connection is the stream.

        Framing (RFC 9112 6.1, 7.1): chunked for an HTTP/1.1 client, close-delimited for an
        HTTP/1.0 one (which cannot read chunked).
        """
        req = self.req
        assert req is not None
        self.chunked = req.http_version != b"1.0"
        out = [b"HTTP/1.1 200 OK\r\nserver: ssegw\r\n"]
        for k, v in headers:
            out.append(b"%s: %s\r\n" % (k, v))
        if self.chunked:
            out.append(b"transfer-encoding: chunked\r\n")
        if not req.keep_alive:
            out.append(b"connection: close\r\n")
        out.append(b"\r\n")
        self.h11 = None
        self.req = None
        self.body = None
        self.rx = None
        self.inbound = 0
        self.served = 0  # from here on: events written
        self.t0 = time.monotonic()
        advance(self, STREAM_OPEN)
        # Read again, only to notice the client closing (bytes are discarded, bounded).
        if not self.transport.is_reading():
            self.transport.resume_reading()
        out.append(_chunk(first) if self.chunked else first)
        self.transport.write(b"".join(out))

    def send_stream(self, payload: bytes) -> None:
        """Write SSE bytes (heartbeat, retry) to an open stream, framed as needed."""
        self.transport.write(_chunk(payload) if self.chunked else payload)

    def end_stream(self, last: bytes = b"", reason: str = "server") -> None:
        """Close a stream from our side: ``last`` (e.g. a retry hint), the last chunk, FIN.
        ``reason`` goes into the access line (lifetime, token_expired, drain, shutdown)."""
        if self.state != STREAM:
            if self.state != CLOSED:
                self.abort(reason)  # not started (or already ending): nothing to say
            return
        advance(self, END)
        if self.chunked:
            self.transport.write(_chunk(last) + LAST_CHUNK)
        elif last:
            self.transport.write(last)
        self.close(reason)

    def close(self, reason: str = "server") -> None:
        """Close after what was written; ``reason`` names why, for a stream's access line."""
        if self.state != CLOSED:
            was = self.state
            advance(self, CLOSE)
            if was == STREAM or was == DRAINING:
                self._access_stream(reason)  # before on_closing takes its topics
            self.w.on_closing(self)
        self.transport.close()

    def abort(self, reason: str = "error") -> None:
        """Close now, discarding what is not sent; ``reason`` as for :meth:`close`."""
        if self.state != CLOSED:
            was = self.state
            advance(self, CLOSE)
            if was == STREAM or was == DRAINING:
                self._access_stream(reason)
            self.w.on_closing(self)
        self.transport.abort()


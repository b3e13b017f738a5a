"""Proxy routes: each client request under a route's ``path`` is its own upstream stream.

Strategy (docs/api.md "Upstream routes", ``mode = "proxy"``).
- The request passes the gateway's own checks first, in the order ``GET /events`` uses:
  admission (address, capacity, rate, per-IP), then the token when subscribers need one.  Only
  then is the upstream asked, with the client's ``Authorization`` and ``Last-Event-ID``
  forwarded and the route's ``headers`` added.
- The upstream's answer decides the client's: a ``200 text/event-stream`` starts the client's
  stream (the gateway's SSE headers, ``retry:``, heartbeats); an upstream 4xx is answered with
  the same status and ``{"error": "upstream_refused", ...}``; anything else is 502
  ``bad_gateway``.  Nothing of a failed upstream answer is passed on.
- Events are parsed (the bounded parser) and re-encoded one complete event at a time, so a
  heartbeat can never land inside an event.  The upstream's ids go to the client unchanged: no
  history here, and a reconnecting client's ``Last-Event-ID`` is the upstream's to resolve.
- The slow-consumer policy ``drop`` holds: a client whose unsent output passes ``max_buffer``
  is closed (it reconnects with its last id), besides the wheel's stall verdict every stream
  gets.  A client that goes away cancels its relay task, which closes the upstream request
  (Context._detach); an upstream that ends or fails ends the client's stream with a jittered
  ``retry:``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

from ..config import RouteRule
from ..core.conn import ACCEPT_STREAM, CLOSED, START_FAILED, STREAM, advance
from ..core.errors import BadRequest, ProtocolError
from ..core.sse import encode_retry
from ..core.sseparse import SSEParser, UpEvent
from .upstream_client import Target, UpstreamFailure, UpstreamStream

if TYPE_CHECKING:
    from .context import Context
    from .protocol import HTTPProtocol, Request

log = logging.getLogger("ssegw.upstream")

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store, no-transform"),
    (b"x-accel-buffering", b"no"),
]
_OPEN_COMMENT = b": ok\n\n"


class Proxies:
    """A worker's proxied streams (one per Context, when any proxy route is configured)."""

    def __init__(self, w: Context) -> None:
        self.w = w
        self.targets = {id(r): Target(r) for r in w.cfg.routes if r.mode == "proxy"}
        self.relays: dict[HTTPProtocol, asyncio.Task[None]] = {}
        self.stall_s = 2 * w.cfg.heartbeat_interval + 1.0
        self.opened = 0
        self.refused = 0

    def forget(self, p: HTTPProtocol) -> None:
        """The client's connection closed: stop its relay (closing the upstream request)."""
        task = self.relays.pop(p, None)
        if task is not None:
            task.cancel()

    def open(self, p: HTTPProtocol, req: Request, route: RouteRule, path: bytes, query: bytes,
             headers: dict[bytes, bytes], ip: str) -> None:
        """Start the upstream request for an admitted, authorized client request."""
        w = self.w
        if p.timer is not None:
            assert w.wheel is not None
            w.wheel.cancel(p.timer)
            p.timer = None
        advance(p, ACCEPT_STREAM)
        extra = [(k, v) for k, v in headers.items() if k in (b"authorization", b"last-event-id")]
        rest = path[len(route.path):].decode("latin-1")
        t = self.targets[id(route)]
        target = t.target(rest, query.decode("latin-1"))
        task = asyncio.get_running_loop().create_task(self._relay(p, t, target, extra))
        self.relays[p] = task

    async def _relay(self, p: HTTPProtocol, t: Target, target: str, extra: list[tuple[bytes, bytes]]) -> None:
        w = self.w
        cfg = w.cfg
        stream = UpstreamStream(SSEParser(cfg.max_body, cfg.max_body), self.stall_s, cfg.max_head_size)
        try:
            try:
                await stream.open(t, target, extra, None)
            except UpstreamFailure as e:
                self.refused += 1
                if p.state == CLOSED:
                    return
                advance(p, START_FAILED)
                status = stream.status
                if 400 <= status < 500:
                    p.respond_error(ProtocolError(f"upstream refused the stream: {e.detail}", status_hint=status,
                                                  code="upstream_refused"), close=True)
                else:
                    log.debug("proxied stream %s: %s", target[:200], e.detail)
                    p.respond_error(ProtocolError(f"upstream unavailable: {e.detail}", status_hint=502,
                                                  code="bad_gateway"), close=True)
                return
            if p.state == CLOSED:
                return
            self.opened += 1
            cors = w.cors_headers(p)
            p.start_stream(_HEADERS + cors, _OPEN_COMMENT + encode_retry(w.retry_ms))
            now = w.now_ms()
            p.last_write_ms = p.progress_ms = now
            w.streams_opened += 1
            w.schedule_heartbeat(p)
            reason = "closed"
            try:
                await stream.events(lambda evs: self._write(p, evs))
            except UpstreamFailure as e:
                reason = e.reason
            if p.state == STREAM:
                p.end_stream(encode_retry(w.jittered_retry()), "upstream_" + reason)
        finally:
            stream.close()
            if self.relays.get(p) is asyncio.current_task():
                del self.relays[p]

    def _write(self, p: HTTPProtocol, evs: list[UpEvent]) -> None:
        if p.state != STREAM:
            raise UpstreamFailure("closed", "client gone")
        out = []
        for ev in evs:
            if ev.id is not None:
                out.append(b"id: " + ev.id.encode("utf-8") + b"\n")
            if ev.event is not None:
                out.append(b"event: " + ev.event.encode("utf-8") + b"\n")
            for line in ev.data.split("\n"):
                out.append(b"data: " + line.encode("utf-8") + b"\n")
            out.append(b"\n")
        p.send_stream(b"".join(out))
        w = self.w
        p.last_write_ms = w.now_ms()
        p.served += len(evs)
        if p.transport.get_write_buffer_size() > w.cfg.max_buffer + w.write_high:
            w.drop(p, "buffer")  # slow_consumer drop: it reconnects with its last id

    def snapshot(self) -> dict[str, object]:
        return {"upstream_proxied": len(self.relays), "upstream_proxy_opened": self.opened,
                "upstream_proxy_refused": self.refused}


def open_proxy(w: Context, p: HTTPProtocol, req: Request, route: RouteRule, path: bytes, query: bytes) -> None:
    """``GET`` under a proxy route's prefix: admission, token, then the upstream."""
    proxies = w.proxies
    assert isinstance(proxies, Proxies)
    if req.method != b"GET":
        raise ProtocolError("use GET on a proxied stream", status_hint=405, code="method_not_allowed",
                            headers=(("Allow", "GET"),))
    rest = path[len(route.path):]
    if any(seg in (b".", b"..") for seg in unquote_to_bytes(rest).split(b"/")):
        raise BadRequest("a proxied path must not contain '.' or '..' segments", code="bad_path")
    headers: dict[bytes, bytes] = {}
    for k, v in req.headers:
        headers.setdefault(k, v)
    counted = p.held_ip  # the per-IP slot was taken at accept (else admit_stream takes it here)
    ip = w.admit_stream(p, req)
    if w.subscribe_auth:
        authz = headers.get(b"authorization")
        cookie = headers.get(b"cookie")
        token = w.auth.token_from(authz.decode("latin-1") if authz else None, None,
                                  cookie.decode("latin-1") if cookie else None)
        try:
            w.auth.authorize_subscribe(token, [], time.time())
        except ProtocolError as e:
            w.count_auth_failure(e)
            w.unadmit_stream(p, ip, counted)
            raise
    proxies.open(p, req, route, path, query, headers, ip)

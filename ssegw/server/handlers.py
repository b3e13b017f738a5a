"""Routes of the public and admin listeners (docs/api.md: Subscribe, Publish, Admin).

Every handler either answers through the protocol (``respond*``/``start_stream``) or raises
a :class:`~ssegw.core.errors.ProtocolError`, which the protocol turns into the status and
JSON error body.  Nothing here writes to a socket directly.

Order of checks for ``GET /events`` (first failure answers): query syntax (400), admission
(403 denied address, 503 draining/at capacity, 429 rate or per-IP count), then the token
(401/403).  Admission comes before the token so that a denied or rate-limited address cannot
make us verify signatures; with only ``publish_keys`` configured, subscribing stays open.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import time
from collections.abc import Coroutine
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson

from ..broker.base import BrokerUnavailable, PublishUnresolved, Replay
from ..core.conn import ACCEPT_STREAM, CLOSED, START_FAILED, STARTING, advance
from ..core.errors import (
    BadRequest,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    OutcomeUnknown,
    ProtocolError,
    Unavailable,
    UnsupportedMediaType,
)
from ..core.ids import parse_id
from ..core.publish import parse_publish, topics_of
from ..core.sse import encode_compacted, encode_reset, encode_retry
from ..core.topics import validate_topic
from ..metrics import CONTENT_TYPE, make_registry, render
from .context import Context
from .protocol import HTTPProtocol, Request
from .proxy import open_proxy

log = logging.getLogger("ssegw.http")

#: Most query parameters we look at (bounds parse_qsl on hostile query strings).
MAX_QUERY_FIELDS = 256
_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store, no-transform"),
    (b"x-accel-buffering", b"no"),
]
_OPEN_COMMENT = b": ok\n\n"


def _header(req: Request, name: bytes) -> str | None:
    for k, v in req.headers:
        if k == name:
            return v.decode("latin-1")
    return None


def handle(w: Context, p: HTTPProtocol, req: Request, body: bytes) -> None:
    path = req.path
    query = req.query
    method = req.method
    if p.admin:
        _admin(w, p, req, path)
        return
    if path == b"/events":
        if method == b"GET":
            open_stream(w, p, req, query)
        elif method == b"OPTIONS":
            preflight(w, p, req, b"GET, OPTIONS")
        else:
            raise MethodNotAllowed("use GET on /events", headers=(("Allow", "GET, OPTIONS"),))
    elif path == b"/publish":
        if method == b"POST":
            publish(w, p, req, body)
        elif method == b"OPTIONS":
            preflight(w, p, req, b"POST, OPTIONS")
        else:
            raise MethodNotAllowed("use POST on /publish", headers=(("Allow", "POST, OPTIONS"),))
    elif path == b"/" and w.cfg.demo:
        if method != b"GET":
            raise MethodNotAllowed("use GET on /", headers=(("Allow", "GET"),))
        from ..demo import PAGE

        p.respond(200, PAGE, content_type=b"text/html; charset=utf-8")
    elif w.proxies is not None and (route := w.cfg.proxy_route(path.decode("latin-1"))) is not None:
        open_proxy(w, p, req, route, path, query)  # a proxy route's prefix (server/proxy.py)
    else:
        raise NotFound(f"no such path: {path[:200].decode('latin-1')}")


# -- CORS -------------------------------------------------------------------------------


def cors_headers(w: Context, p: HTTPProtocol) -> list[tuple[bytes, bytes]]:
    origins = w.cfg.cors_origins
    req = p.req
    if not origins or req is None:
        return []
    origin = _header(req, b"origin")
    if origin is None:
        return []
    creds = w.cfg.cors_credentials
    if origin.lower() in origins:
        allow = origin
    elif "*" in origins:
        allow = origin if creds else "*"
    else:
        return []
    out = [(b"access-control-allow-origin", allow.encode("latin-1")), (b"vary", b"Origin")]
    if creds:
        out.append((b"access-control-allow-credentials", b"true"))
    return out


def preflight(w: Context, p: HTTPProtocol, req: Request, methods: bytes) -> None:
    hdrs = cors_headers(w, p)
    if hdrs:
        asked = _header(req, b"access-control-request-headers")
        hdrs += [
            (b"access-control-allow-methods", methods),
            (b"access-control-allow-headers",
             asked.encode("latin-1") if asked else b"Content-Type, Authorization, Last-Event-ID"),
            (b"access-control-max-age", b"600"),
        ]
    hdrs.append((b"allow", methods))
    p.respond(204, b"", headers=hdrs)


# -- subscribe --------------------------------------------------------------------------


def parse_subscribe(w: Context, req: Request, query: bytes) -> tuple[tuple[str, ...], str | None, str | None, str | None]:
    """(topics, since, last_event_id, query_token) from a ``/events`` request; 400 if bad."""
    try:
        fields = parse_qsl(query.decode("latin-1"), keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS,
                           encoding="utf-8", errors="strict")
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed query string: {e}", code="bad_query") from None
    topics: list[str] = []
    since = last_id = token = None
    for k, v in fields:
        if k == "topic":
            if v not in topics:
                topics.append(v)
        elif k == "since":
            since = v
        elif k == "last_event_id":
            last_id = v
        elif k == "token":
            token = v
    if not topics:
        raise BadRequest("missing topic: give one or more topic=NAME", code="bad_topic")
    if len(topics) > w.cfg.max_topics_per_conn:
        raise BadRequest(f"too many topics: {len(topics)} > max_topics_per_conn ({w.cfg.max_topics_per_conn})",
                         code="too_many_topics")
    for t in topics:
        validate_topic(t)
    if since is not None and since not in ("last", "earliest", "snapshot"):
        raise BadRequest("since must be 'last', 'earliest' or 'snapshot'", code="bad_since")
    if since == "snapshot" and not w.broker.keyed:
        raise BadRequest(f"since=snapshot is not supported by the {w.broker.kind} broker", code="bad_since")
    header_id = _header(req, b"last-event-id")
    if header_id is not None and header_id.strip():
        last_id = header_id.strip()
    elif last_id is not None and not last_id:
        last_id = None
    return tuple(topics), since, last_id, token


def open_stream(w: Context, p: HTTPProtocol, req: Request, query: bytes) -> None:
    topics, since, last_id, qtoken = parse_subscribe(w, req, query)
    after = parse_id(last_id) if last_id is not None else None
    # Admission before token verification (Context.admit_stream).
    counted = p.held_ip  # the per-IP slot was taken at accept (else admit_stream takes it here)
    ip = w.admit_stream(p, req)
    principal = None
    if w.subscribe_auth:
        token = w.auth.token_from(req.authorization, qtoken, _header(req, b"cookie"))
        try:
            principal = w.auth.authorize_subscribe(token, list(topics), time.time())
        except ProtocolError as e:
            w.count_auth_failure(e)
            w.unadmit_stream(p, ip, counted)
            raise
    # The head is complete: the head timer's job is done.
    if p.timer is not None:
        assert w.wheel is not None
        w.wheel.cancel(p.timer)
        p.timer = None
    args = (topics, after, since, principal)
    if not w.stream_gate():
        # A reconnect storm: stream starts are paced (worker.START_SHARE) so that replays
        # do not starve the streams already open; this one waits its turn.
        w.parked.append((p, args))
        return
    w.start_stream(p, args)


def begin_stream(w: Context, p: HTTPProtocol, topics: tuple[str, ...], after: tuple[str, tuple[int, ...]] | None,
                 since: str | None, principal: object) -> None:
    """Subscribe, replay and start a stream whose request passed every check."""
    if p.state == CLOSED:
        return
    # Subscribe first and hold live events (state STARTING) while the replay is fetched;
    # the replay and the held events are merged (duplicates removed by sequence) when the
    # stream starts.
    advance(p, ACCEPT_STREAM)
    w.subscribe(p, topics)
    cors = cors_headers(w, p)
    broker = w.broker
    done = broker.replay_now(topics, after, since)
    if done is not None:
        _start(w, p, done, principal, cors)
        return
    task = asyncio.get_running_loop().create_task(broker.replay(topics, after, since))
    task.add_done_callback(lambda t: _replayed(w, p, t, principal, cors))


def _replayed(w: Context, p: HTTPProtocol, task: asyncio.Task, principal: object, cors: list) -> None:
    if p.state != STARTING:
        return
    exc = task.exception()
    if exc is not None:
        w.replay_errors += 1
        w.abandon_stream(p)
        advance(p, START_FAILED)
        # The connection was subscribed a moment ago: the answer closes it, so nothing of a
        # stream can follow it on a connection the client might reuse.
        if isinstance(exc, BrokerUnavailable):
            p.respond_error(Unavailable("history is unavailable, retry", headers=(("Retry-After", "1"),)), close=True)
        else:
            log.error("replay failed", exc_info=exc)
            p.respond_internal("replay failed")
        return
    _start(w, p, task.result(), principal, cors)


def _start(w: Context, p: HTTPProtocol, replay: Replay, principal: object, cors: list) -> None:
    parts = [_OPEN_COMMENT, encode_retry(w.retry_ms)]
    if replay.reset:
        parts.append(encode_reset(replay.reset))
        w.resets += 1
    if replay.compacted:
        parts.append(encode_compacted(replay.compacted))
        w.compacted += 1
    w.events_replayed += len(replay.events)
    floors = replay.floors
    # What the stream owes: the replay, then events held while it was fetched, minus
    # those the replay already covered.  All of it is paced out as the client reads
    # (server/flow.py), never joined and written whole.
    held = p.backlog
    p.backlog = None
    owed = list(replay.events)
    if held is not None:
        owed.extend(e for e in held.take(1 << 62) if e.seq > floors.get(e.topic, 0))
    # Events still in a batch (or on their way from the broker) at or under a topic's floor
    # were part of the replay: the fan-out skips them (core/fanout.py "Replay floors").
    p.floor = dict(floors) if floors else None
    now = w.now_ms()
    p.start_stream(_STREAM_HEADERS + cors, b"".join(parts))
    p.last_write_ms = p.progress_ms = now
    if p.wpaused and w.fanout.conflate_only(p):
        w.flow.user_timeout(p, False)  # paused before it was a stream: see Context.on_pause
    if owed and w.fanout.hold(p, owed, now, True):
        w.drop(p, "buffer")
        return
    w.flow.pump(p, now)
    if p.state == CLOSED:
        return
    w.streams_opened += 1
    w.schedule_heartbeat(p)
    if w.cfg.max_lifetime > 0:
        life = w.cfg.max_lifetime * 1000
        w.set_deadline(p, now + int(life + random.uniform(0, life * 0.1)), w.T_LIFETIME)
    exp = getattr(principal, "exp", None)
    if exp is not None:
        w.set_deadline(p, now + max(0, int((exp - time.time()) * 1000)), w.T_EXPIRE)
    if w.draining:
        # Started after the drain began (its replay was in flight): close it within the
        # drain window like the others.
        w.set_deadline(p, now + int(random.uniform(0, w.cfg.drain_timeout * 500)), w.T_DRAIN)


# -- publish ----------------------------------------------------------------------------


def _is_json(ctype: str | None) -> bool:
    if not ctype:
        return False
    known = _JSON_TYPES.get(ctype)
    if known is not None:
        return known
    mime = ctype.split(";", 1)[0].strip().lower()
    verdict = mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))
    if len(_JSON_TYPES) >= 64:  # a publisher sends one or two spellings; bounded all the same
        _JSON_TYPES.clear()
    _JSON_TYPES[ctype] = verdict
    return verdict


#: Content-Type values already judged by _is_json.
_JSON_TYPES: dict[str, bool] = {}


def check_head(w: Context, p: HTTPProtocol, req: Request) -> None:
    """Decide what can be decided from a request head before its body is read (and before
    ``100 Continue``): a ``POST /publish`` from a denied address or without valid
    credentials is refused here, so a stranger cannot make us buffer a body of max_body.

    Raises:
        ProtocolError: the refusal (the protocol answers it and closes: the body is unread).
    """
    if p.admin or req.method != b"POST" or req.path != b"/publish":
        return
    # The head is in: ssegw_publish_duration_seconds starts here (publish() takes it).
    t0 = time.perf_counter()
    try:
        authz, loopback = _publisher(w, p, req)
    except ProtocolError:
        # Refused from the head; the protocol writes the answer as this returns.
        w.hist_publish.observe(time.perf_counter() - t0)
        raise
    w.publish_t0[p] = (t0, authz, loopback)


def _publisher(w: Context, p: HTTPProtocol, req: Request) -> tuple[str | None, bool]:
    """(Authorization, loopback) of an allowed publisher; raises the refusal otherwise."""
    ip = w.client_ip(p, req)
    if not w.admission.ip_filter.allowed(ip):
        w.count_refused("ip_denied")
        raise Forbidden("client address denied", code="ip_denied")
    authz = req.authorization
    # The client, not the proxy in front of it: a trusted local reverse proxy must not turn
    # every remote publisher into a loopback one.
    loopback = _is_loopback(ip)
    _authorize_publish(w, authz, [], loopback)
    return authz, loopback


def _authorize_publish(w: Context, authz: str | None, topics: list[str], loopback: bool) -> None:
    try:
        w.auth.authorize_publish(authz, topics, time.time(), loopback)
    except ProtocolError as e:
        w.count_auth_failure(e)
        raise


def publish(w: Context, p: HTTPProtocol, req: Request, body: bytes) -> None:
    """Serve POST /publish, and observe ``ssegw_publish_duration_seconds`` for every answer
    it gives: 200, a refusal (4xx), a broker failure (503/504) or a bug of ours (500).  A
    publish whose client leaves before its answer is not observed."""
    head = w.publish_t0.pop(p, None)  # set by check_head when the head came in
    if head is None:  # not through the protocol's check_head: decide it here
        t0 = time.perf_counter()
        head = (t0, *_publisher(w, p, req))
    try:
        _publish(w, p, req, body, head)
    except Exception:
        # Raised to the protocol, which writes the answer (4xx, or 500 for a bug) as this
        # returns; re-raised, not handled here.
        w.hist_publish.observe(time.perf_counter() - head[0])
        raise


def _publish(w: Context, p: HTTPProtocol, req: Request, body: bytes, head: tuple[float, str | None, bool]) -> None:
    t0, authz, loopback = head
    if not _is_json(req.content_type):
        raise UnsupportedMediaType("Content-Type must be application/json", code="unsupported_media_type")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"invalid JSON: {e}", code="bad_json") from None
    msgs = parse_publish(obj, w.cfg.max_batch, orjson.dumps)
    if w.auth.enabled:  # auth off: the head decided it all (loopback or not), nothing per topic
        _authorize_publish(w, authz, sorted(set(topics_of(msgs))), loopback)
    if w.upstreams is not None:
        w.upstreams.refuse_routed(msgs)  # 409: a shared route's upstream feeds that topic
    broker = w.broker
    cors = cors_headers(w, p)
    ids = broker.publish_now(msgs)
    if ids is not None:
        if len(msgs) >= FREEZE_BATCH:
            # The events just published stay in history: out of the collector's young
            # generations at once (worker.age_young's policy, a tick early), so that the
            # collections a batch's allocations trigger do not walk every event held since
            # the last tick.  What is frozen is reached again by worker.full_collect.
            gc.freeze()
        _published(w, p, ids, len(msgs), cors)
        w.hist_publish.observe(time.perf_counter() - t0)
        return
    # No readiness check here: the broker answers for the shards this request touches
    # (BrokerUnavailable -> 503 at once when one of them is down).
    # The request is in: from here the wait is ours (a publish in flight when Redis dies
    # waits for Redis, up to the broker's resolve timeout), not the client's; the head timer
    # sees the state (RESPOND) and does not answer 408 (worker._head_due).
    task = asyncio.get_running_loop().create_task(broker.publish(msgs))
    task.add_done_callback(lambda t: _publish_done(w, p, t, len(msgs), cors, t0))


def _publish_done(w: Context, p: HTTPProtocol, task: asyncio.Task, n: int, cors: list, t0: float) -> None:
    if p.state == CLOSED:
        return  # the client left: no answer, no duration
    try:
        _publish_answer(w, p, task, n, cors)
    finally:
        w.hist_publish.observe(time.perf_counter() - t0)


def _publish_answer(w: Context, p: HTTPProtocol, task: asyncio.Task, n: int, cors: list) -> None:
    if task.cancelled():  # the worker is shutting down with the publish in flight
        p.respond_error(OutcomeUnknown("the gateway stopped before the publish was confirmed"))
        return
    exc = task.exception()
    if exc is None:
        _published(w, p, task.result(), n, cors)
    elif isinstance(exc, BrokerUnavailable):
        p.respond_error(Unavailable(f"broker unavailable: nothing was published ({exc})", headers=(("Retry-After", "1"),)))
    elif isinstance(exc, PublishUnresolved):
        log.warning("publish outcome unknown: %s", exc)
        p.respond_error(OutcomeUnknown(f"the request may or may not have been published ({exc})"))
    else:
        log.error("publish failed", exc_info=exc)
        p.respond_internal("publish failed")


#: Batches of at least this many messages freeze the collector's young objects (_publish).
FREEZE_BATCH = 16


def _published(w: Context, p: HTTPProtocol, ids: list[str], n: int, cors: list) -> None:
    w.events_published += n
    w.publish_requests += 1
    p.respond(200, orjson.dumps({"ids": ids}), headers=cors)


def _is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip == "::1" or ip.startswith("::ffff:127.")


# -- admin ------------------------------------------------------------------------------


_ADMIN_PATHS = (b"/healthz", b"/readyz", b"/metrics", b"/admin/stats", b"/internal/snapshot")


class LocalAdmin:
    """What the admin routes report for one worker serving its own admin listener.  A
    supervisor provides the same four methods, aggregated over its workers."""

    def __init__(self, w: Context) -> None:
        self.w = w

    def ready(self) -> tuple[bool, str]:
        w = self.w
        if w.draining:
            return False, "draining"
        if not w.broker.ready():
            return False, "broker unavailable"
        return True, "ready"

    async def snapshots(self) -> list[dict[str, object]]:
        return [snapshot(self.w)]

    async def stats(self) -> list[dict[str, object]]:
        return [stats(self.w)]

    async def subscribers(self, topic: str) -> int:
        w = self.w
        return await w.broker.subscribers(topic, w.table.subscribers(topic))

    async def keys(self, topic: str) -> int:
        return await self.w.broker.keys(topic)


def _admin(w: Context, p: HTTPProtocol, req: Request, path: bytes) -> None:
    if path not in _ADMIN_PATHS and not path.startswith(b"/admin/topics/"):
        raise NotFound(f"no such admin path: {path[:200].decode('latin-1')}")
    if req.method not in (b"GET", b"HEAD"):
        raise MethodNotAllowed("admin endpoints are read-only: use GET", headers=(("Allow", "GET, HEAD"),))
    source = w.admin_source
    assert source is not None  # set with the worker (LocalAdmin) or by the CLI (a supervisor)
    if path == b"/healthz":
        p.respond_json(200, {"status": "ok"})
    elif path == b"/readyz":
        ready, reason = source.ready()
        if not ready:
            raise Unavailable(reason, code="not_ready")
        p.respond_json(200, {"status": "ready"})
    elif path == b"/metrics":
        async def metrics() -> None:
            snaps = await source.snapshots()
            p.respond(200, render(make_registry(lambda: snaps)), content_type=CONTENT_TYPE.encode())

        _later(p, metrics())
    elif path == b"/internal/snapshot":
        p.respond_json(200, snapshot(w))
    elif path == b"/admin/stats":
        async def all_stats() -> None:
            p.respond_json(200, {"workers": await source.stats()})

        _later(p, all_stats())
    else:
        try:
            name = unquote(path[len(b"/admin/topics/"):].decode("latin-1"), errors="strict")
        except UnicodeDecodeError:
            raise BadRequest("topic name is not valid percent-encoded UTF-8", code="bad_topic") from None
        validate_topic(name)

        async def topic() -> None:
            p.respond_json(200, {"topic": name, "subscribers": await source.subscribers(name),
                                 "keys": await source.keys(name)})

        _later(p, topic())


def _later(p: HTTPProtocol, coro: Coroutine[Any, Any, None]) -> None:
    """Run an admin answer that needs a round trip (broker, workers); errors become 503."""
    task = asyncio.get_running_loop().create_task(coro)

    def done(t: asyncio.Task) -> None:
        exc = t.exception()
        if exc is None or p.state == CLOSED:
            return
        if isinstance(exc, (BrokerUnavailable, OSError, asyncio.TimeoutError)):
            p.respond_error(Unavailable(f"unavailable: {exc}", headers=(("Retry-After", "1"),)))
        else:
            log.error("admin request failed", exc_info=exc)
            p.respond_internal("admin request failed")

    task.add_done_callback(done)


def snapshot(w: Context) -> dict[str, object]:
    """The worker's counters for /metrics, with the broker's folded in."""
    snap = w.snapshot()
    b = w.broker.stats()
    snap["broker_up"] = 1 if w.broker.ready() else 0
    for k in ("reconnects", "publish_errors", "publish_retries", "gap_fills", "gap_events", "gap_lost"):
        snap["broker_" + k] = b.get(k, 0)
    snap["keyed_evictions"] = {"max_keys": b.get("keyed_evicted", 0), "ttl": b.get("keyed_expired", 0)}
    snap["broker_errors"] = {
        "publish": b.get("publish_errors", 0),
        "replay": w.replay_errors,
        "reconnect": b.get("reconnects", 0),
        "gap_lost": b.get("gap_lost", 0),
    }
    return snap


def _process_usage() -> dict[str, object]:
    """Resident memory (bytes, from /proc; absent elsewhere) and CPU time (s) of this process."""
    out: dict[str, object] = {}
    t = os.times()
    out["cpu_seconds"] = round(t.user + t.system, 3)
    try:
        with open("/proc/self/statm", "rb") as f:
            out["rss_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: no /proc
        pass
    return out


def stats(w: Context) -> dict[str, object]:
    snap = {k: v for k, v in w.snapshot().items() if not k.startswith("hist_")}
    snap["pid"] = os.getpid()
    # This process's own memory and CPU: /metrics' process_* are those of the process
    # answering it (the supervisor, when there is one).
    snap.update(_process_usage())
    snap["uptime_s"] = round(time.time() - w.started_at, 3)
    snap["draining"] = w.draining
    snap["broker"] = w.broker.stats()
    return snap


__all__ = ["handle", "cors_headers"]

"""What ``POST /publish`` answers when Redis goes away around the publish (docs/api.md
"Publish": 200 only once accepted; 503 means nothing of the request was published).

A real ``redis-server`` sits behind ``faultproxy.FaultProxy``; the gateway's ``--redis`` URL
points at the proxy.  The proxy loses the reply of the ``FCALL ssegw_publish`` (Redis ran
it), or drops the call (Redis never saw it), and then refuses connections for longer than the
old 5 s window.  The gateway must retry with the request's token and finally answer 200 with
the ids Redis gave -- the event in Redis once, delivered once.  A publish arriving while Redis
is known to be down is a prompt 503, and nothing of it appears later.  Past
``RESOLVE_TIMEOUT`` the broker gives up with ``PublishUnresolved`` (HTTP 504): shown in-process
with the timeout shortened, and the event is indeed in Redis -- 504 never hides a publish.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from urllib.parse import urlencode

import orjson
import pytest
import redis
from faultproxy import FaultProxy
from harness import Gateway, Response, Stream, request, wait_until

import ssegw.broker.redis
from ssegw.broker.base import PublishUnresolved
from ssegw.broker.redis import RedisBroker, stream_key
from ssegw.core.publish import parse_publish

#: The FCALL's function-name argument as RESP puts it on the wire (FUNCTION LOAD's source
#: also names ``ssegw_publish``, but quoted, so it does not match).
FCALL_PUBLISH = b"$13\r\nssegw_publish\r\n"
#: Longer than the 5 s a publish used to wait before answering 503.
OUTAGE = 7.0


def new_topic(tag: str = "t") -> str:
    return f"po.{tag}.{uuid.uuid4().hex[:10]}"


def path(*topics: str) -> str:
    return "/events?" + urlencode([("topic", t) for t in topics])


def seq_of(eid: str) -> int:
    return int(eid.rsplit("-", 1)[1])


def ready(g: Gateway) -> bool:
    try:
        return g.request("GET", "/readyz", admin=True, timeout=5).status == 200
    except OSError:
        return False


class Post(threading.Thread):
    """One ``POST /publish`` in the background (client timeout 30 s)."""

    def __init__(self, g: Gateway, msgs: object) -> None:
        super().__init__(daemon=True, name="post")
        self.port = g.port
        self.body = json.dumps(msgs).encode()
        self.resp: Response | None = None
        self.error: BaseException | None = None
        self.elapsed = 0.0
        self.start()

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            self.resp = request(self.port, "POST", "/publish", self.body, {"Content-Type": "application/json"}, 30)
        except BaseException as e:  # reported by result()
            self.error = e
        self.elapsed = time.monotonic() - t0

    def result(self, timeout: float = 35.0) -> Response:
        self.join(timeout)
        assert not self.is_alive(), "POST /publish got no answer"
        assert self.error is None, f"POST /publish failed: {self.error!r}"
        assert self.resp is not None
        return self.resp


def history(r: redis.Redis, topic: str) -> list[tuple[int, bytes]]:
    """The topic's history stream as Redis holds it: (seq, body) per entry."""
    return [(int(eid.split(b"-")[0]), fields[b"b"]) for eid, fields in r.xrange(stream_key(topic))]


def body_of(msg: dict) -> bytes:
    """The history entry body the gateway stores for ``msg`` (its event/data lines)."""
    return parse_publish(msg, 1, orjson.dumps)[0].body


def settle(s: Stream, t: float = 0.5) -> None:
    """Read whatever else arrives within ``t`` (to catch duplicates)."""
    deadline = time.monotonic() + t
    while time.monotonic() < deadline:
        s.pump(deadline - time.monotonic())


@pytest.fixture
def direct(redis_server):
    """A client on the real Redis, not through the proxy."""
    c = redis.Redis(port=redis_server.port, socket_timeout=5)
    yield c
    c.close()


@pytest.fixture
def proxy(redis_server):
    p = FaultProxy(redis_server.port)
    yield p
    p.close()


@pytest.fixture
def gw(gateway, proxy):
    g = gateway("--redis", proxy.url, "--heartbeat-interval", "500ms", "--flush-interval", "10ms",
                "--retry", "300ms", "--drain-timeout", "1s")
    assert wait_until(lambda: ready(g), 10, 0.05), "gateway never became ready:\n" + "".join(g.log[-20:])
    return g


def publish_across_outage(g: Gateway, proxy: FaultProxy, direct: redis.Redis, msgs: list[dict],
                          drop: bool) -> None:
    """Subscribe to the messages' topics, POST them while the proxy loses the reply (or the
    request) and then refuses connections for OUTAGE seconds; check the answer, the stream,
    Redis and the retry counter."""
    topics = sorted({m["topic"] for m in msgs})
    with g.stream(path(*topics)) as s:
        assert s.status == 200, s.error_body
        if drop:
            proxy.drop_next_request(FCALL_PUBLISH, OUTAGE)
        else:
            proxy.lose_next_reply(FCALL_PUBLISH, OUTAGE)
        post = Post(g, msgs if len(msgs) > 1 else msgs[0])
        assert proxy.wait_fault(1, 5), "the publish never reached the proxy"
        # During the outage: Redis ran the call (reply lost) or never saw it (request dropped).
        time.sleep(0.3)
        held = {t: history(direct, t) for t in topics}
        n_held = sum(len(h) for h in held.values())
        assert n_held == (0 if drop else len(msgs)), f"Redis holds {held} during the outage"
        assert post.is_alive(), f"/publish answered during the outage: {post.resp!r}"

        r = post.result()
        assert r.status == 200, r
        ids = r.json()["ids"]
        assert len(ids) == len(msgs) and len(set(ids)) == len(msgs), ids
        # It waited for Redis to come back -- and not much longer (retries are <= 1 s apart).
        assert OUTAGE <= post.elapsed < OUTAGE + 4, f"answered after {post.elapsed:.2f}s"

        # Redis holds every message once, under the id the publisher got.
        for t in topics:
            want = [(seq_of(i), body_of(m)) for i, m in zip(ids, msgs, strict=True) if m["topic"] == t]
            got = history(direct, t)
            assert got == want, f"{t}: Redis holds {got}, the publisher was told {want}"

        # The subscriber gets each message once, with its id, in order.
        s.wait_events(len(msgs), 10)
        settle(s)
        got_ev = [(e.id, e.data) for e in s.events]
        assert got_ev == [(i, m["data"]) for i, m in zip(ids, msgs, strict=True)], got_ev
        assert not s.closed, "the stream was closed by the outage"

    br = g.stats()["broker"]
    assert br["publish_retries"] >= 1, br
    assert br["publish_errors"] == 0, br
    assert br["reconnects"] >= 1, br  # the proxy really cut the gateway off
    assert g.metrics()["ssegw_broker_publish_retries_total"] >= 1


def test_reply_lost_then_outage_gets_200_once(gw, proxy, direct) -> None:
    publish_across_outage(gw, proxy, direct, [{"topic": new_topic("one"), "data": "lost-reply"}], drop=False)


def test_publish_waiting_for_redis_is_not_cut_by_head_timeout(gateway, proxy, direct) -> None:
    """head_timeout bounds how long a *client* takes to send its request; once the request is
    in, a publish waiting for Redis to come back is the gateway's wait (CI once saw a 408
    here when the outage outlasted head_timeout)."""
    g = gateway("--redis", proxy.url, "--head-timeout", "2s", "--heartbeat-interval", "500ms",
                "--flush-interval", "10ms")
    assert wait_until(lambda: ready(g), 10, 0.05), "gateway never became ready"
    assert OUTAGE > 2 * 2
    publish_across_outage(g, proxy, direct, [{"topic": new_topic("slow"), "data": "over-head-timeout"}], drop=False)


def test_batch_reply_lost_then_outage_gets_200_once(gw, proxy, direct) -> None:
    t1, t2 = new_topic("b1"), new_topic("b2")
    msgs = [{"topic": t1, "data": "b0"}, {"topic": t2, "data": "b1"}, {"topic": t1, "data": "b2"}]
    publish_across_outage(gw, proxy, direct, msgs, drop=False)


def test_request_dropped_then_outage_gets_200_once(gw, proxy, direct) -> None:
    publish_across_outage(gw, proxy, direct, [{"topic": new_topic("drop"), "data": "dropped"}], drop=True)


def test_publish_while_redis_is_down_is_a_prompt_503_and_never_published(gw, proxy, direct) -> None:
    topic = new_topic("down")
    with gw.stream(path(topic)) as s:
        assert s.status == 200, s.error_body
        retries = gw.stats()["broker"]["publish_retries"]
        proxy.cut(4.0)
        assert wait_until(lambda: not ready(gw), 3, 0.02), "the gateway did not notice Redis going away"
        t0 = time.monotonic()
        r = gw.publish({"topic": topic, "data": "while-down"})
        took = time.monotonic() - t0
        assert r.status == 503, r
        assert took < 2.0, f"503 took {took:.2f}s"
        assert r.headers.get("retry-after"), r.headers
        assert r.json()["error"] == "unavailable", r.body

        # Redis comes back: nothing of the refused request shows up, then or later.
        assert proxy.wait_listening(10)
        assert wait_until(lambda: ready(gw), 10, 0.05), "the gateway did not recover"
        time.sleep(1.0)
        assert history(direct, topic) == []
        assert direct.exists(stream_key(topic)) == 0
        # The stream survived and still works: the next publish is the only event on it.
        r = gw.publish({"topic": topic, "data": "after"})
        assert r.status == 200, r
        (eid,) = r.json()["ids"]
        s.wait_events(1, 5)
        settle(s)
        assert [(e.id, e.data) for e in s.events] == [(eid, "after")]
        assert history(direct, topic) == [(seq_of(eid), body_of({"topic": topic, "data": "after"}))]
    br = gw.stats()["broker"]
    assert br["publish_retries"] == retries, "a refused publish must not be retried"


def test_retry_refused_by_redis_is_not_a_503_for_a_published_event(gw, proxy, direct) -> None:
    """The reply is lost (Redis ran the publish), and when the gateway retries, Redis refuses
    the call before running it (here: over maxmemory, for a moment).  The refusal says nothing
    about the first attempt, so the answer may be 200 with the original id (keep asking until
    Redis runs the call and the token answers) or 504 -- never 503 "nothing was published"."""
    topic = new_topic("oom")
    msg = {"topic": topic, "data": "published-then-refused"}
    with gw.stream(path(topic)) as s:
        assert s.status == 200, s.error_body
        proxy.lose_next_reply(FCALL_PUBLISH, 2.0)
        post = Post(gw, msg)
        try:
            assert proxy.wait_fault(1, 5), "the publish never reached the proxy"
            time.sleep(0.2)
            held = history(direct, topic)
            assert [body for _, body in held] == [body_of(msg)], f"Redis holds {held}"
            direct.config_set("maxmemory", 1)  # every write is refused with -OOM
            assert proxy.wait_listening(10)
            post.join(1.5)  # the retries now reach Redis and are refused
        finally:
            direct.config_set("maxmemory", 0)
        r = post.result()
        assert r.status != 503, f"503 'nothing was published' for an event Redis holds: {r!r}"
        assert r.status in (200, 504), r
        if r.status == 200:
            assert r.json()["ids"] and [seq_of(i) for i in r.json()["ids"]] == [held[0][0]], r
        assert history(direct, topic) == held
        s.wait_events(1, 10)
        settle(s)
        assert [e.data for e in s.events] == [msg["data"]]


def test_unresolved_after_resolve_timeout_is_504_and_was_published(redis_server, proxy, direct,
                                                                   monkeypatch) -> None:
    """In-process (RESOLVE_TIMEOUT is 60 s in the gateway): the reply is lost and Redis stays
    away longer than the (shortened) timeout -> ``PublishUnresolved`` (HTTP 504), and Redis
    did publish it -- which is why the answer is 504 "outcome unknown", not 503."""
    monkeypatch.setattr(ssegw.broker.redis, "RESOLVE_TIMEOUT", 2.0)
    topic = new_topic("unres")

    async def main() -> None:
        delivered: list = []
        b = RedisBroker(proxy.url, lambda t: (1000, 3_600_000), 3_600_000)
        await b.start(delivered.extend, None)
        try:
            deadline = time.monotonic() + 5
            while not b.ready():
                assert time.monotonic() < deadline, "broker never connected"
                await asyncio.sleep(0.02)
            b.interest(topic, True)
            await b.replay((topic,), None, None)  # waits for the subscription

            proxy.lose_next_reply(FCALL_PUBLISH, 6.0)
            t0 = time.monotonic()
            with pytest.raises(PublishUnresolved):
                await b.publish(parse_publish({"topic": topic, "data": "unresolved"}, 1, orjson.dumps))
            took = time.monotonic() - t0
            assert 1.0 <= took <= 3.0, f"PublishUnresolved after {took:.2f}s (RESOLVE_TIMEOUT 2 s)"
            assert proxy.listening is False, "the outage should still be on"
            assert b.publish_retries >= 1 and b.publish_errors == 1, b.stats()

            # The honest part: Redis published it (once), though the caller could not learn so.
            held = history(direct, topic)
            assert [body for _, body in held] == [body_of({"topic": topic, "data": "unresolved"})], held

            # When Redis is reachable again the broker delivers it once (pub/sub or gap fill).
            assert await asyncio.to_thread(proxy.wait_listening, 10)
            deadline = time.monotonic() + 10
            while not (b.ready() and delivered):
                assert time.monotonic() < deadline, "broker did not recover / deliver"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            assert [(e.topic, e.seq) for e in delivered] == [(topic, held[0][0])]
            assert history(direct, topic) == held
        finally:
            await b.close()

    asyncio.run(main())

"""Fault injection on the real ``redis-server`` under a clustered gateway.

- SIGKILL and restart Redis (with its append-only file, fsynced on every write) in the
  middle of a publishing run, several times: while Redis is gone ``/publish`` and
  ``/readyz`` answer 503, open streams stay open with heartbeats, and afterwards every
  subscriber has received every event whose publish got a 2xx -- in order, exactly once
  (docs/api.md "Publish": a 503 means nothing was published; "Ids, history and resume").
- Redis coming back *without* its data: the gap cannot be filled, so open streams are
  closed and a client resuming with its last id gets ``event: ssegw.reset``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlencode

import orjson
import pytest
from harness import Gateway, Stream, request, wait_until
from redis_harness import RedisServer

# -- helpers ----------------------------------------------------------------------------------


def new_topic(tag: str = "t") -> str:
    return f"rf.{tag}.{uuid.uuid4().hex[:10]}"


def path(*topics: str, **params: str) -> str:
    return "/events?" + urlencode([("topic", t) for t in topics] + list(params.items()))


def seq_of(eid: str) -> int:
    return int(eid.rsplit("-", 1)[1])


def status(g: Gateway, method: str, p: str, body: bytes | None = None, admin: bool = False) -> int:
    try:
        return g.request(method, p, body, {"Content-Type": "application/json"} if body else None,
                         admin=admin, timeout=10).status
    except OSError:
        return -1


def ready(g: Gateway) -> bool:
    return status(g, "GET", "/readyz", admin=True) == 200


class Reader(threading.Thread):
    """Keeps one SSE stream read, noting when heartbeats arrive and when it closes."""

    def __init__(self, name: str, s: Stream, topics: tuple[str, ...]) -> None:
        super().__init__(daemon=True, name=f"reader-{name}")
        self.label = name
        self.s = s
        self.topics = topics
        self.heartbeats: list[float] = []
        self.closed_at: float | None = None
        self.halt = False

    def run(self) -> None:
        s = self.s
        seen = len(s.parser.comments)
        while not self.halt and not s.closed:
            s.pump(0.05)
            comments = s.parser.comments
            while seen < len(comments):
                if comments[seen] == "":
                    self.heartbeats.append(time.monotonic())
                seen += 1
        if s.closed:
            self.closed_at = time.monotonic()

    def beats_between(self, t0: float, t1: float) -> int:
        return sum(1 for t in self.heartbeats if t0 <= t <= t1)

    def stop(self) -> None:
        self.halt = True
        self.join(5)


@dataclass
class Acked:
    n: int
    topic: str
    eid: str


class Publisher(threading.Thread):
    """POSTs numbered events without pause: single messages and batches of 3, alternating
    topics.  A 503 (or no answer) means "nothing was published": the same request is sent
    again.  Only 2xx answers are recorded as published."""

    def __init__(self, gws: list[Gateway], topics: tuple[str, str]) -> None:
        super().__init__(daemon=True, name="publisher")
        self.gws = gws
        self.topics = topics
        self.acked: list[Acked] = []
        #: every attempt: (sent, answered, status, first number of the request, its size)
        self.log: list[tuple[float, float, int, int, int]] = []
        self.unexpected: list[str] = []
        self.n = 0
        self.halt = False

    def run(self) -> None:
        req = 0
        while not self.halt:
            size = 3 if req % 4 == 3 else 1
            msgs = [{"topic": self.topics[(self.n + k) % 2], "data": str(self.n + k)} for k in range(size)]
            body = json.dumps(msgs if size > 1 else msgs[0]).encode()
            while not self.halt:
                t0 = time.monotonic()
                try:
                    g = self.gws[req % len(self.gws)]
                    r = request(g.port, "POST", "/publish", body, {"Content-Type": "application/json"}, 15)
                    code = r.status
                except OSError as e:
                    code = -1
                    self.unexpected.append(f"no answer: {e!r}")
                self.log.append((t0, time.monotonic(), code, self.n, size))
                if 200 <= code < 300:
                    ids = r.json()["ids"]
                    if len(ids) != size:
                        self.unexpected.append(f"{len(ids)} ids for {size} messages")
                    for k, (m, eid) in enumerate(zip(msgs, ids, strict=False)):
                        self.acked.append(Acked(self.n + k, m["topic"], eid))
                    self.n += size
                    break
                if code != 503:
                    self.unexpected.append(f"status {code}: {r.body[:200]!r}" if code > 0 else "no answer")
                time.sleep(0.02)
            req += 1
            time.sleep(0.002)

    def stop(self) -> None:
        self.halt = True
        self.join(30)


def expected_for(acked: list[Acked], topics: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(a.eid, str(a.n)) for a in sorted(acked, key=lambda a: seq_of(a.eid)) if a.topic in topics]


def open_readers(a: Gateway, b: Gateway, t1: str, t2: str) -> list[Reader]:
    """One subscriber of each topic and a multi-topic one, on two gateways."""
    readers = []
    for name, g, topics in (("t1@A", a, (t1,)), ("t2@B", b, (t2,)), ("both@A", a, (t1, t2)),
                            ("both@B", b, (t1, t2))):
        s = g.stream(path(*topics))
        assert s.status == 200, s.error_body
        readers.append(Reader(name, s, topics))
    for r in readers:
        r.start()
    return readers


def gateway_on(redis: RedisServer, tmp_path, *extra: str) -> Gateway:
    g = Gateway("--redis", redis.url, "--heartbeat-interval", "500ms", "--flush-interval", "10ms",
                "--retry", "300ms", *extra, tmp_path=tmp_path)
    g.start()
    assert wait_until(lambda: ready(g), 10, 0.05), "gateway never became ready"
    return g


# -- kill and restart with data ----------------------------------------------------------------


def run_kill_cycles(redis: RedisServer, tmp_path, cycles: int, outage: float, between: float) -> None:
    """Two gateways on one Redis (two hosts); the publisher alternates between them, so each
    gateway also has to fill gaps with what the other published while it was reconnecting."""
    gws = [gateway_on(redis, tmp_path), gateway_on(redis, tmp_path)]
    t1, t2 = new_topic("t1"), new_topic("t2")
    readers: list[Reader] = []
    pub = Publisher(gws, (t1, t2))
    probe = json.dumps({"topic": new_topic("probe"), "data": "x"}).encode()
    try:
        readers = open_readers(gws[0], gws[1], t1, t2)
        pub.start()
        outages: list[tuple[float, float]] = []
        for cycle in range(cycles):
            time.sleep(between)
            before = len(pub.acked)
            assert wait_until(lambda before=before: len(pub.acked) > before + 5, 10, 0.01), \
                f"cycle {cycle}: nothing is being published ({pub.unexpected[-3:]})"
            redis.kill()
            down = time.monotonic()
            # While Redis is gone: 503s, not ready, new streams refused, open streams kept.
            for g in gws:
                assert wait_until(lambda g=g: status(g, "POST", "/publish", probe) == 503, 5, 0.02), \
                    f"cycle {cycle}: /publish does not answer 503 while Redis is down"
                assert wait_until(lambda g=g: status(g, "GET", "/readyz", admin=True) == 503, 3, 0.02), \
                    f"cycle {cycle}: /readyz does not answer 503 while Redis is down"
                s = g.stream(path(t1), timeout=10)
                assert s.status == 503, f"cycle {cycle}: a new stream got {s.status} while Redis is down"
                assert s.headers.get("retry-after"), s.headers
            remaining = outage - (time.monotonic() - down)
            if remaining > 0:
                time.sleep(remaining)
            for g in gws:
                assert status(g, "POST", "/publish", probe) == 503
                assert status(g, "GET", "/readyz", admin=True) == 503
            up_at = time.monotonic()
            for r in readers:
                assert not r.s.closed, f"cycle {cycle}: stream {r.label} was closed during the outage"
                assert r.beats_between(down, up_at) >= 1, \
                    f"cycle {cycle}: no heartbeat on {r.label} during a {up_at - down:.1f}s outage"
            redis.start()
            outages.append((down, up_at))
            for g in gws:
                assert wait_until(lambda g=g: ready(g), 15, 0.05), f"cycle {cycle}: gateway did not recover"
        time.sleep(between)
        pub.stop()
        assert not pub.unexpected, (pub.unexpected[:10], [list(g.log)[-40:] for g in gws],
                                    [e for e in pub.log if e[2] not in (200, 503)], outages)
        assert len(pub.acked) > 20 * cycles
        # A 2xx only while Redis was reachable: no request sent well inside an outage (after
        # the gateways saw Redis go) was acknowledged before Redis came back.
        for down, up_at in outages:
            bad = [(round(s - down, 3), round(e - down, 3)) for s, e, c, _, _ in pub.log
                   if 200 <= c < 300 and down + 0.5 < s and e < up_at]
            assert not bad, f"2xx answered while Redis was down: {bad[:5]}"
            # (The publisher itself need not see a 503: its request in flight at the kill
            # waits for Redis to resolve whether it was published; the probes above check
            # that requests arriving during the outage are answered 503.)

        # Every acknowledged event reached every subscriber of its topic: in order, once.
        for r in readers:
            want = expected_for(pub.acked, r.topics)
            ok = wait_until(lambda r=r, want=want: len(r.s.events) >= len(want), 15, 0.05)
            time.sleep(0.3)  # let duplicates, if any, arrive
            got = [(e.id, e.data) for e in r.s.events]
            seqs = [seq_of(i) for i, _ in got]
            assert seqs == sorted(set(seqs)), f"{r.label}: ids repeated or out of order"
            assert not r.s.closed, f"stream {r.label} was closed"
            assert not any(e.event == "ssegw.reset" for e in r.s.events), f"{r.label} got a reset"
            missing = [w for w in want if w not in set(got)]
            assert ok and not missing, f"{r.label}: {len(missing)} acknowledged events never arrived: {missing[:10]}"
            extra = [x for x in got if x not in set(want)]
            # A publish in flight when Redis was killed is retried by the gateway with the
            # same request token, so it is never both answered 503 and published.
            assert not extra, f"{r.label}: events that were never acknowledged, or duplicates: {extra[:10]}"
            assert got == want, f"{r.label}: order or duplicates differ"
            nums = [int(d) for _, d in got]
            assert nums == sorted(set(nums)), f"{r.label}: data numbers out of order or repeated"
        for g in gws:
            br = g.stats()["broker"]
            assert br["up"] is True and br["reconnects"] >= cycles, br
            assert br["gap_fills"] >= cycles, br
            assert br["gap_lost"] == 0, br
    finally:
        pub.halt = True
        for r in readers:
            r.stop()
            r.s.close()
        for g in gws:
            g.kill()


def test_redis_killed_and_restarted_while_publishing(redis_server, tmp_path) -> None:
    run_kill_cycles(redis_server, tmp_path / "gw", cycles=5, outage=1.2, between=0.4)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_redis_killed_and_restarted_while_publishing_long(redis_server, tmp_path) -> None:
    run_kill_cycles(redis_server, tmp_path / "gw", cycles=15, outage=2.0, between=1.0)


# -- a publish whose reply is lost ---------------------------------------------------------------


class ReplyCutter:
    """A TCP proxy in front of Redis.  Once armed, it forwards the next ``FCALL
    ssegw_publish`` to Redis, swallows Redis's reply and drops both connections: Redis
    executed the publish, the gateway never hears so -- what a Redis crash between executing
    a command and answering it looks like from the gateway."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.armed = False
        self.cuts = 0
        self.conns: set[asyncio.Task] = set()

    async def handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.conns.add(asyncio.current_task())  # type: ignore[arg-type]
        ur, uw = await asyncio.open_connection("127.0.0.1", self.port)
        swallow = False

        async def c2s() -> None:
            nonlocal swallow
            while data := await cr.read(65536):
                uw.write(data)
                await uw.drain()
                if self.armed and b"ssegw_publish" in data:
                    self.armed = False
                    swallow = True
                    self.cuts += 1
                    await asyncio.sleep(0.2)  # Redis has executed it by now
                    return

        async def s2c() -> None:
            while data := await ur.read(65536):
                if not swallow:
                    cw.write(data)
                    await cw.drain()

        try:
            done, pending = await asyncio.wait([asyncio.ensure_future(c2s()), asyncio.ensure_future(s2c())],
                                               return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        except BaseException:  # a proxy connection going away is not a test failure
            pass
        finally:
            cw.transport.abort()
            uw.transport.abort()


def test_publish_whose_reply_is_lost_is_not_a_503_for_a_published_event(redis_server) -> None:
    from ssegw.broker.base import BrokerUnavailable
    from ssegw.broker.redis import RedisBroker, stream_key
    from ssegw.core.publish import parse_publish

    topic = new_topic("lost")

    async def main() -> tuple[list[str] | None, int, int]:
        cutter = ReplyCutter(redis_server.port)
        srv = await asyncio.start_server(cutter.handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        delivered: list = []
        b = RedisBroker(f"redis://127.0.0.1:{port}/0", lambda t: (1000, 3_600_000), 3_600_000)
        await b.start(delivered.extend, None)
        try:
            deadline = time.monotonic() + 5
            while not b.ready():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            b.interest(topic, True)
            await b.replay((topic,), None, None)
            cutter.armed = True
            ids: list[str] | None
            try:
                ids = await b.publish(parse_publish({"topic": topic, "data": "once"}, 10, orjson.dumps))
            except BrokerUnavailable:
                ids = None  # /publish answers 503: "nothing was published"
            assert cutter.cuts == 1
            await asyncio.sleep(0.5)
            xlen = int(redis_server.command("XLEN", stream_key(topic)).strip()[1:])
            return ids, xlen, len(delivered)
        finally:
            await b.close()
            srv.close()
            for t in list(cutter.conns):
                t.cancel()
            await asyncio.gather(*cutter.conns, return_exceptions=True)
            await srv.wait_closed()

    ids, xlen, delivered = asyncio.run(main())
    if ids is None:
        assert xlen == 0 and delivered == 0, \
            f"publish reported unavailable (503) but the event is in history ({xlen}) and was delivered ({delivered})"
    else:
        assert len(ids) == 1 and xlen == 1 and delivered == 1, (ids, xlen, delivered)


# -- restarted without its data ---------------------------------------------------------------------


def test_redis_restarted_empty_closes_streams_and_resets(tmp_path) -> None:
    redis = RedisServer(tmp_path / "redis", persist=False).start()
    g = None
    streams: list[Stream] = []
    try:
        g = gateway_on(redis, tmp_path)
        t1, t2 = new_topic("t1"), new_topic("t2")
        s1 = g.stream(path(t1))
        s2 = g.stream(path(t1, t2))
        streams = [s1, s2]
        assert s1.status == s2.status == 200
        ids = []
        for i in range(4):
            r = g.publish({"topic": (t1, t2)[i % 2], "data": f"old{i}"})
            assert r.status == 200, r
            ids += r.json()["ids"]
        assert len(s1.wait_events(2)) == 2 and len(s2.wait_events(4)) == 4
        last1, last2 = s1.events[-1].id, s2.events[-1].id
        old_epoch = ids[0].rsplit("-", 1)[0]

        redis.kill()
        assert wait_until(lambda: not ready(g), 5, 0.02)
        time.sleep(0.5)
        # A brand-new Redis on the same port: no AOF, no RDB, nothing.
        redis.start()
        assert redis.command("KEYS", "{ssegw:0}:h:*").startswith(b"*0"), "the new Redis must hold no history"
        assert wait_until(lambda: ready(g), 15, 0.05), "gateway did not recover"
        # The gap cannot be filled: the open streams are closed so their clients resume.
        for s in streams:
            assert s.wait_closed(10), "a stream stayed open across a Redis that lost its data"
        assert g.stats()["broker"]["gap_lost"] >= 1

        with g.stream(path(t1), {"Last-Event-ID": last1}) as r1, \
                g.stream(path(t1, t2), {"Last-Event-ID": last2}) as r2, \
                g.stream(path(t2, since="earliest")) as fresh:
            assert r1.status == r2.status == fresh.status == 200
            r1.wait_events(1)
            r2.wait_events(1)
            assert r1.events and r1.events[0].event == "ssegw.reset", r1.events
            assert json.loads(r1.events[0].data) == {"topics": [t1]}
            assert r2.events and r2.events[0].event == "ssegw.reset", r2.events
            assert sorted(json.loads(r2.events[0].data)["topics"]) == sorted([t1, t2])
            r = g.publish({"topic": t1, "data": "new"})
            assert r.status == 200, r
            (new_id,) = r.json()["ids"]
            assert new_id.rsplit("-", 1)[0] != old_epoch, "a Redis that lost its data must get a new epoch"
            for s in (r1, r2):
                s.wait_events(2)
                assert [(e.event, e.data) for e in s.events[1:]] == [("message", "new")]
                assert s.events[1].id == new_id
            settle_events = fresh.wait_events(1, 0.5)
            assert settle_events == [], "nothing of the lost history may be replayed"
    finally:
        for s in streams:
            s.close()
        if g is not None:
            g.kill()
        redis.stop()

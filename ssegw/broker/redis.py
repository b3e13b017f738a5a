"""The Redis broker: many workers on many hosts, one sequence, history anyone can resume from.

Strategy.
- Publishing is one FCALL of ``ssegw_publish`` (``redis_lib.lua``): INCR the shard
  sequence, XADD to the topic's history stream, PUBLISH to the topic's channel -- atomically,
  so ids, history order and fan-out order are the same thing.  A batch is one call: all or
  nothing.  Only after Redis answered does ``/publish`` answer 200.
- Each worker subscribes to the channels of the topics its clients need (first local
  subscriber: SUBSCRIBE; last one gone: UNSUBSCRIBE on the next housekeeping pass).  With
  millions of per-user topics a worker hears only its own users' traffic; with a handful of
  high fan-out tickers it is the same as subscribing to everything.  Pub/Sub on one
  connection delivers in publish order, so events of a shard arrive in sequence order.
- Pub/Sub loses what is published while the connection is down, so the worker remembers the
  last sequence it received; after reconnecting (with backoff and jitter) it resubscribes,
  reads every subscribed topic's history after that sequence in one call, delivers it in
  order and drops pub/sub duplicates below the read's head.  Topics whose history no longer
  covers the gap, or a Redis that came back with a new epoch (it lost its data), cannot be
  filled: their streams are closed so that clients resume (and get ``ssegw.reset``).
- A new stream's replay waits until its topics' subscriptions are confirmed, then reads
  history up to the head: nothing published in between can fall through.
- Presence: each worker keeps its per-topic subscriber counts in a hash that expires unless
  refreshed, and registers itself in a ZSET by last-seen time; cluster counts sum the live
  workers' hashes.

Only Redis errors that mean "cannot reach Redis" become :class:`BrokerUnavailable` (503);
nothing of a failed publish is half-applied because the function runs atomically.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import socket
from collections.abc import Callable
from importlib import resources

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..core.history import Event
from ..core.ids import format_id
from ..core.publish import Message
from ..core.sse import encode_frame
from .base import BrokerUnavailable, PublishUnresolved, Replay

log = logging.getLogger("ssegw.redis")

PREFIX = "{ssegw:0}"
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)
#: How long a worker's presence survives without a refresh (it refreshes every second).
PRESENCE_TTL_MS = 15_000
#: Reconnect backoff bounds (seconds); each wait is jittered by +-50%.
BACKOFF_MIN, BACKOFF_MAX = 0.05, 2.0
#: Bound on how long a request waits for Redis (publish, replay) before answering 503.
COMMAND_TIMEOUT = 5.0
#: How long a publish whose outcome is unknown keeps asking Redis (the token lives 2 min).
RESOLVE_TIMEOUT = 60.0
#: Idle seconds on the pub/sub connection before we check Redis is still there.
PING_EVERY = 3.0
#: Keep clock samples this much longer than the longest history_ttl.
CLOCK_MARGIN_MS = 3_600_000


def stream_key(topic: str) -> str:
    return f"{PREFIX}:h:{topic}"


def channel(topic: str) -> str:
    return f"{PREFIX}:c:{topic}"


_CHANNEL_PREFIX = f"{PREFIX}:c:".encode()


class RedisBroker:
    kind = "redis"

    def __init__(self, url: str, settings: Callable[[str], tuple[int, int]], max_ttl_ms: int) -> None:
        """Args:
            url: ``redis://host:port/db`` (or ``rediss://``, ``unix://``).
            settings: topic -> (history_size, history_ttl_ms).
            max_ttl_ms: the longest history_ttl configured (clock samples are kept that long).
        """
        self.url = url
        self._settings = settings
        self._retention = max_ttl_ms + CLOCK_MARGIN_MS
        self._client: aioredis.Redis | None = None
        self._deliver: Callable[[list[Event]], None] | None = None
        self._on_gap: Callable[[list[str] | None], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._pubsub: aioredis.client.PubSub | None = None
        self._closed = False
        self.up = False
        self.epoch = ""
        self.last_seq = 0  # highest sequence received (pub/sub or gap fill)
        self.desired: set[str] = set()
        self.confirmed: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._idle: set[str] = set()  # topics to unsubscribe on the next pass
        self._to_subscribe: list[str] = []
        self._requests = itertools.count(1)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self._presence: dict[str, int] = {}
        self._presence_dirty: set[str] = set()
        self._housekeeping: asyncio.Task[None] | None = None
        # counters for metrics
        self.reconnects = 0
        self.publish_errors = 0
        self.publish_retries = 0
        self.gap_fills = 0
        self.gap_events = 0
        self.gap_lost = 0

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, deliver: Callable[[list[Event]], None],
                    on_gap: Callable[[list[str] | None], None] | None = None) -> None:
        self._deliver = deliver
        self._on_gap = on_gap
        # No retries inside redis-py (its default since 6.x is 3): a command it re-sends
        # after a lost reply would surface as a *connect* error, which ``publish`` must
        # be able to read as "nothing was sent".  Every retry is ours, with its own token.
        self._client = aioredis.Redis.from_url(
            self.url, socket_timeout=COMMAND_TIMEOUT, socket_connect_timeout=2.0, health_check_interval=0,
            retry=Retry(NoBackoff(), 0),
        )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ssegw-redis-pubsub")

    async def close(self) -> None:
        self._closed = True
        for t in (self._task, self._housekeeping):
            if t is not None:
                t.cancel()
                try:
                    await t
                except (asyncio.CancelledError, *_UNREACHABLE, RedisError):
                    pass
        if self._client is not None:
            try:
                await self._client.zrem(f"{PREFIX}:workers", self.worker_id)
                await self._client.delete(self._presence_key())
            except (*_UNREACHABLE, RedisError):
                pass  # Redis is gone; our presence expires by itself
            await self._client.aclose()

    def ready(self) -> bool:
        return self.up

    async def wait_ready(self, timeout: float) -> bool:
        """Wait (bounded) until Redis is connected; a worker calls this before accepting."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.up and loop.time() < deadline:
            await asyncio.sleep(0.02)
        return self.up

    # -- publishing -------------------------------------------------------------------

    async def publish(self, messages: list[Message]) -> list[str]:
        """One FCALL for the whole batch.

        Refused at connect on the first attempt means nothing was sent: ``BrokerUnavailable``
        (503, "nothing was published").  Any other failure -- a reply lost to a broken
        connection, Redis still loading after a restart -- is ambiguous, and the call is
        retried with the same request token until Redis answers: Redis either ran the first
        call (the token returns its ids) or did not (the retry publishes), never twice.  So a
        publish in flight when Redis dies waits for Redis and gets its real answer.  Only if
        Redis stays away past ``RESOLVE_TIMEOUT`` (well inside the token's 2 min life) does
        the caller get ``PublishUnresolved``."""
        client = self._client
        if client is None or not self.up:
            raise BrokerUnavailable("redis is not connected")
        token = f"{PREFIX}:req:{self.worker_id}:{next(self._requests)}"
        keys = [f"{PREFIX}:seq", f"{PREFIX}:epoch", f"{PREFIX}:clock", token]
        args: list[object] = [len(messages), self._retention]
        for m in messages:
            size, ttl_ms = self._settings(m.topic)
            keys.append(stream_key(m.topic))
            args += [channel(m.topic), m.key or "", "1" if m.key is not None else "0", m.body, size, ttl_ms]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RESOLVE_TIMEOUT
        delay = 0.0
        while True:
            try:
                res = await client.fcall("ssegw_publish", len(keys), *keys, *args)
                break
            except _UNREACHABLE as e:
                if delay == 0.0 and "connecting to" in str(e):
                    self.publish_errors += 1
                    raise BrokerUnavailable(f"redis unreachable: {e}") from None
                err: Exception = e
            except ResponseError as e:
                if "Function not found" not in str(e):
                    # Redis refused the call before running it (the library checks every
                    # key before the first write): nothing was published.
                    self.publish_errors += 1
                    raise BrokerUnavailable(f"redis refused the publish: {e}") from None
                # Redis came back without its data (and so without our library): load it
                # and retry; whatever the first call did went with the data.
                err = e
                try:
                    await self._load_library(client)
                except (*_UNREACHABLE, RedisError):
                    pass
            self.publish_retries += 1
            delay = min(max(delay * 2, BACKOFF_MIN), 1.0)
            if loop.time() + delay >= deadline:
                self.publish_errors += 1
                raise PublishUnresolved(f"redis unreachable for {RESOLVE_TIMEOUT:.0f}s with the publish "
                                        f"in flight: {err}") from None
            await asyncio.sleep(delay)
        epoch = res[0].decode() if isinstance(res[0], bytes) else str(res[0])
        return [format_id(epoch, int(s)) for s in res[1:]]

    # -- replay ---------------------------------------------------------------------------

    async def replay(self, topics: tuple[str, ...], after: tuple[str, tuple[int, ...]] | None,
                     since: str | None) -> Replay:
        await self._wait_subscribed(topics)
        if after is None and since is None:
            return Replay([], [])
        mode = "after" if after is not None else since
        after_seq = after[1][0] if after is not None and len(after[1]) == 1 else 0
        epoch, head, per_topic = await self._read(topics, mode, after_seq)  # type: ignore[arg-type]
        if after is not None:
            a_epoch, seqs = after
            if a_epoch != epoch or len(seqs) != 1 or seqs[0] > head:
                return Replay([], list(topics))
        reset: list[str] = []
        events: list[Event] = []
        floors: dict[str, int] = {}
        for topic, (covered, evs) in zip(topics, per_topic, strict=True):
            if not covered:
                reset.append(topic)
                continue
            floors[topic] = head
            events.extend(evs)
        events.sort(key=_seq)
        return Replay(events, reset, floors)

    async def _read(self, topics: tuple[str, ...] | list[str], mode: str, after_seq: int
                    ) -> tuple[str, int, list[tuple[bool, list[Event]]]]:
        client = self._client
        if client is None or not self.up:
            raise BrokerUnavailable("redis is not connected")
        keys = [f"{PREFIX}:seq", f"{PREFIX}:epoch", f"{PREFIX}:clock", *(stream_key(t) for t in topics)]
        args = [mode, after_seq, *(self._settings(t)[1] for t in topics)]
        try:
            res = await client.fcall_ro("ssegw_replay", len(keys), *keys, *args)
        except _UNREACHABLE as e:
            raise BrokerUnavailable(f"redis unreachable: {e}") from None
        except ResponseError as e:
            if "Function not found" in str(e):
                await self._load_library(client)
            raise BrokerUnavailable(f"redis refused the replay: {e}") from None
        epoch = res[0].decode()
        head = int(res[1])
        out: list[tuple[bool, list[Event]]] = []
        for topic, r in zip(topics, res[3:], strict=True):
            covered = int(r[0]) == 1
            evs = []
            for i in range(1, len(r), 4):
                seq = int(r[i])
                key = r[i + 2].decode() if r[i + 2] is not None else None
                evs.append(Event(topic, seq, int(r[i + 1]), encode_frame(format_id(epoch, seq), r[i + 3]), key))
            out.append((covered, evs))
        return epoch, head, out

    # -- subscriptions ----------------------------------------------------------------

    def interest(self, topic: str, on: bool) -> None:
        if on:
            self._idle.discard(topic)
            if topic not in self.desired:
                self.desired.add(topic)
                if self._pubsub is not None and self.up:
                    # One SUBSCRIBE for all topics that became wanted in this loop turn.
                    if not self._to_subscribe:
                        asyncio.get_running_loop().call_soon(self._subscribe_soon)
                    self._to_subscribe.append(topic)
        elif topic in self.desired:
            # Unsubscribe lazily: a client that reconnects at once should not cost two
            # round trips and a gap in between.
            self._idle.add(topic)

    def _subscribe_soon(self) -> None:
        topics, self._to_subscribe = self._to_subscribe, []
        if topics:
            asyncio.get_running_loop().create_task(self._subscribe(topics))

    async def _subscribe(self, topics: list[str]) -> None:
        ps = self._pubsub
        if ps is None:
            return
        try:
            await ps.subscribe(*(channel(t) for t in topics))
        except _UNREACHABLE:
            pass  # the reader notices and reconnects; resubscribing covers these topics

    async def _wait_subscribed(self, topics: tuple[str, ...]) -> None:
        if not self.up:
            raise BrokerUnavailable("redis is not connected")
        loop = asyncio.get_running_loop()
        futs = []
        for t in topics:
            if t in self.confirmed:
                continue
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(t, []).append(fut)
            futs.append(fut)
        if futs:
            try:
                await asyncio.wait_for(asyncio.gather(*futs), COMMAND_TIMEOUT)
            except TimeoutError:
                raise BrokerUnavailable("redis did not confirm the subscription") from None

    def _confirm(self, topic: str) -> None:
        self.confirmed.add(topic)
        for fut in self._waiters.pop(topic, ()):
            if not fut.done():
                fut.set_result(None)

    def _fail_waiters(self) -> None:
        for futs in self._waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(BrokerUnavailable("redis connection lost"))
        self._waiters.clear()

    # -- the pub/sub reader -------------------------------------------------------------

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        while not self._closed:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (*_UNREACHABLE, RedisError) as e:
                if self.up:
                    log.warning("redis connection lost: %s", e)
                self._down()
            except Exception:  # a bug of ours: log it, reconnect rather than stop serving
                log.exception("redis reader failed")
                self._down()
            if self._closed:
                return
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, BACKOFF_MAX)
            if self.up:
                backoff = BACKOFF_MIN

    def _down(self) -> None:
        self.up = False
        self.confirmed.clear()
        self._fail_waiters()
        ps = self._pubsub
        self._pubsub = None
        if ps is not None:
            asyncio.get_running_loop().create_task(_close_quietly(ps))

    async def _session(self) -> None:
        client = self._client
        assert client is not None
        await client.ping()
        await self._load_library(client)
        # The epoch names this incarnation of the sequence; create it if Redis has none
        # (a new Redis, or one that lost its data) so that pub/sub ids can be formed.
        await client.set(f"{PREFIX}:epoch", _new_epoch(), nx=True)
        ps = client.pubsub()
        self._pubsub = ps
        topics = sorted(self.desired)
        await ps.subscribe(f"{PREFIX}:ctl")  # keeps the connection subscribed with no topics
        for i in range(0, len(topics), 1000):
            await ps.subscribe(*(channel(t) for t in topics[i:i + 1000]))
        # Wait for the confirmations so that the gap fill below starts after them.
        pending = {channel(t).encode() for t in topics} | {f"{PREFIX}:ctl".encode()}
        buffered: list[dict] = []
        deadline = asyncio.get_running_loop().time() + COMMAND_TIMEOUT
        while pending:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise RedisTimeoutError("no subscription confirmation")
            m = await ps.get_message(ignore_subscribe_messages=False, timeout=left)
            if m is None:
                continue
            if m["type"] == "subscribe":
                pending.discard(m["channel"])
            else:
                buffered.append(m)
        for t in topics:
            self._confirm(t)
        await self._fill_gap(client, topics)
        if self.reconnects:
            log.info("redis reconnected (%d topics resubscribed)", len(topics))
        self.reconnects += 1
        self.up = True
        # Topics that became wanted while we were connecting were not in the snapshot
        # above and got no SUBSCRIBE (interest() sends one only while up): send it now.
        late = sorted(self.desired - set(topics))
        if late:
            await ps.subscribe(*(channel(t) for t in late))
        if self._housekeeping is None or self._housekeeping.done():
            self._housekeeping = asyncio.get_running_loop().create_task(self._presence_loop())
        for m in buffered:
            self._on_message(m)
        idle = 0.0
        while True:
            m = await ps.get_message(ignore_subscribe_messages=False, timeout=1.0)
            if m is None:
                # A silent connection may be a dead one (no FIN from a vanished host):
                # ping it every few idle seconds; a failure raises and we reconnect.
                idle += 1.0
                if idle >= PING_EVERY:
                    idle = 0.0
                    await asyncio.wait_for(client.ping(), COMMAND_TIMEOUT)
                continue
            idle = 0.0
            typ = m["type"]
            if typ == "message":
                self._on_message(m)
            elif typ == "subscribe":
                ch = m["channel"]
                if ch.startswith(_CHANNEL_PREFIX):
                    self._confirm(ch[len(_CHANNEL_PREFIX):].decode())
            elif typ == "unsubscribe":
                ch = m["channel"]
                if ch.startswith(_CHANNEL_PREFIX):
                    self.confirmed.discard(ch[len(_CHANNEL_PREFIX):].decode())

    async def _fill_gap(self, client: aioredis.Redis, topics: list[str]) -> None:
        """After a (re)connect: deliver what was published while we were not listening."""
        epoch_b = await client.get(f"{PREFIX}:epoch")
        epoch = epoch_b.decode() if epoch_b else ""
        if not self.epoch:
            self.epoch = epoch
            if not self.last_seq:
                head = await client.get(f"{PREFIX}:seq")
                self.last_seq = int(head or 0)
                return
        if epoch != self.epoch and epoch:
            # Redis lost its data (or is another Redis): what we missed cannot be placed.
            log.warning("redis epoch changed (%s -> %s): closing streams so clients resume", self.epoch, epoch)
            self.epoch = epoch
            head = await client.get(f"{PREFIX}:seq")
            self.last_seq = int(head or 0)
            self.gap_lost += 1
            if self._on_gap is not None:
                self._on_gap(None)
            return
        if not topics:
            head = await client.get(f"{PREFIX}:seq")
            self.last_seq = max(self.last_seq, int(head or 0))
            return
        self.up = True  # _read needs it; the reader has not started delivering yet
        _, head, per_topic = await self._read(topics, "after", self.last_seq)
        lost = [t for t, (covered, _) in zip(topics, per_topic, strict=True) if not covered]
        events = [e for covered, evs in per_topic if covered for e in evs if e.seq > self.last_seq]
        events.sort(key=_seq)
        self.gap_fills += 1
        self.gap_events += len(events)
        if events and self._deliver is not None:
            self._deliver(events)
        self.last_seq = max(self.last_seq, head)
        if lost:
            self.gap_lost += 1
            log.warning("history no longer covers the outage for %d topics: closing their streams", len(lost))
            if self._on_gap is not None:
                self._on_gap(lost)

    def _on_message(self, m: dict) -> None:
        ch: bytes = m["channel"]
        if not ch.startswith(_CHANNEL_PREFIX):
            return
        data: bytes = m["data"]
        seq_b, ms_b, klen_b, rest = data.split(b":", 3)
        seq = int(seq_b)
        if seq <= self.last_seq:
            return  # already delivered by a gap fill
        self.last_seq = seq
        klen = int(klen_b)
        if klen >= 0:
            key: str | None = rest[:klen].decode()
            body = rest[klen:]
        else:
            key, body = None, rest
        topic = ch[len(_CHANNEL_PREFIX):].decode()
        ev = Event(topic, seq, int(ms_b), encode_frame(format_id(self.epoch, seq), body), key)
        if self._deliver is not None:
            self._deliver([ev])

    async def _load_library(self, client: aioredis.Redis) -> None:
        code = resources.files("ssegw.broker").joinpath("redis_lib.lua").read_text()
        await client.function_load(code, replace=True)

    # -- presence ---------------------------------------------------------------------

    def _presence_key(self) -> str:
        return f"{PREFIX}:presence:{self.worker_id}"

    def presence(self, counts: dict[str, int]) -> None:
        """The worker's subscriber counts for topics that changed since the last call."""
        for t, n in counts.items():
            self._presence[t] = n
            self._presence_dirty.add(t)

    async def _presence_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(1.0)
            if not self.up:
                continue
            client = self._client
            assert client is not None
            try:
                await self._presence_flush(client)
                await self._unsubscribe_idle()
            except (*_UNREACHABLE, RedisError) as e:
                log.debug("presence refresh failed: %s", e)

    async def _presence_flush(self, client: aioredis.Redis) -> None:
        dirty = self._presence_dirty
        self._presence_dirty = set()
        key = self._presence_key()
        pipe = client.pipeline(transaction=False)
        sets = {t: self._presence[t] for t in dirty if self._presence.get(t)}
        gone = [t for t in dirty if not self._presence.get(t)]
        for t in gone:
            self._presence.pop(t, None)
        if sets:
            pipe.hset(key, mapping=sets)
        if gone:
            pipe.hdel(key, *gone)
        pipe.pexpire(key, PRESENCE_TTL_MS)
        t = await client.time()
        now_ms = int(t[0]) * 1000 + int(t[1]) // 1000
        pipe.zadd(f"{PREFIX}:workers", {self.worker_id: now_ms})
        pipe.zremrangebyscore(f"{PREFIX}:workers", "-inf", now_ms - PRESENCE_TTL_MS)
        try:
            await pipe.execute()
        except (*_UNREACHABLE, RedisError):
            self._presence_dirty |= dirty  # try again next time
            raise

    async def _unsubscribe_idle(self) -> None:
        idle = self._idle
        if not idle or self._pubsub is None:
            return
        self._idle = set()
        for t in idle:
            self.desired.discard(t)
            self.confirmed.discard(t)
        await self._pubsub.unsubscribe(*(channel(t) for t in idle))

    async def subscribers(self, topic: str, local: int) -> int:
        client = self._client
        if client is None or not self.up:
            raise BrokerUnavailable("redis is not connected")
        try:
            t = await client.time()
            now_ms = int(t[0]) * 1000 + int(t[1]) // 1000
            workers = await client.zrangebyscore(f"{PREFIX}:workers", now_ms - PRESENCE_TTL_MS, "+inf")
            pipe = client.pipeline(transaction=False)
            for w in workers:
                pipe.hget(f"{PREFIX}:presence:{w.decode()}", topic)
            counts = await pipe.execute()
        except _UNREACHABLE as e:
            raise BrokerUnavailable(f"redis unreachable: {e}") from None
        me = self.worker_id.encode()
        total = local
        for w, c in zip(workers, counts, strict=True):
            if w != me and c is not None:
                total += int(c)
        return total

    def tick(self, now_ms: int) -> None:
        """Housekeeping runs in its own task (it needs Redis round trips)."""

    def stats(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "up": self.up,
            "epoch": self.epoch,
            "last_seq": self.last_seq,
            "subscribed_topics": len(self.confirmed),
            "reconnects": max(0, self.reconnects - 1),
            "publish_errors": self.publish_errors,
            "publish_retries": self.publish_retries,
            "gap_fills": self.gap_fills,
            "gap_events": self.gap_events,
            "gap_lost": self.gap_lost,
        }


async def _close_quietly(ps: aioredis.client.PubSub) -> None:
    try:
        await ps.aclose()
    except (*_UNREACHABLE, RedisError):
        pass  # the connection is already broken


def _seq(e: Event) -> int:
    return e.seq


def _new_epoch() -> str:
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    return "".join(random.choice(alphabet) for _ in range(8))

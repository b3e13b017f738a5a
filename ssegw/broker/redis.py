"""The Redis broker: many workers on many hosts, history anyone can resume from.

Strategy.
- Publishing is one FCALL of ``ssegw_publish`` (``redis_lib.lua``) per shard: INCR the
  shard sequence, XADD to the topic's history stream, SPUBLISH to the topic's sharded
  channel -- atomically, so ids, history order and fan-out order are the same thing.  Only
  after Redis answered does ``/publish`` answer 200.
- Each worker subscribes (SSUBSCRIBE) to the channels of the topics its clients need (first
  local subscriber: subscribe; last one gone: unsubscribe on the next housekeeping pass).
  With millions of per-user topics a worker hears only its own users' traffic; with a
  handful of high fan-out tickers it is the same as subscribing to everything.  A shard's
  messages reach a worker on one connection in publish order, i.e. in sequence order.
- Pub/Sub loses what is published while the connection is down, so the worker remembers the
  last sequence it received per shard; after reconnecting (with backoff and jitter) it
  resubscribes, reads every subscribed topic's history after that sequence in one call,
  delivers it in order and drops pub/sub duplicates below the read's head.  Topics whose
  history no longer covers the gap, or a shard that came back with a new epoch (it lost its
  data), cannot be filled: their streams are closed so that clients resume (and get
  ``ssegw.reset``).
- A new stream's replay waits until its topics' subscriptions are confirmed, then reads
  history up to the head: nothing published in between can fall through.
- Presence (``redis_presence.py``): per-worker counts in expiring hashes, summed.
- Where shards live and how nodes are found: ``redis_layout.py``; the listening half
  (subscriptions, sessions, gap fill, syncs): ``redis_pubsub.py``.

Several shards (Redis Cluster).  The broker finds out at start whether ``url`` is a cluster
node.  A standalone Redis is one shard (hash tag ``ssegw:0``).  On a cluster there is one
shard per primary: the first worker ever to start picks one hash tag per primary (a tag
whose slot that primary serves) and stores the list in ``ssegw:shards`` (SET NX), and the
list never changes after that (the topic -> shard map is ``crc32(topic) % len(list)``), so
resharding moves slots, not topics.  Each shard has its own sequence, epoch, history and
pub/sub connection to the node that serves its slot.

Ids with several shards are vectors ``EPOCH-S0.S1...``: a connection hands back one
``Last-Event-ID`` for all its topics, so the id must say how far it got on every shard.
A live event's frame is encoded once per worker with the worker's *watermark* vector: the
event's own shard at the event's sequence, every other shard at the last sequence the
worker has received from it.  That is a correct resume point for every connection of the
worker that gets the frame: events of a shard reach the worker in order and are queued to
connections as they arrive, so a connection has every event of its topics up to the
watermark, and none above it.  A new stream must not get a live frame whose vector is
behind its replay, so on a cluster a replay stops at the watermark taken just before the
read and everything newer comes live (the replay floor).  For that, every newer event of
the stream's topics must come through pub/sub, which holds once the worker's watermark has
passed everything published before the topics were subscribed: after a new subscription
the worker sends a *sync* (``ssegw_sync`` publishes the shard's head to this worker's
marker channel on that shard, behind every earlier event) and waits for it; syncs are
shared by every stream opening meanwhile, and topics subscribed before the last sync need
none.  Replayed frames are encoded per connection with a running vector.  The same event
can therefore show different ids on different workers (their watermarks differ); each is a
correct resume point.  A multi-topic connection gets a flush's events in arrival order
(``Event.n``), the order their watermark ids assume.  ``EPOCH`` of a
vector id is a checksum of the shards' epochs: if any shard lost its data, ids from before
cannot be placed and resuming clients get ``ssegw.reset`` for all their topics.

A publish batch that spans shards is one FCALL per shard, in shard order.  It is
all-or-nothing only on one shard (one Redis can run one function atomically; two nodes
cannot): if the first shard's call is refused, nothing was published (503); a failure
after that is retried until resolved, and ends in 504 ``outcome_unknown`` if Redis stays
away, never in a 503 that would hide published messages.

Replicated 200s (``redis_wait_replicas``, ``redis_wait_timeout``).  A shard that must
reach N replicas sends ``WAIT N timeout`` in the same pipeline as its FCALL -- one round trip,
one connection (WAIT counts the replicas that acknowledged the *connection's* last write, so
it must ride the FCALL's connection: a pooled ``client.wait()`` could pick another one).
Fewer than N acknowledgements is ``PublishUnresolved`` (504: written on the primary, maybe
lost by a failover), never a 200.  A retry whose token finds the first call's ids writes
nothing, so the connection's offset need not cover that earlier write (Redis after 7.0 moves
it only on a propagated write); the retry pipeline therefore also re-arms the token's expiry
(a replicated write) before its WAIT.  ``auto`` (the default) is resolved per shard from
``ROLE`` on the first publish after each (re)connect: 1 if the primary has a replica
attached, else 0, and asked again every ``AUTO_RECHECK`` s in the background.  So a replica
that detaches, or a primary just promoted whose replicas have not attached yet, costs 504s
for at most that long, and then the shard serves primary-only 200s (logged as a warning)
rather than no 200 at all until an operator steps in: a failover must not become an outage.
Set ``redis_wait_replicas`` explicitly to require replicas whatever happens.

Only Redis errors that mean "cannot reach Redis" become :class:`BrokerUnavailable` (503).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import random
import socket
import weakref
import zlib
from collections.abc import Callable, Sequence

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from ..core.history import Event
from ..core.publish import Message
from ..core.sse import encode_frame
from .base import BrokerUnavailable, PublishUnresolved, Replay
from .redis_layout import (
    PREFIX,
    UNREACHABLE,
    Layout,
    Shard,
    b36,
    channel,
    load_library,
    shard_index,
    stream_key,
)
from .redis_presence import Presence
from .redis_pubsub import BACKOFF_MAX, BACKOFF_MIN, Listener, close_quietly

log = logging.getLogger("ssegw.redis")

__all__ = ["PREFIX", "RedisBroker", "channel", "shard_index", "stream_key"]

#: How long a publish whose outcome is unknown keeps asking Redis (the token lives 2 min).
RESOLVE_TIMEOUT = 60.0
#: Keep clock samples this much longer than the longest history_ttl.
CLOCK_MARGIN_MS = 3_600_000
#: The request token's life in ms (``redis_lib.lua`` sets it; a WAITed retry re-arms it).
TOKEN_TTL_MS = 120_000
#: How often a shard whose ``auto`` replica count resolved to 0 is asked again (seconds).
AUTO_RECHECK = 10.0


#: How long a lease's note (an upstream's status and last id) outlives its last write.
NOTE_TTL_MS = 3_600_000
_LEASE_LUA = """
local cur = redis.call('GET', KEYS[1])
local held = 0
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  held = 1
elseif not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
  held = 1
end
if held == 1 and ARGV[3] ~= '' then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
end
return {held, redis.call('GET', KEYS[2])}
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _default_keyed(topic: str) -> tuple[int, bool]:
    return 10_000, False


class RedisBroker(Listener):
    kind = "redis"
    # Keyed state lives beside each history stream, written by ssegw_publish in the same
    # call (redis_lib.lua "Keyed state").
    keyed = True

    def __init__(self, url: str, settings: Callable[[str], tuple[int, int]], max_ttl_ms: int, *,
                 wait_replicas: int | None = None, wait_timeout: float = 1.0,
                 keyed: Callable[[str], tuple[int, bool]] | None = None) -> None:
        """Args:
            url: ``redis://host:port/db`` (or ``rediss://``, ``unix://``); on a cluster, any node.
            settings: topic -> (history_size, history_ttl_ms).
            max_ttl_ms: the longest history_ttl configured (clock samples are kept that long).
            wait_replicas: replicas a publish must reach before it succeeds (``None``: auto,
                1 on a shard with a replica, else 0).
            wait_timeout: how long (seconds) a publish waits for them.
            keyed: topic -> (max_keys, whether a resume is compacted whenever that sends
                fewer events: slow_consumer conflate); default (10,000, False).
        """
        self.url = url
        self._settings = settings
        self._keyed = keyed or _default_keyed
        self._retention = max_ttl_ms + CLOCK_MARGIN_MS
        self._deliver: Callable[[list[Event]], None] | None = None
        self._on_gap: Callable[[list[str] | None], None] | None = None
        self._boot: asyncio.Task[None] | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._layout = Layout(url)
        self._closed = False
        self.shards: list[Shard] = []
        #: the watermark: per shard, the highest sequence received (pub/sub, gap fill, marker)
        self.seqs: list[int] = []
        self.epoch = ""
        #: events replayed recently and still held somewhere (a backlog, a batch), by
        #: (epoch, seq): concurrent replays of the same history share one frame each instead
        #: of one copy per client (one shard only: with several, frames carry per-stream
        #: vector ids).  Weak: an event no stream holds any more is gone from here too.
        self._frames: weakref.WeakValueDictionary[tuple[str, int], Event] = weakref.WeakValueDictionary()
        self._inflight: dict[tuple, asyncio.Future[Replay]] = {}
        self.desired: set[str] = set()
        self.confirmed: set[str] = set()
        #: per topic, its shard's confirm_count when its subscription was confirmed
        self._confirmed_at: dict[str, int] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._idle: set[str] = set()  # topics to unsubscribe on the next pass
        self._requests = itertools.count(1)
        # os.urandom, not random: the publish request tokens are made from this id, and a
        # seeded `random` (a test framework's, or an application's) would give two brokers
        # of one process the same tokens -- a publish would get another's ids back.
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self._presence = Presence(self.worker_id)
        self.reconnects = 0
        self.publish_errors = 0
        self.publish_retries = 0
        self.gap_fills = 0
        self.gap_events = 0
        self.gap_lost = 0
        #: pub/sub messages dropped at or below the watermark (redis_pubsub.py)
        self.dup_dropped = 0
        #: epoch integrity (redis_pubsub.py): per shard, the primary's replication identity,
        #: the newest event received, the gap fill's head
        self._ident: dict[int, tuple[str, int, int]] = {}
        self._last_ev: dict[int, tuple[str, int, int]] = {}
        self._fill_head: dict[int, int] = {}
        self._published: dict[int, int] = {}
        self._wait_replicas = wait_replicas
        self._wait_timeout_ms = max(1, round(wait_timeout * 1000))
        #: per shard index: replicas a publish must reach (auto resolved), the shard's
        #: ``reconnects`` when that was resolved, and when an auto 0 is asked again
        self._need: dict[int, int] = {}
        self._need_at: dict[int, int] = {}
        self._need_next: dict[int, float] = {}
        self._resolving: dict[int, asyncio.Future[int]] = {}
        self.publish_unreplicated = 0
        #: reads of history and keyed state sent to Redis (replays, where concurrent identical
        #: ones share a read, and gap fills), and the frames replays encoded (a frame still
        #: held from an earlier read is reused, one shard only)
        self.history_reads = 0
        self.replay_encoded = 0

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, deliver: Callable[[list[Event]], None],
                    on_gap: Callable[[list[str] | None], None] | None = None) -> None:
        self._deliver = deliver
        self._on_gap = on_gap
        self._boot = asyncio.get_running_loop().create_task(self._discover(), name="ssegw-redis-boot")

    async def close(self) -> None:
        self._closed = True
        tasks = [self._boot, self._housekeeping, *(s.task for s in self.shards)]
        for t in tasks:
            if t is not None:
                t.cancel()
                try:
                    await t
                except (asyncio.CancelledError, *UNREACHABLE, RedisError):
                    pass
        if self.shards and self.shards[0].client is not None:
            first = self.shards[0]
            try:
                await self._presence.remove(first.client, first.prefix)  # type: ignore[arg-type]
            except (*UNREACHABLE, RedisError):
                pass  # Redis is gone; our presence expires by itself
        for s in self.shards:
            if s.pubsub is not None:
                await close_quietly(s.pubsub)
            if s.client is not None:
                await s.client.aclose()
        await self._layout.close()

    @property
    def up(self) -> bool:
        return bool(self.shards) and all(s.up for s in self.shards)

    def ready(self) -> bool:
        """Every shard is connected (on a cluster with a primary down, the topics of the
        other shards still work, but the gateway does not call itself ready)."""
        return self.up

    async def wait_ready(self, timeout: float) -> bool:
        """Wait (bounded) until every shard is connected; a worker calls this before accepting."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.up and loop.time() < deadline:
            await asyncio.sleep(0.02)
        return self.up

    # -- discovery --------------------------------------------------------------------

    async def _discover(self) -> None:
        """Find the shards (one, or one per cluster primary), then run one pub/sub session per
        shard.  Retried with backoff until Redis answers."""
        backoff = BACKOFF_MIN
        while not self._closed:
            try:
                tags = await self._layout.tags()
                break
            except (*UNREACHABLE, RedisError) as e:
                log.warning("redis is not reachable yet: %s", e)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, BACKOFF_MAX)
        else:
            return
        self.shards = [Shard(i, tag, self.worker_id) for i, tag in enumerate(tags)]
        self.seqs = [0] * len(tags)
        if len(tags) > 1:
            log.info("redis cluster: %d shards (%s)", len(tags), ", ".join(tags))
        loop = asyncio.get_running_loop()
        for s in self.shards:
            s.task = loop.create_task(self._run(s), name=f"ssegw-redis-{s.tag}")
        self._housekeeping = loop.create_task(self._housekeeping_loop())

    # -- publishing -------------------------------------------------------------------

    def shard_of(self, topic: str) -> Shard:
        return self.shards[shard_index(topic, len(self.shards))]

    async def publish(self, messages: Sequence[Message]) -> list[str]:
        """One FCALL per shard the batch touches (one, on a standalone Redis).

        Refused at connect on the first attempt means nothing was sent: ``BrokerUnavailable``
        (503, "nothing was published").  Any other failure -- a reply lost to a broken
        connection, Redis still loading after a restart -- is ambiguous, and the call is
        retried with the same request token until Redis answers: Redis either ran the first
        call (the token returns its ids) or did not (the retry publishes), never twice.  So a
        publish in flight when Redis dies waits for Redis and gets its real answer.  Only if
        Redis stays away past ``RESOLVE_TIMEOUT`` (well inside the token's 2 min life) does
        the caller get ``PublishUnresolved``."""
        if not self.shards:
            raise BrokerUnavailable("redis is not connected")
        groups: dict[int, list[int]] = {}
        for i, m in enumerate(messages):
            groups.setdefault(shard_index(m.topic, len(self.shards)), []).append(i)
        # Only the shards this request touches need to be up: a cluster with one primary
        # gone keeps serving the topics of the others.
        down = [self.shards[k].tag for k in groups if not self.shards[k].up]
        if down:
            raise BrokerUnavailable(f"redis is not connected ({', '.join(down)})")
        ids: list[str] = [""] * len(messages)
        first = True
        for k in sorted(groups):
            idx = groups[k]
            s = self.shards[k]
            seqs = await self._publish_shard(s, [messages[i] for i in idx], first)
            first = False
            if seqs and seqs[-1] > self._published.get(k, 0):
                self._published[k] = seqs[-1]  # handed out: the epoch check vouches for it too
            for i, seq in zip(idx, seqs, strict=True):
                ids[i] = self._id_at(k, seq)
        return ids

    async def _publish_shard(self, s: Shard, messages: list[Message], first: bool) -> list[int]:
        client = s.client
        if client is None or not s.up:
            if first:
                raise BrokerUnavailable("redis is not connected")
        token = f"{s.prefix}:req:{self.worker_id}:{next(self._requests)}"
        keys = [f"{s.prefix}:seq", f"{s.prefix}:epoch", f"{s.prefix}:clock", token]
        args: list[object] = [len(messages), self._retention]
        for m in messages:
            size, ttl_ms = self._settings(m.topic)
            keys.append(s.stream_key(m.topic))
            args += [s.channel(m.topic), m.key or "", "1" if m.key is not None else "0", m.body, size, ttl_ms]
        args += [self._keyed(m.topic)[0] for m in messages]  # max_keys, after the documented arguments
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RESOLVE_TIMEOUT
        delay = 0.0
        while True:
            client = s.client
            try:
                if client is None:
                    raise RedisConnectionError("Error connecting to the shard's node")
                need = await self._replicas_needed(s, client)
                if need == 0:
                    res = await client.fcall("ssegw_publish", len(keys), *keys, *args)
                    break
                res = await self._fcall_wait(client, keys, args, need, delay > 0.0)
                break
            except UNREACHABLE as e:
                if first and delay == 0.0 and "connecting to" in str(e):
                    self.publish_errors += 1
                    raise BrokerUnavailable(f"redis unreachable: {e}") from None
                err: Exception = e
            except ResponseError as e:
                err = e
                if "Function not found" in str(e):
                    # Redis came back without its data (and so without our library): load
                    # it and retry; whatever an earlier attempt did went with the data.
                    if client is not None:
                        try:
                            await load_library(client)
                        except (*UNREACHABLE, RedisError):
                            pass
                elif delay == 0.0:
                    # Refused before running (OOM, READONLY, WRONGTYPE: the library checks
                    # every key before its first write): nothing of this call was published.
                    self.publish_errors += 1
                    if first:
                        raise BrokerUnavailable(f"redis refused the publish: {e}") from None
                    raise PublishUnresolved(f"published on some shards only; then redis refused: {e}") from None
                # A refusal of a *retry* says nothing about the attempt whose reply was
                # lost: keep asking until Redis answers for the token (or give up: 504).
            self.publish_retries += 1
            delay = min(max(delay * 2, BACKOFF_MIN), 1.0)
            if loop.time() + delay >= deadline:
                self.publish_errors += 1
                raise PublishUnresolved(f"redis unreachable for {RESOLVE_TIMEOUT:.0f}s with the publish "
                                        f"in flight: {err}") from None
            await asyncio.sleep(delay)
        return [int(x) for x in res[1:]]

    async def _fcall_wait(self, client: aioredis.Redis, keys: list[str], args: list[object], need: int,
                          retry: bool) -> list:
        """The FCALL and ``WAIT need timeout`` in one pipeline, so on one connection (see
        "Replicated 200s" above).  Raises what the FCALL raised (the caller's retry logic
        reads it as before), or ``PublishUnresolved`` when the write is on the primary but
        fewer than ``need`` replicas acknowledged it in time."""
        pipe = client.pipeline(transaction=False)
        pipe.fcall("ssegw_publish", len(keys), *keys, *args)
        if retry:
            # The token may return an earlier attempt's ids without writing anything, and WAIT
            # waits for the connection's replication offset, which Redis 7.0 moves after every
            # command but later versions only after one that propagated: on this fresh
            # connection that could be nothing, and a lagging replica would count as caught up.
            # Touch the token (propagated as PEXPIREAT) so the offset is past that write.
            pipe.pexpire(keys[3], TOKEN_TTL_MS)
        pipe.wait(need, self._wait_timeout_ms)
        # raise_on_error=False: redis-py would otherwise put the whole command (every
        # message body) into the error text.
        out = await pipe.execute(raise_on_error=False)
        res, acked = out[0], out[-1]
        if isinstance(res, Exception):
            raise res
        if isinstance(acked, Exception) or int(acked) < need:
            self.publish_errors += 1
            self.publish_unreplicated += 1
            got = f"refused: {acked}" if isinstance(acked, Exception) else int(acked)
            raise PublishUnresolved(
                f"written on the primary but acknowledged by {got} of {need} replicas within "
                f"{self._wait_timeout_ms} ms (redis_wait_timeout); a failover may lose it") from None
        return res

    async def _replicas_needed(self, s: Shard, client: aioredis.Redis) -> int:
        """How many replicas a publish on ``s`` must reach: ``redis_wait_replicas``, or for
        ``auto`` the value resolved on the first publish since the shard (re)connected."""
        if self._wait_replicas is not None:
            return self._wait_replicas
        k = s.index
        need = self._need.get(k)
        loop = asyncio.get_running_loop()
        if need is not None and self._need_at.get(k) == s.reconnects:
            if loop.time() >= self._need_next.get(k, 0.0) and k not in self._resolving:
                # A replica may have attached or left since: look again without holding
                # this publish.
                self._need_next[k] = loop.time() + AUTO_RECHECK
                self._start_resolve(s, client)
            return need
        fut = self._resolving.get(k) or self._start_resolve(s, client)
        return await asyncio.shield(fut)

    def _start_resolve(self, s: Shard, client: aioredis.Redis) -> asyncio.Future[int]:
        k = s.index
        fut: asyncio.Future[int] = asyncio.ensure_future(self._resolve_need(s, client))
        self._resolving[k] = fut

        def done(f: asyncio.Future[int]) -> None:
            if self._resolving.get(k) is f:
                del self._resolving[k]
            if not f.cancelled() and f.exception() is not None:
                log.debug("redis ROLE failed (%s): %s", s.tag, f.exception())
        fut.add_done_callback(done)
        return fut

    async def _resolve_need(self, s: Shard, client: aioredis.Redis) -> int:
        """``auto``: ask the shard's primary how many replicas it has attached (``ROLE``)."""
        k, at = s.index, s.reconnects
        old = self._need.get(k, 0)
        try:
            role = await client.execute_command("ROLE")
        except ResponseError as e:  # e.g. an ACL without ROLE: keep what we had
            log.warning("redis refused ROLE on %s (%s): redis_wait_replicas auto stays %d; set it "
                        "explicitly", s.tag, e, old)
            role = None
        need = old
        if role is not None and role[0] in (b"master", "master"):
            need = min(1, len(role[2]))
            if need < old:
                log.warning("redis %s: no replica attached: publishes are acknowledged by the primary "
                            "only until one attaches (a failover may lose them; set "
                            "redis_wait_replicas to require replicas)", s.tag)
        if k not in self._need or need != old:
            log.info("redis %s: a publish waits for %d replicas (redis_wait_replicas auto)", s.tag, need)
        self._need[k] = need
        self._need_at[k] = at
        self._need_next[k] = asyncio.get_running_loop().time() + AUTO_RECHECK
        return need

    # -- ids --------------------------------------------------------------------------

    def _id_at(self, k: int, seq: int) -> str:
        """The id of an event at ``seq`` on shard ``k``, in this worker's frame of reference."""
        if len(self.seqs) == 1:
            return f"{self.epoch}-{seq}"
        v = list(self.seqs)
        v[k] = seq
        return f"{self.epoch}-{'.'.join(map(str, v))}"

    def _set_epoch(self) -> None:
        if len(self.shards) == 1:
            self.epoch = self.shards[0].epoch
        elif all(s.epoch for s in self.shards):
            joined = ",".join(s.epoch for s in self.shards).encode()
            self.epoch = b36(zlib.crc32(joined))

    # -- replay -----------------------------------------------------------------------

    def publish_now(self, messages: Sequence[Message]) -> list[str] | None:
        return None  # every publish is a round trip to Redis

    def replay_now(self, topics: tuple[str, ...], after: tuple[str, tuple[int, ...]] | None,
                   since: str | None) -> Replay | None:
        return None  # every replay is a round trip to Redis

    async def replay(self, topics: tuple[str, ...], after: tuple[str, tuple[int, ...]] | None,
                     since: str | None) -> Replay:
        """Concurrent replays asking the same thing (a storm of ``since=earliest`` clients,
        or of clients resuming from the same id) share one read and one result: history's
        bytes are read from Redis once, not once per client."""
        key = (topics, after, since)
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._replay(topics, after, since))
            self._inflight[key] = fut
            fut.add_done_callback(lambda f: self._replayed(key, f))
        return await asyncio.shield(fut)

    def _replayed(self, key: tuple, fut: asyncio.Future[Replay]) -> None:
        self._inflight.pop(key, None)
        if not fut.cancelled():
            fut.exception()  # retrieved: every waiter got it already (or none is left)

    async def _replay(self, topics: tuple[str, ...], after: tuple[str, tuple[int, ...]] | None,
                      since: str | None) -> Replay:
        n = len(self.shards)
        if not n or not all(self.shards[shard_index(t, n)].up for t in topics):
            raise BrokerUnavailable("redis is not connected")
        await self._wait_subscribed(topics)
        if after is None and since is None:
            return Replay([], [])
        if after is not None:
            a_epoch, seqs = after
            if a_epoch != self.epoch or len(seqs) != n:
                return Replay([], list(topics))
        groups: dict[int, list[str]] = {}
        for t in topics:
            groups.setdefault(shard_index(t, n), []).append(t)
        mode = "resume" if after is not None else str(since)  # resume: history, else keyed state
        order = sorted(groups)
        if n > 1:
            # Several shards ("Several shards" above): the replay of shard k stops at this
            # worker's watermark u[k], taken before the read, and whatever is newer comes
            # live.  Every live frame this stream gets is then newer than u, so its vector
            # id is never behind the replay's.  That needs every event above u[k] of these
            # topics to come through pub/sub: true once a sync sent after the topic's
            # subscription has come back (the watermark then passed everything older).
            await asyncio.gather(*(self._synced(self.shards[k], groups[k]) for k in order))
            upto = {k: self.seqs[k] for k in order}
        reads = await asyncio.gather(*(
            self._read(self.shards[k], groups[k], mode, after[1][k] if after is not None else 0)
            for k in order))
        reset: list[str] = []
        compacted: list[str] = []
        floors: dict[str, int] = {}
        per_shard: list[tuple[int, list[tuple[int, int, str, str | None, bytes]]]] = []
        heads: dict[int, int] = {}
        for k, (epoch, head, per_topic) in zip(order, reads, strict=True):
            s = self.shards[k]
            if epoch != s.epoch or (after is not None and after[1][k] > head):
                reset.extend(groups[k])  # this shard lost its data, or the id is from elsewhere
                continue
            if n > 1:
                head = upto[k]
            heads[k] = head
            evs: list[tuple[int, int, str, str | None, bytes]] = []
            for topic, (status, raw) in zip(groups[k], per_topic, strict=True):
                if status == 0:
                    reset.append(topic)
                    continue
                if status == 2:
                    compacted.append(topic)
                # Live events at or under the floor are skipped.  With several shards head is
                # this worker's watermark, which can be behind the position the client brings
                # from another gateway: what it already has on this shard must not come again.
                floors[topic] = max(head, after[1][k]) if after is not None else head
                evs.extend((seq, ms, topic, key, body) for seq, ms, key, body in raw if seq <= head)
            evs.sort()
            per_shard.append((k, evs))
        if n == 1:
            epoch, frames = self.epoch, self._frames
            events = []
            for _, evs in per_shard:
                for seq, ms, t, key, body in evs:
                    ev = frames.get((epoch, seq))
                    if ev is None:
                        ev = frames[(epoch, seq)] = Event(t, seq, ms, encode_frame(f"{epoch}-{seq}", body), key)
                        self.replay_encoded += 1
                    events.append(ev)
            return Replay(events, reset, floors, compacted)
        # Several shards: replayed frames get a running vector id, per connection.
        v = list(after[1]) if after is not None else list(self.seqs)
        if after is None:
            for k, h in heads.items():
                v[k] = h
            for k, evs in per_shard:
                if evs:
                    v[k] = evs[0][0] - 1
        events = []
        # Interleave the shards by publish time; each shard's own order is kept whatever
        # the clocks say (heapq.merge only ever takes a list's head).
        tagged = [[(ms, k, seq, t, key, body) for seq, ms, t, key, body in evs] for k, evs in per_shard]
        for ms, k, seq, t, key, body in heapq.merge(*tagged, key=lambda x: x[0]):
            v[k] = seq
            events.append(Event(t, seq, ms, encode_frame(f"{self.epoch}-{'.'.join(map(str, v))}", body), key))
        self.replay_encoded += len(events)
        return Replay(events, reset, floors, compacted)

    async def _read(self, s: Shard, topics: list[str], mode: str, after_seq: int
                    ) -> tuple[str, int, list[tuple[int, list[tuple[int, int, str | None, bytes]]]]]:
        """One ``ssegw_replay`` call: (epoch, head, per topic (status, events)); status 1 =
        history covers, 2 = compacted from keyed state, 0 = neither (reset)."""
        client = s.client
        if client is None or not s.up:
            raise BrokerUnavailable("redis is not connected")
        keys = [f"{s.prefix}:seq", f"{s.prefix}:epoch", f"{s.prefix}:clock", *(s.stream_key(t) for t in topics)]
        self.history_reads += 1
        args: list[object] = [mode, after_seq, *(self._settings(t)[1] for t in topics),
                              *("1" if self._keyed(t)[1] else "0" for t in topics)]
        try:
            res = await client.fcall_ro("ssegw_replay", len(keys), *keys, *args)
        except UNREACHABLE as e:
            raise BrokerUnavailable(f"redis unreachable: {e}") from None
        except ResponseError as e:
            if "Function not found" in str(e):
                await load_library(client)
            raise BrokerUnavailable(f"redis refused the replay: {e}") from None
        epoch = res[0].decode()
        head = int(res[1])
        out: list[tuple[int, list[tuple[int, int, str | None, bytes]]]] = []
        for r in res[3:]:
            status = int(r[0])
            evs = []
            for i in range(1, len(r), 4):
                key = r[i + 2].decode() if r[i + 2] is not None else None
                evs.append((int(r[i]), int(r[i + 1]), key, r[i + 3]))
            out.append((status, evs))
        return epoch, head, out


    # -- presence (redis_presence.py) and housekeeping ----------------------------------

    def presence(self, counts: dict[str, int]) -> None:
        """The worker's subscriber counts for topics that changed since the last call."""
        self._presence.update(counts)

    async def subscribers(self, topic: str, local: int) -> int:
        first = self.shards[0] if self.shards else None
        if first is None or first.client is None or not first.up:
            raise BrokerUnavailable("redis is not connected")
        try:
            return await self._presence.total(first.client, first.prefix, topic, local)
        except UNREACHABLE as e:
            raise BrokerUnavailable(f"redis unreachable: {e}") from None

    async def keys(self, topic: str) -> int:
        """The members of the topic's keyed state (``redis_lib.lua`` "Keyed state"); members
        older than the ttl count until the next publish or replay removes or skips them."""
        if not self.shards:
            raise BrokerUnavailable("redis is not connected")
        s = self.shard_of(topic)
        if s.client is None or not s.up:
            raise BrokerUnavailable("redis is not connected")
        try:
            return int(await s.client.zcard(s.stream_key(topic).replace("}:h:", "}:kz:", 1)))
        except UNREACHABLE as e:
            raise BrokerUnavailable(f"redis unreachable: {e}") from None

    # -- leases (upstream routes: one upstream stream per topic in the cluster) -----------

    async def lease(self, name: str, owner: str, ttl_ms: int, note: str | None) -> tuple[bool, str | None]:
        """``SET NX PX`` to take the lease, ``PEXPIRE`` to renew it (only by its owner), in one
        script so that a renewal can never extend someone else's lease.  The note lives in its
        own key (``NOTE_TTL_MS``) so that it outlives a holder that died: the next holder
        reads where the last one got to."""
        first = self.shards[0] if self.shards else None
        if first is None or first.client is None or not first.up:
            raise BrokerUnavailable("redis is not connected")
        keys = (f"{first.prefix}:lease:{name}", f"{first.prefix}:lease-note:{name}")
        try:
            held, stored = await first.client.eval(  # type: ignore[misc]
                _LEASE_LUA, 2, *keys, owner, ttl_ms, "" if note is None else note, NOTE_TTL_MS)
        except (*UNREACHABLE, RedisError) as e:
            raise BrokerUnavailable(f"redis unreachable: {e}") from None
        return bool(held), stored.decode("utf-8", "replace") if stored else None

    async def release(self, name: str, owner: str) -> None:
        first = self.shards[0] if self.shards else None
        if first is None or first.client is None:
            return
        try:
            await first.client.eval(_RELEASE_LUA, 1, f"{first.prefix}:lease:{name}", owner)  # type: ignore[misc]
        except (*UNREACHABLE, RedisError) as e:
            log.debug("lease release failed (it expires by itself): %s", e)

    async def _housekeeping_loop(self) -> None:
        """Every second: refresh presence, unsubscribe topics nobody here wants any more."""
        while not self._closed:
            await asyncio.sleep(1.0)
            first = self.shards[0]
            if not first.up or first.client is None:
                continue
            try:
                await self._presence.flush(first.client, first.prefix)
                await self._unsubscribe_idle()
            except (*UNREACHABLE, RedisError) as e:
                log.debug("presence refresh failed: %s", e)

    def tick(self, now_ms: int) -> None:
        """Housekeeping runs in its own task (it needs Redis round trips)."""

    def stats(self) -> dict[str, object]:
        out: dict[str, object] = {
            "kind": self.kind,
            "up": self.up,
            "epoch": self.epoch,
            "last_seq": self.seqs[0] if len(self.seqs) == 1 else list(self.seqs),
            "subscribed_topics": len(self.confirmed),
            "reconnects": max(0, self.reconnects - len(self.shards)),
            "publish_errors": self.publish_errors,
            "publish_retries": self.publish_retries,
            "publish_unreplicated": self.publish_unreplicated,
            "gap_fills": self.gap_fills,
            "gap_events": self.gap_events,
            "gap_lost": self.gap_lost,
            "dup_dropped": self.dup_dropped,
            "history_reads": self.history_reads,
            "replay_frames_encoded": self.replay_encoded,
        }
        if len(self.shards) > 1:
            out["shards"] = [{"tag": s.tag, "node": s.node, "up": s.up, "epoch": s.epoch, "last_seq": self.seqs[s.index]}
                             for s in self.shards]
        return out

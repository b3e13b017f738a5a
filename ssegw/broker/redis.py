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
- Presence: each worker keeps its per-topic subscriber counts in a hash that expires unless
  refreshed, and registers itself in a ZSET by last-seen time; cluster counts sum the live
  workers' hashes.

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
none.  Replayed frames are encoded per connection with a running vector.  The same event can therefore show different ids on
different workers (their watermarks differ); each is a correct resume point.  ``EPOCH`` of a
vector id is a checksum of the shards' epochs: if any shard lost its data, ids from before
cannot be placed and resuming clients get ``ssegw.reset`` for all their topics.

A publish batch that spans shards is one FCALL per shard, in shard order.  It is
all-or-nothing only on one shard (one Redis can run one function atomically; two nodes
cannot): if the first shard's call is refused, nothing was published (503); a failure
after that is retried until resolved, and ends in 504 ``outcome_unknown`` if Redis stays
away, never in a 503 that would hide published messages.

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
import zlib
from collections.abc import Callable
from importlib import resources

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import ConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..core.history import Event
from ..core.publish import Message
from ..core.sse import encode_frame
from .base import BrokerUnavailable, PublishUnresolved, Replay

log = logging.getLogger("ssegw.redis")

#: The one shard of a standalone Redis (also the first candidate tag on a cluster).
DEFAULT_TAG = "ssegw:0"
#: Where a cluster's shard list lives (JSON list of hash tags; written once, SET NX).
SHARDS_KEY = "ssegw:shards"
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)
#: How long a worker's presence survives without a refresh (it refreshes every second).
PRESENCE_TTL_MS = 15_000
#: Reconnect backoff bounds (seconds); each wait is jittered by +-50%.
BACKOFF_MIN, BACKOFF_MAX = 0.05, 2.0
#: Bound on how long a request waits for Redis (replay, subscriptions) before answering 503.
COMMAND_TIMEOUT = 5.0
#: How long a publish whose outcome is unknown keeps asking Redis (the token lives 2 min).
RESOLVE_TIMEOUT = 60.0
#: Idle seconds on a pub/sub connection before we check Redis is still there.
PING_EVERY = 3.0
#: Keep clock samples this much longer than the longest history_ttl.
CLOCK_MARGIN_MS = 3_600_000
#: Client options: no retries inside redis-py (its default since 6.x is 3): a command it
#: re-sends after a lost reply would surface as a *connect* error, which ``publish`` must
#: be able to read as "nothing was sent".  Every retry is ours, with its own token.
_CLIENT_OPTS: dict[str, object] = {
    "socket_timeout": COMMAND_TIMEOUT, "socket_connect_timeout": 2.0, "health_check_interval": 0,
    "retry": Retry(NoBackoff(), 0),
}


#: The standalone layout (one shard): key prefix, history stream key, channel name.
PREFIX = "{" + DEFAULT_TAG + "}"


def stream_key(topic: str) -> str:
    return f"{PREFIX}:h:{topic}"


def channel(topic: str) -> str:
    return f"{PREFIX}:c:{topic}"


def shard_index(topic: str, nshards: int) -> int:
    """The shard of a topic: ``crc32(utf-8 name) % nshards`` (backends publishing straight
    into a cluster compute the same, README "Publishing straight into Redis")."""
    return zlib.crc32(topic.encode()) % nshards if nshards > 1 else 0


class _Shard:
    """One shard: its keys' hash tag, the client of the node that serves it, its pub/sub
    session and how far this worker has received its sequence."""

    __slots__ = ("index", "tag", "prefix", "chan_prefix", "marker", "client", "node", "pubsub", "task",
                 "epoch", "up", "reconnects", "waits", "to_subscribe", "unsubscribing", "confirm_count", "synced_upto",
                 "sync_next", "sync_running")

    def __init__(self, index: int, tag: str, worker_id: str) -> None:
        self.index = index
        self.tag = tag
        self.prefix = "{" + tag + "}"
        self.chan_prefix = f"{self.prefix}:c:".encode()
        self.marker = f"{self.prefix}:m:{worker_id}"
        self.client: aioredis.Redis | None = None
        self.node = ""
        self.pubsub: aioredis.client.PubSub | None = None
        self.task: asyncio.Task[None] | None = None
        self.epoch = ""
        self.up = False
        self.reconnects = 0
        #: (sequence, future) pairs waiting for the watermark to reach the sequence
        self.waits: list[tuple[int, asyncio.Future[None]]] = []
        self.to_subscribe: list[str] = []
        #: topics we sent SUNSUBSCRIBE for and whose confirmation has not come yet
        self.unsubscribing: dict[str, int] = {}
        #: subscriptions confirmed so far; syncs cover those confirmed before they were sent
        self.confirm_count = 0
        self.synced_upto = 0
        self.sync_next: asyncio.Future[None] | None = None
        self.sync_running = False

    def stream_key(self, topic: str) -> str:
        return f"{self.prefix}:h:{topic}"

    def channel(self, topic: str) -> str:
        return f"{self.prefix}:c:{topic}"


class RedisBroker:
    kind = "redis"

    def __init__(self, url: str, settings: Callable[[str], tuple[int, int]], max_ttl_ms: int) -> None:
        """Args:
            url: ``redis://host:port/db`` (or ``rediss://``, ``unix://``); on a cluster, any node.
            settings: topic -> (history_size, history_ttl_ms).
            max_ttl_ms: the longest history_ttl configured (clock samples are kept that long).
        """
        self.url = url
        self._settings = settings
        self._retention = max_ttl_ms + CLOCK_MARGIN_MS
        self._deliver: Callable[[list[Event]], None] | None = None
        self._on_gap: Callable[[list[str] | None], None] | None = None
        self._boot: asyncio.Task[None] | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._cluster: RedisCluster | None = None
        self._closed = False
        self.shards: list[_Shard] = []
        #: the watermark: per shard, the highest sequence received (pub/sub, gap fill, marker)
        self.seqs: list[int] = []
        self.epoch = ""
        self.desired: set[str] = set()
        self.confirmed: set[str] = set()
        #: per topic, its shard's confirm_count when its subscription was confirmed
        self._confirmed_at: dict[str, int] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._idle: set[str] = set()  # topics to unsubscribe on the next pass
        self._requests = itertools.count(1)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self._presence: dict[str, int] = {}
        self._presence_dirty: set[str] = set()
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
        self._boot = asyncio.get_running_loop().create_task(self._discover(), name="ssegw-redis-boot")

    async def close(self) -> None:
        self._closed = True
        tasks = [self._boot, self._housekeeping, *(s.task for s in self.shards)]
        for t in tasks:
            if t is not None:
                t.cancel()
                try:
                    await t
                except (asyncio.CancelledError, *_UNREACHABLE, RedisError):
                    pass
        if self.shards and self.shards[0].client is not None:
            first = self.shards[0]
            try:
                await first.client.zrem(f"{first.prefix}:workers", self.worker_id)  # type: ignore[union-attr]
                await first.client.delete(self._presence_key())  # type: ignore[union-attr]
            except (*_UNREACHABLE, RedisError):
                pass  # Redis is gone; our presence expires by itself
        for s in self.shards:
            if s.pubsub is not None:
                await _close_quietly(s.pubsub)
            if s.client is not None:
                await s.client.aclose()
        if self._cluster is not None:
            await self._cluster.aclose()

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
                tags = await self._layout()
                break
            except (*_UNREACHABLE, RedisError) as e:
                log.warning("redis is not reachable yet: %s", e)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, BACKOFF_MAX)
        else:
            return
        self.shards = [_Shard(i, tag, self.worker_id) for i, tag in enumerate(tags)]
        self.seqs = [0] * len(tags)
        if len(tags) > 1:
            log.info("redis cluster: %d shards (%s)", len(tags), ", ".join(tags))
        loop = asyncio.get_running_loop()
        for s in self.shards:
            s.task = loop.create_task(self._run(s), name=f"ssegw-redis-{s.tag}")
        self._housekeeping = loop.create_task(self._presence_loop())

    async def _layout(self) -> list[str]:
        probe = aioredis.Redis.from_url(self.url, **_CLIENT_OPTS)  # type: ignore[arg-type]
        try:
            info = await probe.info("cluster")
        finally:
            await probe.aclose()
        if not info.get("cluster_enabled"):
            return [DEFAULT_TAG]
        if self._cluster is None:
            self._cluster = RedisCluster.from_url(self.url, socket_timeout=COMMAND_TIMEOUT,
                                                  socket_connect_timeout=2.0)
        cluster = self._cluster
        await cluster.initialize()
        raw = await cluster.get(SHARDS_KEY)
        if raw is None:
            await cluster.set(SHARDS_KEY, orjson.dumps(self._pick_tags(cluster)), nx=True)
            raw = await cluster.get(SHARDS_KEY)
        tags = orjson.loads(raw)
        if not isinstance(tags, list) or not tags or not all(isinstance(t, str) for t in tags):
            raise ResponseError(f"{SHARDS_KEY} holds {raw!r}, not a list of hash tags")
        return tags

    @staticmethod
    def _pick_tags(cluster: RedisCluster) -> list[str]:
        """One hash tag per primary, each in a slot that primary serves (so fan-out and
        history spread over the primaries as they are when the first worker starts)."""
        primaries = sorted({(n.host, n.port) for n in cluster.get_primaries()})
        tags: list[str] = []
        taken: set[tuple[str, int]] = set()
        for i in itertools.count():
            tag = f"ssegw:{i}"
            node = cluster.nodes_manager.get_node_from_slot(key_slot(("{" + tag + "}").encode()))
            if node is not None and (node.host, node.port) not in taken:
                taken.add((node.host, node.port))
                tags.append(tag)
            if len(taken) == len(primaries) or i > 100_000:
                break
        return tags

    async def _connect(self, s: _Shard) -> aioredis.Redis:
        """A client of the node serving the shard (re-resolved on every reconnect, so a
        moved slot or a failover is followed)."""
        if self._cluster is None:
            if s.client is None:
                s.client = aioredis.Redis.from_url(self.url, **_CLIENT_OPTS)  # type: ignore[arg-type]
                s.node = self.url
            return s.client
        await self._cluster.initialize()
        node = self._cluster.get_node_from_key(f"{s.prefix}:seq")
        if node is None:
            raise RedisConnectionError(f"no cluster node serves {s.tag} yet")
        where = f"{node.host}:{node.port}"
        if s.client is None or s.node != where:
            if s.client is not None:
                await s.client.aclose()
            kw = parse_url(self.url)
            kw.update(host=node.host, port=node.port, **_CLIENT_OPTS)
            s.client = aioredis.Redis.from_pool(ConnectionPool(**kw))  # closes its pool on aclose()
            s.node = where
        return s.client

    # -- publishing -------------------------------------------------------------------

    def shard_of(self, topic: str) -> _Shard:
        return self.shards[shard_index(topic, len(self.shards))]

    async def publish(self, messages: list[Message]) -> list[str]:
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
            for i, seq in zip(idx, seqs, strict=True):
                ids[i] = self._id_at(k, seq)
        return ids

    async def _publish_shard(self, s: _Shard, messages: list[Message], first: bool) -> list[int]:
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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RESOLVE_TIMEOUT
        delay = 0.0
        while True:
            client = s.client
            try:
                if client is None:
                    raise RedisConnectionError("Error connecting to the shard's node")
                res = await client.fcall("ssegw_publish", len(keys), *keys, *args)
                break
            except _UNREACHABLE as e:
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
                            await self._load_library(client)
                        except (*_UNREACHABLE, RedisError):
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
            self.epoch = _b36(zlib.crc32(joined))

    # -- replay -----------------------------------------------------------------------

    async def replay(self, topics: tuple[str, ...], after: tuple[str, tuple[int, ...]] | None,
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
        mode = "after" if after is not None else str(since)
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
            for topic, (covered, raw) in zip(groups[k], per_topic, strict=True):
                if not covered:
                    reset.append(topic)
                    continue
                floors[topic] = head
                evs.extend((seq, ms, topic, key, body) for seq, ms, key, body in raw if seq <= head)
            evs.sort()
            per_shard.append((k, evs))
        if n == 1:
            events = [Event(t, seq, ms, encode_frame(f"{self.epoch}-{seq}", body), key)
                      for _, evs in per_shard for seq, ms, t, key, body in evs]
            return Replay(events, reset, floors)
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
        return Replay(events, reset, floors)

    async def _read(self, s: _Shard, topics: list[str], mode: str, after_seq: int
                    ) -> tuple[str, int, list[tuple[bool, list[tuple[int, int, str | None, bytes]]]]]:
        client = s.client
        if client is None or not s.up:
            raise BrokerUnavailable("redis is not connected")
        keys = [f"{s.prefix}:seq", f"{s.prefix}:epoch", f"{s.prefix}:clock", *(s.stream_key(t) for t in topics)]
        args: list[object] = [mode, after_seq, *(self._settings(t)[1] for t in topics)]
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
        out: list[tuple[bool, list[tuple[int, int, str | None, bytes]]]] = []
        for r in res[3:]:
            covered = int(r[0]) == 1
            evs = []
            for i in range(1, len(r), 4):
                key = r[i + 2].decode() if r[i + 2] is not None else None
                evs.append((int(r[i]), int(r[i + 1]), key, r[i + 3]))
            out.append((covered, evs))
        return epoch, head, out

    async def _synced(self, s: _Shard, topics: list[str]) -> None:
        """Return once a sync sent after every one of ``topics`` was subscribed has come back
        (at once if one already has)."""
        confirmed_at = self._confirmed_at
        if max(confirmed_at.get(t, 0) for t in topics) <= s.synced_upto:
            return
        if s.sync_next is None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_retrieve)
            s.sync_next = fut
        fut = s.sync_next
        if not s.sync_running:
            s.sync_running = True
            asyncio.get_running_loop().create_task(self._sync_loop(s))
        try:
            await asyncio.wait_for(asyncio.shield(fut), COMMAND_TIMEOUT)
        except TimeoutError:
            raise BrokerUnavailable("redis did not answer the sync") from None

    async def _sync_loop(self, s: _Shard) -> None:
        """Run syncs one at a time; callers that arrive while one is out share the next."""
        try:
            while s.sync_next is not None:
                fut, s.sync_next = s.sync_next, None
                gen = s.confirm_count
                try:
                    client = s.client
                    if client is None or not s.up:
                        raise BrokerUnavailable("redis is not connected")
                    head = int(await client.fcall("ssegw_sync", 1, f"{s.prefix}:seq", s.marker))
                    await self._wait_seq(s, head)
                except (*_UNREACHABLE, RedisError, BrokerUnavailable) as e:
                    if not fut.done():
                        fut.set_exception(BrokerUnavailable(f"redis sync failed: {e}"))
                    continue
                s.synced_upto = max(s.synced_upto, gen)
                if not fut.done():
                    fut.set_result(None)
        finally:
            s.sync_running = False

    async def _wait_seq(self, s: _Shard, seq: int) -> None:
        if self.seqs[s.index] >= seq:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        s.waits.append((seq, fut))
        try:
            await asyncio.wait_for(fut, COMMAND_TIMEOUT)
        except TimeoutError:
            raise BrokerUnavailable("redis did not deliver the replay marker") from None

    def _advanced(self, s: _Shard) -> None:
        at = self.seqs[s.index]
        keep = []
        for seq, fut in s.waits:
            if fut.done():
                continue
            if seq <= at:
                fut.set_result(None)
            else:
                keep.append((seq, fut))
        s.waits = keep

    # -- subscriptions ----------------------------------------------------------------

    def interest(self, topic: str, on: bool) -> None:
        if on:
            self._idle.discard(topic)
            if topic not in self.desired:
                self.desired.add(topic)
                if not self.shards:
                    return  # subscribed when the shard's session starts
                s = self.shard_of(topic)
                if s.pubsub is not None and s.up:
                    # One SSUBSCRIBE per shard for all topics that became wanted in this turn.
                    if not s.to_subscribe:
                        asyncio.get_running_loop().call_soon(self._subscribe_soon, s)
                    s.to_subscribe.append(topic)
        elif topic in self.desired:
            # Unsubscribe lazily: a client that reconnects at once should not cost two
            # round trips and a gap in between.
            self._idle.add(topic)

    def _subscribe_soon(self, s: _Shard) -> None:
        topics, s.to_subscribe = s.to_subscribe, []
        if topics:
            asyncio.get_running_loop().create_task(self._subscribe(s, topics))

    async def _subscribe(self, s: _Shard, topics: list[str]) -> None:
        ps = s.pubsub
        if ps is None:
            return
        try:
            await ps.ssubscribe(*(s.channel(t) for t in topics))
        except _UNREACHABLE:
            pass  # the reader notices and reconnects; resubscribing covers these topics

    async def _wait_subscribed(self, topics: tuple[str, ...]) -> None:
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
        if len(self.shards) > 1:
            s = self.shard_of(topic)
            s.confirm_count += 1
            self._confirmed_at[topic] = s.confirm_count
        for fut in self._waiters.pop(topic, ()):
            if not fut.done():
                fut.set_result(None)

    def _fail_waiters(self, s: _Shard) -> None:
        n = len(self.shards)
        for t in [t for t in self._waiters if shard_index(t, n) == s.index]:
            for fut in self._waiters.pop(t):
                if not fut.done():
                    fut.set_exception(BrokerUnavailable("redis connection lost"))
        for _, fut in s.waits:
            if not fut.done():
                fut.set_exception(BrokerUnavailable("redis connection lost"))
        s.waits = []

    # -- the pub/sub readers (one per shard) ----------------------------------------------

    async def _run(self, s: _Shard) -> None:
        backoff = BACKOFF_MIN
        while not self._closed:
            try:
                await self._session(s)
            except asyncio.CancelledError:
                raise
            except (*_UNREACHABLE, RedisError) as e:
                if s.up:
                    log.warning("redis connection lost (%s): %s", s.tag, e)
                self._down(s)
            except Exception:  # a bug of ours: log it, reconnect rather than stop serving
                log.exception("redis reader failed (%s)", s.tag)
                self._down(s)
            if self._closed:
                return
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, BACKOFF_MAX)
            if s.up:
                backoff = BACKOFF_MIN

    def _down(self, s: _Shard) -> None:
        s.up = False
        s.unsubscribing.clear()
        n = len(self.shards)
        gone = {t for t in self.confirmed if shard_index(t, n) == s.index}
        self.confirmed -= gone
        for t in gone:
            self._confirmed_at.pop(t, None)
        self._fail_waiters(s)
        ps = s.pubsub
        s.pubsub = None
        if ps is not None:
            asyncio.get_running_loop().create_task(_close_quietly(ps))

    async def _session(self, s: _Shard) -> None:
        client = await self._connect(s)
        await client.ping()
        await self._load_library(client)
        # The epoch names this incarnation of the shard's sequence; create it if Redis has
        # none (a new Redis, or one that lost its data) so that pub/sub ids can be formed.
        await client.set(f"{s.prefix}:epoch", _new_epoch(), nx=True)
        ps = client.pubsub()
        s.pubsub = ps
        n = len(self.shards)
        topics = sorted(t for t in self.desired if shard_index(t, n) == s.index)
        await ps.ssubscribe(s.marker)  # keeps the connection subscribed with no topics
        for i in range(0, len(topics), 1000):
            await ps.ssubscribe(*(s.channel(t) for t in topics[i:i + 1000]))
        # Wait for the confirmations so that the gap fill below starts after them.
        pending = {s.channel(t).encode() for t in topics} | {s.marker.encode()}
        buffered: list[dict] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + COMMAND_TIMEOUT
        while pending:
            left = deadline - loop.time()
            if left <= 0:
                raise RedisTimeoutError("no subscription confirmation")
            m = await ps.get_message(ignore_subscribe_messages=False, timeout=left)
            if m is None:
                continue
            if m["type"] == "ssubscribe":
                pending.discard(m["channel"])
            else:
                buffered.append(m)
        for t in topics:
            self._confirm(t)
        await self._fill_gap(s, client, topics)
        if s.reconnects:
            log.info("redis reconnected (%s, %d topics resubscribed)", s.tag, len(topics))
        s.reconnects += 1
        self.reconnects += 1
        s.up = True
        # Topics that became wanted while we were connecting were not in the snapshot
        # above and got no SSUBSCRIBE (interest() sends one only while up): send it now.
        late = sorted(t for t in self.desired - set(topics) if shard_index(t, n) == s.index)
        if late:
            await ps.ssubscribe(*(s.channel(t) for t in late))
        for m in buffered:
            self._on_message(s, m)
        idle = 0.0
        chan_prefix = s.chan_prefix
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
            if typ == "smessage":
                self._on_message(s, m)
            elif typ == "ssubscribe":
                ch = m["channel"]
                if ch.startswith(chan_prefix):
                    self._confirm(ch[len(chan_prefix):].decode())
            elif typ == "sunsubscribe":
                ch = m["channel"]
                if ch.startswith(chan_prefix):
                    topic = ch[len(chan_prefix):].decode()
                    self.confirmed.discard(topic)
                    self._confirmed_at.pop(topic, None)
                    asked = s.unsubscribing.get(topic, 0)
                    if asked > 1:
                        s.unsubscribing[topic] = asked - 1
                    elif asked:
                        del s.unsubscribing[topic]
                    elif topic in self.desired:
                        # Not asked for: the slot moved to another node (resharding or
                        # failover).  Reconnect to the new owner; the gap fill covers it.
                        raise RedisConnectionError(f"{s.tag}: slot moved away from {s.node}")
                elif ch == s.marker.encode():
                    raise RedisConnectionError(f"{s.tag}: slot moved away from {s.node}")

    async def _fill_gap(self, s: _Shard, client: aioredis.Redis, topics: list[str]) -> None:
        """After a (re)connect: deliver what was published while we were not listening.
        The read happens after the session's subscriptions were confirmed, so it also
        serves as their sync."""
        gen = s.confirm_count
        await self._fill(s, client, topics)
        s.synced_upto = max(s.synced_upto, gen)
        self._advanced(s)

    async def _fill(self, s: _Shard, client: aioredis.Redis, topics: list[str]) -> None:
        k = s.index
        epoch_b = await client.get(f"{s.prefix}:epoch")
        epoch = epoch_b.decode() if epoch_b else ""
        if not s.epoch:
            s.epoch = epoch
            self._set_epoch()
            if not self.seqs[k]:
                head = await client.get(f"{s.prefix}:seq")
                self.seqs[k] = int(head or 0)
                return
        if epoch != s.epoch and epoch:
            # Redis lost its data (or is another Redis): what we missed cannot be placed.
            log.warning("redis epoch changed on %s (%s -> %s): closing streams so clients resume",
                        s.tag, s.epoch, epoch)
            s.epoch = epoch
            self._set_epoch()
            head = await client.get(f"{s.prefix}:seq")
            self.seqs[k] = int(head or 0)
            self.gap_lost += 1
            if self._on_gap is not None:
                self._on_gap(None)
            return
        if not topics:
            head = await client.get(f"{s.prefix}:seq")
            self.seqs[k] = max(self.seqs[k], int(head or 0))
            return
        s.up = True  # _read needs it; the reader has not started delivering yet
        _, head, per_topic = await self._read(s, topics, "after", self.seqs[k])
        lost = [t for t, (covered, _) in zip(topics, per_topic, strict=True) if not covered]
        raw = sorted((seq, ms, t, key, body) for t, (covered, evs) in zip(topics, per_topic, strict=True)
                     if covered for seq, ms, key, body in evs if seq > self.seqs[k])
        events = []
        for seq, ms, t, key, body in raw:
            self.seqs[k] = seq
            events.append(Event(t, seq, ms, encode_frame(self._id_at(k, seq), body), key))
        self.gap_fills += 1
        self.gap_events += len(events)
        if events and self._deliver is not None:
            self._deliver(events)
        self.seqs[k] = max(self.seqs[k], head)
        if lost:
            self.gap_lost += 1
            log.warning("history no longer covers the outage for %d topics: closing their streams", len(lost))
            if self._on_gap is not None:
                self._on_gap(lost)

    def _on_message(self, s: _Shard, m: dict) -> None:
        ch: bytes = m["channel"]
        data: bytes = m["data"]
        k = s.index
        if not ch.startswith(s.chan_prefix):
            if ch == s.marker.encode():  # a replay's marker: we have heard up to its head
                if int(data) > self.seqs[k]:
                    self.seqs[k] = int(data)
                self._advanced(s)
            return
        seq_b, ms_b, klen_b, rest = data.split(b":", 3)
        seq = int(seq_b)
        if seq <= self.seqs[k]:
            return  # already delivered by a gap fill
        self.seqs[k] = seq
        klen = int(klen_b)
        if klen >= 0:
            key: str | None = rest[:klen].decode()
            body = rest[klen:]
        else:
            key, body = None, rest
        topic = ch[len(s.chan_prefix):].decode()
        ev = Event(topic, seq, int(ms_b), encode_frame(self._id_at(k, seq), body), key)
        if s.waits:
            self._advanced(s)
        if self._deliver is not None:
            self._deliver([ev])

    async def _load_library(self, client: aioredis.Redis) -> None:
        code = resources.files("ssegw.broker").joinpath("redis_lib.lua").read_text()
        await client.function_load(code, replace=True)

    # -- presence ---------------------------------------------------------------------

    def _presence_key(self) -> str:
        return f"{self.shards[0].prefix}:presence:{self.worker_id}"

    def presence(self, counts: dict[str, int]) -> None:
        """The worker's subscriber counts for topics that changed since the last call."""
        for t, n in counts.items():
            self._presence[t] = n
            self._presence_dirty.add(t)

    async def _presence_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(1.0)
            first = self.shards[0]
            if not first.up or first.client is None:
                continue
            try:
                await self._presence_flush(first)
                await self._unsubscribe_idle()
            except (*_UNREACHABLE, RedisError) as e:
                log.debug("presence refresh failed: %s", e)

    async def _presence_flush(self, first: _Shard) -> None:
        client = first.client
        assert client is not None
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
        try:
            t = await client.time()
            now_ms = int(t[0]) * 1000 + int(t[1]) // 1000
            pipe.zadd(f"{first.prefix}:workers", {self.worker_id: now_ms})
            pipe.zremrangebyscore(f"{first.prefix}:workers", "-inf", now_ms - PRESENCE_TTL_MS)
            await pipe.execute()
        except (*_UNREACHABLE, RedisError):
            self._presence_dirty |= dirty  # try again next time
            raise

    async def _unsubscribe_idle(self) -> None:
        idle = self._idle
        if not idle:
            return
        self._idle = set()
        n = len(self.shards)
        by_shard: dict[int, list[str]] = {}
        for t in idle:
            self.desired.discard(t)
            self.confirmed.discard(t)
            self._confirmed_at.pop(t, None)
            by_shard.setdefault(shard_index(t, n), []).append(t)
        for k, topics in by_shard.items():
            sh = self.shards[k]
            ps = sh.pubsub
            if ps is not None:
                # Remembered so that the confirmations are not taken for "slot moved" even
                # when a topic is wanted again before its confirmation arrives.
                for t in topics:
                    sh.unsubscribing[t] = sh.unsubscribing.get(t, 0) + 1
                await ps.sunsubscribe(*(sh.channel(t) for t in topics))

    async def subscribers(self, topic: str, local: int) -> int:
        first = self.shards[0] if self.shards else None
        if first is None or first.client is None or not self.up:
            raise BrokerUnavailable("redis is not connected")
        client = first.client
        try:
            t = await client.time()
            now_ms = int(t[0]) * 1000 + int(t[1]) // 1000
            workers = await client.zrangebyscore(f"{first.prefix}:workers", now_ms - PRESENCE_TTL_MS, "+inf")
            pipe = client.pipeline(transaction=False)
            for w in workers:
                pipe.hget(f"{first.prefix}:presence:{w.decode()}", topic)
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
        out: dict[str, object] = {
            "kind": self.kind,
            "up": self.up,
            "epoch": self.epoch,
            "last_seq": self.seqs[0] if len(self.seqs) == 1 else list(self.seqs),
            "subscribed_topics": len(self.confirmed),
            "reconnects": max(0, self.reconnects - len(self.shards)),
            "publish_errors": self.publish_errors,
            "publish_retries": self.publish_retries,
            "gap_fills": self.gap_fills,
            "gap_events": self.gap_events,
            "gap_lost": self.gap_lost,
        }
        if len(self.shards) > 1:
            out["shards"] = [{"tag": s.tag, "node": s.node, "up": s.up, "epoch": s.epoch, "last_seq": self.seqs[s.index]}
                             for s in self.shards]
        return out


async def _close_quietly(ps: aioredis.client.PubSub) -> None:
    try:
        await ps.aclose()
    except (*_UNREACHABLE, RedisError):
        pass  # the connection is already broken


def _retrieve(fut: asyncio.Future[None]) -> None:
    """Mark a shared future's exception as seen (its waiters may all have timed out)."""
    if not fut.cancelled():
        fut.exception()


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, d = divmod(n, 36)
        out = digits[d] + out
        if n == 0:
            return out


def _new_epoch() -> str:
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    return "".join(random.choice(alphabet) for _ in range(8))

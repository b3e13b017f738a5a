"""Where the Redis broker's data lives: shards, their keys, and the node serving each.

A standalone Redis is one shard, hash tag ``ssegw:0``.  On a Redis Cluster there is one
shard per primary: the first worker ever to start picks one hash tag per primary (a tag
whose slot that primary serves) and stores the list in ``ssegw:shards`` with SET NX; every
worker reads the list, and it never changes after that, so the topic -> shard map
(``crc32(topic) % len(list)``) is stable and resharding moves slots, not topics.  A shard's
keys and sharded channels all carry its tag, so they live in one slot on one node; each
shard gets a plain client of that node, re-resolved on every reconnect so that a moved slot
or a failover is followed.
"""

from __future__ import annotations

import asyncio
import random
import zlib
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

#: The one shard of a standalone Redis (also the first candidate tag on a cluster).
DEFAULT_TAG = "ssegw:0"
#: Where a cluster's shard list lives (JSON list of hash tags; written once, SET NX).
SHARDS_KEY = "ssegw:shards"
#: Errors that mean "cannot reach Redis" (as opposed to Redis refusing a command).
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)
#: Bound on how long a request waits for Redis (replay, subscriptions) before answering 503.
COMMAND_TIMEOUT = 5.0
#: Client options: no retries inside redis-py (its default since 6.x is 3): a command it
#: re-sends after a lost reply would surface as a *connect* error, which a publish must be
#: able to read as "nothing was sent".  Every retry is the broker's, with its own token.
CLIENT_OPTS: dict[str, object] = {
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


class Shard:
    """One shard: its keys' hash tag, the client of the node that serves it, its pub/sub
    session and the broker's bookkeeping for it (subscriptions in flight, syncs)."""

    __slots__ = ("index", "tag", "prefix", "chan_prefix", "marker", "client", "node", "pubsub", "task",
                 "epoch", "up", "reconnects", "waits", "to_subscribe", "unsubscribing", "confirm_count",
                 "synced_upto", "sync_next", "sync_running")

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


class Layout:
    """Finds the shards behind ``url`` and connects to the node serving each."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.cluster: RedisCluster | None = None

    async def tags(self) -> list[str]:
        """The shards' hash tags: ``[DEFAULT_TAG]`` on a standalone Redis."""
        probe = aioredis.Redis.from_url(self.url, **CLIENT_OPTS)  # type: ignore[arg-type]
        try:
            info = await probe.info("cluster")
        finally:
            await probe.aclose()
        if not info.get("cluster_enabled"):
            return [DEFAULT_TAG]
        if self.cluster is None:
            self.cluster = RedisCluster.from_url(self.url, socket_timeout=COMMAND_TIMEOUT,
                                                 socket_connect_timeout=2.0)
        cluster = self.cluster
        await cluster.initialize()
        raw = await cluster.get(SHARDS_KEY)
        if raw is None:
            await cluster.set(SHARDS_KEY, orjson.dumps(pick_tags(cluster)), nx=True)
            raw = await cluster.get(SHARDS_KEY)
        tags = orjson.loads(raw) if raw is not None else None
        if not isinstance(tags, list) or not tags or not all(isinstance(t, str) for t in tags):
            raise ResponseError(f"{SHARDS_KEY} holds {raw!r}, not a list of hash tags")
        return tags

    async def connect(self, s: Shard) -> aioredis.Redis:
        """A client of the node serving the shard (re-resolved on every call on a cluster)."""
        if self.cluster is None:
            if s.client is None:
                s.client = aioredis.Redis.from_url(self.url, **CLIENT_OPTS)  # type: ignore[arg-type]
                s.node = self.url
            return s.client
        await self.cluster.initialize()
        node = self.cluster.get_node_from_key(f"{s.prefix}:seq")
        if node is None:
            raise RedisConnectionError(f"no cluster node serves {s.tag} yet")
        where = f"{node.host}:{node.port}"
        if s.client is None or s.node != where:
            if s.client is not None:
                await s.client.aclose()
            kw: dict[str, object] = dict(parse_url(self.url))
            kw.update(host=node.host, port=node.port, **CLIENT_OPTS)
            s.client = aioredis.Redis.from_pool(ConnectionPool(**kw))  # closes its pool on aclose()
            s.node = where
        return s.client

    async def close(self) -> None:
        if self.cluster is not None:
            await self.cluster.aclose()


def pick_tags(cluster: RedisCluster) -> list[str]:
    """One hash tag per primary, each in a slot that primary serves (so fan-out and history
    spread over the primaries as they are when the first worker starts)."""
    primaries = {(n.host, n.port) for n in cluster.get_primaries()}
    tags: list[str] = []
    taken: set[tuple[str, int]] = set()
    for i in range(100_000):
        tag = f"ssegw:{i}"
        try:
            node = cluster.nodes_manager.get_node_from_slot(key_slot(("{" + tag + "}").encode()))
        except RedisError:  # a slot nobody serves: the cluster is not ready
            node = None
        if node is not None and (node.host, node.port) not in taken:
            taken.add((node.host, node.port))
            tags.append(tag)
            if len(taken) == len(primaries):
                return tags
    # Never store a partial layout: it would be permanent.  Try again once the cluster is up.
    raise RedisConnectionError(f"the cluster's slots are not all served yet ({len(primaries)} primaries)")


async def load_library(client: aioredis.Redis) -> None:
    """FUNCTION LOAD REPLACE the ``ssegw`` library (``redis_lib.lua``)."""
    code = resources.files("ssegw.broker").joinpath("redis_lib.lua").read_text()
    await client.function_load(code, replace=True)


def b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, d = divmod(n, 36)
        out = digits[d] + out
        if n == 0:
            return out


def new_epoch() -> str:
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    return "".join(random.choice(alphabet) for _ in range(8))

"""Where the Redis broker's data lives: shards, their keys, and the node serving each.

A standalone Redis is one shard, hash tag ``ssegw:0``.  On a Redis Cluster there is one
shard per primary: the first worker ever to start picks one hash tag per primary (a tag
whose slot that primary serves) and stores the list in ``ssegw:shards`` with SET NX; every
worker reads the list, and it never changes after that, so the topic -> shard map
(``crc32(topic) % len(list)``) is stable and resharding moves slots, not topics.  A shard's
keys and sharded channels all carry its tag, so they live in one slot on one node; each
shard gets a plain client of that node.

Following the topology.  Which node serves a slot is asked of the cluster on every
(re)connect of a shard, never taken from a cached map (redis-py's ``RedisCluster.initialize``
does nothing after its first success, so its map never learns of a failover): ``CLUSTER
NODES`` goes to every node this layout knows -- the URL's node plus every node any answer
ever named, replicas included, so the seed may die -- and the slot goes to the claimant with
the highest config epoch, the rule Redis itself uses to settle conflicting claims.  So a
promoted replica is followed as soon as it (or anyone who heard of it) answers, and a
restarted old primary that still believes in its old slots loses to it.  ``CLUSTER NODES``
rather than ``CLUSTER SHARDS``/``SLOTS`` because only it carries the config epoch.
The session (``redis_pubsub.py``) reconnects on MOVED, READONLY, LOADING, connection
errors and an unrequested SUNSUBSCRIBE, so each of those leads here.

Redis Sentinel (``redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE``, syntax owned by
``config_keys.parse_sentinel_url``).  A primary with replicas and no Cluster: one shard, as a
plain ``redis://`` URL, but the node is asked of the sentinels (redis-py's asyncio
``Sentinel.discover_master``: the first sentinel that names a primary it does not consider
down) on every (re)connect of the shard, never remembered across one.  After a ``kill -9``
the old primary's connections fail; the session retries (``CLUSTER_BACKOFF_MAX`` apart) and
is served by the promoted replica as soon as a sentinel names it.  A planned ``SENTINEL
FAILOVER`` is different: Sentinel promotes the replica and demotes the old primary (with
``CLIENT KILL`` of its clients) only about 10 s later, and the old primary takes writes
meanwhile -- Sentinel has no fencing.  So the session's periodic check also asks the
sentinels (``Layout.confirm``, every ``PING_EVERY`` s) and ends the session when they name
another node.  Either way the session comes back here and gets a client of the new primary;
``Shard.client``, which the publish path reads on every attempt, is replaced with it.
"""

from __future__ import annotations

import asyncio
import random
import zlib
from importlib import resources

import orjson
import redis.asyncio as aioredis
from redis.asyncio.connection import ConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..config_keys import SENTINEL_SCHEME, parse_sentinel_url

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

#: Bound on how long one node may take to answer ``CLUSTER NODES`` (the nodes are asked at
#: once, so a black-holed one costs this much per resolution, not per node).
ASK_TIMEOUT = 2.0
#: Bound on the nodes a layout remembers (every node any answer named); a cluster has far
#: fewer, this only stops a misbehaving one from growing the set without end.
MAX_KNOWN = 1000
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
                 "synced_upto", "sync_next", "sync_running", "slot", "down_since", "down_logged")

    def __init__(self, index: int, tag: str, worker_id: str) -> None:
        self.index = index
        self.tag = tag
        self.prefix = "{" + tag + "}"
        self.chan_prefix = f"{self.prefix}:c:".encode()
        self.marker = f"{self.prefix}:m:{worker_id}"
        #: the cluster slot of every key and channel of the shard
        self.slot = key_slot(f"{self.prefix}:seq".encode())
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
        #: loop time the shard went down (None while up) and when that was last logged: a
        #: shard that stays down is logged every ``DOWN_LOG_EVERY`` s, not per retry
        #: (``redis_pubsub.py``)
        self.down_since: float | None = None
        self.down_logged = 0.0

    def stream_key(self, topic: str) -> str:
        return f"{self.prefix}:h:{topic}"

    def channel(self, topic: str) -> str:
        return f"{self.prefix}:c:{topic}"


class Layout:
    """Finds the shards behind ``url`` and connects to the node serving each."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.clustered = False
        #: (sentinel addresses, service name) behind a ``redis+sentinel://`` URL, else None
        self.sentinel: tuple[list[tuple[str, int]], str] | None = None
        self._sentinels: Sentinel | None = None
        if url.startswith(SENTINEL_SCHEME):
            self.sentinel = parse_sentinel_url(url)  # validated with the config already
            self._base: dict[str, object] = {}
            return
        self._base = dict(parse_url(url))
        #: "host:port" of every node ever named (the URL's first), in the order first seen
        self.known: dict[str, tuple[str, int]] = {}
        host, port = self._base.get("host"), self._base.get("port", 6379)
        if isinstance(host, str) and isinstance(port, int):
            self.known[f"{host}:{port}"] = (host, port)
        #: one client per known node, for CLUSTER NODES
        self._probes: dict[str, aioredis.Redis] = {}

    def _client(self, host: str, port: int) -> aioredis.Redis:
        kw = dict(self._base)
        kw.update(host=host, port=port, **CLIENT_OPTS)
        return aioredis.Redis.from_pool(ConnectionPool(**kw))  # closes its pool on aclose()

    @property
    def follows(self) -> bool:
        """Whether the node serving a shard can change (Cluster or Sentinel): the session then
        retries at most ``CLUSTER_BACKOFF_MAX`` apart (``redis_pubsub.py``)."""
        return self.clustered or self.sentinel is not None

    async def tags(self) -> list[str]:
        """The shards' hash tags: ``[DEFAULT_TAG]`` on a standalone Redis (also the primary a
        Sentinel names)."""
        if self.sentinel is not None:
            await self.primary()  # retried by the caller until the sentinels name one
            return [DEFAULT_TAG]
        probe = aioredis.Redis.from_url(self.url, **CLIENT_OPTS)  # type: ignore[arg-type]
        try:
            info = await probe.info("cluster")
        finally:
            await probe.aclose()
        if not info.get("cluster_enabled"):
            return [DEFAULT_TAG]
        self.clustered = True
        view = await self.view()
        where = view.owner(key_slot(SHARDS_KEY.encode()))
        if where is None:
            raise RedisConnectionError(f"no cluster node serves {SHARDS_KEY} yet")
        client = self._probe(where)
        raw = await client.get(SHARDS_KEY)
        if raw is None:
            await client.set(SHARDS_KEY, orjson.dumps(pick_tags(view)), nx=True)
            raw = await client.get(SHARDS_KEY)
        tags = orjson.loads(raw) if raw is not None else None
        if not isinstance(tags, list) or not tags or not all(isinstance(t, str) for t in tags):
            raise ResponseError(f"{SHARDS_KEY} holds {raw!r}, not a list of hash tags")
        return tags

    async def connect(self, s: Shard) -> aioredis.Redis:
        """A client of the node serving the shard (asked of the cluster, or the sentinels, on
        every call)."""
        if self.sentinel is not None:
            host, port = await self.primary()
            return await self._use(s, f"{host}:{port}", host, port)
        if not self.clustered:
            if s.client is None:
                s.client = aioredis.Redis.from_url(self.url, **CLIENT_OPTS)  # type: ignore[arg-type]
                s.node = self.url
            return s.client
        where = (await self.view()).owner(s.slot)
        if where is None:
            raise RedisConnectionError(f"no cluster node serves {s.tag} (slot {s.slot}) yet")
        node_host, _, node_port = where.rpartition(":")
        return await self._use(s, where, node_host, int(node_port))

    async def _use(self, s: Shard, where: str, host: str, port: int) -> aioredis.Redis:
        """Point ``s.client`` at ``where`` (a new client if the node changed)."""
        if s.client is None or s.node != where:
            if s.client is not None:
                await s.client.aclose()
            s.client = self._client(host, port)
            s.node = where
        return s.client

    async def confirm(self, s: Shard) -> None:
        """Behind Sentinel, part of the session's periodic check: end the session if the
        sentinels now name another primary.  A planned ``SENTINEL FAILOVER`` promotes the
        replica first and demotes the old primary only about 10 s later (Sentinel's "convert
        to replica" delay), and the old one keeps answering -- writes included -- until then;
        this moves the shard within one check of the sentinels' switch.  Sentinels that cannot be
        asked, or name nobody (a failover in progress), end nothing: the data path does not
        depend on them.  A no-op on a standalone Redis or a cluster.

        Raises:
            RedisConnectionError: the sentinels name a primary other than ``s.node``.
        """
        if self.sentinel is None or not s.node:
            return
        try:
            host, port = await asyncio.wait_for(self.primary(), ASK_TIMEOUT)
        except (TimeoutError, RedisConnectionError):
            return  # sentinels unreachable, slow or mid-failover: keep serving from s.node
        if f"{host}:{port}" != s.node:
            raise RedisConnectionError(f"{s.tag}: the sentinels name {host}:{port} as primary, not {s.node}")

    async def primary(self) -> tuple[str, int]:
        """The primary the sentinels name now (``SENTINEL MASTERS`` to each in turn until one
        names a primary it does not consider down; redis-py moves that one to the front).

        Raises:
            RedisConnectionError: no sentinel answered, or none names a usable primary
                (``MasterNotFoundError``, e.g. during a failover).
        """
        assert self.sentinel is not None
        if self._sentinels is None:
            # Each sentinel is asked in turn, so a black-holed one costs its socket timeout
            # per resolution: bounded by ``ASK_TIMEOUT``, as a cluster node's CLUSTER NODES.
            opts = {"socket_timeout": ASK_TIMEOUT, "socket_connect_timeout": 1.0, "retry": Retry(NoBackoff(), 0)}
            self._sentinels = Sentinel(self.sentinel[0], sentinel_kwargs=opts)
        try:
            host, port = await self._sentinels.discover_master(self.sentinel[1])
        except (TimeoutError, RedisTimeoutError, OSError) as e:
            raise RedisConnectionError(f"sentinels unreachable: {e}") from None
        return str(host), int(port)

    def _probe(self, where: str) -> aioredis.Redis:
        client = self._probes.get(where)
        if client is None:
            host, _, port = where.rpartition(":")
            client = self._probes[where] = self._client(host, int(port))
        return client

    async def view(self) -> View:
        """Ask every known node for ``CLUSTER NODES`` at once and merge the answers.

        Raises:
            RedisConnectionError: no node answered.
        """
        asked = list(self.known)
        answers = await asyncio.gather(*(self._ask(w) for w in asked))
        view = View()
        for where, text in zip(asked, answers, strict=True):
            if text is not None:
                view.add(where, text)
        if not view.answered:
            raise RedisConnectionError(f"no cluster node answered CLUSTER NODES (asked {', '.join(asked)})")
        for where in view.nodes:
            if where not in self.known and len(self.known) < MAX_KNOWN:
                host, _, port = where.rpartition(":")
                self.known[where] = (host, int(port))
        return view

    async def _ask(self, where: str) -> str | None:
        try:
            raw = await asyncio.wait_for(self._probe(where).execute_command("CLUSTER", "NODES"), ASK_TIMEOUT)
        except (*UNREACHABLE, RedisError):
            return None  # down, loading or not a cluster node: the others answer
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def close(self) -> None:
        probes, self._probes = self._probes, {}
        for client in probes.values():
            await client.aclose()
        sentinels, self._sentinels = self._sentinels, None
        if sentinels is not None:
            await sentinels.aclose()


class View:
    """The cluster's slot owners as a set of nodes described them (``CLUSTER NODES``).

    Every primary line's slot ranges are claims ``(config epoch, lo, hi, node)``; a slot's
    owner is the claimant with the highest config epoch (then the one fewer nodes flag as
    failing, then the one more nodes name).  Slots being migrated (``[...]``) are ignored: the
    node that has them is the one that claims them."""

    __slots__ = ("answered", "nodes", "claims")

    def __init__(self) -> None:
        self.answered: list[str] = []
        #: "host:port" of every node named in any answer
        self.nodes: set[str] = set()
        #: (lo, hi, node) -> [config epoch, times named, times flagged failing]
        self.claims: dict[tuple[int, int, str], list[int]] = {}

    def add(self, asked: str, text: str) -> None:
        """Merge one node's ``CLUSTER NODES`` answer (``asked``: the "host:port" asked)."""
        self.answered.append(asked)
        for line in text.splitlines():
            f = line.split()
            if len(f) < 8:
                continue
            flags = f[2].split(",")
            addr = f[1].split("@", 1)[0]
            host, _, port = addr.rpartition(":")
            if "myself" in flags and not host:
                addr = asked  # a node that has not learned its own address yet
            elif not host or port in ("", "0") or "noaddr" in flags or "handshake" in flags:
                continue
            self.nodes.add(addr)
            if "master" not in flags:
                continue
            failing = "fail" in flags or "fail?" in flags
            for r in f[8:]:
                if r.startswith("["):
                    continue
                lo, _, hi = r.partition("-")
                c = self.claims.setdefault((int(lo), int(hi or lo), addr), [int(f[6]), 0, 0])
                c[0] = max(c[0], int(f[6]))
                c[1] += 1
                c[2] += failing

    def owner(self, slot: int) -> str | None:
        """The "host:port" serving ``slot``, or None if no answer says anyone does."""
        best: tuple[int, int, int] | None = None
        where = None
        for (lo, hi, addr), (epoch, named, failing) in self.claims.items():
            if lo <= slot <= hi:
                rank = (epoch, -failing, named)
                if best is None or rank > best:
                    best, where = rank, addr
        return where

    def primaries(self) -> set[str]:
        """The nodes that own at least one slot (a stale claim of a demoted node is no owner)."""
        owners = {self.owner(lo) for lo, _, _ in self.claims}
        return {w for w in owners if w is not None}


def pick_tags(view: View) -> list[str]:
    """One hash tag per primary, each in a slot that primary serves (so fan-out and history
    spread over the primaries as they are when the first worker starts)."""
    primaries = view.primaries()
    tags: list[str] = []
    taken: set[str] = set()
    for i in range(100_000):
        tag = f"ssegw:{i}"
        node = view.owner(key_slot(("{" + tag + "}").encode()))
        if node is not None and node not in taken:
            taken.add(node)
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

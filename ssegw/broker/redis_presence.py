"""Cluster-wide presence: how many subscribers a topic has over every worker of every host.

Each worker keeps its per-topic subscriber counts in a hash (``PREFIX:presence:WORKER``)
that expires ``PRESENCE_TTL_MS`` after its last refresh, and registers itself in a ZSET
(``PREFIX:workers``) scored by when it last refreshed (Redis time).  A count sums the hashes
of the workers seen within the TTL, so a worker or host that dies stops counting within it.
Refreshes write only the topics whose count changed since the last one, unless the hash has
expired meanwhile (Redis unreachable for longer than the TTL): then every count is written.  Both keys live on
the first shard (one slot: one pipeline).
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .redis_layout import UNREACHABLE

#: How long a worker's presence survives without a refresh (it refreshes every second).
PRESENCE_TTL_MS = 15_000


class Presence:
    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.counts: dict[str, int] = {}
        self.dirty: set[str] = set()

    def update(self, counts: dict[str, int]) -> None:
        """The worker's subscriber counts for topics that changed since the last call."""
        for t, n in counts.items():
            self.counts[t] = n
            self.dirty.add(t)

    def key(self, prefix: str) -> str:
        return f"{prefix}:presence:{self.worker_id}"

    async def flush(self, client: aioredis.Redis, prefix: str) -> None:
        """Write what changed and refresh our expiry and our place in the worker set.  If
        our hash is gone (it expired while Redis was unreachable, or Redis lost it), write
        every count again, not only the changed ones."""
        dirty = self.dirty
        self.dirty = set()
        key = self.key(prefix)
        try:
            alive = await client.pexpire(key, PRESENCE_TTL_MS)
        except (*UNREACHABLE, RedisError):
            self.dirty |= dirty
            raise
        if not alive:
            dirty |= set(self.counts)
        pipe = client.pipeline(transaction=False)
        sets: dict[str | bytes, int] = {t: self.counts[t] for t in dirty if self.counts.get(t)}
        gone = [t for t in dirty if not self.counts.get(t)]
        for t in gone:
            self.counts.pop(t, None)
        if sets:
            pipe.hset(key, mapping=sets)  # type: ignore[arg-type]
        if gone:
            pipe.hdel(key, *gone)
        pipe.pexpire(key, PRESENCE_TTL_MS)
        try:
            now_ms = await _now_ms(client)
            pipe.zadd(f"{prefix}:workers", {self.worker_id: now_ms})
            pipe.zremrangebyscore(f"{prefix}:workers", "-inf", now_ms - PRESENCE_TTL_MS)
            await pipe.execute()
        except (*UNREACHABLE, RedisError):
            self.dirty |= dirty  # try again next time
            raise

    async def remove(self, client: aioredis.Redis, prefix: str) -> None:
        """Leave at once (a clean shutdown), rather than expire."""
        await client.zrem(f"{prefix}:workers", self.worker_id)
        await client.delete(self.key(prefix))

    async def total(self, client: aioredis.Redis, prefix: str, topic: str, local: int) -> int:
        """Subscribers of ``topic`` over every live worker: ``local`` (ours, exact and
        current) plus the other workers' last refreshed counts."""
        now_ms = await _now_ms(client)
        workers = await client.zrangebyscore(f"{prefix}:workers", now_ms - PRESENCE_TTL_MS, "+inf")
        pipe = client.pipeline(transaction=False)
        for w in workers:
            pipe.hget(f"{prefix}:presence:{w.decode()}", topic)
        counts = await pipe.execute()
        me = self.worker_id.encode()
        total = local
        for w, c in zip(workers, counts, strict=True):
            if w != me and c is not None:
                total += int(c)
        return total


async def _now_ms(client: aioredis.Redis) -> int:
    t = await client.time()
    return int(t[0]) * 1000 + int(t[1]) // 1000

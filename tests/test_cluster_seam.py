"""The resume seam on Redis Cluster when the resuming worker's pub/sub lags the client.

On several shards a replay stops at this worker's watermark for each shard and sets each
topic's *floor*: live events at or under it are skipped, because the replay (or the client)
has them already (ssegw/broker/redis.py, "Several shards").  A client can bring a position
from another gateway that is *ahead* of this worker's watermark -- this worker's pub/sub
is simply behind.  The floor must then be the client's position, or the event at that
position (which the client has) comes again live: a duplicate at the seam.

Two real brokers on a real three-node cluster, in one loop.  Worker B's pub/sub is held back
deterministically: its message handler queues messages instead of handling them (the
session looks the handler up on every message), which is what a busy or slow pub/sub
connection looks like from the replay's side.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from test_broker_shared import HOUR_MS, Rig, data_of, id_of, topic

from ssegw.broker.redis import RedisBroker
from ssegw.core.ids import parse_id


def _broker(url: str) -> RedisBroker:
    return RedisBroker(url, lambda t: (1000, HOUR_MS), HOUR_MS)


async def _until(pred, timeout: float = 5.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.timeout(120)
def test_resume_with_a_position_ahead_of_this_workers_pubsub_gets_no_duplicate(redis_cluster) -> None:  # noqa: ANN001
    t = topic("seam")

    async def main() -> None:
        async with Rig(_broker(redis_cluster.url)) as a, Rig(_broker(redis_cluster.url)) as b:
            assert len(b.b.shards) == 3
            k = b.b.shard_of(t).index
            # Both workers follow t (B has a subscriber already: its next replay needs no sync).
            await a.replay((t,), since="last")
            await b.replay((t,), since="last")
            await a.pub((t, "e1"))
            await _until(lambda: [data_of(e) for e in b.delivered] == ["e1"])

            held: list[tuple[object, dict]] = []
            b.b._on_message = lambda s, m: held.append((s, m))  # B's pub/sub falls behind
            await a.pub((t, "e2"))
            await _until(lambda: [data_of(e) for e in a.delivered] == ["e1", "e2"])
            e2 = a.delivered[-1]
            cut = id_of(e2)  # what a client of A holds after e2
            assert parse_id(cut)[1][k] == e2.seq
            assert b.b.seqs[k] < e2.seq, "B's watermark should lag the client here"

            r = await b.replay((t,), cut)
            assert r.reset == [] and r.events == [], r
            # Live events at or under the floor are skipped: e2, which the client has, must be.
            assert r.floors[t] >= e2.seq, (r.floors, e2.seq, b.b.seqs[k])

            del b.b._on_message  # B catches up: e2 arrives live, then a new event
            for s, m in held:
                b.b._on_message(s, m)
            await a.pub((t, "e3"))
            await _until(lambda: [data_of(e) for e in b.delivered][-1:] == ["e3"])
            live = [e for e in b.delivered if e.seq > r.floors[t]]
            assert [data_of(e) for e in live] == ["e3"], "a duplicate or a gap at the seam"

    asyncio.run(main())

"""The listening half of the Redis broker: subscriptions, one pub/sub session per shard,
gap fills after a reconnect, and syncs.

``Listener`` is a mixin of :class:`ssegw.broker.redis.RedisBroker`; its state is created in
``RedisBroker.__init__`` (the attributes annotated below) and it calls back into the broker
for what both halves use (``_read``, ``_id_at``, ``_set_epoch``).

- Each worker subscribes (SSUBSCRIBE) to the channels of the topics its clients need: on a
  topic's first local subscriber one SSUBSCRIBE per shard for all topics wanted in that loop
  turn; on its last, a SUNSUBSCRIBE on the next housekeeping pass (a client that reconnects
  at once costs nothing).  A stream's replay waits for its topics' confirmations.
- A shard's session: connect to the node serving it, load the function library, make sure
  the shard has an epoch, subscribe the marker channel and every wanted topic, wait for the
  confirmations, fill the gap (read every subscribed topic's history after the last
  sequence received), then deliver messages as they come, pinging a silent connection.  Any
  error ends the session: the shard is down (its waiters fail, its topics unconfirmed) and
  the session starts again after a jittered backoff.
- An unrequested SUNSUBSCRIBE means the slot moved to another node (resharding, or a
  failover demoted the node): reconnect (the layout asks the cluster who serves the slot now,
  ``redis_layout.py``) and let the gap fill cover the move.  So do MOVED, READONLY and LOADING
  answers and connection errors, on the session's own commands and on its periodic check
  (``GET`` of the shard's epoch every ``PING_EVERY`` s, busy or idle: a node that no longer
  serves the slot answers MOVED).  On a cluster or behind Sentinel the retries are at most
  ``CLUSTER_BACKOFF_MAX`` apart, so a promoted replica is found within about that much of its
  promotion.
- A shard that goes down is logged once, then every ``DOWN_LOG_EVERY`` s while it stays down
  (never per retry), and once more when it is back, with how long it was down.
- Syncs (several shards only): see "Several shards" in ``redis.py``.
- Epoch integrity.  A failover may promote a replica that lacks the newest writes (replication
  is asynchronous; ``redis_wait_replicas`` 0, or more replicas than it waits for); its sequence
  then restarts below ids already handed out.  So every (re)connect of a shard, before the gap
  fill, asks the primary (``ssegw_check``, ``redis_lib.lua``) whether it has everything this
  worker has seen: its head at or above the watermark and the highest sequence this worker's
  publishes got, the newest event received still in its history as received, and -- from
  ``INFO replication``, compared with the replication id and offset this worker last saw on
  the shard's primary (``_lineage``) -- not an earlier cut of the history seen.  If not, the
  shard gets a new epoch (only if its epoch is still the one this worker knew: the first
  worker to notice decides, atomically), announced on the shard's epoch channel; every worker
  then closes its streams, which resume into ``ssegw.reset``.  A lossless handover (planned
  ``CLUSTER FAILOVER``, a promoted replica that was current) passes every check and keeps the
  epoch.  Limit: a worker vouches only for what it has seen.  One that saw nothing past the
  lost writes (no subscriber, no publish there), and a backend publishing straight into
  Redis, may publish on the new primary under the old epoch -- their publish answers then
  repeat lost ids -- until a worker that saw the lost writes connects and changes the epoch;
  streams are closed and reset from then on.
- A pub/sub message at or below the watermark is dropped only when this session's gap fill
  delivered it already (at or below the fill's head); any other one means the node reuses
  sequences: it is counted (``dup_dropped``), logged, and the shard reconnects, which runs
  the check above.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..core.history import Event
from ..core.sse import encode_frame
from .base import BrokerUnavailable
from .redis_layout import COMMAND_TIMEOUT, UNREACHABLE, Layout, Shard, load_library, new_epoch, shard_index

log = logging.getLogger("ssegw.redis")

#: Reconnect backoff bounds (seconds); each wait is jittered by +-50%.
BACKOFF_MIN, BACKOFF_MAX = 0.05, 2.0
#: On a cluster, the longest wait between two reconnects of a shard (before jitter): after a
#: failover the contract allows node-timeout + 5 s to serve again; promotion takes
#: node-timeout + 1-2 s, so a retry every 0.25-0.75 s leaves room, and each costs one
#: CLUSTER NODES per known node.
CLUSTER_BACKOFF_MAX = 0.5
#: Seconds between two checks that the session's node is there and still serves the shard.
PING_EVERY = 3.0
#: While a shard stays down, log it this often (seconds).
DOWN_LOG_EVERY = 30.0


class Listener:
    shards: list[Shard]
    seqs: list[int]
    desired: set[str]
    confirmed: set[str]
    _confirmed_at: dict[str, int]
    _waiters: dict[str, list[asyncio.Future[None]]]
    _idle: set[str]
    _deliver: Callable[[list[Event]], None] | None
    _on_gap: Callable[[list[str] | None], None] | None
    _closed: bool
    _layout: Layout
    reconnects: int
    gap_fills: int
    gap_events: int
    gap_lost: int
    dup_dropped: int
    #: per shard index: (replid, offset, watermark) from the last ``INFO replication`` of its
    #: primary; the newest event received (topic, seq, ms); this session's gap fill head
    _ident: dict[int, tuple[str, int, int]]
    _last_ev: dict[int, tuple[str, int, int]]
    _fill_head: dict[int, int]
    #: per shard index: the highest sequence this worker's publishes got (their ids were handed out)
    _published: dict[int, int]

    if TYPE_CHECKING:
        def shard_of(self, topic: str) -> Shard: ...
        def _id_at(self, k: int, seq: int) -> str: ...
        def _set_epoch(self) -> None: ...
        async def _read(self, s: Shard, topics: list[str], mode: str, after_seq: int
                        ) -> tuple[str, int, list[tuple[int, list[tuple[int, int, str | None, bytes]]]]]: ...

    async def _synced(self, s: Shard, topics: list[str]) -> None:
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

    async def _sync_loop(self, s: Shard) -> None:
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
                except (*UNREACHABLE, RedisError, BrokerUnavailable) as e:
                    if not fut.done():
                        fut.set_exception(BrokerUnavailable(f"redis sync failed: {e}"))
                    continue
                s.synced_upto = max(s.synced_upto, gen)
                if not fut.done():
                    fut.set_result(None)
        finally:
            s.sync_running = False

    async def _wait_seq(self, s: Shard, seq: int) -> None:
        if self.seqs[s.index] >= seq:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        s.waits.append((seq, fut))
        try:
            await asyncio.wait_for(fut, COMMAND_TIMEOUT)
        except TimeoutError:
            raise BrokerUnavailable("redis did not deliver the sync marker") from None

    def _advanced(self, s: Shard) -> None:
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

    def _subscribe_soon(self, s: Shard) -> None:
        topics, s.to_subscribe = s.to_subscribe, []
        if topics:
            asyncio.get_running_loop().create_task(self._subscribe(s, topics))

    async def _subscribe(self, s: Shard, topics: list[str]) -> None:
        ps = s.pubsub
        if ps is None:
            return
        try:
            await ps.ssubscribe(*(s.channel(t) for t in topics))
        except UNREACHABLE:
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

    def _fail_waiters(self, s: Shard) -> None:
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

    async def _run(self, s: Shard) -> None:
        backoff = BACKOFF_MIN
        cap = CLUSTER_BACKOFF_MAX if self._layout.follows else BACKOFF_MAX
        while not self._closed:
            sessions = s.reconnects
            try:
                await self._session(s)
            except asyncio.CancelledError:
                raise
            except (*UNREACHABLE, RedisError) as e:
                self._down(s)
                self._unavailable(s, f"{type(e).__name__}: {e}")
            except Exception as e:  # a bug of ours: log it, reconnect rather than stop serving
                log.exception("redis reader failed (%s)", s.tag)
                self._down(s)
                self._unavailable(s, f"{type(e).__name__}: {e}")
            if self._closed:
                return
            if s.reconnects != sessions:
                backoff = BACKOFF_MIN  # this session worked: its loss starts a new series
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, cap)

    def _unavailable(self, s: Shard, error: str) -> None:
        """Log a shard going down, then every ``DOWN_LOG_EVERY`` s while it stays down."""
        now = asyncio.get_running_loop().time()
        if s.down_since is None:
            s.down_since = s.down_logged = now
            what = "unavailable" if s.reconnects else "not reachable yet"
            log.warning("redis shard %s %s (node %s): %s", s.tag, what, s.node or "?", error)
        elif now - s.down_logged >= DOWN_LOG_EVERY:
            s.down_logged = now
            log.warning("redis shard %s still unavailable after %.0f s (node %s): %s",
                        s.tag, now - s.down_since, s.node or "?", error)

    def _available(self, s: Shard, topics: int) -> None:
        """Log a shard coming back (nothing on a first connect that worked at once)."""
        if s.down_since is not None:
            log.warning("redis shard %s available again on %s after %.1f s down (%d topics resubscribed)",
                        s.tag, s.node, asyncio.get_running_loop().time() - s.down_since, topics)
            s.down_since = None

    def _down(self, s: Shard) -> None:
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
            asyncio.get_running_loop().create_task(close_quietly(ps))

    async def _session(self, s: Shard) -> None:
        client = await self._layout.connect(s)
        await client.ping()
        await load_library(client)
        # The epoch names this incarnation of the shard's sequence; create it if Redis has
        # none (a new Redis, or one that lost its data) so that pub/sub ids can be formed.
        await client.set(f"{s.prefix}:epoch", new_epoch(), nx=True)
        ps = client.pubsub()
        s.pubsub = ps
        n = len(self.shards)
        topics = sorted(t for t in self.desired if shard_index(t, n) == s.index)
        epoch_chan = f"{s.prefix}:e"
        # The marker keeps the connection subscribed with no topics; the epoch channel says
        # when another worker gave the shard a new epoch.
        await ps.ssubscribe(s.marker, epoch_chan)
        for i in range(0, len(topics), 1000):
            await ps.ssubscribe(*(s.channel(t) for t in topics[i:i + 1000]))
        # Wait for the confirmations so that the gap fill below starts after them.
        pending = {s.channel(t).encode() for t in topics} | {s.marker.encode(), epoch_chan.encode()}
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
        self._available(s, len(topics))
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
        chan_prefix = s.chan_prefix
        epoch_key = f"{s.prefix}:epoch"
        check_at = loop.time() + PING_EVERY
        while True:
            m = await ps.get_message(ignore_subscribe_messages=False, timeout=1.0)
            if loop.time() >= check_at:
                # A silent node may be a dead one (no FIN from a vanished host), and a node
                # may stop serving the slot without a SUNSUBSCRIBE reaching us: ask it
                # something about the shard's slot, busy or idle.  A node that no longer
                # serves it answers MOVED; a failure raises and we reconnect.
                # The epoch read also catches a new epoch whose announcement we missed; the
                # replication identity keeps _lineage current.
                pipe = client.pipeline(transaction=False)
                pipe.get(epoch_key)
                pipe.info("replication")
                wm = self.seqs[s.index]
                epoch_b, info = await asyncio.wait_for(pipe.execute(raise_on_error=False), COMMAND_TIMEOUT)
                if isinstance(epoch_b, Exception):
                    raise epoch_b  # MOVED: the node no longer serves the slot
                if epoch_b is not None and epoch_b.decode() != s.epoch:
                    raise RedisConnectionError(f"{s.tag}: the shard has a new epoch {epoch_b.decode()}")
                if isinstance(info, dict):  # else INFO was refused (ACL): the data checks remain
                    self._note_ident(s, info, wm)
                await self._layout.confirm(s)  # behind Sentinel: still the primary it names?
                check_at = loop.time() + PING_EVERY
            if m is None:
                continue
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

    async def _fill_gap(self, s: Shard, client: aioredis.Redis, topics: list[str]) -> None:
        """After a (re)connect: deliver what was published while we were not listening.
        The read happens after the session's subscriptions were confirmed, so it also
        serves as their sync."""
        gen = s.confirm_count
        await self._fill(s, client, topics)
        s.synced_upto = max(s.synced_upto, gen)
        self._advanced(s)

    async def _check(self, s: Shard, client: aioredis.Redis) -> tuple[str, str]:
        """Epoch integrity (module docstring): ``ssegw_check`` on the shard's (new) primary.
        Returns the shard's epoch (a new one if this primary may lack writes this worker has
        seen) and why it changed ('' if kept, 'moved' if another worker or a Redis that lost
        its data changed it)."""
        k = s.index
        wm = self.seqs[k]
        try:
            info = await client.info("replication")
        except ResponseError as e:  # an ACL without INFO: the data checks still run
            log.debug("redis refused INFO on %s (%s): no replication history check", s.tag, e)
            info = {}
        seen = max(wm, self._published.get(k, 0))
        last = self._last_ev.get(k) if s.epoch else None
        why = self._lineage(k, info) if s.epoch else ""
        keys = [f"{s.prefix}:seq", f"{s.prefix}:epoch", f"{s.prefix}:ident",
                s.stream_key(last[0]) if last else f"{s.prefix}:epoch"]
        args = [s.epoch, seen, last[1] if last else 0, last[2] if last else 0,
                str(info.get("master_replid", "")), info.get("master_repl_offset", 0), new_epoch(), why]
        epoch_b, _, reason_b = await client.fcall("ssegw_check", len(keys), *keys, *args)
        self._note_ident(s, info, wm)
        return epoch_b.decode(), reason_b.decode()

    def _lineage(self, k: int, info: dict) -> str:
        """Why the primary's replication history cannot hold everything seen on the shard's
        previous primary, or ''.  A promoted replica takes a new replid and keeps the old one as
        ``master_replid2``, valid up to ``second_repl_offset`` - 1: if that is below the offset
        the previous primary had reached after writes this worker received, it missed some.
        (The offset also counts writes that are not events -- a lost presence refresh costs a
        needless reset; never the other way.)  Any other history says nothing here; the data
        checks of ``ssegw_check`` decide."""
        old = self._ident.get(k)
        if old is None or not old[2]:
            return ""
        replid, offset, wm = old
        # str(): redis-py's INFO parser turns an id that looks like a number into one.
        if str(info.get("master_replid")) == replid or str(info.get("master_replid2")) != replid:
            return ""
        upto = int(info.get("second_repl_offset", -1)) - 1
        if upto >= offset:
            return ""
        return (f"it took over replication history {replid[:8]} at offset {upto}, before offset {offset} "
                f"that followed seq {wm}")

    def _note_ident(self, s: Shard, info: dict, wm: int) -> None:
        """Remember the primary's replication id and offset, reached after every event up to
        ``wm`` (the watermark when INFO was sent)."""
        if info.get("role") == "master":
            self._ident[s.index] = (str(info.get("master_replid", "")), int(info.get("master_repl_offset", 0)), wm)

    async def _fill(self, s: Shard, client: aioredis.Redis, topics: list[str]) -> None:
        k = s.index
        epoch, why = await self._check(s, client)
        if not s.epoch:
            s.epoch = epoch
            self._set_epoch()
            if not self.seqs[k]:
                head = await client.get(f"{s.prefix}:seq")
                self.seqs[k] = self._fill_head[k] = int(head or 0)
                return
        if epoch != s.epoch and epoch:
            # Redis lost its data (or is another Redis), or this primary lacks writes we have
            # seen: what we missed cannot be placed, and ids we handed out must not be reused.
            if why and why != "moved":
                log.warning("redis shard %s: the primary on %s may lack writes already delivered (%s): "
                            "new epoch %s -> %s, closing streams so clients resume and get ssegw.reset",
                            s.tag, s.node, why, s.epoch, epoch)
            else:
                log.warning("redis epoch changed on %s (%s -> %s): closing streams so clients resume",
                            s.tag, s.epoch, epoch)
            s.epoch = epoch
            self._set_epoch()
            head = await client.get(f"{s.prefix}:seq")
            self.seqs[k] = self._fill_head[k] = int(head or 0)
            self._last_ev.pop(k, None)
            self._published.pop(k, None)
            self.gap_lost += 1
            if self._on_gap is not None:
                self._on_gap(None)
            return
        if not topics:
            head = await client.get(f"{s.prefix}:seq")
            self.seqs[k] = self._fill_head[k] = max(self.seqs[k], int(head or 0))
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
        if raw:
            self._last_ev[k] = (raw[-1][2], raw[-1][0], raw[-1][1])
        self.gap_fills += 1
        self.gap_events += len(events)
        if events and self._deliver is not None:
            self._deliver(events)
        self.seqs[k] = self._fill_head[k] = max(self.seqs[k], head)
        if lost:
            self.gap_lost += 1
            log.warning("history no longer covers the outage for %d topics: closing their streams", len(lost))
            if self._on_gap is not None:
                self._on_gap(lost)

    def _on_message(self, s: Shard, m: dict) -> None:
        ch: bytes = m["channel"]
        data: bytes = m["data"]
        k = s.index
        if not ch.startswith(s.chan_prefix):
            if ch == s.marker.encode():  # a replay's marker: we have heard up to its head
                if int(data) > self.seqs[k]:
                    self.seqs[k] = int(data)
                self._advanced(s)
            elif ch == f"{s.prefix}:e".encode() and data.decode() != s.epoch:
                # Another worker found the primary lacking writes and gave the shard a new
                # epoch: reconnect, and the gap fill closes our streams.
                raise RedisConnectionError(f"{s.tag}: the shard has a new epoch {data.decode()}")
            return
        seq_b, ms_b, klen_b, rest = data.split(b":", 3)
        seq = int(seq_b)
        if seq <= self.seqs[k]:
            self.dup_dropped += 1
            if seq <= self._fill_head.get(k, 0):
                return  # already delivered by this session's gap fill
            # The node hands out sequences we have received already: a primary that lost
            # writes.  Never drop silently: reconnect, and the check gives a new epoch.
            log.warning("redis shard %s: seq %d at or below the %d already received on %s: checking "
                        "the primary", s.tag, seq, self.seqs[k], ch.decode(errors="replace"))
            raise RedisConnectionError(f"{s.tag}: sequence {seq} reused")
        self.seqs[k] = seq
        klen = int(klen_b)
        if klen >= 0:
            key: str | None = rest[:klen].decode()
            body = rest[klen:]
        else:
            key, body = None, rest
        topic = ch[len(s.chan_prefix):].decode()
        ms = int(ms_b)
        self._last_ev[k] = (topic, seq, ms)
        ev = Event(topic, seq, ms, encode_frame(self._id_at(k, seq), body), key)
        if s.waits:
            self._advanced(s)
        if self._deliver is not None:
            self._deliver([ev])

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


async def close_quietly(ps: aioredis.client.PubSub) -> None:
    try:
        await ps.aclose()
    except (*UNREACHABLE, RedisError):
        pass  # the connection is already broken


def _retrieve(fut: asyncio.Future[None]) -> None:
    """Mark a shared future's exception as seen (its waiters may all have timed out)."""
    if not fut.cancelled():
        fut.exception()

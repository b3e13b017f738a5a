"""Redis Cluster failovers under publishing load: the gateway follows the promoted replica.

docs/api.md "Redis failover": the gateway serves again within the cluster's node timeout + 5 s
after a primary changes, planned or not; acknowledged events are delivered exactly once, in
order, and a 503 means nothing was published.  Each test starts its own 3 primaries + 3
replicas cluster (``cluster-node-timeout`` 2000 ms, tests/redis_cluster_harness.py) and two
gateways pointed at different nodes, subscribers of every topic on both, and a publisher that
POSTs one message at a time at about 50 msg/s, round robin over topics on every shard and over
both gateways, re-sending a message answered 503 (nothing was published) until it gets 200.

1. A planned ``CLUSTER FAILOVER`` on a replica (lossless): 0 lost, 0 ``ssegw.reset``, every
   acknowledged event delivered exactly once in order, and the shard serves again within the
   bound (measured: the longest stretch without a 200 on that shard, and the longest run of
   503s).
2. ``kill -9`` of a primary, promotion by the cluster: every publish answered 200 is delivered
   exactly once (and is in history on the new primary); those answered 503 are not in history;
   serving again within the bound of the kill.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis
from harness import Gateway, request, wait_until
from redis.crc import key_slot
from redis_cluster_harness import NODE_TIMEOUT_MS, RedisCluster
from redis_harness import RedisServer
from test_redis_cluster import (
    NSHARDS,
    Reader,
    data_of,
    path,
    per_topic,
    ready,
    run_id,
    shard_of,
    spread,
    stream_numbers,
)

#: The contract's bound on the time to serve again after a failover (seconds).
BOUND = NODE_TIMEOUT_MS / 1000 + 5.0
#: The publisher's pace (messages per second, one message per request).
RATE = 50.0


def start_gateway(url: str) -> Gateway:
    g = Gateway("--redis", url, "--heartbeat-interval", "1s", "--flush-interval", "10ms", "--retry", "200ms")
    g.start()
    assert wait_until(lambda: ready(g), 20, 0.05), "gateway never became ready:\n" + "".join(g.log)
    return g


class Paced(threading.Thread):
    """One message per request at ``RATE`` msg/s, topics and gateways round robin.  A message
    answered 503 is sent again on its topic's next turn (nothing was published); a 200 or a
    504 (``outcome_unknown``: maybe published, e.g. written on a primary that no replica has
    acknowledged yet when ``redis_wait_replicas`` asks for one) moves the topic to its next
    number.  So a topic's numbers in history are increasing, and must be exactly what each
    subscriber got."""

    def __init__(self, gws: list[Gateway], topics: list[str]) -> None:
        super().__init__(daemon=True, name="paced")
        self.gws = gws
        self.topics = topics
        self.acked: dict[str, list[int]] = {t: [] for t in topics}
        self.maybe: dict[str, list[int]] = {t: [] for t in topics}
        #: every attempt: (sent, answered, status, shard)
        self.log: list[tuple[float, float, int, int]] = []
        self.unexpected: list[str] = []
        #: every answer but a 200, for the diagnostics: (sent, answered, status, shard, gateway, body)
        self.refusals: list[tuple[float, float, int, int, int, bytes]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        nxt = {t: 0 for t in self.topics}
        i = 0
        due = time.monotonic()
        while not self.halt.is_set():
            t = self.topics[i % len(self.topics)]
            g = self.gws[i % len(self.gws)]
            i += 1
            body = json.dumps({"topic": t, "data": data_of(t, nxt[t])}).encode()
            t0 = time.monotonic()
            try:
                r = request(g.port, "POST", "/publish", body, {"Content-Type": "application/json"}, 90)
                code = r.status
            except OSError as e:
                code = -1
                self.unexpected.append(f"no answer: {e!r}")
            t1 = time.monotonic()
            self.log.append((t0, t1, code, shard_of(t)))
            if code != 200:
                self.refusals.append((t0, t1, code, shard_of(t), (i - 1) % len(self.gws),
                                      r.body[:160] if code > 0 else b""))
            if code in (200, 504):
                (self.acked if code == 200 else self.maybe)[t].append(nxt[t])
                nxt[t] += 1
            elif code != 503 and code > 0:
                self.unexpected.append(f"status {code}: {r.body[:200]!r}")
            due = max(due + 1 / RATE, time.monotonic() - 0.5)
            self.halt.wait(max(0.0, due - time.monotonic()))

    def stop(self) -> None:
        self.halt.set()
        self.join(100)


def longest_without_200(log: list[tuple[float, float, int, int]], shard: int) -> float:
    """The longest time between two consecutive 200 answers on ``shard``."""
    ok = sorted(t1 for _, t1, code, k in log if k == shard and code == 200)
    return max((b - a for a, b in zip(ok, ok[1:], strict=False)), default=0.0)


def longest_503_run(log: list[tuple[float, float, int, int]], shard: int) -> float:
    """From the first 503 of a run of 503s on ``shard`` to the end of its last one."""
    best, start = 0.0, None
    for t0, t1, code, _ in sorted(x for x in log if x[3] == shard):
        if code == 503:
            start = t0 if start is None else start
            best = max(best, t1 - start)
        else:
            start = None
    return best


class Rig:
    """The cluster, the gateways, the subscribers and the publisher of one test."""

    def __init__(self, tmp_path, label: str) -> None:  # noqa: ANN001
        self.c = RedisCluster(tmp_path / "cluster", replicas=1)
        self.gws: list[Gateway] = []
        self.readers: list[Reader] = []
        self.pub: Paced | None = None
        try:
            self.c.start()
            self.gws = [start_gateway(self.c.nodes[0].url), start_gateway(self.c.nodes[4].url)]
        except BaseException:
            self.close()
            raise
        self.topics = spread(4, f"{label}{run_id()}")
        self.tags: list[str] = json.loads(self.client(self.owner("ssegw:shards")).get("ssegw:shards"))
        assert len(self.tags) == NSHARDS, self.tags

    def owner(self, key: str) -> RedisServer:
        return self.c.primary_of_slot(key_slot(key.encode()))

    def shard_owner(self, k: int) -> RedisServer:
        return self.owner("{" + self.tags[k] + "}:seq")

    @staticmethod
    def client(n: RedisServer) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=n.port, socket_timeout=5)

    def run_load(self) -> None:
        for i, g in enumerate(self.gws):
            s = g.stream(path(*self.topics))
            assert s.status == 200, s.error_body
            self.readers.append(Reader(s, self.topics, f"all@gw{i}"))
        for r in self.readers:
            r.start()
        self.pub = Paced(self.gws, self.topics)
        self.pub.start()

    def history(self, topic: str) -> list[int]:
        """The numbers in ``topic``'s history stream, read from its shard's primary now."""
        tag = self.tags[shard_of(topic)]
        key = "{" + tag + "}:h:" + topic
        cl = self.client(self.owner(key))
        try:
            return stream_numbers(cl, key)
        finally:
            cl.close()

    def check_delivery(self) -> None:
        """History holds every acknowledged event once, in order, and nothing answered 503
        (a 503 re-sent with the same number would show as a repeat); every subscriber got
        exactly what history holds, with no reset and no stream closed."""
        assert self.pub is not None
        assert not self.pub.unexpected, self.pub.unexpected[:5]
        want = {t: self.history(t) for t in self.topics}
        for t in self.topics:
            h, acked, maybe = want[t], self.pub.acked[t], set(self.pub.maybe[t])
            assert all(a < b for a, b in zip(h, h[1:], strict=False)), (t, h[-20:])
            assert not set(acked) - set(h), (t, sorted(set(acked) - set(h))[:20])
            assert not set(h) - set(acked) - maybe, (t, sorted(set(h) - set(acked) - maybe)[:20])
        n = sum(map(len, want.values()))
        for r in self.readers:
            assert wait_until(lambda r=r: len(r.s.events) >= n, 15, 0.05), (r.label, len(r.s.events), n,
                                                                            self.diagnostics())
        time.sleep(0.5)
        for r in self.readers:
            evs = r.s.events
            assert not any(e.event == "ssegw.reset" for e in evs), f"{r.label} got a reset"
            assert not r.s.closed, f"{r.label}: stream closed"
            assert len({e.id for e in evs}) == len(evs), f"{r.label}: an id repeated"
            got = per_topic(evs)
            for t in self.topics:
                assert got.get(t, []) == want[t], (r.label, t, shard_of(t), got.get(t, [])[-20:], want[t][-20:])
        for g in self.gws:
            br = g.stats()["broker"]
            assert br["up"] and br["gap_lost"] == 0, br

    def diagnostics(self, since: float | None = None) -> str:
        """The gateways' Redis log lines and (``since``: a monotonic time) every answer but a
        200 from then on, with its gateway and body: printed in full, as the assertion
        message is cut short."""
        out = []
        for i, g in enumerate(self.gws):
            lines = [ln.strip()[:300] for ln in list(g.log) if "redis" in ln]
            out.append(f"gw{i}: " + "\n  ".join(lines[-12:]))
        if since is not None and self.pub is not None:
            out += [f"+{t0 - since:.2f}..+{t1 - since:.2f} s  {code} shard {k} gw{gw}  {body!r}"
                    for t0, t1, code, k, gw, body in list(self.pub.refusals) if t1 >= since]
        text = "\n".join(out)
        print(text)
        return text

    def check_followed(self, k: int, new: RedisServer) -> None:
        """Both gateways serve shard ``k`` from ``new`` and logged the outage once each way."""
        for g in self.gws:
            sh = g.stats()["broker"]["shards"][k]
            assert sh["up"] and sh["node"] == f"127.0.0.1:{new.port}", (sh, new.port)
        logs = [ln.strip() for g in self.gws for ln in list(g.log) if f"redis shard {self.tags[k]} " in ln]
        assert any("unavailable (" in ln for ln in logs) and any("available again" in ln for ln in logs), logs
        assert not any("still unavailable" in ln for ln in logs), logs  # every 30 s, never per retry

    def close(self) -> None:
        if self.pub is not None:
            self.pub.stop()
        for r in self.readers:
            r.stop()
            r.s.close()
        for g in self.gws:
            try:
                g.stop(timeout=10)
            except Exception:  # noqa: BLE001 - the cluster must still be stopped
                g.kill()
        self.c.stop()


def report(what: str, **figures: float) -> None:
    print(f"\n{what}: " + ", ".join(f"{k} {v:.2f} s" for k, v in figures.items()))


@pytest.mark.timeout(120)
def test_planned_failover_under_load_loses_nothing_and_serves_within_the_bound(tmp_path):
    rig = Rig(tmp_path, "pf")
    victim = 1
    try:
        old = rig.shard_owner(victim)
        new = rig.c.replica_of(old)
        rig.run_load()
        time.sleep(2.0)
        t_fail = time.monotonic()
        assert new.command("CLUSTER", "FAILOVER").startswith(b"+OK")
        assert wait_until(lambda: rig.c.role(new) == "master", 10, 0.02), "the replica was not promoted"
        promoted = time.monotonic() - t_fail
        assert wait_until(lambda: all(ready(g) for g in rig.gws), BOUND, 0.05), rig.diagnostics()
        time.sleep(3.0)
        assert rig.pub is not None
        rig.pub.stop()
        gap = longest_without_200(rig.pub.log, victim)
        run503 = longest_503_run(rig.pub.log, victim)
        report("planned failover", promoted=promoted, longest_without_200=gap, longest_503_run=run503)
        assert gap <= BOUND and run503 <= BOUND, (gap, run503, rig.diagnostics())
        # The other shards never stopped.
        for k in range(NSHARDS):
            if k != victim:
                assert longest_without_200(rig.pub.log, k) < 2.0, (k, rig.diagnostics())
        # Lossless.  A publish in the moment after the switch, before the demoted primary has
        # re-attached as the new primary's replica, cannot be confirmed replicated
        # (redis_wait_replicas auto): it is answered 504, honestly, and check_delivery holds
        # each of those to "in history and delivered exactly once, or nowhere".  A few at most.
        maybe = {t: m for t, m in rig.pub.maybe.items() if m}
        assert sum(map(len, maybe.values())) <= 5, maybe
        assert all(shard_of(t) == victim for t in maybe), maybe
        rig.check_delivery()
        rig.check_followed(victim, new)
    finally:
        rig.close()


@pytest.mark.timeout(120)
def test_primary_killed_replica_promoted_acknowledged_events_delivered_once(tmp_path):
    rig = Rig(tmp_path, "pk")
    victim = 2
    try:
        old = rig.shard_owner(victim)
        new = rig.c.replica_of(old)
        rig.run_load()
        time.sleep(2.0)
        old.kill()
        t_kill = time.monotonic()
        assert wait_until(lambda: rig.c.role(new) == "master", 15, 0.05), "the replica was not promoted"
        promoted = time.monotonic() - t_kill
        assert wait_until(lambda: all(ready(g) for g in rig.gws), BOUND + 2, 0.05), rig.diagnostics()
        # As systemd would: the old node comes back, still believing it serves the slots,
        # until the cluster tells it otherwise; it rejoins as the new primary's replica.
        old.start()
        assert wait_until(lambda: rig.c.in_sync(old), 15, 0.05), "the old primary did not rejoin as a replica"
        time.sleep(2.0)
        assert rig.pub is not None
        rig.pub.stop()
        log = rig.pub.log
        # Served again: the first request sent after the kill that the new primary took
        # (200, or 504 while it has no replica and redis_wait_replicas asks for one).
        serve = min(t1 for t0, t1, code, k in log if k == victim and code in (200, 504) and t0 >= t_kill) - t_kill
        report("kill -9", promoted=promoted, first_accepted_after_kill=serve,
               longest_503_run=longest_503_run(log, victim))
        # The bound counts from the kill: node timeout for the cluster to notice, then 5 s in
        # which it promotes (~1 s here) and the gateway follows.  On a starved machine the
        # cluster alone has taken 5 s to promote (node timeout 2 s); the gateway cannot serve
        # before that, so it is held to the 5 s after the promotion.
        bound = max(BOUND, promoted + (BOUND - NODE_TIMEOUT_MS / 1000))
        assert serve <= bound, (serve, bound, rig.diagnostics(t_kill))
        rig.check_delivery()
        rig.check_followed(victim, new)
    finally:
        rig.close()

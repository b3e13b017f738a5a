"""Gateways on a real three-node Redis Cluster (three primaries, no replicas, loopback).

What the cluster layout promises (ssegw/broker/redis.py, "Several shards"): one shard per
primary, chosen once and stored in ``ssegw:shards``; topic -> shard is ``crc32 % nshards``;
each shard has its own sequence, epoch, history streams and *sharded* pub/sub; ids are vectors
``EPOCH-S0.S1.S2`` that may differ between gateways for the same event, each a correct resume
point.  And what the contract promises on top of it (docs/api.md "Ids, history and resume",
"Publish"): fan-out across gateways, exact resume on any gateway, ``ssegw.reset`` rather than a
silent gap, 503 means nothing was published.

Most tests share one cluster and two gateways (module scope, each gateway pointed at a
different node; a few add a gateway with special flags); the node-failure test builds its own
cluster.
"""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from urllib.parse import urlencode

import pytest
import redis
from harness import Gateway, Stream, dechunk, read_head, request, wait_until
from redis.crc import key_slot
from redis_cluster_harness import RedisCluster
from redis_harness import RedisServer
from sse_parser import Parser

NSHARDS = 3
ID_RE = re.compile(r"^[0-9a-z]{1,16}-\d+\.\d+\.\d+$")

# -- helpers ----------------------------------------------------------------------------------


def run_id() -> str:
    return uuid.uuid4().hex[:10]


def shard_of(topic: str) -> int:
    return zlib.crc32(topic.encode()) % NSHARDS


def topics_on(shard: int, n: int, prefix: str) -> list[str]:
    """``n`` fresh topic names that map to ``shard``."""
    out: list[str] = []
    while len(out) < n:
        t = f"{prefix}.{uuid.uuid4().hex[:10]}"
        if shard_of(t) == shard:
            out.append(t)
    return out


def spread(per_shard: int, prefix: str) -> list[str]:
    """``per_shard`` topics on every shard, interleaved: s0, s1, s2, s0, s1, s2, ..."""
    cols = [topics_on(k, per_shard, prefix) for k in range(NSHARDS)]
    return [cols[k][i] for i in range(per_shard) for k in range(NSHARDS)]


def path(*topics: str, **params: str) -> str:
    return "/events?" + urlencode([("topic", t) for t in topics] + list(params.items()))


def data_of(topic: str, n: int) -> str:
    return f"{topic}|{n}"


def parse_data(d: str) -> tuple[str, int]:
    t, _, n = d.rpartition("|")
    return t, int(n)



def stream_numbers(cl, key: str) -> list[int]:  # noqa: ANN001
    """The numbers (``data_of``) of the events in the history stream ``key``, via client ``cl``."""
    out = []
    for _, fields in cl.xrange(key):
        body = fields[b"b"].decode()
        line = next(ln for ln in body.split("\n") if ln.startswith("data:"))
        out.append(parse_data(line[5:].strip())[1])
    return out

def vec(eid: str) -> tuple[str, list[int]]:
    epoch, _, rest = eid.partition("-")
    return epoch, [int(x) for x in rest.split(".")]


def publish_ok(g: Gateway, msgs: object) -> list[str]:
    r = g.publish(msgs)
    assert r.status == 200, r
    ids = r.json()["ids"]
    assert len(ids) == (len(msgs) if isinstance(msgs, list) else 1)
    return ids


def ready(g: Gateway) -> bool:
    try:
        return g.request("GET", "/readyz", admin=True, timeout=3).status == 200
    except OSError:
        return False


def subscribers(g: Gateway, topic: str) -> int | None:
    r = g.request("GET", f"/admin/topics/{topic}", admin=True)
    if r.status != 200:
        return None
    body = r.json()
    assert body["topic"] == topic, body
    return body["subscribers"]


def drain(s: Stream, n: int, timeout: float = 5.0, extra: float = 0.3) -> list:
    """Wait for ``n`` events, then keep reading ``extra`` s so that surplus events show up."""
    s.wait_events(n, timeout)
    end = time.monotonic() + extra
    while time.monotonic() < end and not s.closed:
        s.pump(end - time.monotonic())
    return list(s.events)


def per_topic(events) -> dict[str, list[int]]:  # noqa: ANN001
    out: dict[str, list[int]] = {}
    for e in events:
        t, n = parse_data(e.data)
        out.setdefault(t, []).append(n)
    return out


def diagnostics(gws: list[Gateway]) -> str:
    """Broker counters and the gateways' warnings, for failure messages."""
    out = []
    for i, g in enumerate(gws):
        try:
            br = {k: v for k, v in g.stats()["broker"].items() if k != "shards"}
        except Exception as e:  # noqa: BLE001
            br = {"stats": repr(e)}
        warns = [ln.strip()[:300] for ln in list(g.log) if "WARNING" in ln or "ERROR" in ln or "redis" in ln.lower()]
        out.append(f"gw{i}: broker {br}; log {warns[-6:]}")
    return "\n".join(out)


def start_gateway(url: str, tmp_path=None, *extra: str) -> Gateway:  # noqa: ANN001
    g = Gateway("--redis", url, "--heartbeat-interval", "1s", "--flush-interval", "10ms", "--retry", "200ms",
                *extra, tmp_path=tmp_path)
    g.start()
    assert wait_until(lambda: ready(g), 15, 0.05), "gateway never became ready:\n" + "".join(g.log)
    return g


@dataclass
class Env:
    c: RedisCluster
    a: Gateway
    b: Gateway
    clients: list[redis.Redis] = field(default_factory=list)  # one per node, same order as c.nodes

    @property
    def gws(self) -> list[Gateway]:
        return [self.a, self.b]

    def node_for_slot(self, slot: int) -> RedisServer:
        """The node that says it serves ``slot`` (``CLUSTER NODES``, its ``myself`` line)."""
        for n, cl in zip(self.c.nodes, self.clients, strict=True):
            for parts in _cluster_nodes(cl):
                if "myself" not in parts[2]:
                    continue
                for r in parts[8:]:
                    if r.startswith("["):
                        continue  # a slot being migrated
                    lo, _, hi = r.partition("-")
                    if int(lo) <= slot <= int(hi or lo):
                        return n
        raise LookupError(slot)

    def client_for_key(self, key: str) -> redis.Redis:
        return self.clients[self.c.nodes.index(self.node_for_slot(key_slot(key.encode())))]

    def tags(self) -> list[str]:
        raw = self.client_for_key("ssegw:shards").get("ssegw:shards")
        assert raw is not None, "ssegw:shards is not set"
        return json.loads(raw)

    def node_of_shard(self, k: int) -> RedisServer:
        return self.node_for_slot(key_slot(("{" + self.tags()[k] + "}:seq").encode()))

    def client_of_shard(self, k: int) -> redis.Redis:
        return self.clients[self.c.nodes.index(self.node_of_shard(k))]


def shard_seq(env: Env, k: int) -> int:
    """The current sequence of shard ``k``, read from its node."""
    return int(env.client_of_shard(k).get("{" + env.tags()[k] + "}:seq") or 0)


def raise_shard_seq(env: Env, g: Gateway, k: int, target: int) -> None:
    """Publish to a scratch topic of shard ``k`` until its sequence is ``target``."""
    scratch = topics_on(k, 1, "scratch")[0]
    n = target - shard_seq(env, k)
    assert n >= 0, (k, target, n)
    while n > 0:
        m = min(n, 500)
        publish_ok(g, [{"topic": scratch, "data": "s"}] * m)
        n -= m
    assert shard_seq(env, k) == target


def make_env(c: RedisCluster, tmp_path=None) -> Env:  # noqa: ANN001
    gws: list[Gateway] = []
    try:
        # Each gateway is given a different node: any node must do.
        gws.append(start_gateway(c.nodes[0].url, tmp_path))
        gws.append(start_gateway(c.nodes[1].url, tmp_path))
    except BaseException:
        for g in gws:
            g.kill()
        raise
    clients = [redis.Redis(host="127.0.0.1", port=n.port, socket_timeout=5) for n in c.nodes]
    return Env(c, gws[0], gws[1], clients)


def close_env(env: Env) -> None:
    for g in env.gws:
        try:
            g.stop(timeout=10)
        except Exception:  # noqa: BLE001
            g.kill()
    for cl in env.clients:
        cl.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One cluster and two gateways for the tests that break nothing."""
    c = RedisCluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start()
        e = make_env(c)
    except BaseException:
        c.stop()
        raise
    yield e
    close_env(e)
    c.stop()


# -- 1. layout ----------------------------------------------------------------------------------


def test_one_shard_per_primary_and_keys_where_their_slots_are(env):
    c = env.c
    tags = env.tags()
    assert len(tags) == NSHARDS and len(set(tags)) == NSHARDS, tags
    ports = {n.port for n in c.nodes}
    # Every node is a primary serving slots, and the cluster has three of them.
    for cl in env.clients:
        lines = _cluster_nodes(cl)
        assert len(lines) == NSHARDS and all("master" in ln[2] for ln in lines), lines
    shards_by_gw = []
    for g in env.gws:
        br = g.stats()["broker"]
        sh = br["shards"]
        assert [s["tag"] for s in sh] == tags, (sh, tags)
        assert all(s["up"] for s in sh), sh
        nodes = [int(s["node"].rsplit(":", 1)[1]) for s in sh]
        assert len(set(nodes)) == NSHARDS and set(nodes) == ports, sh
        for s, port in zip(sh, nodes, strict=True):
            assert env.node_for_slot(key_slot(("{" + s["tag"] + "}:seq").encode())).port == port, s
        assert re.fullmatch(r"[0-9a-z]{1,16}", br["epoch"]), br
        shards_by_gw.append([(s["tag"], s["node"], s["epoch"]) for s in sh])
    assert shards_by_gw[0] == shards_by_gw[1], shards_by_gw  # the same shards, epochs and nodes

    # Publish to 60 fresh topics (a batch spanning every shard, and singles via the other gateway).
    run = run_id()
    topics = [f"lay{run}.{i}" for i in range(60)]
    publish_ok(env.a, [{"topic": t, "data": "x"} for t in topics[:30]])
    for t in topics[30:]:
        publish_ok(env.b, {"topic": t, "data": "y"})
    found: dict[str, list[tuple[int, str]]] = {}
    for n, cl in zip(c.nodes, env.clients, strict=True):
        for key in cl.scan_iter(match=f"*:h:lay{run}.*", count=1000):
            key = key.decode()
            topic = key.split(":h:", 1)[1]
            found.setdefault(topic, []).append((n.port, key))
            assert cl.type(key) == b"stream", key
    assert set(found) == set(topics), set(topics) ^ set(found)
    used_nodes = set()
    for t, hits in found.items():
        assert len(hits) == 1, (t, hits)  # one history stream per topic, on one node
        port, key = hits[0]
        k = shard_of(t)
        assert key == "{" + tags[k] + "}:h:" + t, (t, key, k)
        assert env.node_for_slot(key_slot(key.encode())).port == port, (key, port)
        assert env.node_of_shard(k).port == port, (t, k, port)
        used_nodes.add(port)
    assert used_nodes == ports, (used_nodes, ports)  # history really is spread over all primaries


def _cluster_nodes(cl: redis.Redis) -> list[list[str]]:
    """``CLUSTER NODES`` of one node, one list of fields per line."""
    raw = cl.execute_command("CLUSTER", "NODES")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return [ln.split() for ln in text.splitlines() if ln.strip()]


# -- 2. sharded pub/sub -------------------------------------------------------------------------


def _shardnumsub(cl: redis.Redis, ch: str) -> int:
    r = cl.execute_command("PUBSUB", "SHARDNUMSUB", ch)
    return int(r[1])


def _numsub(cl: redis.Redis, ch: str) -> int:
    r = cl.execute_command("PUBSUB", "NUMSUB", ch)
    return int(r[1])


def _shardchannels(cl: redis.Redis, pattern: str) -> set[str]:
    return {x.decode() for x in cl.execute_command("PUBSUB", "SHARDCHANNELS", pattern)}


def test_subscriptions_are_sharded_pubsub_on_the_topics_node(env):
    run = run_id()
    for k in range(NSHARDS):
        t = topics_on(k, 1, f"pss{run}")[0]
        ch = "{" + env.tags()[k] + "}:c:" + t
        owner = env.client_of_shard(k)
        others = [cl for cl in env.clients if cl is not owner]
        with env.a.stream(path(t)) as s1:
            assert s1.status == 200, s1.error_body
            assert wait_until(lambda ch=ch, owner=owner: _shardnumsub(owner, ch) == 1, 3), _shardnumsub(owner, ch)
            with env.b.stream(path(t)) as s2:
                assert s2.status == 200, s2.error_body
                # One sharded subscription per gateway (worker), on the node that owns the slot.
                assert wait_until(lambda ch=ch, owner=owner: _shardnumsub(owner, ch) == 2, 3), \
                    _shardnumsub(owner, ch)
                assert ch in _shardchannels(owner, f"*{t}")
                for cl in env.clients:
                    assert _numsub(cl, ch) == 0, "a classic SUBSCRIBE to the topic channel"
                    chans = {x.decode() for x in cl.execute_command("PUBSUB", "CHANNELS", f"*{t}*")}
                    assert not chans, chans
                for cl in others:
                    assert _shardchannels(cl, f"*{t}*") == set()
                eid = publish_ok(env.a, {"topic": t, "data": data_of(t, 0)})[0]
                for s in (s1, s2):
                    evs = drain(s, 1, extra=0.1)
                    assert [e.data for e in evs] == [data_of(t, 0)], evs
                assert ID_RE.match(evs[0].id) and ID_RE.match(eid), (evs[0].id, eid)
        # The last local subscriber gone: the gateways unsubscribe (lazily, next housekeeping pass).
        assert wait_until(lambda ch=ch, owner=owner: _shardnumsub(owner, ch) == 0, 5), _shardnumsub(owner, ch)


# -- 3. fan-out across gateways ---------------------------------------------------------------------


def test_cross_gateway_fanout_order_ids_and_resume_from_every_cut(env):
    a, b = env.a, env.b
    topics = spread(2, f"fan{run_id()}")
    s = a.stream(path(*topics))
    assert s.status == 200, s.error_body
    rnd = random.Random(7)
    sent: dict[str, list[int]] = {t: [] for t in topics}
    count = 0

    def msg(t: str) -> dict:
        m = {"topic": t, "data": data_of(t, len(sent[t]))}
        sent[t].append(len(sent[t]))
        return m

    with s:
        for i in range(24):
            publish_ok(b, msg(topics[i % len(topics)]))
            count += 1
        for _ in range(6):  # batches spanning shards, some topics twice in one batch
            batch = [msg(rnd.choice(topics)) for _ in range(rnd.randint(2, 7))]
            ids = publish_ok(b, batch)
            assert len(set(ids)) == len(ids), ids
            count += len(batch)
        evs = drain(s, count)
        assert len(evs) == count, (len(evs), count)
        assert all(e.event == "message" and e.has_id for e in evs), [e for e in evs if e.event != "message"]
        bad = [e.id for e in evs if not ID_RE.match(e.id)]
        assert not bad, bad
        assert len({e.id for e in evs}) == len(evs), "an id repeated on one connection"
        assert per_topic(evs) == sent
        assert not s.closed

    # Resume from (nearly) every id the connection saw, alternately on either gateway, with the
    # header or the query form: exactly the rest, per topic in order.
    cuts = sorted({0, 1, len(evs) - 2, len(evs) - 1, *rnd.sample(range(len(evs)), 8)})
    for j, cut in enumerate(cuts):
        g = (a, b)[j % 2]
        eid = evs[cut].id
        if j % 3 == 2:
            r = g.stream(path(*topics, last_event_id=eid))
        else:
            r = g.stream(path(*topics), headers={"Last-Event-ID": eid})
        with r:
            assert r.status == 200, r.error_body
            want = evs[cut + 1:]
            got = drain(r, len(want), extra=0.15)
            assert not any(e.event == "ssegw.reset" for e in got), (cut, got[:2])
            assert per_topic(got) == per_topic(want), (cut, eid)
            assert len({e.id for e in got}) == len(got)
    # Resuming from the last id, then live.
    with b.stream(path(*topics), headers={"Last-Event-ID": evs[-1].id}) as r:
        assert r.status == 200
        assert drain(r, 1, timeout=0.3, extra=0) == []
        publish_ok(a, [{"topic": t, "data": data_of(t, len(sent[t]))} for t in topics])
        got = drain(r, len(topics), extra=0.1)
        assert per_topic(got) == {t: [len(sent[t])] for t in topics}


# -- 3b. the resume point of every id, on a connection with topics of two shards -----------------


def test_every_id_of_a_two_shard_connection_is_an_exact_resume_point(env, tmp_path):
    """Shard 0's sequence is far ahead of shard 1's; each round publishes one batch ``[w, x]``
    (shard 0) + ``[y]`` (shard 1).  The gateway calls shard 0 first, so x reaches a gateway
    before y, and y's id says "shard 0 up to x".  ``w`` has 65 subscribers on a gateway with a
    300 ms flush interval, so its arrival right after a flush defers the next sweep and x and y
    go out in the same sweep.  Resuming from any id the (x, y) connection saw must give exactly
    the rest, on either gateway."""
    g = start_gateway(env.c.nodes[2].url, tmp_path, "--flush-interval", "300ms")
    crowd: list[Stream] = []
    try:
        run = run_id()
        w, x = topics_on(0, 2, f"cut{run}")
        y = topics_on(1, 1, f"cut{run}")[0]
        raise_shard_seq(env, g, 0, max(shard_seq(env, 0), shard_seq(env, 1)) + 50)
        crowd = [g.stream(path(w)) for _ in range(65)]
        assert all(c.status == 200 for c in crowd)
        rounds = 3
        with g.stream(path(x, y)) as s:
            assert s.status == 200
            for i in range(rounds):
                publish_ok(env.a, {"topic": w, "data": "trigger"})  # a flush now ...
                time.sleep(0.03)
                publish_ok(env.a, [{"topic": w, "data": "w"}, {"topic": x, "data": data_of(x, i)},
                                   {"topic": y, "data": data_of(y, i)}])  # ... the next one in 300 ms
                time.sleep(0.4)
            evs = drain(s, 2 * rounds)
        assert per_topic(evs) == {x: list(range(rounds)), y: list(range(rounds))}
        order = [(e.data.rpartition(".")[2], e.id) for e in evs]
        wrong = []
        for cut in range(len(evs)):
            for other in env.gws:
                with other.stream(path(x, y), headers={"Last-Event-ID": evs[cut].id}) as r:
                    assert r.status == 200
                    got = per_topic(drain(r, len(evs) - cut - 1, timeout=1, extra=0.1))
                    want = per_topic(evs[cut + 1:])
                    if got != want:
                        wrong.append(f"after {order[cut]}: got {got}, want {want}")
        assert not wrong, f"{len(wrong)} wrong resumes, e.g. {wrong[:3]}; the connection saw {order}"
    finally:
        for c in crowd:
            c.close()
        g.kill()


# -- 3c. a paused connection holding events of two shards --------------------------------------------


class StalledReader:
    """An SSE request on a socket with a tiny receive buffer whose body is not read until
    :meth:`read_all`: the gateway soon has to hold this connection's events."""

    def __init__(self, port: int, target: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
        self.buf = bytearray()
        self.status, self.headers, _ = read_head(self.sock, self.buf, 5)

    def read_all(self, idle: float = 0.5, timeout: float = 10) -> list:
        deadline = time.monotonic() + timeout
        data = bytearray(self.buf)
        self.sock.settimeout(idle)
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
        self.sock.close()
        payload, _, _ = dechunk(bytes(data)) if self.headers.get("transfer-encoding") == "chunked" \
            else (bytes(data), b"", False)
        p = Parser()
        p.feed(payload.decode())
        return p.events


def test_held_events_of_two_shards_with_the_same_sequence_both_arrive(env, tmp_path):
    """A stalled subscriber of x (shard 0), y (shard 1) and f (shard 2) on a gateway with a small
    max_buffer; f's big events fill the socket until the gateway holds events; then one batch
    publishes x and y, whose shards were first brought to the same sequence."""
    g = start_gateway(env.c.nodes[2].url, tmp_path, "--max-buffer", "64KiB")
    try:
        run = run_id()
        x, y, f = (topics_on(k, 1, f"held{run}")[0] for k in range(NSHARDS))
        target = max(shard_seq(env, 0), shard_seq(env, 1), shard_seq(env, 2) + 200)
        raise_shard_seq(env, g, 0, target)
        raise_shard_seq(env, g, 1, target)
        conn = StalledReader(g.port, path(x, y, f))
        assert conn.status == 200
        held0 = g.stats()["held"]
        nfill = 0
        while g.stats()["held"] == held0:
            assert nfill < 100, "the gateway never held an event for the stalled connection"
            publish_ok(g, {"topic": f, "data": data_of(f, nfill) + "|" + "z" * 6000})
            nfill += 1
            time.sleep(0.02)
        held1 = g.stats()["held"]
        ids = publish_ok(g, [{"topic": x, "data": data_of(x, 0)}, {"topic": y, "data": data_of(y, 0)}])
        assert vec(ids[0])[1][0] == vec(ids[1])[1][1] == target + 1, ids  # same sequence, two shards
        assert wait_until(lambda: g.stats()["held"] >= held1 + 2, 3), "x and y were not held"
        evs = conn.read_all()
        got = {}
        for e in evs:
            t, _, rest = e.data.partition("|")
            got.setdefault(t, []).append(int(rest.split("|")[0]))
        assert got == {f: list(range(nfill)), x: [0], y: [0]}, {t: v[-3:] for t, v in got.items()}
    finally:
        g.kill()


# -- 3d. a topic wanted again while its lazy unsubscribe is on its way ---------------------------


def test_resubscribing_while_the_lazy_unsubscribe_is_in_flight_is_not_an_outage(env, tmp_path):
    """2000 topics of one shard lose their last subscriber at once, so one housekeeping pass
    sends one big SUNSUBSCRIBE; meanwhile clients keep subscribing to single topics of that
    set.  A topic wanted again before Redis's unsubscribe confirmation for it is read must not
    look like "the slot moved away": no reconnect, and every new stream is a 200 (Redis is fine)."""
    g = start_gateway(env.c.nodes[0].url, tmp_path, "--max-topics-per-conn", "250")
    try:
        run = run_id()[:4]
        topics = [t for t in (f"r{run}{i}" for i in range(10000)) if shard_of(t) == 0][:2000]
        reconnects = g.stats()["broker"]["reconnects"]
        codes: dict[int, int] = {}
        rnd = random.Random(5)
        for _ in range(2):
            big = [g.stream(path(*topics[i:i + 250])) for i in range(0, len(topics), 250)]
            assert {s.status for s in big} == {200}
            for s in big:
                s.close()
            end = time.monotonic() + 1.3  # the housekeeping pass runs every second
            while time.monotonic() < end and not codes.get(503):
                with g.stream(path(rnd.choice(topics))) as p:
                    codes[p.status] = codes.get(p.status, 0) + 1
            if codes.get(503) or g.stats()["broker"]["reconnects"] != reconnects:
                break
        moved = [ln.strip()[:200] for ln in g.log if "moved away" in ln]
        assert codes.keys() == {200} and g.stats()["broker"]["reconnects"] == reconnects, \
            f"new streams answered {codes}; {moved[-2:]}"
    finally:
        g.kill()


# -- 4. resume exactness under load ---------------------------------------------------------------


@dataclass
class Acked:
    n: int
    sent: float  # when the request that published it was sent
    acked: float


class LoadPublisher(threading.Thread):
    """Publishes numbered messages to its own topics without pause: singles and batches (which
    span shards), alternating between the gateways.  Each topic has exactly one publisher, so a
    topic's acknowledged numbers are its publish order."""

    def __init__(self, gws: list[Gateway], topics: list[str], seed: int, retry_503: bool = False) -> None:
        super().__init__(daemon=True, name=f"pub{seed}")
        self.gws = gws
        self.topics = topics
        self.rnd = random.Random(seed)
        self.retry_503 = retry_503
        self.acked: dict[str, list[Acked]] = {t: [] for t in topics}
        self.unexpected: list[str] = []
        #: every attempt: (sent, answered, status, shards the request touched)
        self.log: list[tuple[float, float, int, frozenset[int]]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        req = 0
        nxt = {t: 0 for t in self.topics}
        while not self.halt.is_set():
            size = 1 if self.rnd.random() < 0.5 else self.rnd.randint(2, 5)
            chosen = [self.rnd.choice(self.topics) for _ in range(size)]
            msgs = []
            local = dict(nxt)
            for t in chosen:
                msgs.append({"topic": t, "data": data_of(t, local[t])})
                local[t] += 1
            body = json.dumps(msgs if size > 1 else msgs[0]).encode()
            shards = frozenset(shard_of(t) for t in chosen)
            while not self.halt.is_set():
                g = self.gws[req % len(self.gws)]
                req += 1
                t0 = time.monotonic()
                try:
                    r = request(g.port, "POST", "/publish", body, {"Content-Type": "application/json"}, 90)
                    code = r.status
                except OSError as e:
                    code = -1
                    self.unexpected.append(f"no answer: {e!r}")
                t1 = time.monotonic()
                self.log.append((t0, t1, code, shards))
                if code == 200:
                    ids = r.json()["ids"]
                    if len(ids) != size or not all(ID_RE.match(i) for i in ids):
                        self.unexpected.append(f"ids {ids} for {size} messages")
                    for m in msgs:
                        t, n = parse_data(m["data"])
                        self.acked[t].append(Acked(n, t0, t1))
                    nxt = local
                    break
                if code == 503 and self.retry_503:
                    time.sleep(0.02)
                    continue  # nothing was published: send the same request again
                if code > 0:
                    self.unexpected.append(f"status {code}: {r.body[:200]!r}")
                time.sleep(0.02)
            time.sleep(0.002)

    def stop(self) -> None:
        self.halt.set()
        self.join(100)


@dataclass
class Conn:
    gw: int
    how: str  # "fresh", "earliest", "header", "query"
    after: str | None
    opened: float
    events: int = 0
    closed_by_server: bool = False


class Hopper(threading.Thread):
    """A subscriber that reads for a random short time, closes, and resumes on the *other*
    gateway with the last id it saw (header or ``last_event_id`` query), sometimes at once,
    sometimes after a pause."""

    def __init__(self, gws: list[Gateway], topics: list[str], seed: int, earliest: bool) -> None:
        super().__init__(daemon=True, name=f"hopper{seed}")
        self.gws = gws
        self.topics = topics
        self.rnd = random.Random(seed)
        self.gi = seed % 2
        self.earliest = earliest
        self.got: dict[str, list[int]] = {t: [] for t in topics}
        #: per received event: (connection index, id, topic, n)
        self.trace: list[tuple[int, str, str, int]] = []
        self.conns: list[Conn] = []
        self.problems: list[str] = []
        self.last: str | None = None
        self.first_open: float | None = None
        self.halt = threading.Event()
        self.target: dict[str, int] | None = None  # set by the test once publishing stopped

    def _open(self) -> Stream | None:
        g = self.gws[self.gi]
        if self.last is None:
            how = "earliest" if self.earliest else "fresh"
            s = g.stream(path(*self.topics, since="earliest") if self.earliest else path(*self.topics))
        elif self.rnd.random() < 0.3:
            how = "query"
            s = g.stream(path(*self.topics, last_event_id=self.last))
        else:
            how = "header"
            s = g.stream(path(*self.topics), headers={"Last-Event-ID": self.last})
        if s.status != 200:
            self.problems.append(f"{how} connect on gw{self.gi} answered {s.status}: {s.error_body[:200]!r}")
            return None
        if self.first_open is None:
            self.first_open = time.monotonic()
        self.conns.append(Conn(self.gi, how, self.last, time.monotonic()))
        return s

    def _take(self, s: Stream, seen: int, ids: set[str]) -> int:
        ci = len(self.conns) - 1
        evs = s.events
        for e in evs[seen:]:
            if e.event == "ssegw.reset":
                self.problems.append(f"conn {ci}: reset {e.data}")
                continue
            if not e.has_id or not ID_RE.match(e.id):
                self.problems.append(f"conn {ci}: bad id {e.id!r}")
            if e.id in ids:
                self.problems.append(f"conn {ci}: id {e.id} repeated on one connection")
            ids.add(e.id)
            t, n = parse_data(e.data)
            if t not in self.got:
                self.problems.append(f"conn {ci}: event of a foreign topic {e.data!r}")
                continue
            self.got[t].append(n)
            self.trace.append((ci, e.id, t, n))
            self.last = e.id
            self.conns[ci].events += 1
        return len(evs)

    def _done(self) -> bool:
        assert self.target is not None
        return all((self.got[t][-1] if self.got[t] else -1) >= self.target[t] - 1 for t in self.topics)

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                s = self._open()
                if s is None:
                    time.sleep(0.1)
                    continue
                seen, ids = 0, set()
                end = time.monotonic() + self.rnd.uniform(0.03, 0.7)
                with s:
                    # (A first connection stays until it has an id to resume from.)
                    while (time.monotonic() < end or self.last is None) and not s.closed \
                            and not self.halt.is_set():
                        s.pump(0.05)
                        seen = self._take(s, seen, ids)
                    seen = self._take(s, seen, ids)
                    if s.closed:
                        self.conns[-1].closed_by_server = True
                        self.problems.append(f"conn {len(self.conns) - 1}: closed by the server")
                self.gi ^= 1
                time.sleep(self.rnd.choice([0, 0, 0, 0.02, 0.1, 0.4]))
            # Publishing has stopped: one last connection collects the rest.
            deadline = time.monotonic() + 15
            while not self._done() and time.monotonic() < deadline:
                s = self._open()
                if s is None:
                    time.sleep(0.1)
                    continue
                seen, ids = 0, set()
                with s:
                    while not self._done() and not s.closed and time.monotonic() < deadline:
                        s.pump(0.05)
                        seen = self._take(s, seen, ids)
                    stop = time.monotonic() + 0.3  # anything surplus (duplicates) shows up too
                    while not s.closed and time.monotonic() < stop:
                        s.pump(0.05)
                    self._take(s, seen, ids)
                self.gi ^= 1
        except Exception as e:  # noqa: BLE001
            self.problems.append(f"hopper crashed: {e!r}")

    def explain(self, t: str, want: list[int]) -> str:
        got = self.got[t]
        i = next((i for i, (x, y) in enumerate(zip(got, want, strict=False)) if x != y), min(len(got), len(want)))
        around = [(ci, eid, n) for ci, eid, tt, n in self.trace if tt == t]
        lo = max(0, i - 3)
        rows = around[lo:i + 3]
        conns = sorted({ci for ci, _, _ in rows})
        return (f"topic {t} (shard {shard_of(t)}): first difference at #{i}: got {got[lo:i + 3]} want {want[lo:i + 3]}"
                f"; events there {rows}; connections {[(ci, self.conns[ci]) for ci in conns]}")


def run_resume_under_load(env: Env, earliest: bool, duration: float) -> None:
    gws = env.gws
    topics = spread(3, f"load{run_id()}")[:8]  # 3 + 3 + 2, interleaved by shard
    pubs = [LoadPublisher(gws, topics[0::2], 1), LoadPublisher(gws[::-1], topics[1::2], 2)]
    assert all({shard_of(t) for t in p.topics} == set(range(NSHARDS)) for p in pubs)
    one_shard = [t for t in topics if shard_of(t) == 1]
    two_shards = [t for t in topics if shard_of(t) != 0]
    hoppers = [Hopper(gws, topics, 10, earliest), Hopper(gws, topics, 11, earliest),
               Hopper(gws, one_shard, 12, earliest), Hopper(gws, two_shards, 13, earliest)]
    try:
        for p in pubs:
            p.start()
        assert wait_until(lambda: all(sum(map(len, p.acked.values())) >= 20 for p in pubs), 5), \
            [p.unexpected[:3] for p in pubs]
        for h in hoppers:
            h.start()
        time.sleep(duration)
    finally:
        for p in pubs:
            p.stop()
    acked = {t: a for p in pubs for t, a in p.acked.items()}
    for h in hoppers:
        h.target = {t: len(acked[t]) for t in h.topics}
        h.halt.set()
    for h in hoppers:
        h.join(30)
        assert not h.is_alive(), "a subscriber hung"
    failures: list[str] = [f"{p.name}: {p.unexpected[:3]}" for p in pubs if p.unexpected]
    total = sum(map(len, acked.values()))
    assert total > 300, f"only {total} events published"
    for t, a in acked.items():
        assert [x.n for x in a] == list(range(len(a))), t

    for h in hoppers:
        assert len(h.conns) >= 5, f"{h.name}: only {len(h.conns)} connections"
        if h.problems:
            failures.append(f"{h.name}: {h.problems[:5]}")
        assert h.first_open is not None
        for t in h.topics:
            got = h.got[t]
            if earliest:
                want = [x.n for x in acked[t]]
            else:
                # A fresh connection gets what is published after it is open; what was in
                # flight while it opened may or may not be in.  Then nothing may be missing.
                must = next((x.n for x in acked[t] if x.sent > h.first_open), len(acked[t]))
                start = got[0] if got else must
                if start > must:
                    failures.append(f"{h.name}: topic {t} starts at {start}, but {must} was published after it opened")
                want = [x.n for x in acked[t]][start:]
            if got != want:
                failures.append(f"{h.name}: " + h.explain(t, want))
    if failures:
        pytest.fail(f"{len(failures)} failures: {failures[:4]}\n{diagnostics(gws)}")
    hops = sum(len(h.conns) for h in hoppers)
    assert hops > 20, hops


def test_resume_on_the_other_gateway_under_load_is_exact(env):
    run_resume_under_load(env, earliest=False, duration=8.0)


def test_resume_under_load_starting_from_earliest(env):
    run_resume_under_load(env, earliest=True, duration=6.0)


# -- 5. since=last ----------------------------------------------------------------------------------


def test_since_last_gives_each_topics_latest_then_live(env):
    a, b = env.a, env.b
    topics = spread(2, f"last{run_id()}")
    empty = topics_on(2, 1, f"last{run_id()}")[0]  # no history at all
    rnd = random.Random(3)
    latest: dict[str, int] = {}
    count = {t: 0 for t in [*topics, empty]}
    for _ in range(5):
        batch = []
        for t in rnd.sample(topics, 4):
            batch.append({"topic": t, "data": data_of(t, count[t])})
            latest[t] = count[t]
            count[t] += 1
        publish_ok(b, batch)
    for t in topics:  # every topic has something
        publish_ok(a, {"topic": t, "data": data_of(t, count[t])})
        latest[t] = count[t]
        count[t] += 1
    ids_seen = []
    for g in (a, b):
        with g.stream(path(*topics, empty, since="last")) as s:
            assert s.status == 200, s.error_body
            first = list(drain(s, len(latest), extra=0.2))
            assert not any(e.event == "ssegw.reset" for e in first), first
            assert per_topic(first) == {t: [latest[t]] for t in latest}, first  # (empty: nothing)
            assert all(ID_RE.match(e.id) for e in first) and len({e.id for e in first}) == len(first)
            ids_seen.append(first)
            live = [{"topic": t, "data": data_of(t, count[t])} for t in [*topics, empty]]
            publish_ok((b, a)[g is b], live)
            got = drain(s, len(first) + len(topics) + 1, extra=0.2)[len(first):]
            assert per_topic(got) == {t: [count[t]] for t in [*topics, empty]}
            assert len({e.id for e in s.events}) == len(s.events)
            for t in [*topics, empty]:
                latest[t] = count[t]
                count[t] += 1
    # A Last-Event-ID wins over since=last: everything after that id, not just the latest.
    first = ids_seen[0]
    with b.stream(path(*topics, since="last"), headers={"Last-Event-ID": first[0].id}) as s:
        assert s.status == 200
        after = drain(s, 3 * len(topics) - 1, extra=0.2)
        want = per_topic([*first[1:]])
        for t in topics:
            want.setdefault(t, [])
            want[t] += [count[t] - 2, count[t] - 1]
        assert per_topic(after) == want


# -- 6. ids the gateway cannot place --------------------------------------------------------------


def test_foreign_or_stale_ids_get_a_reset_then_live(env):
    a, b = env.a, env.b
    topics = spread(2, f"rst{run_id()}")
    eid = publish_ok(a, [{"topic": t, "data": data_of(t, 0)} for t in topics])[-1]
    epoch, v = vec(eid)
    other = "zz" + epoch[2:] if not epoch.startswith("zz") else "yy" + epoch[2:]
    big = 10**12
    cases = [
        ("standalone shape", "k3x9a0qz-123", set(topics)),
        ("standalone shape, right epoch", f"{epoch}-{v[0]}", set(topics)),
        ("wrong epoch", f"{other}-{'.'.join(map(str, v))}", set(topics)),
        ("two shards", f"{epoch}-{v[0]}.{v[1]}", set(topics)),
        ("four shards", f"{epoch}-{v[0]}.{v[1]}.{v[2]}.0", set(topics)),
        ("beyond every head", f"{epoch}-{big}.{big}.{big}", set(topics)),
    ]
    n = 1
    for j, (label, bad_id, want_reset) in enumerate(cases):
        g = (a, b)[j % 2]
        with g.stream(path(*topics), headers={"Last-Event-ID": bad_id}) as s:
            assert s.status == 200, (label, s.status, s.error_body)
            drain(s, 1, extra=0.15)
            assert s.events, f"{label}: nothing at all (a silent gap)"
            first = s.events[0]
            assert first.event == "ssegw.reset", (label, s.events[:3])
            assert set(json.loads(first.data)["topics"]) == want_reset, (label, first.data)
            assert len(s.events) == 1, f"{label}: replay after a reset: {s.events[1:4]}"
            publish_ok((b, a)[j % 2], [{"topic": t, "data": data_of(t, n)} for t in topics])
            got = drain(s, 1 + len(topics), extra=0.15)[1:]
            assert per_topic(got) == {t: [n] for t in topics}, label
            n += 1
    # One shard out of reach, the others fine: only that shard's topics are reset, the others
    # resume exactly.
    ids = publish_ok(b, [{"topic": t, "data": data_of(t, n)} for t in topics])
    _, v = vec(ids[-1])
    cut = f"{epoch}-{big}.{v[1]}.{v[2]}"
    publish_ok(a, [{"topic": t, "data": data_of(t, n + 1)} for t in topics])
    with a.stream(path(*topics), headers={"Last-Event-ID": cut}) as s:
        assert s.status == 200
        evs = drain(s, 1 + 4, extra=0.2)
        assert evs and evs[0].event == "ssegw.reset", evs[:3]
        assert set(json.loads(evs[0].data)["topics"]) == {t for t in topics if shard_of(t) == 0}
        assert per_topic(evs[1:]) == {t: [n + 1] for t in topics if shard_of(t) != 0}
    # Malformed ids are a 400, not a reset.
    for bad in ("nodash", "abc-1.x.3", "ABC-1.2.3"):
        s = a.stream(path(*topics), headers={"Last-Event-ID": bad})
        assert s.status == 400, (bad, s.status)


# -- 7. presence ----------------------------------------------------------------------------------------


def test_admin_topic_counts_subscribers_on_both_gateways(env):
    a, b = env.a, env.b
    for t in [f"pres{run_id()}"]:
        streams = [a.stream(path(t)) for _ in range(2)] + [b.stream(path(t)) for _ in range(3)]
        try:
            assert all(s.status == 200 for s in streams)
            assert wait_until(lambda t=t: [subscribers(a, t), subscribers(b, t)] == [5, 5], 4, 0.1), \
                [subscribers(a, t), subscribers(b, t)]
            for s in streams[:2]:
                s.close()
            assert wait_until(lambda t=t: [subscribers(a, t), subscribers(b, t)] == [3, 3], 4, 0.1), \
                [subscribers(a, t), subscribers(b, t)]
        finally:
            for s in streams:
                s.close()
        assert wait_until(lambda t=t: [subscribers(a, t), subscribers(b, t)] == [0, 0], 4, 0.1)


# -- 8. a backend publishing straight into the cluster ------------------------------------------


def _redis_cli_fcall(port: int, numkeys: int, *words: str) -> list[str]:
    out = subprocess.run(["redis-cli", "-c", "-p", str(port), "FCALL", "ssegw_publish", str(numkeys), *words],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines and not out.stdout.startswith("(error)") and "ERR" not in out.stdout, out.stdout
    return lines


def direct_publish(env: Env, port: int, msgs: list[tuple[str, str]], token: str | None = None
                   ) -> tuple[list[str], str]:
    """FCALL ssegw_publish the way a backend does it (README "Publishing straight into
    Redis"): the shard from crc32 and the tags in ``ssegw:shards``; all messages of one call
    on one shard.  Sent with ``redis-cli -c`` to ``port`` (any node: it follows MOVED)."""
    tags = env.tags()
    ks = {zlib.crc32(t.encode()) % len(tags) for t, _ in msgs}
    assert len(ks) == 1, "one call publishes on one shard"
    p = "{" + tags[ks.pop()] + "}"
    token = token or f"{p}:req:{uuid.uuid4()}"
    keys = [f"{p}:seq", f"{p}:epoch", f"{p}:clock", token, *(f"{p}:h:{t}" for t, _ in msgs)]
    args = [str(len(msgs)), "7200000"]
    for t, body in msgs:
        args += [f"{p}:c:{t}", "", "0", body, "1000", "3600000"]
    return _redis_cli_fcall(port, len(keys), *keys, *args), token


def test_backend_fcall_into_the_cluster_reaches_subscribers(env):
    a, b = env.a, env.b
    topics = spread(2, f"fc{run_id()}")
    sa, sb = a.stream(path(*topics)), b.stream(path(*topics))
    with sa, sb:
        assert sa.status == 200 and sb.status == 200
        epochs = {s["tag"]: s["epoch"] for s in a.stats()["broker"]["shards"]}
        tags = env.tags()
        sent: dict[str, list[int]] = {t: [] for t in topics}
        seqs: dict[str, int] = {}
        for i, t in enumerate(topics):
            port = env.c.nodes[i % NSHARDS].port  # often not the node of the topic's slot
            reply, _ = direct_publish(env, port, [(t, f"event: tick\ndata: {data_of(t, 0)}\n")])
            assert reply[0] == epochs[tags[shard_of(t)]], (reply, epochs)
            seqs[data_of(t, 0)] = int(reply[1])
            sent[t].append(0)
        # A batch of two topics of one shard, and a retry with the same token (no double publish).
        t1, t2 = topics[0], topics[3]
        assert shard_of(t1) == shard_of(t2)
        batch = [(t1, f"event: tick\ndata: {data_of(t1, 1)}\n"), (t2, f"event: tick\ndata: {data_of(t2, 1)}\n")]
        reply, token = direct_publish(env, env.c.nodes[2].port, batch)
        again, _ = direct_publish(env, env.c.nodes[0].port, batch, token)
        assert again == reply, (again, reply)
        seqs[data_of(t1, 1)], seqs[data_of(t2, 1)] = int(reply[1]), int(reply[2])
        sent[t1].append(1)
        sent[t2].append(1)
        total = sum(map(len, sent.values()))
        for s in (sa, sb):
            evs = drain(s, total, extra=0.3)
            assert len(evs) == total, evs
            assert all(e.event == "tick" and ID_RE.match(e.id) for e in evs), evs
            assert per_topic(evs) == sent
            for e in evs:
                t, _ = parse_data(e.data)
                assert vec(e.id)[1][shard_of(t)] == seqs[e.data], (e.id, seqs[e.data])
        # And the direct publishes are history like any other: a resume from the first one.
        first = sa.events[0]
        with b.stream(path(*topics), headers={"Last-Event-ID": first.id}) as r:
            assert per_topic(drain(r, total - 1, extra=0.2)) == per_topic(sa.events[1:])


# -- 9. a node dies and comes back --------------------------------------------------------------


class Reader(threading.Thread):
    def __init__(self, s: Stream, topics: list[str], label: str) -> None:
        super().__init__(daemon=True, name=label)
        self.s = s
        self.topics = topics
        self.label = label
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set() and not self.s.closed:
            self.s.pump(0.05)

    def stop(self) -> None:
        self.halt.set()
        self.join(5)


def _status(g: Gateway, msgs: object) -> int:
    try:
        return g.publish(msgs).status
    except OSError:
        return -1


def test_node_killed_and_restarted_while_publishing(redis_cluster, tmp_path):
    """SIGKILL the node of one shard for ~1.5 s (it comes back with its append-only file) while
    two publishers run on topics of all shards and a third on the other shards' topics, through
    both gateways.  During the outage the dead shard's topics get 503 and the other shards keep
    publishing and delivering.  Publishes answered 503 are re-sent (nothing was published);
    every acknowledged event reaches every subscriber exactly once, in order, with no reset and
    no stream closed."""
    c = redis_cluster
    env = make_env(c, tmp_path)
    victim_shard = 1
    run = run_id()
    mixed = spread(2, f"nk{run}")
    # (A publisher whose request touches the dead shard keeps re-sending it until the node is
    # back; this one's topics are all on the other shards, so it keeps publishing.)
    steady = [topics_on(k, 1, f"nk{run}")[0] for k in range(NSHARDS) if k != victim_shard]
    topics = mixed + steady
    readers: list[Reader] = []
    pubs = [LoadPublisher(env.gws, mixed[0::2], 21, retry_503=True),
            LoadPublisher(env.gws[::-1], mixed[1::2], 22, retry_503=True),
            LoadPublisher(env.gws, steady, 23, retry_503=True)]
    victim = env.node_of_shard(victim_shard)
    try:
        for label, g, ts in (("all@A", env.a, topics), ("all@B", env.b, topics),
                             ("victim@B", env.b, [t for t in topics if shard_of(t) == victim_shard]),
                             ("others@A", env.a, [t for t in topics if shard_of(t) != victim_shard])):
            s = g.stream(path(*ts))
            assert s.status == 200, s.error_body
            readers.append(Reader(s, ts, label))
        for r in readers:
            r.start()
        for p in pubs:
            p.start()
        time.sleep(1.5)
        victim.kill()
        down = time.monotonic()
        others_at_kill = len(readers[3].s.events)
        # While the node is down: its shard's topics are refused (503, nothing published), the
        # other shards keep working, and the gateways do not call themselves ready.
        # (Once the gateways have seen it go: a publish sent just before that may be on a
        # connection that was already dead, and then waits for Redis to resolve it.)
        for g in env.gws:
            assert wait_until(lambda g=g: not g.stats()["broker"]["shards"][victim_shard]["up"], 3, 0.01)
        dead = topics_on(victim_shard, 1, "nkdead")[0]
        live = [topics_on(k, 1, "nklive")[0] for k in range(NSHARDS) if k != victim_shard]
        seen = {}
        for i, g in enumerate(env.gws):
            seen[f"gw{i} publish dead shard"] = _status(g, {"topic": dead, "data": "p"})
            seen[f"gw{i} publish dead+live shards"] = _status(g, [{"topic": t, "data": "p"} for t in [*live, dead]])
            seen[f"gw{i} publish live shards"] = _status(g, [{"topic": t, "data": "p"} for t in live])
            with g.stream(path(*live)) as s:
                seen[f"gw{i} new stream, live shards"] = s.status
            with g.stream(path(live[0], dead)) as s:
                seen[f"gw{i} new stream, dead shard"] = s.status
            seen[f"gw{i} readyz"] = g.request("GET", "/readyz", admin=True).status
        outage_checks = time.monotonic() - down
        time.sleep(max(0.0, 1.5 - (time.monotonic() - down)))
        others_in_outage = len(readers[3].s.events) - others_at_kill
        victim.start()
        up = time.monotonic()
        c.wait_ok(20)
        for g in env.gws:
            assert wait_until(lambda g=g: ready(g), 15, 0.05), "gateway did not recover"
        time.sleep(1.5)
    finally:
        for p in pubs:
            p.stop()
    try:
        want_seen = {}
        for i in range(2):
            want_seen.update({f"gw{i} publish dead shard": 503, f"gw{i} publish dead+live shards": 503,
                              f"gw{i} publish live shards": 200, f"gw{i} new stream, live shards": 200,
                              f"gw{i} new stream, dead shard": 503, f"gw{i} readyz": 503})
        assert outage_checks < 1.5, f"the outage checks took {outage_checks:.2f}s: {seen}"
        assert seen == want_seen, seen
        assert others_in_outage > 10, f"the other shards' subscriber got {others_in_outage} events in the outage"
        acked = {t: a for p in pubs for t, a in p.acked.items()}
        for p in pubs:
            assert not p.unexpected, p.unexpected[:5]
            # A 2xx for the dead shard only from requests sent before the kill or answered
            # after the restart (a request in flight waits for Redis and gets its real answer).
            bad = [(round(t0 - down, 3), round(t1 - down, 3)) for t0, t1, code, shards in p.log
                   if code == 200 and victim_shard in shards and down + 0.3 < t0 and t1 < up]
            assert not bad, f"2xx for the dead shard while its node was down: {bad[:5]}"
        for t, a in acked.items():
            assert [x.n for x in a] == list(range(len(a))), t
            assert len(a) > 10, (t, len(a))
        for r in readers:
            want = {t: [x.n for x in acked[t]] for t in r.topics}
            n = sum(map(len, want.values()))
            assert wait_until(lambda r=r, n=n: len(r.s.events) >= n, 10, 0.05), (r.label, len(r.s.events), n)
            time.sleep(0.3)
            evs = r.s.events
            assert not any(e.event == "ssegw.reset" for e in evs), f"{r.label} got a reset"
            assert not r.s.closed, f"{r.label}: stream closed"
            assert len({e.id for e in evs}) == len(evs), f"{r.label}: an id repeated"
            got = per_topic(evs)
            for t in r.topics:
                assert got.get(t, []) == want[t], (r.label, t, shard_of(t), got.get(t, [])[:20], want[t][:20])
        for g in env.gws:
            br = g.stats()["broker"]
            assert br["up"] and br["gap_lost"] == 0, br
            assert all(s["up"] for s in br["shards"]), br
    finally:
        for r in readers:
            r.stop()
            r.s.close()
        close_env(env)

"""The supervisor (``ssegw serve --workers N --redis URL``) with real worker processes, a real
redis-server and real signals: aggregation of the admin routes, cross-worker fan-out, crash
restart, zero-downtime SIGHUP reload, SIGTERM drain, and the startup checks of ``--workers``.
Also SIGHUP with one worker, where the reload happens inside the process (cli.Generations)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from checks import alive, ids, open_streams, publish, started, stop_supervised, uniq
from checks import worker_stats as stats
from harness import ROOT, Gateway, Stream, read_head, request, wait_until
from test_multihost import Publisher

WORKER_EXITED = re.compile(r"worker (\d+) exited")


# -- helpers ---------------------------------------------------------------------------------


def streams_open(g: Gateway) -> list[int]:
    return sorted(w["streams_open"] for w in stats(g))


def wait_ready(g: Gateway, n: int, timeout: float = 15.0) -> None:
    def ok() -> bool:
        try:
            return (g.request("GET", "/readyz", admin=True, timeout=2).status == 200
                    and len(stats(g)) == n)
        except OSError:
            return False

    assert wait_until(ok, timeout, 0.1), f"{n} workers not ready:\n" + "".join(g.log)


def wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


@pytest.fixture
def cluster(redis_server, tmp_path):
    """Start supervisors on the test's redis-server; stop them and kill any leftover worker."""
    made: list[Gateway] = []

    def make(*args: str, workers: int = 2) -> Gateway:
        g = Gateway("--redis", redis_server.url, "--drain-timeout", "1s", "--flush-interval", "10ms",
                    "--heartbeat-interval", "1s", "--workers", str(workers), *args, tmp_path=tmp_path)
        made.append(g)
        g.start()
        wait_ready(g, workers or (os.cpu_count() or 1))
        return g

    yield make
    for g in made:
        stop_supervised(g)


# -- N workers serve, and the admin listener aggregates them -------------------------------


def test_two_workers_serve_and_admin_aggregates(cluster):
    g = cluster()
    topic = uniq("agg")
    streams = open_streams(g, topic, 20)
    try:
        assert wait_until(lambda: sum(streams_open(g)) == 20, 5, 0.05), stats(g)
        ws = stats(g)
        assert len(ws) == 2
        assert len({w["pid"] for w in ws}) == 2
        assert all(w["streams_open"] > 0 for w in ws), f"one worker got every stream: {ws}"
        m = g.metrics()
        assert m["ssegw_workers"] == 2
        assert m["ssegw_streams_open"] == 20
        assert m["ssegw_connections_open"] == 20
        assert m["ssegw_worker_restarts_total"] == 0
        before = m["ssegw_events_delivered_total"]

        eid = publish(g, topic, "hello")
        for s in streams:
            assert [(e.id, e.data) for e in s.wait_events(1, 5)] == [(eid, "hello")]
        assert wait_until(lambda: g.metrics()["ssegw_events_delivered_total"] - before == 20, 5, 0.05), g.metrics()
        ws = stats(g)
        assert sum(w["events_delivered"] for w in ws) == 20
        assert all(w["events_delivered"] > 0 for w in ws), ws
    finally:
        for s in streams:
            s.close()
    assert wait_until(lambda: g.metrics()["ssegw_streams_open"] == 0, 5, 0.05)


def test_publish_on_public_port_reaches_subscribers_on_both_workers(cluster):
    g = cluster()
    topic = uniq("cross")
    streams = open_streams(g, topic, 12)
    try:
        assert wait_until(lambda: sum(streams_open(g)) == 12, 5, 0.05)
        assert all(n > 0 for n in streams_open(g)), stats(g)
        # Each publish is a new connection: the kernel spreads them over both workers, so
        # events accepted by one worker must reach the subscribers held by the other.
        sent = [publish(g, topic, f"m{i}") for i in range(16)]
        ws = stats(g)
        assert all(w["events_published"] > 0 for w in ws), f"all publishes hit one worker: {ws}"
        for s in streams:
            s.wait_events(16, 5)
            assert ids(s) == sent
            assert [e.data for e in s.events] == [f"m{i}" for i in range(16)]
    finally:
        for s in streams:
            s.close()


# -- a crashed worker is restarted; the others keep serving -----------------------------------


def publish_retrying(g: Gateway, topic: str, data: str, timeout: float = 5.0) -> str:
    """Publish as the contract allows a publisher to: a 503 published nothing, so retry it."""
    deadline = time.monotonic() + timeout
    while True:
        r = g.publish({"topic": topic, "data": data})
        if r.status != 503 or time.monotonic() > deadline:
            assert r.status == 200, r
            return r.json()["ids"][0]
        time.sleep(0.05)


def brokers_up(g: Gateway, n: int) -> bool:
    ws = stats(g)
    return len(ws) == n and all(w["broker"]["up"] for w in ws)


def test_killed_worker_is_restarted_others_keep_serving(cluster):
    g = cluster("--retry", "200ms")
    topic = uniq("crash")
    streams = open_streams(g, topic, 16)
    resumed: list[Stream] = []
    try:
        assert wait_until(lambda: sum(streams_open(g)) == 16, 5, 0.05)
        first = publish(g, topic, "e1")
        for s in streams:
            assert ids(s.wait_events(1, 5)) == [first]
        ws = stats(g)
        victim = ws[0]["pid"]
        victim_streams = ws[0]["streams_open"]
        assert 0 < victim_streams < 16, ws
        n_started = len(started(g))
        slot = next(slot for pid, slot, _ in started(g) if pid == victim)

        os.kill(victim, signal.SIGKILL)
        # Its clients see their streams end; the others stay open.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sum(s.closed for s in streams) < victim_streams:
            for s in streams:
                s.pump(0.01)
        dead = [s for s in streams if s.closed]
        live = [s for s in streams if not s.closed]
        assert len(dead) == victim_streams, f"{len(dead)} closed, expected {victim_streams}"

        # The survivors keep receiving while the slot restarts (a publisher retries a 503).
        missed = [publish_retrying(g, topic, f"e{i}") for i in range(2, 6)]
        for s in live:
            s.wait_events(5, 5)
            assert ids(s) == [first, *missed], "a surviving stream lost events"
            assert not s.closed

        # Restarted: a new `worker ... started` line for the same slot, 2 workers again.
        assert wait_until(lambda: len(started(g)) > n_started, 5, 0.05), "".join(g.log)
        new_pid, new_slot, gen = started(g)[-1]
        assert new_pid != victim and new_slot == slot and gen == 1
        assert wait_until(lambda: brokers_up(g, 2), 5, 0.1), stats(g)
        assert victim not in {w["pid"] for w in stats(g)}
        assert not alive(victim)
        assert g.metrics()["ssegw_worker_restarts_total"] == 1
        assert g.request("GET", "/readyz", admin=True).status == 200

        # The killed worker's clients resume with Last-Event-ID: exactly what they missed.
        for s in dead:
            assert ids(s) == [first]
            r = g.stream(f"/events?topic={topic}", {"Last-Event-ID": first})
            assert r.status == 200, r.error_body
            resumed.append(r)
        last = publish(g, topic, "e6")
        for r in resumed:
            r.wait_events(5, 5)
            assert ids(r) == [*missed, last]
            assert [e.data for e in r.events] == ["e2", "e3", "e4", "e5", "e6"]
        for s in live:
            assert ids(s.wait_events(6, 5))[-1] == last
    finally:
        for s in streams + resumed:
            s.close()


def test_connections_queued_during_a_restart_are_served(cluster):
    g = cluster()
    topic = uniq("queued")
    victim = stats(g)[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    # 16 connections at once while the worker is down (restart backoff is 0.25 s): about
    # half of them wait in the dead worker's slot socket, which the supervisor keeps open.
    socks = []
    statuses = []
    try:
        for _ in range(16):
            s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
            s.sendall(f"GET /events?topic={topic} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            socks.append(s)
        for s in socks:
            status, _, _ = read_head(s, bytearray(), 10)
            statuses.append(status)
    finally:
        for s in socks:
            s.close()
    assert statuses == [200] * 16, statuses


# -- SIGHUP: zero-downtime reload ---------------------------------------------------------------


class Hammer(threading.Thread):
    """Opens a new /events connection every ``period`` s: connect, request, read the 200 head
    and the first stream bytes, close.  Records every failure as (kind, detail)."""

    def __init__(self, port: int, topic: str, period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.req = (f"GET /events?topic={topic} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    "Accept: text/event-stream\r\n\r\n").encode()
        self.period = period
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[tuple[str, str]] = []

    def one(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                s.sendall(self.req)
                buf = bytearray()
                status, _, _ = read_head(s, buf, 8)
                if status != 200:
                    self.failures.append((f"status {status}", bytes(buf)[:200].decode("latin-1")))
                    return
                if not buf:
                    s.settimeout(5)
                    buf += s.recv(4096)
                if not buf:
                    self.failures.append(("eof", "200 head, then EOF without a stream byte"))
                    return
                self.ok += 1
        except ConnectionRefusedError as e:
            self.failures.append(("refused", str(e)))
        except ConnectionResetError as e:
            self.failures.append(("reset", str(e)))
        except TimeoutError as e:
            self.failures.append(("timeout", str(e)))
        except ConnectionError as e:  # read_head: closed before a response head
            self.failures.append(("eof", str(e)))
        except OSError as e:
            self.failures.append((type(e).__name__, str(e)))

    def run(self) -> None:
        nxt = time.monotonic()
        while not self.stop.is_set():
            self.one()
            nxt += self.period
            time.sleep(max(0.0, nxt - time.monotonic()))


def exited(g: Gateway) -> set[int]:
    return {int(m.group(1)) for m in map(WORKER_EXITED.search, list(g.log)) if m}


def test_sighup_reload_is_zero_downtime(cluster):
    g = cluster("--retry", "200ms")
    topic = uniq("hup")
    old_pids = {w["pid"] for w in stats(g)}
    assert old_pids == {pid for pid, _, gen in started(g) if gen == 1}
    subs = open_streams(g, topic, 8)
    hammer = Hammer(g.port, uniq("hammer"))
    published: list[str] = []
    resumed: list[Stream] = []
    try:
        assert wait_until(lambda: sum(streams_open(g)) == 8, 5, 0.05)
        published.append(publish(g, topic, "p0"))
        for s in subs:
            assert ids(s.wait_events(1, 5)) == published
        retries_before = [len(s.parser.retries) for s in subs]

        hammer.start()
        time.sleep(1.0)
        t_hup = time.monotonic()
        g.send(signal.SIGHUP)
        # Keep publishing through the reload (a 503 publishes nothing and may be retried, as
        # the contract allows); keep every subscriber reading.
        while time.monotonic() - t_hup < 3.0:
            published.append(publish_retrying(g, topic, f"p{len(published)}"))
            for s in subs:
                s.pump(0.005)
            time.sleep(0.05)
        hammer.stop.set()
        hammer.join(10)
        # No new connection is refused, reset or closed unanswered: the slot sockets outlive
        # the generations.
        hard = [f for f in hammer.failures if not f[0].startswith("status ")]
        assert not hard, f"{len(hard)} failures ({hammer.ok} ok): {hard[:5]}"
        # The one non-200 answer seen here is the new generation's 503 before its broker is
        # up: test_sighup_new_generation_answers_every_connection (xfail) holds that bug; once
        # it is fixed, that test XPASSes and this tolerance goes.
        other = [f for f in hammer.failures if f[0] != "status 503" or '"unavailable"' not in f[1]]
        assert not other, f"{len(other)} non-200 answers ({hammer.ok} ok): {other[:5]}"
        assert hammer.ok >= 20, (hammer.ok, hammer.failures)

        # Generation 2 started on every slot; generation 1 drained and exited.
        gen2 = {slot: pid for pid, slot, gen in started(g) if gen == 2}
        assert sorted(gen2) == [0, 1], "".join(g.log)
        assert any("reload: generation 2 ready" in line for line in g.log), "".join(g.log)
        assert wait_until(lambda: {w["pid"] for w in stats(g)} == set(gen2.values()), 5, 0.1), stats(g)
        assert wait_until(lambda: old_pids <= exited(g), 5, 0.1), "".join(g.log)
        assert wait_until(lambda: not any(alive(p) for p in old_pids), 5, 0.1)
        assert all(alive(p) for p in gen2.values())
        assert g.metrics()["ssegw_worker_restarts_total"] == 0, "a reload is not a crash"

        # The old generation's subscribers got a retry: hint and a closed stream.
        for s, before in zip(subs, retries_before, strict=True):
            assert s.wait_closed(5), "an old-generation stream was not closed"
            assert len(s.parser.retries) > before, "closed without a retry: hint"
            assert s.ended, "stream not ended with the last chunk"
        # They resume losing nothing.
        for s in subs:
            seen = ids(s)
            assert seen == published[:len(seen)]
            r = g.stream(f"/events?topic={topic}", {"Last-Event-ID": seen[-1]})
            assert r.status == 200, r.error_body
            resumed.append(r)
        published.append(publish(g, topic, "last"))
        for s, r in zip(subs, resumed, strict=True):
            r.wait_for(lambda x: published[-1] in ids(x), 5)
            assert ids(s) + ids(r) == published
    finally:
        hammer.stop.set()
        for s in subs + resumed:
            s.close()


def test_sighup_new_generation_answers_every_connection(cluster):
    """The 50 ms loop of the reload test, plus dense connection bursts while the new generation
    starts (where the kernel begins handing it connections): every one must get its 200."""
    g = cluster()
    topic = uniq("hupdense")
    hammers = [Hammer(g.port, topic)]
    try:
        hammers[0].start()
        time.sleep(0.5)
        g.send(signal.SIGHUP)
        assert wait_until(lambda: any(gen == 2 for _, _, gen in started(g)), 5, 0.005), "".join(g.log)
        for _ in range(4):
            h = Hammer(g.port, topic, period=0.002)
            h.start()
            hammers.append(h)
        assert wait_until(lambda: any("generation 2 ready" in line for line in g.log), 10, 0.01), "".join(g.log)
        time.sleep(0.5)
    finally:
        for h in hammers:
            h.stop.set()
        for h in hammers:
            h.join(10)
    # A connection an old worker accepted just before its drain began is answered 503
    # "draining" with Retry-After (CONTRACT); anything else -- refused, reset, unanswered,
    # or a new worker's 503 before its broker is up -- is a failure.
    failures = [f for h in hammers for f in h.failures
                if not (f[0] == "status 503" and '"draining"' in f[1])]
    assert sum(h.ok for h in hammers) > 100
    assert not failures, f"{len(failures)} failures: {failures[:5]}"


def test_sighup_old_generation_answers_connections_it_accepted(cluster):
    g = cluster()
    topic = uniq("hupearly")
    # Connected (and accepted by a generation-1 worker) but the request not sent yet: a
    # client whose request is still in flight when the reload drains its worker.
    socks = [socket.create_connection(("127.0.0.1", g.port), timeout=5) for _ in range(4)]
    try:
        time.sleep(0.3)
        assert sum(w["connections_open"] for w in stats(g)) == 4, stats(g)
        g.send(signal.SIGHUP)
        # Both old workers have begun draining (each logs `draining: ...`).
        assert wait_until(lambda: any("generation 2 ready" in line for line in g.log), 10, 0.005)
        mark = next(i for i, line in enumerate(g.log) if "generation 2 ready" in line)
        assert wait_until(lambda: sum("ssegw.worker: draining" in line for line in g.log[mark:]) >= 2, 5, 0.002)
        results = []
        for s in socks:
            try:
                s.sendall(f"GET /events?topic={topic} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                status, headers, _ = read_head(s, bytearray(), 5)
                results.append(f"{status} retry-after={'retry-after' in headers}")
            except OSError as e:
                results.append(f"{type(e).__name__}: {e}")
    finally:
        for s in socks:
            s.close()
    # Accepted before the drain, so answered (CONTRACT: 503 while draining, with
    # Retry-After), never closed unanswered.
    assert results == ["503 retry-after=True"] * 4, results


# -- SIGHUP with one worker: the reload happens inside the process ------------------------------


@pytest.mark.parametrize("broker", ["memory", "redis"])
def test_sighup_with_one_worker_is_zero_downtime(request, tmp_path, broker):
    """CONTRACT Lifecycle: "SIGHUP: zero-downtime reload ..., with one worker or many".  A
    publisher and new subscribers keep coming through the reload and none fails; the old
    streams end with a retry: hint and resume on the new generation losing nothing (history
    carries across, also with the embedded broker: no ssegw.reset); the re-read config is in
    effect for new streams."""
    cfg = tmp_path / "one.toml"
    cfg.write_text('retry = "1s"\n')
    extra = ("--redis", request.getfixturevalue("redis_server").url) if broker == "redis" else ()
    g = Gateway("--config", str(cfg), "--drain-timeout", "1s", "--flush-interval", "10ms",
                "--heartbeat-interval", "1s", *extra)
    topic = uniq("hup1")
    subs: list[Stream] = []
    resumed: list[Stream] = []
    hammer = Hammer(0, uniq("hammer1"), period=0.02)
    pub = Publisher(g, topic)
    try:
        g.start()
        assert g.proc is not None
        subs = open_streams(g, topic, 4)
        assert all(s.parser.retries == [1000] for s in subs)
        hammer.port = g.port
        hammer.start()
        pub.start()
        time.sleep(0.5)
        cfg.write_text('retry = "2s"\n')
        g.send(signal.SIGHUP)
        t_hup = time.monotonic()
        while time.monotonic() - t_hup < 2.5:
            for s in subs:
                s.pump(0.01)
        pub.stop.set()
        hammer.stop.set()
        pub.join(10)
        hammer.join(10)

        assert any("reload: generation 2 serving" in line for line in g.log), "".join(g.log)
        assert g.proc.poll() is None, "the process is the same one"
        assert not pub.errors, pub.errors[:5]
        assert len(pub.ids) >= 40
        assert not hammer.failures, f"{len(hammer.failures)} failures ({hammer.ok} ok): {hammer.failures[:5]}"
        assert hammer.ok >= 50

        # Old streams: every event up to their close (published on either generation), then
        # a retry: hint and the last chunk.
        for s in subs:
            assert s.wait_closed(3), "an old-generation stream was not closed"
            assert s.ended and len(s.parser.retries) == 2
            seen = ids(s)
            assert seen == pub.ids[:len(seen)]
            assert len(seen) >= 10
        # They resume on the new generation and miss nothing; new streams have the new retry.
        for s in subs:
            r = g.stream(f"/events?topic={topic}", {"Last-Event-ID": ids(s)[-1]})
            assert r.status == 200, r.error_body
            resumed.append(r)
        last = publish(g, topic, "last")
        for s, r in zip(subs, resumed, strict=True):
            assert r.wait_for(lambda x: last in ids(x), 5)
            assert not [e for e in r.events if e.event == "ssegw.reset"], "history did not carry across"
            assert ids(s) + ids(r) == [*pub.ids, last]
            assert r.parser.retries[0] == 2000, "the re-read config is not in effect"
        m = g.metrics()
        assert m["ssegw_workers"] == 1
        assert m["ssegw_events_published_total"] == len(pub.ids) + 1
    finally:
        pub.stop.set()
        hammer.stop.set()
        for s in subs + resumed:
            s.close()
        stop_supervised(g)


def test_sighup_with_one_worker_keeps_serving_on_a_bad_config(gateway, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('retry = "1s"\n')
    g = gateway("--config", str(cfg), "--drain-timeout", "1s")
    topic = uniq("hupbad")
    with g.stream(f"/events?topic={topic}") as s:
        cfg.write_text("no_such_key = 1\n")
        g.send(signal.SIGHUP)
        assert wait_until(lambda: any("generation 1 keeps serving" in line for line in g.log), 5, 0.05), \
            "".join(g.log)
        eid = publish(g, topic, "still here")
        assert ids(s.wait_events(1, 3)) == [eid]
        assert not s.closed
    cfg.write_text('retry = "3s"\n')
    g.send(signal.SIGHUP)
    assert wait_until(lambda: any("generation 2 serving" in line for line in g.log), 5, 0.05), "".join(g.log)
    with g.stream(f"/events?topic={topic}") as s2:
        assert s2.parser.retries[0] == 3000


# -- SIGTERM: drain everything, exit 0 ------------------------------------------------------------


def test_sigterm_drains_all_workers_and_exits_0(cluster):
    g = cluster("--drain-timeout", "2s", "--retry", "1s")
    topic = uniq("term")
    streams = open_streams(g, topic, 10)
    try:
        sigterm_drain(g, streams)
    finally:
        for s in streams:
            s.close()


def sigterm_drain(g: Gateway, streams: list[Stream]) -> None:
    assert wait_until(lambda: sum(streams_open(g)) == 10, 5, 0.05)
    pids = [w["pid"] for w in stats(g)]
    assert len(pids) == 2 and all(alive(p) for p in pids)
    retries_before = [len(s.parser.retries) for s in streams]
    assert g.proc is not None
    t0 = time.monotonic()
    g.send(signal.SIGTERM)
    # The signal reaches the loop asynchronously: a probe racing it may see 200 for a moment.
    r = request(g.admin_port, "GET", "/readyz", timeout=2)
    while r.status == 200 and time.monotonic() - t0 < 1.0:
        r = request(g.admin_port, "GET", "/readyz", timeout=2)
    assert time.monotonic() - t0 < 0.3, "readyz did not turn 503 at once"
    assert r.status == 503, r
    assert set(r.json()) == {"error", "detail"}

    closed_at: dict[int, float] = {}
    deadline = t0 + 6
    while len(closed_at) < len(streams) and time.monotonic() < deadline:
        for i, s in enumerate(streams):
            if i not in closed_at:
                s.pump(0.01)
                if s.closed:
                    closed_at[i] = time.monotonic() - t0
    assert len(closed_at) == len(streams), f"only {len(closed_at)} streams closed"
    assert max(closed_at.values()) < 2.0 + 0.8, closed_at
    for s, before in zip(streams, retries_before, strict=True):
        assert len(s.parser.retries) > before, "stream closed without a retry: hint"
        assert 500 <= s.parser.retries[-1] <= 1500
    code = wait_exit(g.proc, 10)
    assert code == 0, "".join(g.log)
    assert wait_until(lambda: not any(alive(p) for p in pids), 3, 0.05), [p for p in pids if alive(p)]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", g.port), timeout=2).close()


# -- --workers startup checks ------------------------------------------------------------------


def test_workers_without_redis_is_a_startup_error():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSEGW_")}
    proc = subprocess.run([sys.executable, "-m", "ssegw", "serve", "--port", "0", "--admin-port", "0",
                           "--workers", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=20)
    assert proc.returncode != 0
    assert "workers" in proc.stderr, proc.stderr
    assert "serving on" not in proc.stderr


@pytest.mark.skipif((os.cpu_count() or 1) > 8, reason="would start one worker per CPU")
def test_workers_0_means_one_per_cpu(cluster):
    n = os.cpu_count() or 1
    g = cluster(workers=0)
    assert len(stats(g)) == n
    assert sorted(slot for _, slot, _ in started(g)) == list(range(n))
    assert f"{n} workers" in "".join(g.log)
    assert g.metrics()["ssegw_workers"] == n
    topic = uniq("cpu")
    streams = open_streams(g, topic, 2)
    try:
        eid = publish(g, topic, "x")
        for s in streams:
            assert ids(s.wait_events(1, 5)) == [eid]
    finally:
        for s in streams:
            s.close()


def test_max_connections_is_per_host_each_worker_enforcing_its_share(cluster):
    """Contract: max_connections is per host, each worker enforces its share.  With 2
    workers and max_connections 4, each worker admits 2 streams: the host never holds more
    than 4, and every worker refuses its third with 503 + Retry-After."""
    g = cluster("--max-connections", "4", workers=2)
    topic = uniq("cap")
    streams: list[Stream] = []
    try:
        codes = []
        for _ in range(12):
            s = g.stream(f"/events?topic={topic}")
            codes.append(s.status)
            if s.status == 200:
                streams.append(s)
            else:
                assert s.status == 503 and s.headers.get("retry-after"), (s.status, s.headers)
                s.close()
        per_worker = streams_open(g)
        assert codes.count(200) == sum(per_worker) <= 4, (codes, per_worker)
        assert all(n <= 2 for n in per_worker), per_worker
        assert codes.count(503) >= 8
    finally:
        for s in streams:
            s.close()


"""Two "hosts" -- two separate supervisors (``--workers 2``) on different ports -- sharing one
real redis-server: cross-host fan-out, cluster-wide presence, and a host dying under its
clients (they resume on the other host from their Last-Event-ID, losing nothing)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from checks import alive, ids, open_streams, publish, stop_supervised, uniq
from checks import topic_subscribers as subscribers
from checks import worker_stats as stats
from harness import Gateway, Stream, wait_until

#: The Redis broker's presence TTL (a vanished worker's subscribers stop counting after it).
PRESENCE_TTL = 15.0


# -- helpers ---------------------------------------------------------------------------------


def wait_ready(g: Gateway, n: int = 2, timeout: float = 15.0) -> None:
    def ok() -> bool:
        try:
            if g.request("GET", "/readyz", admin=True, timeout=2).status != 200:
                return False
            ws = stats(g)
            return len(ws) == n and all(w["broker"]["up"] for w in ws)
        except OSError:
            return False

    assert wait_until(ok, timeout, 0.1), f"{n} workers not ready:\n" + "".join(g.log)


def wait_subscribers(hosts: list[Gateway], topic: str, n: int, timeout: float) -> list[int | None]:
    seen: list[int | None] = []

    def ok() -> bool:
        seen[:] = [subscribers(g, topic) for g in hosts]
        return all(c == n for c in seen)

    wait_until(ok, timeout, 0.1)
    return seen


@pytest.fixture
def hosts(redis_server, tmp_path):
    """Two supervisors with 2 workers each on one redis-server; everything killed at the end."""
    made: list[Gateway] = []
    for _ in range(2):
        g = Gateway("--redis", redis_server.url, "--workers", "2", "--drain-timeout", "1s",
                    "--flush-interval", "10ms", "--heartbeat-interval", "1s", "--retry", "200ms",
                    tmp_path=tmp_path)
        made.append(g)
        g.start()
    for g in made:
        wait_ready(g)
    assert made[0].port != made[1].port and made[0].admin_port != made[1].admin_port
    yield made
    for g in made:
        stop_supervised(g)


# -- fan-out across hosts --------------------------------------------------------------------------


def test_publish_on_one_host_reaches_subscribers_on_the_other(hosts):
    a, b = hosts
    topic = uniq("xhost")
    on_a = open_streams(a, topic, 6)
    on_b = open_streams(b, topic, 6)
    try:
        sent = [publish(a, topic, "from-a"), publish(b, topic, "from-b")]
        sent += [publish(h, topic, f"m{i}") for i, h in enumerate([a, b, b, a])]
        for s in on_a + on_b:
            s.wait_events(len(sent), 5)
            assert ids(s) == sent
            assert [e.data for e in s.events] == ["from-a", "from-b", "m0", "m1", "m2", "m3"]
        # Every worker of both hosts delivered: each host's subscribers are spread over its
        # workers and every event reached all of them.
        for g in hosts:
            ws = stats(g)
            assert sum(w["events_delivered"] for w in ws) == 6 * len(sent)
    finally:
        for s in on_a + on_b:
            s.close()


# -- presence ----------------------------------------------------------------------------------------


def test_admin_topic_counts_subscribers_of_both_hosts(hosts):
    a, b = hosts
    topic = uniq("presence")
    assert [subscribers(a, topic), subscribers(b, topic)] == [0, 0]
    on_a = open_streams(a, topic, 3)
    on_b = open_streams(b, topic, 5)
    try:
        seen = wait_subscribers(hosts, topic, 8, 3.5)
        assert seen == [8, 8], seen
        for s in on_a:
            s.close()
        seen = wait_subscribers(hosts, topic, 5, 3.5)
        assert seen == [5, 5], seen
        other = uniq("presence")
        assert [subscribers(a, other), subscribers(b, other)] == [0, 0]
    finally:
        for s in on_a + on_b:
            s.close()
    seen = wait_subscribers(hosts, topic, 0, 3.5)
    assert seen == [0, 0], seen


# -- a host dies -------------------------------------------------------------------------------------


class Publisher(threading.Thread):
    """Publishes to ``topic`` through one host every ``period`` s, recording the ids in order."""

    def __init__(self, g: Gateway, topic: str, period: float = 0.03) -> None:
        super().__init__(daemon=True)
        self.g = g
        self.topic = topic
        self.period = period
        self.stop = threading.Event()
        self.ids: list[str] = []
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                r = self.g.publish({"topic": self.topic, "data": f"n{len(self.ids)}"})
            except OSError as e:
                self.errors.append(repr(e))
            else:
                if r.status == 200:
                    self.ids.append(r.json()["ids"][0])
                else:
                    self.errors.append(repr(r))
            time.sleep(self.period)


def test_host_killed_clients_resume_on_the_other_host(hosts):
    a, b = hosts
    topic = uniq("failover")
    on_a = open_streams(a, topic, 6)
    on_b = open_streams(b, topic, 2)
    resumed: list[Stream] = []
    pub = Publisher(b, topic)
    try:
        seen = wait_subscribers([b], topic, 8, 3.5)
        assert seen == [8], seen
        pub.start()
        assert wait_until(lambda: len(pub.ids) >= 10, 5, 0.02)

        # SIGKILL host A: its supervisor and every worker, at once.
        assert a.proc is not None
        a_workers = [w["pid"] for w in stats(a)]
        assert len(a_workers) == 2
        victims = [a.proc.pid, *a_workers]
        t_kill = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        a.proc.wait(5)
        assert wait_until(lambda: not any(alive(p) for p in victims), 5, 0.05), [p for p in victims if alive(p)]

        # A's clients see their streams end.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(s.closed for s in on_a):
            for s in on_a:
                s.pump(0.01)
        assert all(s.closed for s in on_a), f"{sum(not s.closed for s in on_a)} streams of the dead host still open"

        # They reconnect to host B with their Last-Event-ID while B keeps publishing.
        for s in on_a:
            assert s.events, "a client of host A saw no event before the kill"
            r = b.stream(f"/events?topic={topic}", {"Last-Event-ID": s.events[-1].id})
            assert r.status == 200, r.error_body
            resumed.append(r)
        n_at_reconnect = len(pub.ids)
        assert wait_until(lambda: len(pub.ids) >= n_at_reconnect + 15, 5, 0.02)
        pub.stop.set()
        pub.join(5)
        assert not pub.errors, pub.errors[:5]
        published = [*pub.ids, publish(b, topic, "last")]

        # Each gets exactly the events it missed, in order, once; B's own clients lost nothing.
        for old, new in zip(on_a, resumed, strict=True):
            new.wait_for(lambda x: published[-1] in ids(x), 5)
            assert ids(old) + ids(new) == published
            assert new.parser.events[-1].data == "last"
        for s in on_b:
            s.wait_for(lambda x: published[-1] in ids(x), 5)
            assert ids(s) == published

        # A's presence (6 subscribers it never unregistered) expires: B counts its own 8.
        left = PRESENCE_TTL + 5 - (time.monotonic() - t_kill)
        seen = wait_subscribers([b], topic, 8, max(left, 0.5))
        assert seen == [8], f"host A's presence still counted {time.monotonic() - t_kill:.1f}s after the kill: {seen}"
    finally:
        pub.stop.set()
        for s in on_a + on_b + resumed:
            s.close()
